"""The self-training loop at web scale, end to end, on the synthetic world: teacher -> shards of pseudo-labels ->
student, every step a glip command under torchrun.

It reproduces the (full) row of the zero-shot experiment (``benchmarks/zero_shot/run.py``, row ``full_lr3e-4``: the
(C) model pseudo-labels the world's caption-only images, a student trains on detection + grounding + those
pseudo-labels) with the web-scale path instead of the single-file one:

1. the world's caption-only images as img2dataset-style shards (``glip-data shard --kind img2dataset``);
2. the teacher -- the row's own: the experiment's (C) model at 3e-4 of the same seed, in float32 (trained by
   ``run.py`` under --experiment-root when it is not there yet) -- labels them with
   ``torchrun --nproc_per_node N -m glip_train.cli pseudo-label --captions WEB --out PSEUDO``;
3. the student trains on the world's detection and grounding files (map-style) and the pseudo-label shards
   (``kind: shards``, streamed, weight 1 as each source of the row) with ``torchrun ... -m glip_train.cli train``
   at the row's settings (2500 steps, global batch 4 = N processes x 4/N, lr 3e-4);
4. ``glip eval`` (coco and lvis-minival) as the experiment evaluates its rows.

    python benchmarks/self_training/recipe.py                  # all steps, 2 processes, seed 0 (hours on 2 cores)
    python benchmarks/self_training/recipe.py --nproc 1 --seed 1
    python benchmarks/self_training/recipe.py --smoke          # tiny world, a few steps: checks the pipeline

Every step skips what is done and resumes what was interrupted (rerun the same command). The result goes to
``benchmarks/results/self_training_<date>_seed<seed>_nproc<N>.json``, one file per run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import platform
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "zero_shot"))

import run as zero_shot  # noqa: E402  (the experiment: its world, row config, evaluation and results)
from glip_data.io import atomic_write_text  # noqa: E402

ROW = "full_lr3e-4"
SHARD_SIZE = 50  # 600 caption images -> 12 shards: several per process, an uneven last share with 5 processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "glip_train.cli"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "glip_train.cli"]


def student_config(paths: "zero_shot.Paths", pseudo: Path, out: Path, seed: int, nproc: int,
                   jsonl: Path | None = None) -> dict:
    """The experiment's (full) row config with the pseudo-label shards as its caption source (``jsonl``: the same
    records as one caption file read map-style instead, the control of the streamed path)."""
    with contextlib.redirect_stdout(io.StringIO()):  # its note that the row's own pseudo-label file is absent
        config = zero_shot.row_config(paths, ROW, seed)
    train = [s for s in config["data"]["train"] if s["kind"] != "captions"]
    if jsonl is None:
        train.append({"kind": "shards", "annotations": str(pseudo), "min_score": zero_shot.PSEUDO_THRESHOLD,
                      "pack_captions": True})
    else:
        train.append({"kind": "captions", "annotations": str(jsonl), "images": str(paths.world / "images"),
                      "min_score": zero_shot.PSEUDO_THRESHOLD, "pack_captions": True})
    config["data"]["train"] = train
    config["data"]["batch_size"] = 4 // nproc  # the row's global batch of 4
    config["output_dir"] = str(out)
    return config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--root", default=str(REPO / "runs" / "self_training"))
    ap.add_argument("--nproc", type=int, default=2, choices=(1, 2, 4), help="processes per step (global batch 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1, help="pseudo-label: images per forward [1, the experiment's]")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--student-source", choices=("shards", "jsonl"), default="shards",
                    help="the student reads the pseudo-labels streamed from their shards [shards], or (the control "
                         "of the streamed path) the same records as one caption JSON Lines file, map-style")
    ap.add_argument("--experiment-root", default=str(REPO / "runs" / "zero_shot"),
                    help="the zero-shot experiment's folder: its world, text tower and the (C) teacher of --seed, "
                         "trained there first when missing [%(default)s]")
    ap.add_argument("--teacher", help="label with these weights instead of the experiment's (C) model of --seed "
                                      "(a model folder, an official .pth, or 'default': the shipped model)")
    ap.add_argument("--smoke", action="store_true", help="tiny world, a few steps")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if args.smoke:
        zero_shot.TRAIN_STEPS, zero_shot.PSEUDO_THRESHOLD = 4, 0.0
        zero_shot.WORLD.update(num_detection=12, num_grounding=12, num_captions=8, num_val=6)
        zero_shot.DOWNSTREAM_WORLD.update(num_detection=16, num_val=6)
        root = Path(str(root) + "_smoke")
        args.results = str(root)
    paths = zero_shot.Paths(root / "zero_shot" if args.smoke else Path(args.experiment_root))
    zero_shot.setup(paths)  # the world and the text tower of the experiment
    web, pseudo = root / "web", root / f"pseudo_seed{args.seed}"
    control = "" if args.student_source == "shards" else "_jsonl"
    student = root / f"student_{ROW}_seed{args.seed}_nproc{args.nproc}{control}"
    logs = root / "logs"
    timings = {}

    if not (web / "00000.tar").is_file():
        timings["shards_s"] = zero_shot.sh(
            [sys.executable, "-m", "glip_data.cli", "shard", paths.world / "captions_train.jsonl", web,
             "--kind", "img2dataset", "--per-shard", str(SHARD_SIZE), "--quiet"], logs / "shards.log")
    if args.teacher is not None or args.smoke:
        teacher_weights = args.teacher or "default"
    else:  # the (full) row's teacher: the (C) row of the same seed and learning rate
        teacher_weights = zero_shot.train_row(paths, zero_shot.teacher_of(ROW), args.seed)
    teacher = ["--weights", teacher_weights]
    timings["pseudo_label_s"] = zero_shot.sh(
        [*torchrun(args.nproc), "pseudo-label", "--captions", web, "--out", pseudo, *teacher,
         "--threshold", str(zero_shot.PSEUDO_THRESHOLD), *zero_shot.EVAL_SIZE, "--batch-size", str(args.batch_size),
         "--quiet"], logs / "pseudo_label.log")
    config_file = root / f"{student.name}.yaml"
    import yaml

    jsonl = None
    if args.student_source == "jsonl":
        from bench_stream_loader import as_jsonl

        jsonl = as_jsonl(pseudo, paths.world / "images", root / f"pseudo_seed{args.seed}.jsonl")
    atomic_write_text(config_file, yaml.safe_dump(student_config(paths, pseudo, student, args.seed, args.nproc, jsonl),
                                                  sort_keys=False))
    if not (student / "model" / "model.safetensors").is_file():
        timings["train_s"] = zero_shot.sh([*torchrun(args.nproc), "train", config_file, "--quiet"],
                                          logs / f"{student.name}.log")
    metrics = zero_shot.evaluate_model(student / "model", student / "eval", paths.world)
    index = json.loads((pseudo / "index.json").read_text())
    result = {
        "date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, CPU only",
        "row": ROW, "seed": args.seed, "nproc": args.nproc, "pseudo_label_batch_size": args.batch_size,
        "teacher": str(teacher_weights),
        "student_source": args.student_source,
        "pseudo_labels": {"shards": len(index["shards"]), "samples": sum(s["samples"] for s in index["shards"]),
                          "written": index["num_samples"],
                          "boxes": sum(s["boxes_kept"] for s in index["shards"])},
        "metrics": metrics, "train_seconds": zero_shot.training_seconds(student),
        "timings_this_invocation": timings,
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"self_training_{result['date']}_seed{args.seed}_nproc{args.nproc}{control}"  # one file per run
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
