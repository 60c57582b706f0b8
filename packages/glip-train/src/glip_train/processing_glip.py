"""The GLIP processor: everything around the network.

A :class:`GLIPProcessor` turns user inputs into network inputs and network outputs into results, in the shape of
a Hugging Face processor:

* ``processor(images=..., text=...)``: images (paths, PIL images, arrays, encoded bytes) -> the official test
  transform -> a zero-padded batch, and texts -> token ids: the network's inputs (``model(**inputs)``);
* class lists, detection prompts and captions with phrases -> prompts (chunked for long vocabularies), their tokens
  and, for every class / phrase, the token indices it is scored on (:meth:`GLIPProcessor.detection_queries`,
  :meth:`GLIPProcessor.grounding_queries`);
* the network's output -> detections per prompt (:meth:`GLIPProcessor.post_process`, the official post-processing)
  -> per-image results with boxes in input-image pixels, merged over the prompts of an image;
* :meth:`GLIPProcessor.save_pretrained` / :meth:`GLIPProcessor.from_pretrained`: the tokenizer and these settings.

The network itself (:class:`glip_train.GLIP`) knows nothing of images files, prompts or result dicts; see
``docs/ARCHITECTURE.md`` for the data flow.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image

from glip_data import ImageLoadError, TestTransform, chunk_classes, detection_prompt, find_noun_phrases
from glip_data import check_phrases, find_phrase_spans, get_resize_size, load_image, pad_images
from glip_encoders import tokenize

from .model_config import GLIPConfig, PostProcessConfig
from .postprocess import ATSSPostProcessor, Detections, cap_detections, passes_threshold

if TYPE_CHECKING:
    from .modeling_glip import GLIPOutput

__all__ = ["GLIPProcessor", "GLIPInputs", "ImageBatch", "TextQuery", "ImageInput"]

ImageInput = Union[str, Path, Image.Image, np.ndarray, bytes]
PROCESSOR_CONFIG_NAME = "processor_config.json"
TOKENIZER_DIR = "tokenizer"


class GLIPInputs(dict):
    """What ``processor(images=..., text=...)`` returns: the keyword arguments of the network's ``forward``
    (``images (B, 3, H, W)``, ``image_sizes``; ``input_ids (B, M)``, ``attention_mask (B, M)``), so that
    ``model(**inputs)`` runs it, and :attr:`original_sizes` (``(h, w)`` of each image as given: the frame of the
    results)."""

    original_sizes: list[tuple[int, int]]


@dataclass
class ImageBatch:
    """Network inputs of a batch of images.

    Attributes:
        pixel_values: ``(B, 3, H, W)`` normalised BGR×255, zero-padded to a multiple of the size divisibility.
        image_sizes: ``(h, w)`` of each image after resizing, before padding (the network-input frame).
        original_sizes: ``(h, w)`` of each image as given (the frame of the results).
    """

    pixel_values: torch.Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


@dataclass
class TextQuery:
    """One prompt to run on one image.

    Attributes:
        image_index: the image (index into the call's images).
        text: the prompt or caption.
        class_tokens: for every class / phrase the prompt scores, its token indices in the tokenized text.
        labels: the output label of each of those classes (index into the image's class / phrase list).
    """

    image_index: int
    text: str
    class_tokens: list[list[int]]
    labels: list[int]


class GLIPProcessor:
    """Images, prompts and post-processing of a GLIP model.

    Args:
        tokenizer: a fast BERT-family tokenizer (the model's).
        max_text_len: the longest text the model takes (256).
        size_divisibility: batch padding multiple (32).
        postprocess: the post-processing parameters (official defaults).
        test_size: the default test-time resize ``(min_size, max_size)`` (official ``(800, 1333)``).
    """

    def __init__(self, tokenizer: Any, *, max_text_len: int = 256, size_divisibility: int = 32,
                 postprocess: PostProcessConfig | None = None, test_size: tuple[int, int] = (800, 1333)):
        self.tokenizer = tokenizer
        self.max_text_len = int(max_text_len)
        self.size_divisibility = int(size_divisibility)
        self.postprocess_config = postprocess or PostProcessConfig()
        self.test_size = (int(test_size[0]), int(test_size[1]))

    @classmethod
    def from_config(cls, config: GLIPConfig, tokenizer: Any) -> "GLIPProcessor":
        return cls(tokenizer, max_text_len=config.max_text_len, size_divisibility=config.size_divisibility,
                   postprocess=config.postprocess, test_size=(config.test_min_size, config.test_max_size))

    def to_dict(self) -> dict[str, Any]:
        """The settings :meth:`save_pretrained` writes (everything but the tokenizer)."""
        return {"max_text_len": self.max_text_len, "size_divisibility": self.size_divisibility,
                "test_size": list(self.test_size), "postprocess": dataclasses.asdict(self.postprocess_config)}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``tokenizer/`` (the model directory's layout) and ``processor_config.json`` to ``directory``."""
        from glip_data.io import atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        atomic_write_json(directory / PROCESSOR_CONFIG_NAME, self.to_dict())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "GLIPProcessor":
        """The processor of a directory written by :meth:`save_pretrained`, or of a model directory written by
        :meth:`glip_train.GLIP.save_pretrained` (its ``config.json`` gives the settings), without loading weights.

        Raises:
            FileNotFoundError: the directory has neither ``processor_config.json`` nor ``config.json``.
        """
        from glip_encoders import load_tokenizer

        directory = Path(directory)
        tokenizer_dir = directory / TOKENIZER_DIR
        if (directory / PROCESSOR_CONFIG_NAME).is_file():
            settings = json.loads((directory / PROCESSOR_CONFIG_NAME).read_text(encoding="utf-8"))
            known = {"max_text_len", "size_divisibility", "test_size", "postprocess"}
            if not isinstance(settings, dict) or set(settings) - known:
                raise ValueError(f"{directory / PROCESSOR_CONFIG_NAME}: expected a JSON object with the keys "
                                 f"{sorted(known)}")
            if not tokenizer_dir.is_dir():
                raise FileNotFoundError(f"{directory}: {PROCESSOR_CONFIG_NAME} without a {TOKENIZER_DIR}/ folder")
            postprocess = PostProcessConfig.from_dict(settings.pop("postprocess", {}))
            test_size = tuple(settings.pop("test_size", (800, 1333)))
            return cls(load_tokenizer(tokenizer_dir), postprocess=postprocess, test_size=test_size, **settings)
        if (directory / "config.json").is_file():
            from .modeling_glip import bundled_tokenizer_dir

            config = GLIPConfig.load(directory / "config.json")
            source = tokenizer_dir if tokenizer_dir.is_dir() else (config.tokenizer or bundled_tokenizer_dir())
            return cls.from_config(config, load_tokenizer(source))
        raise FileNotFoundError(f"{directory}: no {PROCESSOR_CONFIG_NAME} or config.json (not written by "
                                "GLIPProcessor.save_pretrained or GLIP.save_pretrained)")

    def __call__(self, images: ImageInput | Sequence[ImageInput] | None = None,
                 text: str | Sequence[str] | None = None, *, min_size: int | None = None,
                 max_size: int | None = None, pad_to_max: bool = False) -> GLIPInputs:
        """The network inputs of ``images`` (:meth:`preprocess`) and ``text`` (:meth:`tokenize`; one text per
        image), ready for ``model(**inputs)``; either may be left out."""
        if images is None and text is None:
            raise ValueError("pass images=..., text=... or both")
        inputs = GLIPInputs()
        inputs.original_sizes = []
        if images is not None:
            if isinstance(images, (str, Path, Image.Image, np.ndarray, bytes)):
                images = [images]
            batch = self.preprocess(list(images), min_size, max_size)
            inputs.update(images=batch.pixel_values, image_sizes=batch.image_sizes)
            inputs.original_sizes = batch.original_sizes
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if images is not None and len(texts) != len(inputs.original_sizes):
                raise ValueError(f"{len(inputs.original_sizes)} images but {len(texts)} texts: pass one text per "
                                 "image")
            inputs["input_ids"], inputs["attention_mask"] = self.tokenize(texts, pad_to_max=pad_to_max)
        return inputs

    def resize_limits(self, min_size: int | None = None, max_size: int | None = None) -> tuple[int, int]:
        """``(min_size, max_size)`` of the test resize: the given values, else the model's (:attr:`test_size`)."""
        return (self.test_size[0] if min_size is None else int(min_size),
                self.test_size[1] if max_size is None else int(max_size))

    # ------------------------------------------------------------------------------------------------ images
    def load_image(self, image: ImageInput, min_size: int | None = None, max_size: int | None = None, *,
                   frame: Any = "upright"):
        """One image as an RGB PIL image, checked to survive the test resize (None: the model's sizes).

        ``frame`` is :func:`glip_data.load_image`'s: upright by default; an image ``load_image`` returned before keeps
        the frame it was loaded in.

        Raises:
            glip_data.ImageLoadError: naming the image (a path, or its index in the call) when it cannot be read or
                has a size the resize cannot handle (e.g. a 1x4000 strip).
        """
        pil = load_image(image, frame=frame)
        min_size, max_size = self.resize_limits(min_size, max_size)
        try:
            get_resize_size(pil.size, min_size, max_size)
        except ValueError as exc:
            name = str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__} {pil.width}x{pil.height}>"
            raise ImageLoadError(f"{name}: {exc}") from None
        return pil

    def preprocess(self, images: Sequence[ImageInput], min_size: int | None = None,
                   max_size: int | None = None) -> ImageBatch:
        """Load, resize (official test transform; None: the model's test sizes) and batch images."""
        min_size, max_size = self.resize_limits(min_size, max_size)
        transform = TestTransform(min_size=min_size, max_size=max_size)
        tensors, original_sizes = [], []
        for image in images:
            pil = self.load_image(image, min_size, max_size)
            original_sizes.append((pil.height, pil.width))
            tensors.append(transform(pil))
        batch, sizes, _ = pad_images(tensors, size_divisibility=self.size_divisibility)
        return ImageBatch(batch, [(int(h), int(w)) for h, w in sizes.tolist()], original_sizes)

    # ------------------------------------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str], pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids (B, M), attention_mask (B, M))``: ``[CLS] ... [SEP]``, truncated at ``max_text_len``.

        ``pad_to_max=False`` pads to the longest text: the real-token outputs are the same as with the official
        padding to 256 (``docs/official_model.md#quirks`` item 11) at a fraction of the cost.
        """
        enc = tokenize(self.tokenizer, list(texts), max_length=self.max_text_len, pad_to_max=pad_to_max)
        return enc["input_ids"], enc["attention_mask"]

    def class_tokens(self, text: str, spans: Sequence[Sequence[tuple[int, int]]], names: Sequence[str]
                     ) -> list[list[int]]:
        """Token indices of each entity of ``text`` (its character ``spans``); raise naming the entities the model
        cannot read (:func:`glip_data.check_phrases`: no token, only unknown tokens, beyond the text limit)."""
        check = check_phrases(self.tokenizer, text, spans, max_length=self.max_text_len)
        if not check.ok:
            raise ValueError(check.error(names, text))
        return check.tokens

    def detection_queries(self, num_images: int, classes: Any = None, prompt: Any = None,
                          classes_per_prompt: int | None = 40) -> tuple[list[TextQuery], list[list[str]]]:
        """Prompts for :meth:`glip_train.GLIP.detect`: ``(queries, class names of every image)``.

        ``classes`` is one list shared by every image or one list per image; long lists are split into prompts of at
        most ``classes_per_prompt`` classes and 256 tokens. ``prompt`` (one string, or one per image) is used as it
        is: its ``.``-separated phrases are the classes.
        """
        per_image = self._resolve_classes(num_images, classes, prompt)
        queries: list[TextQuery] = []
        for i, names in enumerate(per_image):
            if prompt is not None:
                queries.append(self._prompt_query(i, prompt if isinstance(prompt, str) else prompt[i], names))
                continue
            for chunk in chunk_classes(names, self.tokenizer, max_classes=classes_per_prompt,
                                       max_tokens=self.max_text_len):
                chunk_names = [names[j] for j in chunk]
                text, spans = detection_prompt(chunk_names)
                queries.append(TextQuery(i, text, self.class_tokens(text, spans, chunk_names), list(chunk)))
        return queries, per_image

    def grounding_queries(self, captions: Sequence[str], phrases: Any = None
                          ) -> tuple[list[TextQuery], list[list[str]]]:
        """Queries for :meth:`glip_train.GLIP.ground`: one per caption; each phrase at its first occurrence.

        ``phrases``: one list per caption, one flat list shared by every caption, or None (noun phrases extracted by
        the offline chunker).
        """
        if phrases is not None:
            if isinstance(phrases, str):
                raise TypeError("phrases must be a list of phrases (got a string)")
            phrases = list(phrases)
            if phrases and isinstance(phrases[0], str):  # one flat list shared by every caption
                phrases = [phrases] * len(captions)
            if len(phrases) != len(captions):
                raise ValueError(f"{len(captions)} captions but {len(phrases)} phrase lists")
        queries, per_image = [], []
        for i, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"caption {i} is empty")
            entities = list(phrases[i]) if phrases is not None else find_noun_phrases(caption)
            if not entities:
                raise ValueError(f"no phrases to ground in caption {i}: {caption!r}")
            spans = find_phrase_spans(caption, entities)
            queries.append(TextQuery(i, caption, self.class_tokens(caption, spans, entities),
                                     list(range(len(entities)))))
            per_image.append(entities)
        return queries, per_image

    def _prompt_query(self, image_index: int, prompt: str, names: list[str]) -> TextQuery:
        # a user prompt: its phrases in order, each at its first occurrence after the previous one
        spans, cursor = [], 0
        lower = prompt.lower()
        for name in names:
            start = lower.find(name.lower(), cursor)
            spans.append([(start, start + len(name))])
            cursor = start + len(name)
        return TextQuery(image_index, prompt, self.class_tokens(prompt, spans, names), list(range(len(names))))

    @staticmethod
    def _resolve_classes(num_images: int, classes: Any, prompt: Any) -> list[list[str]]:
        if (classes is None) == (prompt is None):
            raise ValueError("pass exactly one of classes=[...] or prompt='a. b.'")
        if prompt is not None:
            prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
            if len(prompts) != num_images:
                raise ValueError(f"{num_images} images but {len(prompts)} prompts")
            out = []
            for p in prompts:
                if not isinstance(p, str):
                    raise TypeError(f"a prompt must be a string; got {type(p).__name__}")
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
        nested = [list(c) for c in classes] if not isinstance(classes[0], str) else [list(classes)] * num_images
        if len(nested) != num_images:
            raise ValueError(f"{num_images} images but {len(nested)} class lists")
        for names in nested:
            # a name of only separators would merge into its neighbours' ". " separators in the prompt
            bad = [n for n in names if not isinstance(n, str) or not n.strip(" ." + "\t\n")]
            if bad or not names:
                raise ValueError(f"class names must be non-empty strings, not only separators; got {bad or names}")
        return nested

    # ------------------------------------------------------------------------------------------------ outputs
    def post_process(self, output: "GLIPOutput", class_tokens: Sequence[Sequence[Sequence[int]]], *,
                     max_detections: int | None = -1, keep_pre_nms: bool = False) -> list[Detections]:
        """The official post-processing of a network output (:class:`glip_train.GLIPOutput`: its head outputs,
        anchors and image sizes), one class-token map per image, in the network-input frame (float32 whatever the
        network's dtype).

        ``max_detections`` overrides the config's per-image cap (None = no cap; -1 = the config's).
        """
        config = self.postprocess_config
        if max_detections != -1:
            config = config.replace(detections_per_image=max_detections)
        head = output.head
        return ATSSPostProcessor(config)(
            [x.float() for x in head.box_regression], [x.float() for x in head.centerness],
            [x.float() for x in head.token_logits], output.anchors, output.image_sizes, class_tokens,
            keep_pre_nms=keep_pre_nms,
        )

    @staticmethod
    def to_input_frame(detections: Detections, image_size: tuple[int, int], original_size: tuple[int, int],
                       labels: Sequence[int]) -> Detections:
        """Rescale boxes from the network-input frame to the original image (ratio of sizes, no ``+1``; official
        rule) and map the prompt's class columns to the output labels."""
        (h, w), (oh, ow) = image_size, original_size
        scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=detections.boxes.dtype,
                             device=detections.boxes.device)
        mapped = torch.as_tensor(list(labels), dtype=torch.int64, device=detections.labels.device)[detections.labels]
        return Detections(detections.boxes * scale, detections.scores, mapped)

    @staticmethod
    def to_results(parts: Sequence[Detections], names: Sequence[str], threshold: float,
                   max_detections: int | None) -> dict[str, Any]:
        """Merge one image's per-prompt detections into the result dict (sorted by score, on the CPU).

        The per-image cap applies over the merged prompts (the same rule as within one prompt, idempotent on a set it
        already capped), then the score threshold.
        """
        boxes = torch.cat([p.boxes for p in parts]) if parts else torch.zeros(0, 4)
        scores = torch.cat([p.scores for p in parts]) if parts else torch.zeros(0)
        labels = torch.cat([p.labels for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        keep = cap_detections(scores, max_detections)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = passes_threshold(scores, threshold)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = scores.argsort(descending=True, stable=True)
        boxes, scores, labels = boxes[order].cpu(), scores[order].cpu(), labels[order].cpu()
        return {"boxes": boxes, "scores": scores, "labels": labels,
                "text_labels": [names[i] for i in labels.tolist()]}
