"""Streamed training sources (``kind: shards``): mixed with map-style sources by weight, split by process and
DataLoader worker, resumed exactly from the positions a checkpoint records, equal steps on every process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from glip_data import CaptionReader, write_shards
from glip_train.training import ResumeError, Trainer, load_train_config

sys.path.insert(0, str(Path(__file__).parent))
from test_train_trainer import (Interrupted, KillAfter, _env, _free_port, _weights, tiny_config,  # noqa: E402
                                world)  # noqa: F401  (the tiny world, a fixture)


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory):
    """The world's 4 captions with their true boxes as caption shards of 3 and 1 records (stand-ins for
    pseudo-labels)."""
    out = tmp_path_factory.mktemp("caption_shards")
    write_shards(CaptionReader(world / "captions_train_gt.jsonl", world / "images"), out, samples_per_shard=3,
                 progress=False)
    return out


def stream_config(world: Path, shards: Path, folder: Path, weight: float = 3.0, **changes) -> Path:
    config = tiny_config(world, folder / "out", **{"schedule.max_iter": 6, "ema": None, "checkpoint_every": 2,
                                                   **changes})
    config["data"]["train"].append({"kind": "shards", "annotations": str(shards), "weight": weight})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder / "run.yaml"


class StreamedKeys:
    """Records, per step, the shard keys of the streamed samples this process trained on."""

    def __init__(self, trainer: Trainer):
        self.keys: list[tuple[str, ...]] = []
        self.data = trainer.data
        self.original = trainer.data._tracked
        trainer.data._tracked = self._tracked

    def _tracked(self, batches):
        for batch in self.original(batches):
            self.keys.append(tuple(f"{name}@{reader}:{pos}" for name, reader, pos in batch.stream_positions))
            yield batch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_streaming_run_sees_the_batches_of_an_uninterrupted_one(world, shards, tmp_path, workers):
    changes = {"data.num_workers": workers, "schedule.max_iter": 5, "checkpoint_every": 3}
    whole = Trainer(load_train_config(stream_config(world, shards, tmp_path / "whole", 10.0, **changes)),
                    progress=False)
    seen = StreamedKeys(whole)
    whole.train()
    broken_config = load_train_config(stream_config(world, shards, tmp_path / "broken", 10.0, **changes))
    with pytest.raises(Interrupted):  # 4 steps done, the checkpoint of step 3 the last
        Trainer(broken_config, progress=False, hooks=[KillAfter(4)]).train()
    resumed = Trainer(broken_config, progress=False)
    assert resumed.step == 3
    positions = resumed.data.stream_positions["2:" + shards.name]
    # the streams had moved: more than one reader, past the first record of a shard
    assert len(positions) == max(1, workers) and any(p != (0, 0, 1) for p in positions.values())
    after = StreamedKeys(resumed)
    resumed.train()
    assert after.keys == seen.keys[3:]  # the same streamed samples, micro-batch by micro-batch
    assert sum(len(k) for k in seen.keys) >= 6  # and the stream was a real part of the batches
    a, b = _weights(tmp_path / "whole" / "out" / "model"), _weights(tmp_path / "broken" / "out" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.data.stream_positions == whole.data.stream_positions


def test_resuming_a_stream_with_another_number_of_workers_is_refused_naming_the_setting(world, shards, tmp_path):
    path = stream_config(world, shards, tmp_path, **{"data.num_workers": 2, "schedule.max_iter": 4})
    with pytest.raises(Interrupted):
        Trainer(load_train_config(path), progress=False, hooks=[KillAfter(3)]).train()
    config = yaml.safe_load(path.read_text())
    config["data"]["num_workers"] = 0  # a setting a map-style run may change on resume
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ResumeError, match=r"split over 2 DataLoader reader\(s\) per process; resume with "
                                          r"data.num_workers=2"):
        Trainer(load_train_config(path), progress=False)


def test_a_folder_without_an_index_is_named_before_anything_is_built(world, tmp_path):
    path = stream_config(world, tmp_path / "nothing", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"data.train.2.annotations: .*nothing is not a shard folder"):
        Trainer(load_train_config(path), progress=False)


def test_two_gloo_processes_stream_unequal_shards_with_equal_steps(world, shards, tmp_path):
    # 4 records in shards of 3 and 1: the two processes' readers get 3 and 1 records per pass, and the run still
    # ends on both with identical replicas (the streams never end; the global batch order decides the steps)
    path = stream_config(world, shards, tmp_path, **{"data.batch_size": 1, "device": "cpu", "schedule.max_iter": 5})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "glip_train.cli", "train", str(path), "--quiet"]
    subprocess.run(torchrun, check=True, env=_env(), timeout=900)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["steps"] == 5 and result["world_size"] == 2 and len(set(result["weights_sha256"])) == 1
    state = torch.load(tmp_path / "out" / "checkpoints" / "checkpoint_00000005.pt", weights_only=False)
    assert sorted(state["data"]["positions"]["2:" + shards.name]) == [0, 1]  # each process recorded its reader


def test_streamed_detection_records_get_sampled_prompts_from_the_index_categories(world, tmp_path):
    from glip_data import COCODetection

    from glip_train import GLIP
    from glip_train.training.data import build_data, build_sources

    write_shards(COCODetection(world / "detection_train.json", world / "images"), tmp_path / "det",
                 samples_per_shard=4, progress=False)
    config = load_train_config(stream_config(world, tmp_path / "det", tmp_path / "run"))
    config = type(config).from_dict({**config.to_dict(), "data": {**config.to_dict()["data"], "train": [
        {"kind": "shards", "annotations": str(tmp_path / "det"), "negatives": 2}]}})
    model = GLIP.from_pretrained()
    data = build_data(config, build_sources(config.data, seed=0), model)
    names = set(json.loads((tmp_path / "det" / "index.json").read_text())["categories"].values())
    for index in range(3):
        sample = data.samples[(0, index)]
        assert sample.metadata["task"] == "detection" and sample.metadata["stream_position"][2] == index + 1
        phrases = {sample.caption[s:e] for spans in sample.tokens_positive for s, e in spans}
        assert phrases and phrases <= names  # every box points at its class name in the sampled prompt
