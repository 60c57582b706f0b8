"""The GLIP network: image encoder + FPN, text encoder, deep-fusion tower and ATSS head with word-region alignment.

:class:`GLIP` is only the network and its weights I/O: ``forward`` is the one network pass (inference, parity
checks, and with ``targets`` the training losses); :meth:`GLIP.from_pretrained` / :meth:`GLIP.save_pretrained`
read and write weights. Images, prompts and post-processing belong to :class:`glip_train.GLIPProcessor`;
:meth:`GLIP.detect` / :meth:`GLIP.ground` hand the network and its processor to :mod:`glip_train.inference`, which
composes processor -> network -> processor, in the Hugging Face zero-shot-detection result shape.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glip_encoders import TextEncoder, build_image_encoder, load_tokenizer
from glip_fusion import level_image_masks

from .adapters import PromptTuning, load_adapter
from .box_ops import AnchorGenerator
from .model_config import GLIPConfig
from .head import GLIPHead, HeadOutput
from .processing_glip import GLIPProcessor, ImageInput

__all__ = ["GLIP", "GLIPOutput", "bundled_tokenizer_dir"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
ADAPTER_NAME = "adapter.safetensors"


def bundled_tokenizer_dir() -> Path:
    """The bert-base-uncased vocabulary shipped with glip-train (the tokenizer of every official checkpoint)."""
    return Path(__file__).resolve().parent / "assets" / "bert-base-uncased"


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
        losses: with ``targets``, the loss terms (``loss_reg``, ``loss_centerness``, ``loss_dot_product_token``).
        loss: their sum.
    """

    head: HeadOutput
    fpn_features: list[torch.Tensor]
    backbone_features: list[torch.Tensor] | None
    text_hidden: torch.Tensor
    text_embedded: torch.Tensor
    text_mask: torch.Tensor
    anchors: list[torch.Tensor]
    image_sizes: list[tuple[int, int]]
    losses: dict[str, torch.Tensor] | None = None
    loss: torch.Tensor | None = None


