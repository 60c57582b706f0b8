"""The GLIP trainer: one process or many (``torchrun``), fine-tuning, prompt tuning, linear probing, pre-training.

:class:`Trainer` builds a run from its config with the functions of :mod:`~glip_train.training.build` (each one job:
process group, input checks, the output folder's lock, data, model, schedule, freezing, optimizer, EMA, DDP,
resume) and then runs a small loop of optimizer steps; checkpointing, validation, logging, the NaN guard and the
progress bar are hooks (:mod:`~glip_train.training.hooks`).

What a step does (``docs/training.md`` has the user view):

1. ``grad_accumulation`` micro-batches of ``data.batch_size`` images per process; a micro-batch with more than
   ``data.max_negative_fraction`` of images without a box is skipped (official rule; decided jointly by all
   processes so they never disagree);
2. forward under autocast (bf16, or fp16 with a gradient scaler), the official losses in float32; a step whose loss
   is not finite on any process applies no update (the :class:`~glip_train.training.hooks.NaNGuard` names it and
   stops the run after ``nan_patience`` in a row);
3. gradient clipping over all parameters (after unscaling), AdamW with the official parameter groups, the LR
   schedule, the EMA update.

Every ``checkpoint_every`` steps a checkpoint is written atomically. Running the same command again resumes from the
last one — model, optimizer, scheduler, scaler, EMA, data position, every RNG, counters, hook states — so an
interrupted run ends with exactly the weights of an uninterrupted one (CPU, float32).
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from glip_data.io import atomic_torch_save, atomic_write_json
from glip_data.report import SkipReport

from ..adapters import save_adapter
from .build import (build_ema, build_model, check_inputs, freeze_for_mode, lock_run_folder,
                    resolve_schedule, wrap_ddp)
from .checkpointing import checkpoint_path, prune_checkpoints, read_resume_state, restore_rng_state, rng_state
from .config import TrainConfig
from .data import TrainBatch, build_data, build_sources, prepare_world, resolve_world_file
from .distributed import all_gather, any_rank, barrier, setup_distributed
from .hooks import (CallbackHook, CheckpointHook, HookBase, MetricsLogger, NaNGuard, ProgressHook, TrainingDiverged,
                    ValidationHook)
from .optim import build_optimizer, build_scheduler

__all__ = ["Trainer", "TrainResult", "StepOutput", "TrainingDiverged", "build_model", "freeze_for_mode"]

COMMAND = "glip train"


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        output_dir: the run folder; model_dir: final weights (``save_pretrained`` layout; None for adapter runs);
        ema_dir: final EMA weights; adapter: the adapter file of a prompt-tuning / linear-probe run;
        steps: optimizer steps done; skipped_batches / bad_steps: batches skipped by the empty-image rule and steps
        skipped by the NaN guard; last_metrics: the last logged metrics; val_metrics: the final validation metrics
        (``data.val``), else None; skipped: the inputs left out, all processes together (annotations the readers
        dropped, image files missing or unreadable; ``skipped.exit_code()`` is 1 when there are any).
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
    skipped: SkipReport = field(default_factory=lambda: SkipReport(COMMAND, stream=None))


@dataclass
class StepOutput:
    """The outcome of one optimizer step (``trainer.last_step``, read by the hooks).

    Attributes:
        terms: the loss terms averaged over the micro-batches used, and their sum ``"loss"`` (empty when the step
        applied no update); images: images this process read; skipped_batches: micro-batches skipped by the
        empty-image rule; bad_term: the loss term that was not finite (the step applied no update), else None.
    """

    terms: dict[str, float]
    images: int
    skipped_batches: int = 0
    bad_term: str | None = None


class Trainer:
    """Runs a :class:`TrainConfig`.

    Building it checks every input, takes the output folder's lock (a second run on the same ``output_dir`` is
    refused with :class:`glip_data.io.OutputLockedError`), reads the data (reporting what the readers drop), builds
    the model and everything around it, and resumes from the run's last checkpoint. :meth:`train` runs to the end
    and releases the lock; :meth:`close` (or ``with Trainer(...) as trainer:``) releases it without training.

    Args:
        config: the run.
        progress: show a progress bar (rank 0).
        hooks: more hooks, run after the default ones (see :mod:`~glip_train.training.hooks`):
            :class:`~glip_train.training.hooks.HookBase` instances, or callables ``hook(trainer, step)`` run after
            each optimizer step.
        loss_fn: override the loss (``fn(model_output, targets) -> dict of terms``); default: the model's own
            GLIP losses.
    """

    def __init__(self, config: TrainConfig, *, progress: bool = True,
                 hooks: list[HookBase | Callable[["Trainer", int], None]] | None = None,
                 loss_fn: Callable[[Any, list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None):
        self.config, self.progress, self.loss_fn = config, progress, loss_fn
        self.output_dir = Path(config.output_dir)
        self.hooks: list[HookBase] = []
        self.lock = None
        self.console: Callable[[str], None] = print
        self.step = self.micro = 0  # optimizer steps done, global micro-batches consumed
        self.skipped_batches = self.bad_steps = self.consecutive_bad = 0
        self.last_metrics: dict[str, Any] = {}
        self.last_step: StepOutput | None = None
        self.result: TrainResult | None = None
        self.resumed_from: Path | None = None
        self.rank, self.world_size, self.device = setup_distributed(config.device)
        self.is_main = self.rank == 0
        check_inputs(config)  # before anything is written or built
        self.lock = lock_run_folder(self.output_dir, self.is_main, self.device)
        try:
            self._build(hooks or [])
        except BaseException:
            self.close()
            raise

    def _build(self, hooks: list) -> None:
        config = self.config
        self.world = prepare_world(config.data, self.is_main, self.device)
        check_inputs(config, self.world)
        # what the readers drop (identical on every process: named by rank 0); images unreadable at training time
        # (each process its own, gathered at the end)
        self.data_skips = SkipReport(COMMAND, stream="stderr" if self.is_main else None)
        self.image_skips = SkipReport(COMMAND)
        sources = build_sources(config.data, self.world, self.data_skips)  # the data is checked before the model
        if self.is_main:
            atomic_write_json(self.output_dir / "skipped.json", self.data_skips.to_dict())
        torch.manual_seed(config.seed)
        self.model = build_model(config).to(self.device)
        self.data = build_data(config, sources, self.model, self.rank, self.world_size)
        self.config = config = resolve_schedule(config, len(self.data.samples), self.world_size)
        self.trainable = freeze_for_mode(self.model, config)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.ema = build_ema(self.model, config)
        self.ddp = wrap_ddp(self.model, self.device, self.world_size)
        for hook in self.default_hooks() + list(hooks):
            self.register(hook)
        # last, so that a checkpoint holds the state every hook reached at its step
        self.register(CheckpointHook(config.checkpoint_every))
        resume = read_resume_state(self.output_dir, config.to_dict(), self.world_size)
        if resume is not None:
            self.resumed_from, state = resume
            self.load_state_dict(state)

    def default_hooks(self) -> list[HookBase]:
        """The hooks that run before the caller's (override to change them); the
        :class:`~glip_train.training.hooks.CheckpointHook` always runs last."""
        config = self.config
        hooks: list[HookBase] = [NaNGuard(config.nan_patience)]
        if self.is_main:
            hooks.append(MetricsLogger(config.log_every))
            if self.progress:
                hooks.append(ProgressHook())
        val = config.data.val
        if val is not None:
            annotations, images = resolve_world_file(val["annotations"], val.get("images"), self.world, "data.val")
            hooks.append(ValidationHook(config.eval_every, annotations, images, val))
        return hooks

    def register(self, hook: HookBase | Callable[["Trainer", int], None]) -> HookBase:
        """Add a hook (a :class:`HookBase`, or a callable ``hook(trainer, step)`` run after each step)."""
        if not isinstance(hook, HookBase):
            hook = CallbackHook(hook)
        hook.trainer = self
        self.hooks.append(hook)
        return hook

    # ---- state -----------------------------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """What the forward pass calls (the DDP wrapper in distributed runs)."""
        return self.ddp if self.ddp is not None else self.model

    @property
    def max_iter(self) -> int:
        return self.config.schedule.max_iter

    def _hook_states(self) -> dict[str, dict[str, Any]]:
        states = {}
        for hook in self.hooks:
            state = hook.state_dict()
            if state:
                if hook.name in states:
                    raise ValueError(f"two hooks named {hook.name!r} have state: give them distinct names")
                states[hook.name] = state
        return states

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (every process takes part: their RNG states and skip reports are gathered)."""
        ranks = all_gather({"rng": rng_state(), "skips": self.image_skips.to_dict()})
        return {
            "step": self.step,
            "micro": self.micro,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": [r["rng"] for r in ranks],
            "image_skips": [r["skips"] for r in ranks],
            "counters": {"skipped_batches": self.skipped_batches, "bad_steps": self.bad_steps,
                         "consecutive_bad": self.consecutive_bad},
            "hooks": self._hook_states(),
            "config": self.config.to_dict(),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (of this config and number of processes)."""
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
        if state.get("image_skips"):
            self.image_skips.merge(state["image_skips"][self.rank])  # named when they happened, not again
        for hook in self.hooks:
            if hook.name in state.get("hooks", {}):
                hook.load_state_dict(state["hooks"][hook.name])

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (atomically; rank 0) and the config beside it; every process
        must call it."""
        state = self.state_dict()
        if not self.is_main:
            return None
        path = checkpoint_path(self.output_dir, self.step)
        atomic_torch_save(state, path)
        self.config.save(path.parent / "config.yaml")
        prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        return path

    # ---- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until ``schedule.max_iter`` optimizer steps (resuming where a previous run of this config stopped),
        write the final weights, and release the output folder."""
        try:
            if self.is_main:
                self.config.save(self.output_dir / "config.yaml")
            batches = self.data.batches(self.micro)
            self._call("before_train")
            while self.step < self.max_iter:
                self._call("before_step")
                self.last_step = self.run_step(batches)
                self.step += 1
                self._call("after_step")
            self.result = self._export()  # the weights are written before the final validation can fail
            self._call("after_train")
            self._write_result()
            return self.result
        finally:
            self.close()

    def _call(self, stage: str) -> None:
        for hook in self.hooks:
            getattr(hook, stage)()

    def log(self, record: dict[str, Any]) -> None:
        """Hand a record (``{"step": ..., ...}``) to every hook's ``on_log`` (the metrics log writes it)."""
        for hook in self.hooks:
            hook.on_log(record)

    def echo(self, text: str) -> None:
        """Show a line to the user (rank 0; above the progress bar when there is one)."""
        if self.is_main:
            self.console(text)

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def compute_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (the model's GLIP losses, or ``loss_fn``)."""
        with self._autocast():
            output = self.network(batch.images, batch.input_ids, batch.attention_mask, batch.image_sizes,
                                  targets=None if self.loss_fn is not None else batch.targets)
        if self.loss_fn is not None:
            return self.loss_fn(output, batch.targets)
        return output.losses

    def run_step(self, batches) -> StepOutput:
        """One optimizer step over ``grad_accumulation`` micro-batches of ``batches``."""
        config = self.config
        accumulation = config.grad_accumulation
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        images = skipped = used = 0
        bad_term = None
        for i in range(accumulation):
            batch: TrainBatch = next(batches)
            self.micro += 1
            images += batch.images.shape[0]
            for path, message in batch.unreadable:
                self.image_skips.skip("unreadable image", path, message)
            if bad_term is not None:
                continue  # keep the data position in step with the other processes
            limit = config.data.max_negative_fraction * batch.images.shape[0]
            if any_rank(batch.num_empty > limit, self.device):
                skipped += 1
                continue
            batch = batch.to(self.device)
            sync = self.ddp is None or i == accumulation - 1
            context = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with context:
                losses = self.compute_losses(batch)
                total = sum(losses.values())
                finite = bool(torch.isfinite(total.detach()).item())
                if any_rank(not finite, self.device):
                    bad_term = next((k for k, v in losses.items() if not torch.isfinite(v.detach()).all()),
                                    "loss (on another process)")
                    continue
                self.scaler.scale(total / accumulation).backward()
            used += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        self.skipped_batches += skipped
        if bad_term is not None or used == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return StepOutput({}, images, skipped, bad_term)
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
        return StepOutput(terms, images, skipped, None)

    # ---- outputs ---------------------------------------------------------------------------------------------------
    def weights_digest(self) -> str:
        """sha256 of every parameter and buffer of the model (replicas of a distributed run must agree)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def skip_report(self) -> SkipReport:
        """Every input left out so far, all processes together (every process must call it)."""
        report = SkipReport(COMMAND).merge(self.data_skips)
        for ranks in all_gather(self.image_skips.to_dict()):
            report.merge(ranks)
        return report

    def _export(self) -> TrainResult:
        """The final weights (``model/`` and ``model_ema/``, or the adapter) and ``result.json``."""
        result = TrainResult(self.output_dir, None, None, None, self.step, self.skipped_batches, self.bad_steps,
                             self.last_metrics, skipped=self.skip_report())
        self._digests = all_gather(self.weights_digest())
        if len(set(self._digests)) != 1:  # DDP keeps replicas equal; anything else is a bug worth stopping for
            raise RuntimeError(f"the weights of the {self.world_size} processes differ at the end of training")
        if self.is_main:
            if self.config.mode == "full":
                result.model_dir = self.model.save_pretrained(self.output_dir / "model")
                if self.ema is not None:
                    result.ema_dir = self.ema.module.save_pretrained(self.output_dir / "model_ema")
            else:
                result.adapter = save_adapter(self.model, self.output_dir / "adapter.safetensors", self.config.mode,
                                              extra={"init": self.config.init, "steps": self.step})
        self.result = result
        self._write_result()
        barrier()
        return result

    def _write_result(self) -> None:
        """``result.json`` (what the run produced, the weights' digests, the last metrics, what was skipped) and
        ``skipped.json`` (every skipped input named; rank 0)."""
        if not self.is_main:
            return
        result = self.result
        atomic_write_json(self.output_dir / "skipped.json", result.skipped.to_dict())
        atomic_write_json(self.output_dir / "result.json", {
            "steps": result.steps, "skipped_batches": result.skipped_batches, "bad_steps": result.bad_steps,
            "model_dir": str(result.model_dir) if result.model_dir else None,
            "ema_dir": str(result.ema_dir) if result.ema_dir else None,
            "adapter": str(result.adapter) if result.adapter else None,
            "weights_sha256": self._digests, "world_size": self.world_size,
            "last_metrics": result.last_metrics, "val_metrics": result.val_metrics,
            "skipped": {k: v for k, v in result.skipped.to_dict().items() if k != "examples"}})

    def close(self) -> None:
        """Close the hooks and release the output folder (done by :meth:`train`; idempotent)."""
        failed = sys.exc_info()[1] is not None  # an error already on its way out is not masked by a closing one
        errors = []
        for hook in self.hooks:
            try:
                hook.close()
            except Exception as exc:  # noqa: BLE001 - every hook gets closed; the first error is raised below
                errors.append(exc)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if errors and not failed:
            raise errors[0]

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

