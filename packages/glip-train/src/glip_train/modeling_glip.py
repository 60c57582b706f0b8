"""The GLIP detector: image encoder + FPN, text encoder, deep-fusion tower and ATSS head with word-region alignment.

``GLIP.forward`` is the explicit network pass on prepared tensors (``GLIPOutput`` holds every stage, for parity checks
and training); ``GLIP.detect`` / ``GLIP.ground`` are the user API: images and prompts in, boxes with phrases out, in
the Hugging Face zero-shot-detection result shape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from glip_data import TestTransform, chunk_classes, detection_prompt, find_noun_phrases, find_phrase_spans, pad_images, spans_to_tokens
from glip_encoders import TextEncoder, build_image_encoder, load_tokenizer

from .box_ops import AnchorGenerator
from .config import GLIPConfig
from .head import GLIPHead, HeadOutput
from .postprocess import ATSSPostProcessor, Detections, PostProcessConfig

__all__ = ["GLIP", "GLIPOutput", "ImageInput", "bundled_tokenizer_dir", "load_image"]

ImageInput = Union[str, Path, Image.Image, np.ndarray]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def bundled_tokenizer_dir() -> Path:
    """The bert-base-uncased vocabulary shipped with glip-train (the tokenizer of every official checkpoint)."""
    return Path(__file__).resolve().parent / "assets" / "bert-base-uncased"


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image (any mode) or an ``(H, W, 3)`` / ``(H, W)`` uint8 array.

    Grayscale, palette and RGBA images are converted to RGB (alpha is dropped, as the official ``convert('RGB')``).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}") from None
        except OSError as exc:
            raise OSError(f"cannot read image {path}: {exc}") from exc
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                f"numpy images must be uint8 (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; got {image.dtype} "
                f"{image.shape}"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, a PIL image or a uint8 array")


@dataclass
class GLIPOutput:
    """Every stage of one forward pass.

    Attributes:
        head: the head's raw outputs (tower results, box regression, centerness, word-region logits).
        fpn_features: P3..P7, each ``(B, C, H_l, W_l)``.
        backbone_features: C3..C5 when requested.
        text_hidden, text_embedded: ``(B, M, D)`` the text encoder's last layer and its padding-zeroed copy.
        text_mask: ``(B, M)`` bool.
        anchors: per level ``(H_l * W_l, 4)``.
        image_sizes: per image ``(h, w)`` of the unpadded network input.
    """

    head: HeadOutput
    fpn_features: list[torch.Tensor]
    backbone_features: list[torch.Tensor] | None
    text_hidden: torch.Tensor
    text_embedded: torch.Tensor
    text_mask: torch.Tensor
    anchors: list[torch.Tensor]
    image_sizes: list[tuple[int, int]]


@dataclass
class _TextQuery:
    """One prompt to run for one image: its text, and for each class it scores, the tokens and the output label."""

    image_index: int
    text: str
    class_tokens: list[list[int]]
    labels: list[int]  # output label (index into the image's class list) of each class column


class GLIP(nn.Module):
    """GLIP: grounded language-image pre-training detector.

    Module names follow the official checkpoint: ``backbone.body`` / ``backbone.fpn`` (image encoder),
    ``language_backbone.model`` (BERT), ``head.dyhead_tower`` (fusion) and ``head.*`` predictors.

    Args:
        config: the architecture.
        tokenizer: a tokenizer instance; default: the one named by ``config.tokenizer`` or the bundled
            bert-base-uncased vocabulary.
    """

    def __init__(self, config: GLIPConfig, tokenizer: Any = None):
        super().__init__()
        self.config = config
        self.backbone = build_image_encoder(config.image_encoder, out_channels=config.fpn_channels,
                                            **config.image_encoder_kwargs)
        self.language_backbone = TextEncoder.from_config(config.text_encoder)
        self.head = GLIPHead(config)
        self.anchor_generator = AnchorGenerator(config.anchor_sizes, config.anchor_strides)
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer or bundled_tokenizer_dir())
        self.tokenizer = tokenizer
        self.postprocessor = ATSSPostProcessor(PostProcessConfig(**config.postprocess))
        if len(config.anchor_strides) != 5:
            raise ValueError("GLIP uses five FPN levels (P3..P7); anchor_strides must have 5 entries")

    # ------------------------------------------------------------------------------------------------ weights
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        use_ema: bool = False,
        tokenizer: Any = None,
        trust_pickle: bool = False,
        map_location: str | torch.device = "cpu",
        verbose: bool = False,
        **config_overrides: Any,
    ) -> "GLIP":
        """Load a model.

        Args:
            path: an official checkpoint file (``.pth``: GLIP-T, GLIP-T(A), GLIP-L recognised from keys and
                shapes), a directory written by :meth:`save_pretrained`, or a weights recipe ``.json`` (the parity
                fixture's synthetic official-layout weights — meaningless boxes, for testing the whole path).
            use_ema: official checkpoints only: load ``"model_ema"`` instead of ``"model"``.
            tokenizer: override the tokenizer (instance or local directory).
            trust_pickle: allow arbitrary pickled objects in an official ``.pth`` (only for files you trust).
            map_location: device for the weights.
            verbose: print what was loaded, ignored and dropped.
            config_overrides: ``GLIPConfig`` fields to change (e.g. ``batch_invariant=True``, ``postprocess={...}``).
        """
        from . import checkpoint as ckpt

        path = Path(path)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if path.is_dir():
            config_file = path / CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"{path} is a directory without {CONFIG_NAME}: not written by save_pretrained")
            data = json.loads(config_file.read_text())
            config = GLIPConfig.from_dict({**data, **config_overrides})
            if tokenizer is None and (path / TOKENIZER_DIR).is_dir():
                tokenizer = load_tokenizer(path / TOKENIZER_DIR)
            model = cls(config, tokenizer=tokenizer)
            from safetensors.torch import load_file

            weights_file = path / WEIGHTS_NAME
            if not weights_file.is_file():
                raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
            state = load_file(str(weights_file), device=str(map_location))
            _load_strict(model, state, str(weights_file))
            return model

        if path.suffix == ".json":
            from .recipe import build_recipe_state_dict, load_recipe

            state_dict = build_recipe_state_dict(load_recipe(path))
            report = ckpt.LoadReport(source=str(path), used_entry="<weights recipe>")
        else:
            state_dict, report = ckpt.read_official_checkpoint(path, use_ema=use_ema, trust_pickle=trust_pickle)
        config = ckpt.infer_official_config(state_dict)
        if config_overrides:
            config = GLIPConfig.from_dict({**config.to_dict(), **config_overrides})
        model = cls(config, tokenizer=tokenizer)
        ours, dropped = ckpt.map_official_state_dict(state_dict, model)
        report.variant = config.name
        report.dropped_keys = dropped
        _load_strict(model, ours, str(path))
        model.load_report = report
        if verbose:
            print(report.summary())
        return model.to(map_location)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        config = self.config.to_dict()
        config["tokenizer"] = None  # the directory's own tokenizer/ wins on load
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "glip_config": self.config.name})
        return directory

    # ------------------------------------------------------------------------------------------------ network
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def level_image_masks(self, image_sizes: Sequence[tuple[int, int]], feature_sizes: Sequence[tuple[int, int]],
                          device: torch.device) -> list[torch.Tensor]:
        """Per level ``(B, H_l, W_l)`` bool: True where the location's top-left pixel lies in the unpadded image."""
        masks = []
        for (h_l, w_l), stride in zip(feature_sizes, self.config.anchor_strides):
            ys = torch.arange(h_l, device=device) * stride
            xs = torch.arange(w_l, device=device) * stride
            masks.append(torch.stack([(ys[:, None] < h) & (xs[None, :] < w) for h, w in image_sizes]))
        return masks

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        *,
        output_intermediates: bool = False,
        return_backbone_features: bool = False,
    ) -> GLIPOutput:
        """The network pass.

        Args:
            images: ``(B, 3, H, W)`` normalised BGR×255 batch, zero-padded to a multiple of 32.
            input_ids, attention_mask: ``(B, M)`` tokenized text (``M <= max_text_len``).
            image_sizes: per image ``(h, w)`` before padding (default: the full padded size).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} texts")
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds max_text_len={self.config.max_text_len}")
        if image_sizes is None:
            image_sizes = [(images.shape[2], images.shape[3])] * images.shape[0]
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        encoded = self.backbone(images, return_body_features=return_backbone_features)
        fpn, body = (encoded if return_backbone_features else (encoded, None))
        text = self.language_backbone(input_ids, attention_mask)
        text_mask = attention_mask.bool()
        feature_sizes = [tuple(f.shape[-2:]) for f in fpn]
        image_masks = (self.level_image_masks(image_sizes, feature_sizes, images.device)
                       if self.config.batch_invariant else None)
        head = self.head(list(fpn), text.hidden, text.embedded, text_mask, image_masks=image_masks,
                         output_intermediates=output_intermediates)
        anchors = [a.to(images.device) for a in self.anchor_generator(feature_sizes)]
        return GLIPOutput(head=head, fpn_features=list(fpn), backbone_features=body, text_hidden=text.hidden,
                          text_embedded=text.embedded, text_mask=text_mask, anchors=anchors, image_sizes=image_sizes)

    # ------------------------------------------------------------------------------------------------ inputs
    def tokenize(self, texts: Sequence[str], pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize like the official model (``[CLS] ... [SEP]``, truncation at ``max_text_len``).

        ``pad_to_max=False`` pads to the longest text of the batch: the valid outputs are the same as with the
        official padding to 256 (spec §12.11) at a fraction of the cost.
        """
        enc = self.tokenizer(list(texts), max_length=self.config.max_text_len, truncation=True,
                             padding="max_length" if pad_to_max else "longest", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def preprocess(self, images: Sequence[ImageInput], min_size: int = 800, max_size: int = 1333):
        """Load, resize (official test transform) and batch images.

        Returns:
            ``(batch (B, 3, H, W), image_sizes [(h, w)], original_sizes [(h, w)])``.
        """
        transform = TestTransform(min_size=min_size, max_size=max_size)
        tensors, original_sizes = [], []
        for image in images:
            pil = load_image(image)
            original_sizes.append((pil.height, pil.width))
            tensors.append(transform(pil))
        batch, sizes, _ = pad_images(tensors, size_divisibility=32)
        return batch, [tuple(int(v) for v in s) for s in sizes.tolist()], original_sizes

    # ------------------------------------------------------------------------------------------------ user API
    @torch.no_grad()
    def detect(
        self,
        images: ImageInput | Sequence[ImageInput],
        classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
        prompt: str | Sequence[str] | None = None,
        threshold: float = 0.5,
        max_detections: int | None = 100,
        min_size: int = 800,
        max_size: int = 1333,
        *,
        max_detections_per_prompt: int | None = None,
        batch_size: int = 1,
        classes_per_prompt: int | None = 40,
        pad_text_to_max: bool = False,
        dtype: torch.dtype | None = None,
    ) -> list[dict[str, Any]]:
        """Zero-shot detection of the given classes.

        Args:
            images: one image or a list (paths, PIL images or uint8 arrays; any sizes).
            classes: class names shared by every image, or one list per image. Long lists are split into prompts of
                at most ``classes_per_prompt`` classes (and 256 tokens) and the detections merged.
            prompt: instead of ``classes``, a detection prompt such as ``"person. bicycle. a red umbrella."`` (one
                for all images, or one per image); its ``.``-separated phrases are the classes.
            threshold: keep detections whose final score is at least this (0.0 keeps every post-processed one).
            max_detections: per image, after merging prompts (official rule: scores >= the k-th best; ties may keep
                a few more); ``None``: no cap.
            min_size, max_size: test-time resize (shorter side, longer-side cap).
            max_detections_per_prompt: cap applied to each prompt's post-processed output (the official
                ``DETECTIONS_PER_IMG``, 300 for LVIS); ``None``: ``max_detections``.
            batch_size: images per forward pass.
            classes_per_prompt: chunk size for long vocabularies (official LVIS protocol: 40). ``None`` or 0: no class
                limit, only the 256-token limit (the official COCO protocol runs its 80 classes as one prompt).
            pad_text_to_max: pad text to 256 tokens as the official code does (slower, same valid outputs).
            dtype: run the network under autocast in this dtype (``torch.bfloat16`` / ``torch.float16``).

        Returns:
            one dict per image: ``boxes (K, 4)`` xyxy in input-image pixels, ``scores (K,)``, ``labels (K,)`` int64
            (0-based index into the image's classes), ``text_labels`` (list of class names).
        """
        images = _as_list(images)
        per_image_classes = self._resolve_classes(len(images), classes, prompt)
        queries: list[_TextQuery] = []
        for i, names in enumerate(per_image_classes):
            queries += self._detection_queries(i, names, prompt=None if prompt is None else _nth(prompt, i),
                                               classes_per_prompt=classes_per_prompt)
        per_prompt = max_detections if max_detections_per_prompt is None else max_detections_per_prompt
        detections = self._run(images, queries, min_size, max_size, batch_size, pad_text_to_max, dtype, per_prompt)
        return [self._finish(det, names, threshold, max_detections) for det, names in zip(detections, per_image_classes)]

    @torch.no_grad()
    def ground(
        self,
        images: ImageInput | Sequence[ImageInput],
        captions: str | Sequence[str],
        phrases: Sequence[str] | Sequence[Sequence[str]] | None = None,
        threshold: float = 0.5,
        max_detections: int | None = 100,
        min_size: int = 800,
        max_size: int = 1333,
        *,
        batch_size: int = 1,
        pad_text_to_max: bool = False,
        dtype: torch.dtype | None = None,
    ) -> list[dict[str, Any]]:
        """Phrase grounding: one caption per image; each phrase is located at its first occurrence in its caption.

        Args:
            captions: one caption per image.
            phrases: the entities to ground, each of which must occur in its caption: one list per image, or one
                flat list shared by every image (as ``classes`` in :meth:`detect`); None extracts noun phrases with
                the offline rule-based chunker (``glip_data.find_noun_phrases``).

        Returns:
            as :meth:`detect`, with ``labels`` indexing the image's phrases and ``text_labels`` the phrases.
        """
        images = _as_list(images)
        captions = [captions] if isinstance(captions, str) else list(captions)
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: pass one caption per image")
        if phrases is not None:
            if isinstance(phrases, str):
                raise TypeError("phrases must be a list of phrases (got a string)")
            phrases = list(phrases)
            if phrases and isinstance(phrases[0], str):  # one flat list shared by every image
                phrases = [phrases] * len(images)
            if len(phrases) != len(images):
                raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        queries, per_image_phrases = [], []
        for i, caption in enumerate(captions):
            if not caption or not caption.strip():
                raise ValueError(f"caption of image {i} is empty")
            entities = list(phrases[i]) if phrases is not None else find_noun_phrases(caption)
            if not entities:
                raise ValueError(f"no phrases to ground in caption {i}: {caption!r}")
            spans = find_phrase_spans(caption, entities)
            tokens = self._tokens_for(caption, spans, entities)
            per_image_phrases.append(entities)
            queries.append(_TextQuery(i, caption, tokens, list(range(len(entities)))))
        detections = self._run(images, queries, min_size, max_size, batch_size, pad_text_to_max, dtype,
                               max_detections)
        return [self._finish(det, names, threshold, max_detections) for det, names in zip(detections, per_image_phrases)]

    # ------------------------------------------------------------------------------------------------ internals
    def _resolve_classes(self, n_images: int, classes, prompt) -> list[list[str]]:
        if (classes is None) == (prompt is None):
            raise ValueError("pass exactly one of classes=[...] or prompt='a. b.'")
        if prompt is not None:
            prompts = [prompt] * n_images if isinstance(prompt, str) else list(prompt)
            if len(prompts) != n_images:
                raise ValueError(f"{n_images} images but {len(prompts)} prompts")
            out = []
            for p in prompts:
                names = [s.strip() for s in p.split(".") if s.strip()]
                if not names:
                    raise ValueError(f"prompt {p!r} has no phrases (it is empty or only separators)")
                out.append(names)
            return out
        if isinstance(classes, str):
            raise TypeError("classes must be a list of names (got a string); use prompt= for a free-form prompt")
        classes = list(classes)
        if not classes:
            raise ValueError("classes is empty")
        nested = [list(c) for c in classes] if not isinstance(classes[0], str) else [list(classes)] * n_images
        if len(nested) != n_images:
            raise ValueError(f"{n_images} images but {len(nested)} class lists")
        for names in nested:
            # a name of only separators would merge into its neighbours' ". " separators in the prompt
            bad = [n for n in names if not isinstance(n, str) or not n.strip(" ." + "\t\n")]
            if bad or not names:
                raise ValueError(f"class names must be non-empty strings, not only separators; got {bad or names}")
        return nested

    def _tokens_for(self, text: str, spans, names) -> list[list[int]]:
        tokens = spans_to_tokens(self.tokenizer, text, spans)
        empty = [names[i] for i, t in enumerate(tokens) if not t]
        if empty:
            raise ValueError(f"these phrases map to no tokens within {self.config.max_text_len} tokens of {text!r}: "
                             f"{empty}")
        limit = self.config.max_text_len
        over = [names[i] for i, t in enumerate(tokens) if max(t) >= limit]
        if over:
            raise ValueError(f"phrases beyond the {limit}-token limit of {text!r}: {over}")
        return tokens

    def _detection_queries(self, image_index, names, prompt, classes_per_prompt) -> list[_TextQuery]:
        if prompt is not None:
            # a user prompt: its phrases in order, each at its first occurrence after the previous one
            spans, cursor = [], 0
            lower = prompt.lower()
            for name in names:
                start = lower.find(name.lower(), cursor)
                spans.append([(start, start + len(name))])
                cursor = start + len(name)
            return [_TextQuery(image_index, prompt, self._tokens_for(prompt, spans, names), list(range(len(names))))]
        queries = []
        for chunk in chunk_classes(names, self.tokenizer, max_classes=classes_per_prompt,
                                   max_tokens=self.config.max_text_len):
            chunk_names = [names[i] for i in chunk]
            text, spans = detection_prompt(chunk_names)
            queries.append(_TextQuery(image_index, text, self._tokens_for(text, spans, chunk_names), list(chunk)))
        return queries

    def _autocast(self, dtype):
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _run(self, images, queries: list[_TextQuery], min_size, max_size, batch_size, pad_text_to_max, dtype,
             max_detections):
        """Run every query; the image encoder runs once per image batch, the text side once per prompt.
        ``max_detections`` caps each prompt's output (``None`` or 0: no cap)."""
        per_image: list[list[Detections]] = [[] for _ in images]
        postprocessor = ATSSPostProcessor(
            dataclasses.replace(self.postprocessor.config, detections_per_image=max_detections or 0),
            self.postprocessor.box_coder,
        )
        by_image: dict[int, list[_TextQuery]] = {}
        for q in queries:
            by_image.setdefault(q.image_index, []).append(q)
        for start in range(0, len(images), max(1, batch_size)):
            idx = list(range(start, min(start + batch_size, len(images))))
            batch, sizes, original = self.preprocess([images[i] for i in idx], min_size, max_size)
            batch = batch.to(self.device)
            with self._autocast(dtype):
                fpn = self.backbone(batch)
            rounds = max(len(by_image.get(i, [])) for i in idx)
            for r in range(rounds):
                members = [j for j, i in enumerate(idx) if r < len(by_image.get(i, []))]
                round_queries = [by_image[idx[j]][r] for j in members]
                ids, mask = self.tokenize([q.text for q in round_queries], pad_to_max=pad_text_to_max)
                ids, mask = ids.to(self.device), mask.to(self.device)
                feats = [f[members] for f in fpn]
                with self._autocast(dtype):
                    text = self.language_backbone(ids, mask)
                    msizes = [sizes[j] for j in members]
                    fsizes = [tuple(f.shape[-2:]) for f in feats]
                    image_masks = (self.level_image_masks(msizes, fsizes, self.device)
                                   if self.config.batch_invariant else None)
                    head = self.head(feats, text.hidden, text.embedded, mask.bool(), image_masks=image_masks)
                anchors = [a.to(self.device) for a in self.anchor_generator(fsizes)]
                dets = postprocessor(
                    [x.float() for x in head.box_regression], [x.float() for x in head.centerness],
                    [x.float() for x in head.token_logits], anchors, msizes, [q.class_tokens for q in round_queries],
                )
                for j, q, det in zip(members, round_queries, dets):
                    (h, w), (oh, ow) = sizes[j], original[j]
                    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=det.boxes.device)
                    labels = torch.as_tensor(q.labels, dtype=torch.int64, device=det.labels.device)[det.labels]
                    per_image[idx[j]].append(Detections(det.boxes * scale, det.scores, labels))
        return per_image

    def _finish(self, parts: list[Detections], names: list[str], threshold: float, max_detections: int | None) -> dict:
        boxes = torch.cat([p.boxes for p in parts]) if parts else torch.zeros(0, 4)
        scores = torch.cat([p.scores for p in parts]) if parts else torch.zeros(0)
        labels = torch.cat([p.labels for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        if max_detections and max_detections > 0 and scores.numel() > max_detections:
            # the per-image cap over all prompts (same rule as one prompt; a no-op when one prompt was capped alike)
            kth = torch.kthvalue(scores.cpu(), scores.numel() - max_detections + 1).values.item()
            keep = scores >= kth
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = scores >= threshold
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = scores.argsort(descending=True)
        boxes, scores, labels = boxes[order].cpu(), scores[order].cpu(), labels[order].cpu()
        return {"boxes": boxes, "scores": scores, "labels": labels, "text_labels": [names[i] for i in labels.tolist()]}


def _as_list(images) -> list:
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images


def _nth(value, i):
    return value if isinstance(value, str) else value[i]


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    from .checkpoint import CheckpointError

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source}: weights do not match the model: missing {missing[:20]}, unexpected "
                              f"{unexpected[:20]}, shape mismatches {shapes[:20]}")
    model.load_state_dict(state, strict=True)
    # keep the frozen cls_logits frozen after loading
    model.head.cls_logits.requires_grad_(False)
    if any(not torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        warnings.warn(f"{source}: some weights are not finite", stacklevel=2)
