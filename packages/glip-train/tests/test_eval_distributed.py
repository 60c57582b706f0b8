"""A real two-process evaluation (torchrun, gloo) gives the files of a single-process run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glip_train.evaluation import evaluate

SCRIPT = """
import importlib.util, json, sys
import torch.distributed as dist
spec = importlib.util.spec_from_file_location("eval_conftest", {conftest!r})
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
from glip_train.evaluation import evaluate, init_distributed_from_env
assert init_distributed_from_env(backend="gloo")
dets = {{int(k): [tuple(r) for r in v] for k, v in json.load(open({dets!r})).items()}}
model = helpers.ScriptedDetector(dets)
result = evaluate(model, "coco", {ann!r}, out_dir={out!r}, progress=False, verbose=False)
rank = dist.get_rank()
json.dump({{"codes": [c for call in model.calls for c in call["codes"]], "has_result": result is not None}},
          open({ranks!r} + f"/rank{{rank}}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two fresh processes import torch, torchvision and transformers: ~25 s on 2 CPU cores
def test_torchrun_two_processes_equal_one(tmp_path, detection_dataset_writer, scripted_detector):
    rng = np.random.default_rng(0)
    sizes = [(120, 90)] * 7
    boxes = [(i, 1 + i % 2, [10.0 + i, 10.0, 30.0, 20.0 + i]) for i in range(7)]
    ann = detection_dataset_writer(tmp_path, sizes, [(1, "cat"), (2, "dog")], boxes)
    dets = {i: [(["cat", "dog"][i % 2], [10.0 + i + rng.normal(), 10.0, 39.0 + i, 29.0 + i], float(rng.random())),
                ("cat", [50.0, 50.0, 70.0, 80.0], float(rng.random()))] for i in range(7)}
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(conftest=str(Path(__file__).with_name("conftest.py")),
                                    dets=str(tmp_path / "dets.json"), ann=str(ann), out=str(tmp_path / "dist"),
                                    ranks=str(ranks)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((ranks / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0]["codes"] == [0, 2, 4, 6] and seen[1]["codes"] == [1, 3, 5]  # rank::world_size shards
    assert seen[0]["has_result"] and not seen[1]["has_result"]
    single = evaluate(scripted_detector(dets), "coco", ann, out_dir=tmp_path / "single", progress=False,
                      verbose=False)
    assert (tmp_path / "dist" / "detections.json").read_text() == (tmp_path / "single" / "detections.json").read_text()
    dist_metrics = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert dist_metrics["metrics"]["AP"] == single.metrics["AP"] and dist_metrics["world_size"] == 2
    assert 0.0 < single.metrics["AP"] < 1.0
