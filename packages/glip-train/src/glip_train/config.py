"""Configuration of a GLIP model: the official variants (GLIP-T, GLIP-T(A), GLIP-L) and small ones.

A :class:`GLIPConfig` is plain data (JSON round-trippable): it is what ``save_pretrained`` writes as ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GLIPConfig", "BERT_BASE_CONFIG"]

#: ``BertConfig()`` defaults = the bert-base-uncased architecture (official text encoder of every GLIP model).
BERT_BASE_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


@dataclass
class GLIPConfig:
    """Everything needed to build a :class:`~glip_train.GLIP`.

    Attributes:
        name: a label ("glip_t", "glip_t_a", "glip_l", or anything for custom models).
        image_encoder: "swin_tiny" / "swin_large" (GLIP layout) or any timm model name.
        image_encoder_kwargs: extra keyword arguments of ``glip_encoders.build_image_encoder``.
        fpn_channels: FPN width (and the fusion encoder's visual width).
        text_encoder: the BERT-family config (a ``transformers`` config dict).
        max_text_len: the text encoder's maximum input length used by GLIP (256).
        fusion_layers: number of fusion blocks (GLIP-T 6, GLIP-L 8).
        early_fusion: X-MHA + head BERT layers in the tower (False for GLIP-T(A): DyConv only).
        fused_text_for_logits: the word-region logits use the fused text (True for every fused official model) rather
            than the BERT output.
        fusion_embed_dim, fusion_heads, fusion_dropout: X-MHA sizes (official: 2048, 8, 0.1).
        fusion_bert_heads, fusion_bert_intermediate: the head BERT layers (official: the text encoder's sizes).
        dyconv_offset_mode: "official" (the coarse-level offset reinterpretation) or "per_level" (clean variant).
        batch_invariant: mask image padding in the text-direction softmax (off for parity with official weights).
        fusion_backend: ``glip_fusion.bi_attention`` backend ("auto", "reference", "sdpa", "triton").
        gradient_checkpointing: checkpoint each fusion block in training (official ``DYHEAD.USE_CHECKPOINT``).
        num_cls_logits: channels of the frozen, unused ``cls_logits`` conv (80 in every official checkpoint).
        anchor_sizes, anchor_strides: one anchor per location and level.
        tokenizer: a local tokenizer directory, or None for the bundled bert-base-uncased vocabulary.
        postprocess: ``PostProcessConfig`` fields.
    """

    name: str = "glip_t"
    image_encoder: str = "swin_tiny"
    image_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    fpn_channels: int = 256
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(BERT_BASE_CONFIG))
    max_text_len: int = 256
    fusion_layers: int = 6
    early_fusion: bool = True
    fused_text_for_logits: bool = True
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    fusion_dropout: float = 0.1
    fusion_bert_heads: int | None = None
    fusion_bert_intermediate: int | None = None
    dyconv_offset_mode: str = "official"
    batch_invariant: bool = False
    fusion_backend: str = "auto"
    gradient_checkpointing: bool = False
    num_cls_logits: int = 80
    prior_prob: float = 0.01
    anchor_sizes: tuple[float, ...] = (64, 128, 256, 512, 1024)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    tokenizer: str | None = None
    postprocess: dict[str, Any] = field(default_factory=dict)

    # ---- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def glip_t(cls, **overrides: Any) -> "GLIPConfig":
        """GLIP-T (B), (C) and the released GLIP-T: Swin-T, 6 fusion blocks."""
        return cls(**{"name": "glip_t", **overrides})

    @classmethod
    def glip_t_a(cls, **overrides: Any) -> "GLIPConfig":
        """GLIP-T (A): Swin-T, no deep fusion (6 DyConv blocks), logits from the BERT output."""
        return cls(**{"name": "glip_t_a", "early_fusion": False, "fused_text_for_logits": False, **overrides})

    @classmethod
    def glip_l(cls, **overrides: Any) -> "GLIPConfig":
        """GLIP-L: Swin-L (window 12), 8 fusion blocks."""
        return cls(**{"name": "glip_l", "image_encoder": "swin_large", "fusion_layers": 8, **overrides})

    @classmethod
    def small(cls, text_encoder_dir: str | Path, image_encoder: str = "resnet18", fusion_layers: int = 2,
              **overrides: Any) -> "GLIPConfig":
        """A small model for tests and experiments: any timm backbone, a local BERT-family text encoder.

        Args:
            text_encoder_dir: a local Hugging Face model directory (its config.json is read; its tokenizer is used).
        """
        text_cfg = json.loads((Path(text_encoder_dir) / "config.json").read_text())
        return cls(**{
            "name": "small",
            "image_encoder": image_encoder,
            "text_encoder": text_cfg,
            "fusion_layers": fusion_layers,
            "fusion_embed_dim": 256,
            "tokenizer": str(text_encoder_dir),
            **overrides,
        })

    # ---- derived ---------------------------------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        return int(self.text_encoder["hidden_size"])

    @property
    def bert_heads(self) -> int:
        return int(self.fusion_bert_heads or self.text_encoder["num_attention_heads"])

    @property
    def bert_intermediate(self) -> int:
        return int(self.fusion_bert_intermediate or self.text_encoder["intermediate_size"])

    # ---- (de)serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchor_sizes"] = list(self.anchor_sizes)
        d["anchor_strides"] = list(self.anchor_strides)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GLIPConfig fields: {unknown}")
        data = dict(data)
        for key in ("anchor_sizes", "anchor_strides"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
