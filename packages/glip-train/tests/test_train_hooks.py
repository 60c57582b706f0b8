"""The trainer's hooks one by one, driven as ``Trainer.train`` drives them but around a stand-in trainer: the NaN
guard, the metrics log and its trimming on resume, checkpoint timing, plain callables."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from glip_train.training.hooks import (CallbackHook, CheckpointHook, MetricsLogger, NaNGuard, TrainingDiverged,
                                       trim_log)
from glip_train.training.trainer import StepOutput

GOOD = StepOutput({"loss_reg": 0.1234567, "loss": 0.1234567}, images=2)
BAD = StepOutput({}, images=2, bad_term="loss_dot_product_token")


def stand_in(tmp_path, step=0, max_iter=5):
    """What the hooks read and call on a trainer; ``logged``, ``echoed`` and ``saved`` record the calls."""
    trainer = SimpleNamespace(step=step, max_iter=max_iter, output_dir=tmp_path, world_size=1, skipped_batches=0,
                              bad_steps=0, consecutive_bad=0, last_metrics={}, last_step=None,
                              optimizer=SimpleNamespace(param_groups=[{"lr": 0.5}]), logged=[], echoed=[], saved=[])
    trainer.log = trainer.logged.append
    trainer.echo = trainer.echoed.append
    trainer.save_checkpoint = lambda: trainer.saved.append(trainer.step)
    return trainer


def drive(hooks, trainer, outcomes):
    for hook in hooks:
        hook.trainer = trainer
        hook.before_train()
    try:
        for outcome in outcomes:
            trainer.step += 1
            trainer.last_step = outcome
            for hook in hooks:
                hook.after_step()
    finally:
        for hook in hooks:
            hook.close()


def test_the_nan_guard_names_counts_and_stops_after_patience_bad_steps_in_a_row(tmp_path):
    trainer = stand_in(tmp_path, max_iter=10)
    with pytest.raises(TrainingDiverged, match=r"not finite for 3 consecutive steps \(last: step 7: "
                                               r"loss_dot_product_token is not finite"):
        drive([NaNGuard(patience=3)], trainer, [GOOD, BAD, BAD, GOOD, BAD, BAD, BAD, GOOD])
    assert trainer.step == 7 and trainer.bad_steps == 5 and trainer.consecutive_bad == 3
    assert [r["step"] for r in trainer.logged] == [2, 3, 5, 6, 7]
    assert trainer.logged[0] == {"step": 2, "event": "non_finite_loss", "term": "loss_dot_product_token"}
    assert trainer.echoed[0] == "glip train: step 2: loss_dot_product_token is not finite; the step is skipped"


def test_checkpoints_every_n_steps_and_at_the_last_one(tmp_path):
    trainer = stand_in(tmp_path, max_iter=5)
    drive([CheckpointHook(every=2)], trainer, [GOOD] * 5)
    assert trainer.saved == [2, 4, 5]


def test_plain_callables_run_after_each_step_with_the_trainer_and_the_step(tmp_path):
    calls = []
    trainer = stand_in(tmp_path, max_iter=3)
    drive([CallbackHook(lambda t, step: calls.append((t, step)))], trainer, [GOOD] * 3)
    assert calls == [(trainer, 1), (trainer, 2), (trainer, 3)]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_metrics_log_has_a_line_every_log_every_steps_and_at_the_last(tmp_path):
    trainer = stand_in(tmp_path, max_iter=5)
    logger = MetricsLogger(log_every=2, tensorboard=False)
    trainer.log = logger.on_log  # as Trainer.log hands records to every hook
    trainer.skipped_batches, trainer.bad_steps = 1, 0
    drive([logger], trainer, [GOOD] * 5)
    lines = _lines(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in lines] == [2, 4, 5]
    assert {k: v for k, v in lines[0].items() if k not in ("time", "images_per_s")} == {
        "step": 2, "lr": 0.5, "loss_reg": 0.123457, "loss": 0.123457, "skipped_batches": 1, "bad_steps": 0}
    assert trainer.last_metrics == {k: v for k, v in lines[-1].items() if k != "time"}


def test_a_resumed_log_drops_the_steps_after_the_checkpoint_and_lines_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "event": "eval", "AP": 0.1},
               {"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # killed mid-line
    assert trim_log(path, last_step=4) == 1
    assert _lines(path) == records
    trainer = stand_in(tmp_path, step=2, max_iter=3)  # resumed from the checkpoint of step 2
    logger = MetricsLogger(log_every=1, tensorboard=False)
    trainer.log = logger.on_log
    drive([logger], trainer, [GOOD])
    assert [(m["step"], m.get("event")) for m in _lines(path)] == [(1, None), (2, None), (2, "eval"), (3, None)]
    assert _lines(path)[:3] == records[:3] and _lines(path)[3]["loss"] == 0.123457
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # rewritten atomically, nothing left
