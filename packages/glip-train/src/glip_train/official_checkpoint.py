"""Official GLIP checkpoints in: reading, recognising the variant, and mapping onto our modules strictly.

An official checkpoint is a ``torch.save`` of a dict with ``"model"`` (keys prefixed ``module.`` by DDP) and possibly
``"model_ema"``, ``"optimizer"``, ``"scheduler"``, ``"iteration"`` (``docs/official_model.md#checkpoint-layout``). A raw state dict is accepted too.
Mapping is strict: every key our model expects must be present with the right shape, or :class:`CheckpointError`
names the missing, unexpected and mis-shaped keys. Extras that are known to be harmless (BERT pooler, ``position_ids``,
the other top-level entries) are dropped and reported — never a silent partial load
(``docs/official_model.md#quirks`` item 20).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glip_encoders import image_checkpoint_filter_fn, image_to_official_state_dict, text_checkpoint_filter_fn

from .model_config import GLIPConfig, fusion_for_text

__all__ = [
    "CheckpointError",
    "LoadReport",
    "load_checkpoint_file",
    "read_official_checkpoint",
    "infer_official_config",
    "map_official_state_dict",
    "to_official_state_dict",
]

#: official prefix -> our module prefix (inside each block the names are the official ones)
PREFIX_MAP = {
    "backbone.": "backbone.",
    "language_backbone.body.model.": "language_backbone.model.",
    "rpn.head.": "head.",
}
ANCHOR_PREFIX = "rpn.anchor_generator.cell_anchors."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be mapped onto the model; the message lists every offending key."""


@dataclass
class LoadReport:
    """What loading an official checkpoint did besides mapping weights."""

    source: str = ""
    variant: str = ""
    used_entry: str = ""  # "model", "model_ema" or "<state dict>"
    ignored_entries: list[str] = field(default_factory=list)  # other top-level entries (optimizer, ...)
    dropped_keys: list[str] = field(default_factory=list)  # harmless extras inside the weights

    def summary(self) -> str:
        lines = [f"loaded {self.source} as {self.variant} (weights from {self.used_entry!r})"]
        if self.ignored_entries:
            lines.append(f"ignored checkpoint entries: {', '.join(self.ignored_entries)}")
        if self.dropped_keys:
            shown = ", ".join(self.dropped_keys[:8]) + (" ..." if len(self.dropped_keys) > 8 else "")
            lines.append(f"dropped {len(self.dropped_keys)} unused keys: {shown}")
        return "\n".join(lines)


