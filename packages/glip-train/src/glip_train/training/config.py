"""Typed training configuration: YAML or JSON files, dotted ``key=value`` overrides, validated when built.

A :class:`TrainConfig` holds everything a run needs; ``glip train CONFIG.yaml optim.lr=1e-5 data.batch_size=4``
loads the file, applies the overrides and validates the result (an unknown key or a bad value names its dotted
path). The resolved config is written beside every checkpoint, and a resumed run must match it.

Defaults are the official GLIP-T pre-training recipe (``docs/official_model.md#training-recipe``) except where a
field says otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from glip_data.validators import check_choice, check_int, check_number

from ..shipped import SHIPPED_NAME

__all__ = [
    "DatasetConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "FreezeConfig",
    "TrainConfig",
    "ConfigError",
    "load_train_config",
    "apply_overrides",
]

DATASET_KINDS = ("coco", "objects365", "lvis", "mdetr", "odvg", "captions", "shards")
DETECTION_KINDS = ("coco", "objects365", "lvis")
PROMPT_MODES = ("fixed", "sampled")
TRAIN_MODES = ("full", "prompt_tuning", "linear_probe")
SCHEDULES = ("multistep", "cosine", "constant")
#: the official linear warm-up length (``SOLVER.WARMUP_ITERS``) ...
OFFICIAL_WARMUP_ITERS = 2000
#: ... and the share of a run it becomes when ``schedule.warmup_iters`` is not set: 2000 of the official COCO
#: fine-tuning's 88,700 steps is 2.3 %, a short run on a small dataset needs a real warm-up without spending most of
#: its steps in it; 5 % reaches the official 2000 at 40,000 steps
WARMUP_FRACTION = 0.05
AMP_MODES = ("none", "bf16", "fp16")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the dotted key."""


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path}: {message}")


def _check_positive_int(path: str, value: Any, allow_zero: bool = False) -> None:
    check_int(value, path, low=0 if allow_zero else 1, error=ConfigError)


def _check_number(path: str, value: Any, low: float = -math.inf, high: float = math.inf,
                  low_open: bool = False) -> None:
    check_number(value, path, low=low, high=high, low_open=low_open, error=ConfigError)


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    check_choice(value, path, choices, error=ConfigError)


@dataclass(frozen=True)
class DatasetConfig:
    """One training source.

    Attributes:
        kind: "coco" (COCO-format detection; also ODinW / Roboflow exports), "objects365", "lvis", "mdetr"
            (grounding: Flickr30k / GoldG / the synthetic world's grounding file), "odvg", "captions" (captions with
            pseudo-labels, JSON Lines), "shards" (streamed, not loaded: a shard folder with its ``index.json`` --
            ``glip pseudo-label`` output or ``glip-data shard`` output -- read split by process and DataLoader worker;
            its caption records follow the captions options, its detection records the detection ones).
        annotations: the annotation file (for "shards": the shard folder).
        images: the image folder (None: the annotation file's folder).
        weight: sampling weight in the mixture of sources.
        prompt: detection sources only: "fixed" — every class in id order (the official COCO fine-tuning prompt,
            ``DISABLE_SHUFFLE``; long vocabularies keep the first classes that fit 256 tokens... use "sampled"), or
            "sampled" — positives plus sampled negative classes in random order (official Objects365 pre-training).
        negatives: the most negative classes a "sampled" prompt draws (official 85).
        few_shot: keep only enough images for ``few_shot`` examples per class (official greedy image rule); 0 = all.
        few_shot_seed: shuffles the image order before the greedy rule (None: the official id order).
        min_score: captions: keep pseudo-label boxes scoring strictly above this (official 0.5).
        min_boxes: captions: leave out captions with fewer kept boxes (official 1).
        pack_captions: captions: pack random other captions as negatives (official caption packing; a streamed
            source draws them from the captions of the same shard).
    """

    kind: str
    annotations: str
    images: Optional[str] = None
    weight: float = 1.0
    prompt: str = "sampled"
    negatives: int = 85
    few_shot: int = 0
    few_shot_seed: Optional[int] = None
    min_score: float = 0.5
    min_boxes: int = 1
    pack_captions: bool = True

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.kind", self.kind, DATASET_KINDS)
        if not isinstance(self.annotations, str) or not self.annotations:
            _fail(f"{path}.annotations", "must name an annotation file")
        _check_number(f"{path}.weight", self.weight, 0.0)
        _check_choice(f"{path}.prompt", self.prompt, PROMPT_MODES)
        _check_positive_int(f"{path}.negatives", self.negatives, allow_zero=True)
        _check_positive_int(f"{path}.few_shot", self.few_shot, allow_zero=True)
        _check_number(f"{path}.min_score", self.min_score, 0.0, 1.0)
        _check_positive_int(f"{path}.min_boxes", self.min_boxes, allow_zero=True)


