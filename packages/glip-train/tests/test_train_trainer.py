"""The trainer end to end on a tiny synthetic world: real subprocesses killed and resumed (bitwise equal weights),
two gloo processes against one (same global batch), the NaN guard, the empty-batch rule, prompt tuning."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from glip_data import SynthConfig, generate_world
from glip_train import GLIP
from glip_train.training import ResumeError, Trainer, TrainingDiverged, load_train_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # square images of one size: batches of any split pad the same way (no padding quirk between 1 and 2 processes)
    folder = tmp_path_factory.mktemp("world")
    generate_world(folder, config=SynthConfig(seed=3, num_detection=8, num_grounding=8, num_captions=4, num_val=2,
                                              min_size=64, max_size=64, max_objects=2))
    return folder


def tiny_config(world: Path, output: Path, **changes) -> dict:
    config = {
        "output_dir": str(output),
        "seed": 0,
        # GroupNorm resnet18: no batch statistics, so one process with batch 2 and two with batch 1 compute alike
        "model": {"small": {"text_encoder_dir": "minilm", "image_encoder": "resnet18", "fusion_layers": 1,
                            "fpn_channels": 64, "dropout": 0.0,
                            "image_encoder_kwargs": {"norm_layer": "groupnorm"}}},
        "data": {
            "train": [{"kind": "coco", "annotations": str(world / "detection_train.json"),
                       "images": str(world / "images"), "negatives": 3},
                      {"kind": "mdetr", "annotations": str(world / "grounding_train.json"),
                       "images": str(world / "images")}],
            "batch_size": 2, "min_sizes": [64], "max_size": 64, "pad_text_to": "longest", "num_workers": 0,
            "flip_prob": 0.5,
        },
        "optim": {"lr": 0.001, "language_lr": 0.0001},
        "schedule": {"max_iter": 4, "warmup_iters": 1},
        "ema": 0.9,
        "checkpoint_every": 2,
        "log_every": 1,
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def write_config(world: Path, folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(world, folder / "out", **changes)))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "glip_train.cli", "train", str(config), "--quiet", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_killed_run_resumed_ends_bitwise_equal_to_an_uninterrupted_run(world, tmp_path):
    whole = write_config(world, tmp_path / "whole")
    subprocess.run(_train_cmd(whole), check=True, env=_env(), timeout=900)

    broken = write_config(world, tmp_path / "broken")
    process = subprocess.Popen(_train_cmd(broken), env=_env())
    first = tmp_path / "broken" / "out" / "checkpoints" / "checkpoint_00000002.pt"
    deadline = time.time() + 600
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the first checkpoint never appeared"
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)  # a crash, not a clean exit
    process.wait(timeout=60)
    assert not (tmp_path / "broken" / "out" / "model").exists(), "the run finished before it could be killed"

    subprocess.run(_train_cmd(broken), check=True, env=_env(), timeout=900)  # the same command resumes
    a = _weights(tmp_path / "whole" / "out" / "model")
    b = _weights(tmp_path / "broken" / "out" / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    ema_a = _weights(tmp_path / "whole" / "out" / "model_ema")
    ema_b = _weights(tmp_path / "broken" / "out" / "model_ema")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not all(torch.equal(ema_a[k], a[k]) for k in a)  # the EMA is saved separately and differs
    result = json.loads((tmp_path / "broken" / "out" / "result.json").read_text())
    assert result["steps"] == 4
    lines = [json.loads(line) for line in (tmp_path / "whole" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and set(m) >= {"loss_reg", "loss_centerness", "loss_dot_product_token", "lr"}
               for m in lines)


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(world, tmp_path):
    config = load_train_config(write_config(world, tmp_path, **{"schedule.max_iter": 2}))
    Trainer(config, progress=False).train()
    changed = load_train_config(write_config(world, tmp_path, **{"schedule.max_iter": 2, "optim.lr": 0.5}))
    with pytest.raises(ResumeError, match=r"optim.lr: checkpoint 0.001 vs now 0.5"):
        Trainer(changed, progress=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(world, tmp_path):
    one = write_config(world, tmp_path / "one", **{"data.batch_size": 2, "device": "cpu"})
    two = write_config(world, tmp_path / "two", **{"data.batch_size": 1, "device": "cpu"})
    subprocess.run(_train_cmd(one), check=True, env=_env(), timeout=900)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "glip_train.cli", "train", str(two), "--quiet"]
    subprocess.run(torchrun, check=True, env=_env(), timeout=900)
    result = json.loads((tmp_path / "two" / "out" / "result.json").read_text())
    assert result["world_size"] == 2 and len(set(result["weights_sha256"])) == 1  # replicas identical
    a = _weights(tmp_path / "one" / "out" / "model")
    b = _weights(tmp_path / "two" / "out" / "model")
    # The same samples and the same normalisers; only the float32 summation order of the gradients differs. Adam
    # turns that into at most its per-step bound (1 - b1) / sqrt(1 - b2) ~ 3.2 x lr per element for gradients that
    # are pure rounding noise (e.g. attention key biases, whose exact gradient is 0): 4 steps at 1e-3, 1e-3, 1e-4,
    # 1e-5 bound any difference by 3.2 x 2.11e-3.
    bound = 3.2 * (1e-3 + 1e-3 + 1e-4 + 1e-5)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= bound, key
    # and functionally the two models are the same: their outputs on a fixed input agree to float32 accuracy
    models = [GLIP.from_pretrained(tmp_path / name / "out" / "model").eval() for name in ("one", "two")]
    ids, mask = models[0].processor.tokenize(["a red circle. a blue square."])
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [m(image, ids, mask).head for m in models]
    for x, y in zip(outs[0].token_logits + outs[0].box_regression, outs[1].token_logits + outs[1].box_regression):
        assert (x - y).abs().max() <= 1e-3 * x.abs().max()


def test_non_finite_losses_are_named_skipped_and_stop_the_run(world, tmp_path):
    config = load_train_config(write_config(world, tmp_path, **{"schedule.max_iter": 6, "nan_patience": 3}))
    calls = []

    def poisoned(output, targets):
        calls.append(1)
        value = sum(x.float().mean() for x in output.head.token_logits)
        if len(calls) >= 2:
            value = value * float("nan")
        return {"loss_dot_product_token": value}

    trainer = Trainer(config, progress=False, loss_fn=poisoned)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .*loss_dot_product_token is not finite"):
        trainer.train()
    assert trainer.step == 4 and trainer.bad_steps == 3
    events = [json.loads(l) for l in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "non_finite_loss"] == [2, 3, 4]
    after = trainer.model.state_dict()
    changed_by_first_step = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed_by_first_step  # step 1 trained; steps 2-4 did not touch the weights
    assert (Path(config.output_dir) / "checkpoints" / "checkpoint_00000002.pt").exists()


def test_batches_with_too_many_empty_images_are_skipped(world, tmp_path):
    config = load_train_config(write_config(world, tmp_path, **{"schedule.max_iter": 3}))
    trainer = Trainer(config, progress=False)
    collate, calls, seen = trainer.collator, [], []

    def every_second_batch_empty(samples):
        batch = collate(samples)
        calls.append(1)
        if len(calls) == 2:
            for target in batch.targets:
                target["boxes"], target["positive_map"] = target["boxes"][:0], target["positive_map"][:0]
            batch.num_empty = len(batch.targets)
        return batch

    losses = trainer._losses
    trainer._losses = lambda batch: (seen.append(batch.num_empty), losses(batch))[1]
    trainer.collator = every_second_batch_empty
    result = trainer.train()
    assert result.skipped_batches == 1 and result.steps == 3
    assert seen == [0, 0]  # the empty batch never reached the network


def test_prompt_tuning_trains_only_the_table_and_saves_an_adapter(world, tmp_path):
    config = load_train_config(write_config(world, tmp_path, **{"schedule.max_iter": 2, "mode": "prompt_tuning",
                                                                  "optim.prompt_lr": 0.05}))
    trainer = Trainer(config, progress=False)
    frozen = {k: v.clone() for k, v in trainer.model.state_dict().items() if not k.startswith("prompt_tuning.")}
    result = trainer.train()
    assert result.model_dir is None and result.adapter.stat().st_size < 2_000_000
    state = trainer.model.state_dict()
    assert all(torch.equal(frozen[k], state[k]) for k in frozen)
    assert state["prompt_tuning.weight"].abs().max() > 0
    base = trainer.model
    base.prompt_tuning = None
    from glip_train.adapters import load_adapter

    load_adapter(base, result.adapter)
    assert torch.equal(base.prompt_tuning.weight, state["prompt_tuning.weight"])


def test_validation_runs_every_eval_every_steps_and_at_the_end_on_the_trained_weights(world, tmp_path):
    from glip_train.evaluation import evaluate

    val = {"annotations": str(world / "coco_val.json"), "images": str(world / "images")}
    config = load_train_config(write_config(world, tmp_path, **{
        "schedule.max_iter": 3, "eval_every": 2, "data.val": val, "ema": None,
        # an untrained head scores below the official 0.05: keep every candidate so there are detections to compare
        "model.small.postprocess": {"candidate_threshold": 0.0}}))
    result = Trainer(config, progress=False).train()
    out = Path(config.output_dir)
    events = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "eval"] == [2, 3]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step_00000002", "step_00000003"]
    # the saved model records the training size as its test size, so evaluating it later, with no sizes given,
    # gives what the run measured
    model = GLIP.from_pretrained(result.model_dir).eval()
    assert model.processor.test_size == (64, 64)
    again = evaluate(model, "coco", val["annotations"], val["images"], tmp_path / "again", progress=False,
                     verbose=False)
    assert result.val_metrics["AP"] == pytest.approx(again.metrics["AP"], abs=1e-6)
    during = json.loads((out / "eval" / "step_00000003" / "detections.json").read_text())
    after = json.loads((tmp_path / "again" / "detections.json").read_text())
    assert len(during) == len(after) > 0
    for a, b in zip(during, after):  # same weights, eval mode: equal up to float32 summation order
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)
    assert json.loads((out / "result.json").read_text())["val_metrics"] == result.val_metrics
    # a rerun of the finished run reads the last validation back instead of evaluating again
    stamp = (out / "eval" / "step_00000003" / "metrics.json").stat().st_mtime_ns
    assert Trainer(config, progress=False).train().val_metrics == result.val_metrics
    assert (out / "eval" / "step_00000003" / "metrics.json").stat().st_mtime_ns == stamp
    events = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "eval"] == [2, 3]  # not logged twice


def test_a_missing_validation_file_stops_the_run_before_training_and_can_be_fixed_on_resume(world, tmp_path):
    bad = {"annotations": str(world / "coco_vall.json"), "images": str(world / "images")}
    with pytest.raises(FileNotFoundError, match=r"data.val.annotations: .*coco_vall.json does not exist"):
        Trainer(load_train_config(write_config(world, tmp_path, **{"data.val": bad})), progress=False)
    # a run interrupted without validation resumes with a validation set added (data.val does not change weights)
    config = load_train_config(write_config(world, tmp_path, **{"schedule.max_iter": 2, "checkpoint_every": 1,
                                                                  "ema": None}))
    trainer = Trainer(config, progress=False)
    trainer._step(trainer._loader(), 1)
    trainer.step = 1
    trainer.save_checkpoint()
    good = {"annotations": str(world / "coco_val.json"), "images": str(world / "images")}
    resumed = Trainer(load_train_config(write_config(world, tmp_path, **{
        "schedule.max_iter": 2, "checkpoint_every": 1, "ema": None, "data.val": good})), progress=False)
    assert resumed.step == 1
    assert resumed.train().val_metrics is not None


def test_bad_validation_settings_are_named(world, tmp_path):
    from glip_train.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.val.protocol.*flickr30k"):
        load_train_config(write_config(world, tmp_path / "a", **{"data.val": {"annotations": "x.json",
                                                                               "protocol": "flickr30k"}}))
    with pytest.raises(ConfigError, match=r"data.val: unknown keys \['image_dir'\]"):
        load_train_config(write_config(world, tmp_path / "b", **{"data.val": {"annotations": "x.json",
                                                                               "image_dir": "y"}}))