def _strip_module(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_official_checkpoint(
    path: str | Path, *, use_ema: bool = False, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read an official ``.pth`` and return its weights (``module.`` stripped) with a report.

    Args:
        path: the checkpoint file.
        use_ema: take ``"model_ema"`` instead of ``"model"`` (the official evaluation uses ``"model"``,
            ``docs/official_model.md#quirks`` item 19).
        trust_pickle: allow arbitrary pickled objects (only for files you trust); by default only tensors and plain
            containers are unpickled.
    """
    path = Path(path)
    obj = load_checkpoint_file(path, trust_pickle=trust_pickle)
    report = LoadReport(source=str(path))
    if isinstance(obj, Mapping) and ("model" in obj or "model_ema" in obj):
        entry = "model_ema" if use_ema else "model"
        if entry not in obj:
            raise CheckpointError(f"{path}: has no {entry!r} entry (entries: {sorted(obj)})")
        weights = obj[entry]
        report.used_entry = entry
        report.ignored_entries = sorted(k for k in obj if k != entry)
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if use_ema:
            raise CheckpointError(f"{path}: is a bare state dict; it has no 'model_ema' entry")
        weights = obj
        report.used_entry = "<state dict>"
    else:
        kind = type(obj).__name__
        keys = sorted(obj)[:20] if isinstance(obj, Mapping) else []
        raise CheckpointError(f"{path}: not a GLIP checkpoint (a {kind} with entries {keys})")
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: entry {report.used_entry!r} is a {type(weights).__name__}, not a state dict")
    return _strip_module(weights), report


_ZIP_MAGIC = b"PK\x03\x04"
# how torch's weights-only unpickler names the global it refuses (an unknown one, or one of a blocked module)
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _global_kind(dotted: str) -> str:
    """"object" when ``module.attr`` (or the builtin ``attr``) exists, "missing module" when the module is not
    installed, "cut" when the module exists but not the attribute (a truncated file cuts names in half)."""
    import builtins
    import importlib

    module, _, attr = dotted.rpartition(".")
    if not module:  # torch names builtins without their module ("eval")
        return "object" if hasattr(builtins, attr) else "cut"
    try:
        found = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - not installed (or failing): the file refers to code we do not have
        return "missing module"
    return "object" if hasattr(found, attr) else "cut"


def load_checkpoint_file(path: str | Path, *, trust_pickle: bool = False):
    """``torch.load`` a checkpoint file on the CPU with one clear :class:`CheckpointError` per way it can be wrong.

    By default only tensors and plain containers are unpickled (``weights_only``). A file holding other Python objects
    -- a checkpoint saved with its config objects, or a malicious file whose unpickling would run code -- is refused,
    naming the object, with a hint to ``trust_pickle`` (``--trust-pickle``) given only where it would help: never for a
    truncated or damaged file, or for a file that is not a checkpoint at all (an image, a text file).
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    is_zip = head == _ZIP_MAGIC
    if not is_zip and not head.startswith(b"\x80"):  # neither a zip archive nor a pickle (protocol >= 2)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with {head!r}; expected a zip archive "
                              "or a pickle, as torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        found = _REFUSED_GLOBAL.search(str(exc))
        blocked = found is not None and "is blocked" in str(exc)
        kind = "object" if blocked else (_global_kind(found.group(1)) if found else None)
        if kind in ("object", "missing module") and not trust_pickle:
            extra = " (its module is not installed here)" if kind == "missing module" else ""
            raise CheckpointError(f"{path}: refuses to unpickle {found.group(1)}{extra}: the file holds Python objects "
                                  "besides tensors, and unpickling them can run any code (pass trust_pickle=True "
                                  "only for files you trust)") from None
        if not found and not trust_pickle and "Unsupported operand" in str(exc):
            raise CheckpointError(f"{path}: is a plain pickle, not a file torch.save wrote with tensors only (pass "
                                  "trust_pickle=True only if it is a checkpoint you trust)") from None
        raise CheckpointError(f"{path}: cannot be read: the file is truncated or damaged") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read: the file is truncated or damaged ({first[:120]})") from None


def _describe_prefixes(keys) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in sorted(counts.items()))


def infer_official_config(state_dict: Mapping[str, torch.Tensor]) -> GLIPConfig:
    """Recognise GLIP-T, GLIP-T(A), GLIP-L (or a custom layout of the same family) from keys and shapes."""
    required = (
        "backbone.body.patch_embed.proj.weight",
        "language_backbone.body.model.embeddings.word_embeddings.weight",
        "rpn.head.bbox_pred.weight",
    )
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(
            "unknown checkpoint layout: expected official GLIP keys such as "
            f"{', '.join(required)}; missing {missing}. Found: {_describe_prefixes(state_dict)}"
        )
    embed_dim = state_dict["backbone.body.patch_embed.proj.weight"].shape[0]
    depths, heads, window = [], [], None
    for stage in range(8):
        blocks = {int(m.group(1)) for k in state_dict
                  if (m := re.match(rf"backbone\.body\.layers\.{stage}\.blocks\.(\d+)\.", k))}
        if not blocks:
            break
        depths.append(len(blocks))
        table = state_dict[f"backbone.body.layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        window = int(round((table.shape[0] ** 0.5 + 1) / 2))
    tower = {int(m.group(1)) for k in state_dict if (m := re.match(r"rpn\.head\.dyhead_tower\.(\d+)\.", k))}
    early_fusion = any(".b_attn." in k for k in state_dict if k.startswith("rpn.head.dyhead_tower."))
    num_layers = len(tower) // 3 if early_fusion else len(tower)
    text = "language_backbone.body.model."
    vocab, hidden = state_dict[text + "embeddings.word_embeddings.weight"].shape
    n_text_layers = len({int(m.group(1)) for k in state_dict if (m := re.match(re.escape(text) + r"encoder\.layer\.(\d+)\.", k))})
    text_cfg = {
        "model_type": "bert",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": n_text_layers,
        "num_attention_heads": max(1, int(hidden) // 64),
        "intermediate_size": int(state_dict[text + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": int(state_dict[text + "embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state_dict[text + "embeddings.token_type_embeddings.weight"].shape[0]),
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }
    known = {(96, (2, 2, 6, 2), 7): "swin_tiny", (192, (2, 2, 18, 2), 12): "swin_large"}
    swin = known.get((embed_dim, tuple(depths), window))
    if swin is None:
        raise CheckpointError(
            f"unsupported Swin layout: embed dim {embed_dim}, depths {depths}, heads {heads}, window {window} "
            "(supported: Swin-T 96/2,2,6,2/7 and Swin-L 192/2,2,18,2/12)"
        )
    if early_fusion:
        name = {("swin_tiny", 6): "glip_t", ("swin_large", 8): "glip_l"}.get((swin, num_layers), "glip_custom")
    else:
        name = "glip_t_a" if (swin, num_layers) == ("swin_tiny", 6) else "glip_custom"
    fusion: dict = {"num_blocks": num_layers, "early_fusion": early_fusion,
                    "channels": int(state_dict["backbone.fpn.fpn_inner2.weight"].shape[0])}
    if early_fusion:  # sizes read from the weights (official: 2048-wide X-MHA, BERT-sized head layers)
        fusion["embed_dim"] = int(state_dict["rpn.head.dyhead_tower.0.b_attn.attn.v_proj.weight"].shape[0])
        fusion["bert_intermediate_size"] = int(state_dict["rpn.head.dyhead_tower.1.intermediate.dense.weight"].shape[0])
    return GLIPConfig(
        name=name,
        image_encoder=swin,
        fpn_channels=fusion["channels"],
        text_encoder=text_cfg,
        fusion=fusion_for_text(text_cfg, **fusion),
        fused_text_for_logits=early_fusion,
        num_cls_logits=int(state_dict["rpn.head.cls_logits.weight"].shape[0]),
    )


def map_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map official keys (``module.`` already stripped) onto ``model``'s keys, strictly.

    Returns:
        ``(our_state_dict, dropped_keys)``. Raises :class:`CheckpointError` listing the missing, unexpected and
        mis-shaped keys if the result would not load strictly.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in PREFIX_MAP}
    unexpected, dropped = [], []
    anchors = {}
    for key, value in state_dict.items():
        if key.startswith(ANCHOR_PREFIX):
            anchors[key] = value
            continue
        for prefix in PREFIX_MAP:
            if key.startswith(prefix):
                groups[prefix][key[len(prefix):]] = value
                break
        else:
            unexpected.append(key)

    ours: dict[str, torch.Tensor] = {}
    errors: list[str] = []
    try:
        body = image_checkpoint_filter_fn(groups["backbone."], model.backbone)
        ours.update({PREFIX_MAP["backbone."] + k: v for k, v in body.items()})
    except (KeyError, ValueError, RuntimeError) as exc:
        errors.append(f"image encoder: {exc}")
    try:
        text, text_dropped = text_checkpoint_filter_fn(groups["language_backbone.body.model."])
        ours.update({PREFIX_MAP["language_backbone.body.model."] + k: v for k, v in text.items()})
        dropped += ["language_backbone.body.model." + k for k in text_dropped]
    except (KeyError, ValueError, RuntimeError) as exc:
        errors.append(f"text encoder: {exc}")
    ours.update({PREFIX_MAP["rpn.head."] + k: v for k, v in groups["rpn.head."].items()})

    # anchors are structural: check them against ours instead of loading them
    generator = model.anchor_generator
    for level, (size, stride) in enumerate(zip(generator.sizes, generator.strides)):
        key = f"{ANCHOR_PREFIX}{level}"
        cell = generator.cell_anchor(size, stride)
        if key in anchors:
            value = anchors[key]
            if value.shape != cell.shape or value.is_meta or not torch.allclose(value.float(), cell):
                errors.append(f"{key}: checkpoint anchors {anchors[key].tolist()} differ from ours {cell.tolist()}")
            dropped.append(key)
    extra_anchor_keys = sorted(set(anchors) - {f"{ANCHOR_PREFIX}{i}" for i in range(len(model.anchor_generator.strides))})
    unexpected += extra_anchor_keys

    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in ours)
    unexpected += sorted(k for k in ours if k not in expected)
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(ours[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in ours if k in expected and ours[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped or errors:
        parts = []
        for title, items in (("errors", errors), ("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mis_shaped)):
            if items:
                shown = "\n    ".join(items[:40]) + (f"\n    ... ({len(items) - 40} more)" if len(items) > 40 else "")
                parts.append(f"  {title} ({len(items)}):\n    {shown}")
        raise CheckpointError("checkpoint does not match the model:\n" + "\n".join(parts))
    return ours, sorted(dropped)


def to_official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse mapping: our model's weights under the official key names (without ``module.``), including the
    structural buffers (``relative_position_index``, anchor templates) an official state dict holds."""
    out = {"backbone." + k: v for k, v in image_to_official_state_dict(model.backbone).items()}
    inverse = {ours: official for official, ours in PREFIX_MAP.items() if official != "backbone."}
    for key, value in model.state_dict().items():
        for ours, official in inverse.items():
            if key.startswith(ours):
                out[official + key[len(ours):]] = value
    generator = model.anchor_generator
    for level, (size, stride) in enumerate(zip(generator.sizes, generator.strides)):
        out[f"{ANCHOR_PREFIX}{level}"] = generator.cell_anchor(size, stride)
    return out