#: what ``data.val`` may hold
VAL_KEYS = ("annotations", "images", "protocol", "min_size", "max_size")


def val_protocols() -> tuple[str, ...]:
    """The protocols ``data.val`` may name: the single-dataset detection protocols of ``glip_train.evaluation``."""
    from ..evaluation.protocols import PROTOCOLS, DetectionProtocol, ODinWProtocol

    return tuple(name for name, p in PROTOCOLS.items()
                 if isinstance(p, DetectionProtocol) and not isinstance(p, ODinWProtocol))


@dataclass(frozen=True)
class DataConfig:
    """Inputs of the run.

    Attributes:
        world: a synthetic grounding world to generate (once) and train on: ``{dir: FOLDER, seed: 0, ...}`` with any
            ``glip_data.SynthConfig`` field; sources then name its files as ``annotations: world:detection_train``
            (also ``world:grounding_train``, ``world:captions_train``, ``world:coco_val``...).
        train: the training sources (mixed by their weights).
        val: a validation set evaluated every ``eval_every`` steps and at the end, or None: ``{annotations: FILE
            (or world:coco_val), images: DIR, protocol: coco, min_size: PX, max_size: PX}`` (protocol: a single-dataset
            detection protocol of ``glip_train.evaluation`` -- coco, lvis-minival, lvis-val, lvis-val-fixed, custom -- not odinw; test resize default: the model's test size, which fine-tuning keeps).
        batch_size: images per process and step (global batch = batch_size x processes x grad_accumulation).
        min_sizes, max_size: multi-scale training resize: the shorter side is drawn from ``min_sizes``, the longer
            side capped at ``max_size`` (official 480..800, 1333). None (the default): fit to the training images,
            the model's test size and the device when the run starts (``glip_train.training.build.fit_train_sizes``;
            the official sizes for COCO-sized images on a GPU), and recorded in the run's config.
        flip_prob: horizontal flip probability (official 0.5).
        swap_left_right: flip also swaps "left"/"right" in captions (off: official, quirk 17).
        pad_text_to: "max" pads every caption to 256 tokens (official PAD_MAX), "longest" to the batch's longest.
        max_negative_fraction: skip a batch when more than this fraction of its images has no box (official 0.1).
        num_workers: DataLoader workers per process.
        epoch_size: samples per epoch of the mixture (None: the sources' total length).
    """

    world: Optional[dict[str, Any]] = None
    train: tuple[DatasetConfig, ...] = ()
    val: Optional[dict[str, Any]] = None
    batch_size: int = 2
    min_sizes: Optional[tuple[int, ...]] = None
    max_size: Optional[int] = None
    flip_prob: float = 0.5
    swap_left_right: bool = False
    pad_text_to: str = "max"
    max_negative_fraction: float = 0.1
    num_workers: int = 2
    epoch_size: Optional[int] = None

    def validate(self, path: str = "data") -> None:
        if self.world is not None and (not isinstance(self.world, dict) or "dir" not in self.world):
            _fail(f"{path}.world", "must be {dir: FOLDER, seed: N, ...SynthConfig fields} or null")
        if not self.train:
            _fail(f"{path}.train", "needs at least one dataset")
        for i, ds in enumerate(self.train):
            ds.validate(f"{path}.train.{i}")
        if self.val is not None:
            if not isinstance(self.val, dict) or "annotations" not in self.val:
                _fail(f"{path}.val", "must be {annotations: FILE, images: DIR, protocol: coco} or null")
            unknown = sorted(set(self.val) - set(VAL_KEYS))
            if unknown:
                _fail(f"{path}.val", f"unknown keys {unknown}; known: {list(VAL_KEYS)}")
            if self.val.get("protocol", "coco") not in val_protocols():
                _fail(f"{path}.val.protocol", f"must be one of {val_protocols()}, got {self.val['protocol']!r}")
            for key in ("min_size", "max_size"):
                if self.val.get(key) is not None:
                    _check_positive_int(f"{path}.val.{key}", self.val[key])
        _check_positive_int(f"{path}.batch_size", self.batch_size)
        if self.min_sizes is not None:
            if not self.min_sizes:
                _fail(f"{path}.min_sizes", "needs at least one size (or null: fit to the images)")
            for s in self.min_sizes:
                _check_positive_int(f"{path}.min_sizes", s)
        if self.max_size is not None:
            _check_positive_int(f"{path}.max_size", self.max_size)
        _check_number(f"{path}.flip_prob", self.flip_prob, 0.0, 1.0)
        _check_choice(f"{path}.pad_text_to", self.pad_text_to, ("max", "longest"))
        _check_number(f"{path}.max_negative_fraction", self.max_negative_fraction, 0.0, 1.0)
        _check_positive_int(f"{path}.num_workers", self.num_workers, allow_zero=True)
        if self.epoch_size is not None:
            _check_positive_int(f"{path}.epoch_size", self.epoch_size)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with the official parameter groups (``docs/official_model.md#training-recipe``).

    Every parameter whose name contains ``language_backbone`` gets ``language_lr``; every parameter whose name
    contains ``bias`` (which also catches ``bias_lang``, ``bias0`` and Swin's ``relative_position_bias_table``, as in
    the official code) gets ``bias_lr_factor`` times its LR and ``weight_decay_bias``.

    Attributes:
        lr, language_lr, weight_decay, weight_decay_bias, bias_lr_factor, betas, eps: as above.
        clip_grad_norm: L2 norm clipping over all parameters after unscaling (official 1.0; None = off).
        prompt_lr, prompt_weight_decay: the prompt-tuning table's (official 0.05, 0.25).
        lr_factors: more LR multipliers, applied after the rules above: each key that names a parameter -- a
            substring of its name, or a glob over the whole name when the key has ``*`` or ``?`` -- multiplies its
            LR. E.g. ``{"b_attn": 0.1}``: the fusion's X-MHA at a tenth of ``lr``; ``{"*dyhead_tower.*.attention.*":
            0.1}``: the tower's text attention layers (docs/training.md, "Learning-rate instability"). Empty (the
            official recipe) by default.
    """

    lr: float = 1e-4
    language_lr: float = 1e-5
    weight_decay: float = 1e-4
    weight_decay_bias: float = 0.0
    bias_lr_factor: float = 2.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad_norm: Optional[float] = 1.0
    prompt_lr: float = 0.05
    prompt_weight_decay: float = 0.25
    lr_factors: dict[str, float] = field(default_factory=dict)

    def validate(self, path: str = "optim") -> None:
        if not isinstance(self.lr_factors, dict):
            _fail(f"{path}.lr_factors", f"must map name substrings to LR multipliers; got {self.lr_factors!r}")
        for key, factor in self.lr_factors.items():
            if not isinstance(key, str) or not key:
                _fail(f"{path}.lr_factors", f"keys must be non-empty parameter-name substrings; got {key!r}")
            _check_number(f"{path}.lr_factors.{key}", factor, 0.0)
        for name in ("lr", "language_lr", "weight_decay", "weight_decay_bias", "bias_lr_factor", "prompt_lr",
                     "prompt_weight_decay"):
            _check_number(f"{path}.{name}", getattr(self, name), 0.0)
        if len(self.betas) != 2:
            _fail(f"{path}.betas", f"must be two numbers; got {self.betas!r}")
        for b in self.betas:
            _check_number(f"{path}.betas", b, 0.0, 1.0)
        _check_number(f"{path}.eps", self.eps, 0.0, low_open=True)
        if self.clip_grad_norm is not None:
            _check_number(f"{path}.clip_grad_norm", self.clip_grad_norm, 0.0, low_open=True)


@dataclass(frozen=True)
class ScheduleConfig:
    """Iterations and the learning-rate schedule.

    Attributes:
        max_iter: optimizer steps of the run. (Official GLIP-T: 30 epochs of the data at batch 64.)
        epochs: instead of ``max_iter``, passes over the training data (max_iter is then computed from the data
            size and the global batch when the run starts, and recorded in the run's config). Whichever of the two
            the user gives wins over a recipe's (:func:`load_train_config`).
        warmup_iters, warmup_factor: linear warm-up from ``warmup_factor`` (official 2000, 0.001). None (the
            default): scaled with the run, ``WARMUP_FRACTION`` (5 %) of ``max_iter`` rounded down, at most the
            official 2000 (:meth:`warmup`: the official number from 40000 steps on; every official recipe is
            longer).
        kind: "multistep" (x ``gamma`` at each of ``steps``, fractions of max_iter rounded like the official code),
            "cosine" (the official cosine: ``min_lr + (lr - min_lr)(1 + cos(pi (it - warmup) / max_iter)) / 2``),
            "constant".
        steps, gamma, min_lr_factor: as above (min_lr = min_lr_factor x lr).
    """

    max_iter: int = 1000
    epochs: Optional[float] = None
    warmup_iters: Optional[int] = None
    warmup_factor: float = 0.001
    kind: str = "multistep"
    steps: tuple[float, ...] = (0.67, 0.89)
    gamma: float = 0.1
    min_lr_factor: float = 0.0

    def validate(self, path: str = "schedule") -> None:
        _check_positive_int(f"{path}.max_iter", self.max_iter)
        if self.epochs is not None:
            _check_number(f"{path}.epochs", self.epochs, 0.0, low_open=True)
        if self.warmup_iters is not None:
            _check_positive_int(f"{path}.warmup_iters", self.warmup_iters, allow_zero=True)
        _check_number(f"{path}.warmup_factor", self.warmup_factor, 0.0, 1.0)
        _check_choice(f"{path}.kind", self.kind, SCHEDULES)
        previous = 0.0
        for s in self.steps:
            _check_number(f"{path}.steps", s, 0.0)
            if s < previous:
                _fail(f"{path}.steps", f"must be increasing; got {self.steps!r}")
            previous = s
        _check_number(f"{path}.gamma", self.gamma, 0.0, 1.0, low_open=True)
        _check_number(f"{path}.min_lr_factor", self.min_lr_factor, 0.0, 1.0)

    def warmup(self) -> int:
        """Warm-up steps: ``warmup_iters``, or when it is None ``min(2000, floor(5 % of max_iter))``."""
        if self.warmup_iters is not None:
            return self.warmup_iters
        return min(OFFICIAL_WARMUP_ITERS, math.floor(WARMUP_FRACTION * self.max_iter))

    def milestones(self) -> list[int]:
        """Steps as iterations: a fraction < 1 is ``round(fraction * max_iter)`` (official), else an iteration."""
        return [round(s * self.max_iter) if s < 1 else int(s) for s in self.steps]


@dataclass(frozen=True)
class FreezeConfig:
    """What does not train (official freezing options).

    Attributes:
        backbone: image encoder body: None trains it; an int is the official ``FREEZE_CONV_BODY_AT`` for Swin
            (0: patch embedding, k >= 2: also stages 0..k-2); "all" freezes the whole body (any backbone).
        fpn, language, head: freeze the FPN, the text encoder, the whole head (fusion tower and predictors).
    """

    backbone: Any = None
    fpn: bool = False
    language: bool = False
    head: bool = False

    def validate(self, path: str = "freeze") -> None:
        if not (self.backbone is None or self.backbone == "all"
                or (isinstance(self.backbone, int) and not isinstance(self.backbone, bool) and self.backbone >= -1)):
            _fail(f"{path}.backbone", f"must be null, 'all' or an integer >= -1; got {self.backbone!r}")


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Attributes:
        output_dir: where checkpoints, logs, the final weights and the resolved config go.
        init: weights to start from: an official ``.pth``, a ``save_pretrained`` directory, a weights-recipe
            ``.json``; None builds ``model`` from scratch.
        model: GLIPConfig fields (a full config without ``init``; overrides of the loaded config with it). The
            special key ``small`` builds ``GLIPConfig.small``: ``{"small": {"text_encoder_dir": ...,
            "image_encoder": "resnet18", ...}}``.
        mode: "full" (fine-tune / pre-train), "prompt_tuning" (only the per-position text offset table trains;
            official ``language_prompt_v2``), "linear_probe" (only the official predictor set trains).
        freeze: :class:`FreezeConfig` (full mode).
        data, optim, schedule: :class:`DataConfig`, :class:`OptimConfig`, :class:`ScheduleConfig`.
        amp: "none", "bf16" (autocast) or "fp16" (autocast with a gradient scaler).
        ema: EMA decay of the weights (official GLIP-T 0.999, buffers included, saved separately); None = off.
        grad_accumulation: micro-batches per optimizer step.
        gradient_checkpointing: recompute the fusion blocks in backward (official ``DYHEAD.USE_CHECKPOINT``).
        fusion_backend: ``glip_fusion.bi_attention`` backend ("auto" picks the fused kernel on CUDA).
        seed: seeds the model init, the data order and every augmentation.
        checkpoint_every, keep_checkpoints: checkpoint period (optimizer steps) and how many to keep.
        log_every: metrics period (steps). eval_every: validation period (steps; None = at the end only if a
            validation set is given).
        nan_patience: stop after this many consecutive steps with a non-finite loss (each is skipped and logged).
        device: "auto", "cpu", "cuda", "cuda:N".
        prompt_positions: rows of the prompt-tuning table (official 1000).
    """

    output_dir: str = "runs/glip"
    init: Optional[str] = None
    model: dict[str, Any] = field(default_factory=dict)
    mode: str = "full"
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    amp: str = "none"
    ema: Optional[float] = 0.999
    grad_accumulation: int = 1
    gradient_checkpointing: bool = False
    fusion_backend: str = "auto"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: Optional[int] = None
    nan_patience: int = 5
    device: str = "auto"
    prompt_positions: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail("output_dir", "must be a folder path")
        if self.init is None and not self.model:
            _fail("model", "without init weights, model must describe the architecture (GLIPConfig fields, or "
                           "{small: {text_encoder_dir: ...}})")
        _check_choice("mode", self.mode, TRAIN_MODES)
        self.freeze.validate()
        self.data.validate()
        self.optim.validate()
        self.schedule.validate()
        _check_choice("amp", self.amp, AMP_MODES)
        if self.ema is not None:
            _check_number("ema", self.ema, 0.0, 1.0, low_open=True)
        _check_positive_int("grad_accumulation", self.grad_accumulation)
        _check_choice("fusion_backend", self.fusion_backend, ("auto", "reference", "sdpa", "triton"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", f"must be an integer >= 0; got {self.seed!r}")
        _check_positive_int("checkpoint_every", self.checkpoint_every)
        _check_positive_int("keep_checkpoints", self.keep_checkpoints)
        _check_positive_int("log_every", self.log_every)
        if self.eval_every is not None:
            _check_positive_int("eval_every", self.eval_every)
        _check_positive_int("nan_patience", self.nan_patience)
        _check_positive_int("prompt_positions", self.prompt_positions)
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            _fail("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}")

    # ---- (de)serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _build(cls, data, "")

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON, atomically."""
        from glip_data.io import atomic_write_text

        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        atomic_write_text(path, text)
        return path


def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """Plain config data as ``{dotted key: value}`` (lists are values)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from plain data, recursively, naming the dotted path of any problem."""
    if not isinstance(data, dict):
        _fail(path or "<config>", f"must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        _fail(f"{where}{unknown[0]}", f"unknown key (known keys here: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = _convert(hints[name], value, sub)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        _fail(path or "<config>", str(exc))


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"must be a list; got {value!r}")
        item = args[0] if args else Any
        if item is DatasetConfig or dataclasses.is_dataclass(item):
            return tuple(_convert(item, v, f"{path}.{i}") for i, v in enumerate(value))
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to plain config data (lists are indexed by number: ``data.train.0.x``);
    values are read by the one override grammar (:mod:`glip_train.overrides`) with the fields' types."""
    from ..overrides import OverrideError, apply_overrides as apply

    try:
        return apply(data, overrides, schema=TrainConfig)
    except OverrideError as exc:
        raise ConfigError(str(exc)) from None


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with glip-train, by name (``glip train NAME``)."""
    folder = Path(__file__).resolve().parent.parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      base: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML/JSON config file (or start from ``base``), apply dotted overrides and validate.

    ``path`` may also name a shipped config (:func:`shipped_configs`, e.g. ``"tiny_synth"``). Relative dataset and
    weight paths in a file are resolved against the file's folder; in a shipped config, against the current folder.

    The run's length is given once: ``schedule.max_iter`` or ``schedule.epochs``. An override of one replaces the
    other where the file or ``base`` (a recipe) gave it; giving both is an error naming both.
    """
    data: dict[str, Any] = dict(base or {})
    root = None
    if path is not None:
        path = Path(path)
        if not path.is_file() and str(path) in shipped_configs():
            path, root = shipped_configs()[str(path)], Path.cwd()
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path} (shipped configs: "
                                    f"{', '.join(shipped_configs())})")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                loaded = yaml.safe_load(text)
            else:
                loaded = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - YAML and JSON raise many types
            raise ConfigError(f"{path}: not a valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                              f"file ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        schedule = loaded.get("schedule")
        if isinstance(schedule, dict) and all(schedule.get(key) is not None for key in ("max_iter", "epochs")):
            raise ConfigError(f"{path}: schedule.max_iter and schedule.epochs are both set; keep one (max_iter: "
                              "optimizer steps, epochs: passes over the training data)")
        data.update(_resolve_paths(loaded, root or path.parent))
    overrides = list(overrides or [])
    data = _user_length_wins(data, overrides)
    data = apply_overrides(data, overrides)
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


#: the two ways of giving a run's length
LENGTH_KEYS = ("schedule.max_iter", "schedule.epochs")


def _user_length_wins(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` without the length the overrides replace: ``schedule.max_iter=50`` drops a recipe's ``epochs`` (and
    ``schedule.epochs=2`` its ``max_iter``), so the user's length always wins."""
    given = [key for key in LENGTH_KEYS
             if any(item.split("=", 1)[0].strip() == key and "=" in item for item in overrides)]
    if len(given) == 2:
        raise ConfigError("schedule.max_iter and schedule.epochs: both given; give one (max_iter: optimizer steps, "
                          "epochs: passes over the training data)")
    schedule = data.get("schedule")
    if not given or not isinstance(schedule, dict):
        return data
    other = LENGTH_KEYS[1 - LENGTH_KEYS.index(given[0])].split(".")[1]
    return {**data, "schedule": {k: v for k, v in schedule.items() if k != other}}


def _resolve_paths(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Make the file's relative paths (datasets, init, output_dir, text encoder dir) relative to its folder."""
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute() and not value.startswith("$"):
            return str((root / value).resolve())
        return value

    data = json.loads(json.dumps(data))
    if data.get("init") and data["init"] != SHIPPED_NAME:  # "default" names the shipped model, not a file
        data["init"] = fix(data["init"])
    for ds in (data.get("data") or {}).get("train") or []:
        if isinstance(ds, dict):
            for key in ("annotations", "images"):
                if ds.get(key) and not str(ds[key]).startswith("world:"):
                    ds[key] = fix(ds[key])
    world = (data.get("data") or {}).get("world")
    if isinstance(world, dict) and world.get("dir"):
        world["dir"] = fix(world["dir"])
    val = (data.get("data") or {}).get("val")
    if isinstance(val, dict):
        for key in ("annotations", "images"):
            if val.get(key) and not str(val[key]).startswith("world:"):
                val[key] = fix(val[key])
    small = (data.get("model") or {}).get("small")
    if isinstance(small, dict) and small.get("text_encoder_dir") and small["text_encoder_dir"] != "minilm":
        small["text_encoder_dir"] = fix(small["text_encoder_dir"])
    return data