class GLIP(nn.Module):
    """GLIP: grounded language-image pre-training detector (the network and its weights).

    Module names follow the official checkpoint: ``backbone.body`` / ``backbone.fpn`` (image encoder),
    ``language_backbone.model`` (BERT), ``head.dyhead_tower`` (fusion) and ``head.*`` predictors.

    Args:
        config: the architecture (validated when built).
        tokenizer: a tokenizer instance; default: the one named by ``config.tokenizer`` or the bundled
            bert-base-uncased vocabulary. Kept with the weights (``save_pretrained``) and used by :attr:`processor`.
    """

    def __init__(self, config: GLIPConfig, tokenizer: Any = None):
        super().__init__()
        if not isinstance(config, GLIPConfig):
            raise TypeError(f"config must be a GLIPConfig; got {type(config).__name__}")
        self.config = config
        self.backbone = build_image_encoder(config.image_encoder, out_channels=config.fpn_channels,
                                            **config.image_encoder_kwargs)
        self.language_backbone = TextEncoder.from_config(config.text_encoder)
        self.head = GLIPHead(config)
        self.anchor_generator = AnchorGenerator(config.anchor_sizes, config.anchor_strides)
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer or bundled_tokenizer_dir())
        self.tokenizer = tokenizer
        self._processor: GLIPProcessor | None = None
        self.prompt_tuning: PromptTuning | None = None  # see enable_prompt_tuning

    def enable_prompt_tuning(self, positions: int = 1000) -> PromptTuning:
        """Add the prompt-tuning table (official ``language_prompt_v2``: ``(positions, text width)``, zeros) whose
        first M rows are added to the text features before the fusion tower. Idempotent for the same size."""
        if self.prompt_tuning is not None:
            if self.prompt_tuning.weight.shape[0] != positions:
                raise ValueError(f"the model already has a prompt table of {self.prompt_tuning.weight.shape[0]} "
                                 f"positions, not {positions}")
            return self.prompt_tuning
        param = next(self.parameters())
        self.prompt_tuning = PromptTuning(positions, self.config.text_dim).to(device=param.device)
        return self.prompt_tuning

    @property
    def processor(self) -> GLIPProcessor:
        """The :class:`GLIPProcessor` of this model (its tokenizer, text limit, padding and post-processing)."""
        if self._processor is None:
            self._processor = GLIPProcessor.from_config(self.config, self.tokenizer)
        return self._processor

    # ------------------------------------------------------------------------------------------------ weights
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        adapter: str | Path | None = None,
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
                None or ``"default"``: the model shipped with glip-train (:mod:`glip_train.shipped`: a small GLIP
                trained on the synthetic shapes world, for trying the API without downloading anything).
            adapter: a prompt-tuning or linear-probe file trained on these weights (:mod:`glip_train.adapters`).
            use_ema: official checkpoints only: load ``"model_ema"`` instead of ``"model"``.
            tokenizer: override the tokenizer (instance or local directory).
            trust_pickle: allow arbitrary pickled objects in an official ``.pth`` (only for files you trust).
            map_location: device for the weights.
            verbose: print what was loaded, ignored and dropped.
            config_overrides: ``GLIPConfig`` fields to change (e.g. ``batch_invariant=True``, ``postprocess={...}``).
        """
        from .shipped import SHIPPED_NAME, shipped_model_dir

        if path is None or str(path) == SHIPPED_NAME:
            path = shipped_model_dir()
        model = cls._load(path, use_ema=use_ema, tokenizer=tokenizer, trust_pickle=trust_pickle,
                          map_location=map_location, verbose=verbose, **config_overrides)
        if adapter is not None:
            model.adapter_info = load_adapter(model, adapter)
        return model

    @classmethod
    def _load(cls, path, *, use_ema, tokenizer, trust_pickle, map_location, verbose, **config_overrides) -> "GLIP":
        from . import official_checkpoint as ckpt

        path = Path(path)
        from .export.runtime import is_exported

        if is_exported(path):
            raise ValueError(f"{path} is an exported model (ONNX / OpenVINO): load it with "
                             "glip_train.export.ExportedGLIP.from_pretrained, which runs it in its runtime")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if path.is_dir():
            config_file = path / CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"{path} is a directory without {CONFIG_NAME}: not written by save_pretrained")
            config = GLIPConfig.load(config_file)
            if config_overrides:
                config = config.updated(**config_overrides)
            weights_file = path / WEIGHTS_NAME
            if not weights_file.is_file():
                raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
            if tokenizer is None and (path / TOKENIZER_DIR).is_dir():
                tokenizer = load_tokenizer(path / TOKENIZER_DIR)
            _check_weights_file(weights_file, config, tokenizer)  # before allocating or reading any weight
            model = cls(config, tokenizer=tokenizer)
            from safetensors.torch import load_file

            state = load_file(str(weights_file))
            _load_strict(model, state, str(weights_file))
            if (path / ADAPTER_NAME).is_file():
                model.adapter_info = load_adapter(model, path / ADAPTER_NAME)
            return model.to(map_location)

        if path.suffix == ".json":
            from .recipe import build_recipe_state_dict, load_recipe

            state_dict = build_recipe_state_dict(load_recipe(path))
            report = ckpt.LoadReport(source=str(path), used_entry="<weights recipe>")
        else:
            state_dict, report = ckpt.read_official_checkpoint(path, use_ema=use_ema, trust_pickle=trust_pickle)
        config = ckpt.infer_official_config(state_dict)
        if config_overrides:
            config = config.updated(**config_overrides)
        model = cls(config, tokenizer=tokenizer)
        ours, dropped = ckpt.map_official_state_dict(state_dict, model)
        report.variant = config.name
        report.dropped_keys = dropped
        _load_strict(model, ours, str(path))
        model.load_report = report
        if verbose:
            print(report.summary())
        return model.to(map_location)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer to ``directory`` (a prompt-tuning table, if
        any, goes to ``adapter.safetensors`` beside them and is applied again by :meth:`from_pretrained`).

        ``dtype`` (e.g. ``torch.float16``) stores the floating-point weights in that type, half the file for
        fp16; :meth:`from_pretrained` loads them into the model's float32 parameters."""
        from safetensors.torch import save

        from .adapters import save_adapter
        from glip_data.io import atomic_write_bytes

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        self.config.replace(tokenizer=None).save(directory / CONFIG_NAME)  # the directory's own tokenizer/ wins
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith("prompt_tuning.")}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        atomic_write_bytes(directory / WEIGHTS_NAME,
                           save(state, metadata={"format": "pt", "glip_config": self.config.name}))
        if self.prompt_tuning is not None:
            save_adapter(self, directory / ADAPTER_NAME, "prompt_tuning")
        return directory

    # ------------------------------------------------------------------------------------------------ network
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the fusion tower's X-MHA blocks are gradient-checkpointed in training."""
        return self.head.dyhead_tower.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.head.dyhead_tower.gradient_checkpointing = enable

    def encode_images(self, images: torch.Tensor, return_backbone_features: bool = False):
        """The image encoder: ``(B, 3, H, W)`` -> P3..P7 (and C3..C5 when asked), to be passed to :meth:`forward`
        as ``image_features`` when several prompts share the same images."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        return self.backbone(images, return_body_features=return_backbone_features)

    def forward(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        *,
        image_features: Sequence[torch.Tensor] | None = None,
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        output_intermediates: bool = False,
        return_backbone_features: bool = False,
    ) -> GLIPOutput:
        """The network pass.

        Args:
            images: ``(B, 3, H, W)`` normalised BGR×255 batch, zero-padded to a multiple of 32.
            input_ids, attention_mask: ``(B, M)`` tokenized text (``M <= max_text_len``).
            image_sizes: per image ``(h, w)`` before padding (default: the full padded size).
            image_features: P3..P7 from :meth:`encode_images` instead of ``images`` (reused across prompts).
            targets: per image ``{"boxes": (n, 4) xyxy network-input pixels, "positive_map": (n, M) bool}``:
                also compute the training losses (``output.losses``, ``output.loss``).
            output_intermediates: keep the output of every tower module.
            return_backbone_features: keep C3..C5 (needs ``images``).
        """
        if input_ids is None or attention_mask is None:
            raise ValueError("forward needs input_ids and attention_mask (see GLIPProcessor.tokenize)")
        if (images is None) == (image_features is None):
            raise ValueError("pass exactly one of images and image_features")
        body = None
        if image_features is None:
            encoded = self.encode_images(images, return_backbone_features=return_backbone_features)
            fpn, body = encoded if return_backbone_features else (encoded, None)
        else:
            if return_backbone_features:
                raise ValueError("return_backbone_features needs images, not image_features")
            fpn = list(image_features)
        batch = fpn[0].shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"{batch} images but {input_ids.shape[0]} texts")
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds max_text_len={self.config.max_text_len}")
        feature_sizes = [tuple(f.shape[-2:]) for f in fpn]
        if image_sizes is None:
            padded = (feature_sizes[0][0] * self.config.anchor_strides[0], feature_sizes[0][1] * self.config.anchor_strides[0])
            image_sizes = [padded] * batch
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        device = fpn[0].device
        head, text_hidden, text_embedded = self.text_and_head(fpn, input_ids, attention_mask, image_sizes,
                                                              output_intermediates=output_intermediates)
        text_mask = attention_mask.bool()
        anchors = [a.to(device) for a in self.anchor_generator(feature_sizes)]
        output = GLIPOutput(head=head, fpn_features=list(fpn), backbone_features=body, text_hidden=text_hidden,
                            text_embedded=text_embedded, text_mask=text_mask, anchors=anchors,
                            image_sizes=image_sizes)
        if targets is not None:
            output.losses = self.compute_losses(output, targets)
            output.loss = sum(output.losses.values())
        return output

    def text_and_head(self, image_features: Sequence[torch.Tensor], input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, image_sizes: Sequence[tuple[int, int]] | torch.Tensor,
                      *, output_intermediates: bool = False) -> tuple[HeadOutput, torch.Tensor, torch.Tensor]:
        """The network after the image encoder: text encoder, prompt tuning (if any), fusion tower and predictors.

        Args:
            image_features: P3..P7 of :meth:`encode_images`, each ``(B, C, H_l, W_l)``.
            input_ids, attention_mask: ``(B, M)``.
            image_sizes: per image ``(h, w)`` before padding, or a ``(B, 2)`` integer tensor (an exported graph takes
                them as an input); only a ``batch_invariant`` model reads them.

        Returns:
            ``(head outputs, text_hidden (B, M, D), text_embedded (B, M, D))``; :meth:`forward` is this plus the image
            encoder, the anchors and the losses. :mod:`glip_train.export` traces it (no Python branch on a value).
        """
        text = self.language_backbone(input_ids, attention_mask)
        text_hidden, text_embedded = text.hidden, text.embedded
        if self.prompt_tuning is not None:
            text_hidden, text_embedded = self.prompt_tuning(text_hidden, text_embedded)
        image_masks = None
        if self.config.batch_invariant:
            image_masks = level_image_masks(image_sizes, [f.shape[-2:] for f in image_features],
                                            self.config.anchor_strides,
                                            size_divisibility=self.config.size_divisibility,
                                            device=image_features[0].device)
        head = self.head(list(image_features), text_hidden, text_embedded, attention_mask.bool(),
                         image_masks=image_masks, output_intermediates=output_intermediates)
        return head, text_hidden, text_embedded

    def compute_losses(self, output: GLIPOutput, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """GLIP's training losses of a forward pass: the official ATSS assignment and loss terms
        (:class:`glip_train.losses.GLIPLoss`), computed in float32 whatever the autocast dtype."""
        from .losses import GLIPLoss

        if len(targets) != output.text_mask.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {output.text_mask.shape[0]} images")
        head = output.head
        with torch.autocast(device_type=output.text_mask.device.type, enabled=False):
            return GLIPLoss(max_text_len=self.config.max_text_len)(
                box_regression=[x.float() for x in head.box_regression],
                centerness=[x.float() for x in head.centerness],
                token_logits=[x.float() for x in head.token_logits],
                anchors=output.anchors, targets=targets, text_mask=output.text_mask)

    # ------------------------------------------------------------------------------------------------ user API
    def detect(self, images: ImageInput | Sequence[ImageInput], classes: Any = None, prompt: Any = None,
               threshold: float = 0.5, max_detections: int | None = 100, min_size: int | None = None, max_size: int | None = None,
               **options: Any) -> list[dict[str, Any]]:
        """Zero-shot detection of the given classes; see :func:`glip_train.inference.detect` for every option.

        Returns one dict per image: ``boxes (K, 4)`` xyxy in input-image pixels, ``scores (K,)``, ``labels (K,)``
        int64 (0-based index into the image's classes), ``text_labels`` (list of class names).
        """
        from .inference import detect

        return detect(self, self.processor, images, classes=classes, prompt=prompt, threshold=threshold,
                      max_detections=max_detections, min_size=min_size, max_size=max_size, **options)

    def ground(self, images: ImageInput | Sequence[ImageInput], captions: str | Sequence[str], phrases: Any = None,
               threshold: float = 0.5, max_detections: int | None = 100, min_size: int | None = None, max_size: int | None = None,
               **options: Any) -> list[dict[str, Any]]:
        """Phrase grounding, one caption per image; see :func:`glip_train.inference.ground` for every option.

        Returns the same shape as :meth:`detect`, with ``labels`` indexing the image's phrases.
        """
        from .inference import ground

        return ground(self, self.processor, images, captions, phrases=phrases, threshold=threshold, max_detections=max_detections,
                      min_size=min_size, max_size=max_size, **options)


def _check_weights_file(weights_file: Path, config: GLIPConfig, tokenizer: Any) -> None:
    """Compare a safetensors file's header (names and shapes) with the model ``config`` describes, reading no tensor.

    Raises:
        CheckpointError: the file is not valid safetensors, or its tensors do not match the config (listing them).
    """
    from safetensors import safe_open

    from .official_checkpoint import CheckpointError

    try:
        with safe_open(str(weights_file), framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{weights_file}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") \
            from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GLIP(config, tokenizer=tokenizer or "meta").state_dict().items()}
    _raise_mismatch(str(weights_file), expected, shapes)


def _raise_mismatch(source: str, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    from .official_checkpoint import CheckpointError

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: {found[k]} vs {expected[k]}" for k in set(found) & set(expected) if found[k] != expected[k])
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source}: weights do not match the model its config.json describes: missing "
                              f"{missing[:20]}, unexpected {unexpected[:20]}, shape mismatches {shapes[:20]}")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    _raise_mismatch(source, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                    {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state, strict=True)
    # keep the frozen cls_logits frozen after loading
    model.head.cls_logits.requires_grad_(False)
    if any(not torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        warnings.warn(f"{source}: some weights are not finite", stacklevel=2)
