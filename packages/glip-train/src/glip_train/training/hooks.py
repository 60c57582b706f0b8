"""Hooks: everything the training loop does besides optimizer steps, one small class per concern.

:meth:`Trainer.train <glip_train.training.Trainer.train>` runs the steps; its hooks, in the order they were
registered, are called

* ``before_train()`` once, after a resume (``trainer.step`` is 0 or the checkpoint's step);
* ``before_step()`` / ``after_step()`` around each optimizer step (in ``after_step``, ``trainer.step`` counts the
  step and ``trainer.last_step`` is its :class:`~glip_train.training.trainer.StepOutput`);
* ``after_train()`` once ``schedule.max_iter`` is reached and the final weights are written (``trainer.result``);
* ``close()`` always, last, also when the run stops on an error (files, progress bars);
* ``on_log(record)`` for every record logged with ``trainer.log(record)``: a dict with ``"step"`` and, for events,
  ``"event"`` (``"eval"``, ``"non_finite_loss"``).

A hook with state that must survive an interruption returns it from ``state_dict()`` (picklable); it is saved in
every checkpoint under the hook's ``name`` and handed back to ``load_state_dict()`` when the run resumes, before
``before_train()``. Everything a hook does that involves other processes (a checkpoint, a validation) runs on every
rank; hooks that only write (logs, progress) are registered on rank 0 alone.

The hooks of a run, in order: :class:`NaNGuard`, :class:`MetricsLogger` and :class:`ProgressHook` (rank 0),
:class:`ValidationHook` (with ``data.val``), the caller's hooks (plain ``hook(trainer, step)`` callables run after
each step through :class:`CallbackHook`), and last :class:`CheckpointHook`, so that a checkpoint of step k holds
what every hook did at step k (and a run killed before it resumes from the previous one and does step k again).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from glip_data.io import atomic_open

from .distributed import any_rank

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

__all__ = ["HookBase", "CallbackHook", "NaNGuard", "MetricsLogger", "ProgressHook", "CheckpointHook",
           "ValidationHook", "TrainingDiverged", "trim_log"]


class TrainingDiverged(RuntimeError):
    """The loss was not finite for ``nan_patience`` consecutive steps; the run stopped instead of training on
    garbage (the last checkpoint is intact)."""


class HookBase:
    """Base of the trainer's hooks: every method does nothing; override the ones you need (see the module doc).

    Attributes:
        trainer: the :class:`~glip_train.training.Trainer` the hook is registered with (set on registration).
    """

    trainer: "Trainer"

    @property
    def name(self) -> str:
        """The key of the hook's state in a checkpoint (the class name unless overridden)."""
        return type(self).__name__

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def close(self) -> None:
        pass

    def on_log(self, record: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CallbackHook(HookBase):
    """A plain ``fn(trainer, step)`` callable, run after each optimizer step."""

    def __init__(self, fn: Callable[["Trainer", int], None]):
        self.fn = fn

    @property
    def name(self) -> str:
        return f"CallbackHook({getattr(self.fn, '__name__', type(self.fn).__name__)})"

    def after_step(self) -> None:
        self.fn(self.trainer, self.trainer.step)


class NaNGuard(HookBase):
    """Names every step whose loss was not finite (the step itself applied no update), counts them in
    ``trainer.bad_steps``, and stops the run with :class:`TrainingDiverged` after ``patience`` in a row."""

    def __init__(self, patience: int):
        self.patience = int(patience)

    def after_step(self) -> None:
        trainer = self.trainer
        term = trainer.last_step.bad_term
        if term is None:
            trainer.consecutive_bad = 0
            return
        trainer.bad_steps += 1
        trainer.consecutive_bad += 1
        message = f"step {trainer.step}: {term} is not finite; the step is skipped"
        trainer.log({"step": trainer.step, "event": "non_finite_loss", "term": term})
        trainer.echo(f"glip train: {message}")
        if trainer.consecutive_bad >= self.patience:
            raise TrainingDiverged(
                f"the loss was not finite for {trainer.consecutive_bad} consecutive steps (last: {message}); "
                f"stopped. The last checkpoint in {trainer.output_dir / 'checkpoints'} is intact: lower the learning "
                "rate or check the data, then rerun to resume")


def trim_log(path: Path, last_step: int) -> int:
    """Drop the records of ``path`` (JSON Lines) after ``last_step``, and any line a kill cut short, atomically;
    returns how many lines were dropped. A resumed run replays the steps after its checkpoint: without this they
    would be logged twice."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        with atomic_open(path) as fh:
            fh.write("".join(f"{line}\n" for line in kept))
    return dropped


class MetricsLogger(HookBase):
    """Writes ``output_dir/metrics.jsonl`` (and TensorBoard scalars under ``output_dir/tensorboard/`` when
    ``tensorboard`` is installed; when it is not, one line says so): every ``log_every`` steps and at the last one
    the loss terms, the LR, images/s and the skip counters; every record logged with ``trainer.log``. Each step
    appears once, also after a resume.

    Also sets ``trainer.last_metrics``.
    """

    def __init__(self, log_every: int, tensorboard: bool = True):
        self.log_every = int(log_every)
        self.tensorboard = tensorboard
        self.file = None
        self.writer = None

    def before_train(self) -> None:
        trainer = self.trainer
        path = trainer.output_dir / "metrics.jsonl"
        trim_log(path, trainer.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: say so once, not silently skip it
                trainer.echo("glip train: TensorBoard logging is off: the tensorboard package is not installed "
                             f"(pip install tensorboard); the metrics are in {path}")
            else:  # events after the checkpoint's step are purged: the resumed run writes them again
                self.writer = SummaryWriter(str(trainer.output_dir / "tensorboard"), purge_step=trainer.step + 1)
        self.window_start, self.window_images = time.perf_counter(), 0

    def after_step(self) -> None:
        trainer = self.trainer
        self.window_images += trainer.last_step.images
        if trainer.step % self.log_every and trainer.step != trainer.max_iter:
            return
        elapsed = time.perf_counter() - self.window_start
        record = {"step": trainer.step, "lr": trainer.optimizer.param_groups[0]["lr"],
                  **{k: round(v, 6) for k, v in trainer.last_step.terms.items()},
                  "images_per_s": round(self.window_images * trainer.world_size / max(elapsed, 1e-9), 3),
                  "skipped_batches": trainer.skipped_batches, "bad_steps": trainer.bad_steps}
        trainer.last_metrics = record
        trainer.log(record)
        self.window_start, self.window_images = time.perf_counter(), 0

    def on_log(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
            self.file.flush()  # a line logged is a line kept, whenever the process dies
        if self.writer is not None:
            prefix = {None: "train", "eval": "val"}.get(record.get("event"))
            if prefix is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step":
                        self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressHook(HookBase):
    """A progress bar on stderr: steps, elapsed time and ETA, images/s (all processes, since the run started) and
    the loss terms; the trainer's messages and the validation results are written above it."""

    def __init__(self) -> None:
        self.bar = None
        self.start, self.images = 0.0, 0

    def before_train(self) -> None:
        from tqdm import tqdm

        trainer = self.trainer
        self.bar = tqdm(total=trainer.max_iter, initial=trainer.step, unit="step", dynamic_ncols=True,
                        desc="glip train")
        trainer.console = self.bar.write
        self.start, self.images = time.perf_counter(), 0

    def after_step(self) -> None:
        trainer = self.trainer
        self.images += trainer.last_step.images * trainer.world_size
        postfix = {"img/s": f"{self.images / max(time.perf_counter() - self.start, 1e-9):.1f}"}
        postfix.update({k.replace("loss_", ""): f"{v:.3f}" for k, v in trainer.last_step.terms.items()})
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_log(self, record: dict[str, Any]) -> None:
        if record.get("event") == "eval" and self.bar is not None:
            self.bar.write(f"glip train: step {record['step']} validation " + ", ".join(
                f"{k} {100 * v:.1f}" for k, v in record.items() if k in ("AP", "AP50", "APr")))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.trainer.console = print
            self.bar = None


class CheckpointHook(HookBase):
    """A checkpoint every ``every`` steps and at the last step (:meth:`Trainer.save_checkpoint`; every process
    takes part)."""

    def __init__(self, every: int):
        self.every = int(every)

    def after_step(self) -> None:
        trainer = self.trainer
        if trainer.step % self.every == 0 or trainer.step == trainer.max_iter:
            trainer.save_checkpoint()


class ValidationHook(HookBase):
    """Evaluates the trained weights on ``data.val`` every ``every`` steps (None: only at the end) and at the end.

    Every process predicts its shard of the images; results go to ``output_dir/eval/step_<step>/``
    (``detections.json``, ``metrics.json``), the scalar metrics to the log (``"event": "eval"``) and the final ones
    to ``trainer.result.val_metrics``. A step already evaluated there is read back, not run again (a rerun of a
    finished run). The trained weights are evaluated, not the EMA (as the official evaluation loads ``"model"``,
    quirk 19).

    ``name`` names the folder and the log event: a second instance with another name (``"test"``) tracks a
    held-out set beside ``data.val`` at the same steps (``output_dir/test/step_<step>/``, ``"event": "test"``);
    only the one named ``"eval"`` sets ``trainer.result.val_metrics``.
    """

    def __init__(self, every: int | None, annotations: str, images: str | None, val: dict[str, Any],
                 name: str = "eval"):
        self.every = every
        self.annotations, self.images = annotations, images
        self.val = val
        self.event = name
        self.start_step = 0

    @property
    def name(self) -> str:
        return "ValidationHook" if self.event == "eval" else f"ValidationHook[{self.event}]"

    def before_train(self) -> None:
        self.start_step = self.trainer.step

    def after_step(self) -> None:
        trainer = self.trainer
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.max_iter:
            self.evaluate()

    def after_train(self) -> None:
        metrics = self.evaluate()
        if self.event == "eval":
            self.trainer.result.val_metrics = metrics

    def evaluate(self) -> dict[str, Any] | None:
        """Validate at the current step; the scalar metrics on rank 0, None elsewhere."""
        trainer = self.trainer
        out_dir = trainer.output_dir / self.event / f"step_{trainer.step:08d}"
        done = out_dir / "metrics.json"
        # evaluated before (decided jointly: all ranks or none): read back, not run again; logged again only when
        # this run replays the step (the log lost its line with the steps after the checkpoint), not on a rerun of
        # a finished run
        if any_rank(done.is_file(), trainer.device):
            if not trainer.is_main or not done.is_file():
                return None
            scalars = _scalars(json.loads(done.read_text())["metrics"])
            if trainer.step > self.start_step:
                trainer.log({"step": trainer.step, "event": self.event, **scalars})
            return scalars
        from ..evaluation import evaluate

        model = trainer.model
        min_size, max_size = model.processor.resize_limits(self.val.get("min_size"), self.val.get("max_size"))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                result = evaluate(model, self.val.get("protocol", "coco"), self.annotations, self.images, out_dir,
                                  progress=False, verbose=False, min_size=min_size, max_size=max_size)
        finally:
            model.train(was_training)
        if not trainer.is_main or result is None:
            return None
        scalars = _scalars(result.metrics)
        trainer.log({"step": trainer.step, "event": self.event, **scalars})
        return scalars


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float))}
