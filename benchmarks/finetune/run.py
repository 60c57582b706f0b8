"""Fine-tuning the shipped model on a downstream task, on a CPU, with ``glip train --coco ... --init default``.

The downstream task is the zero-shot experiment's (``benchmarks/zero_shot/run.py``): a synthetic world of another
seed whose eight shapes carry names the shipped model never trained on (circle -> orb, square -> tile, ...): 160
training and 120 validation images of 96-160 px. From the shipped model (``--init default``), each of

* the first fine-tune a new user runs: the COCO recipe with nothing else given (all images, 24 epochs);
* full fine-tuning, prompt tuning and linear probing with 1, 5 and all shots (``data.train.0.few_shot``), each with
  its own learning rate and a schedule long enough to reach its plateau (validation AP every ``eval_every`` steps)

is trained by the command line as a user runs it, one torch thread per job, and measured: steps, wall time, training
images/s, peak resident memory of the process (training and its validations), the validation AP curve. The
shipped model's own AP on the task (zero-shot) is the starting point.

    python benchmarks/finetune/run.py --out runs/finetune_bench --jobs 2     # about an hour on 2 cores
    python benchmarks/finetune/run.py --out runs/finetune_bench --smoke      # every path in a few minutes

Writes ``benchmarks/results/finetune_cpu_<date>.json`` and ``.md`` (``--smoke``: under ``--out``). Rerunning skips
finished jobs (a killed one resumes from its checkpoints).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "zero_shot"))

from run import DOWNSTREAM_WORLD, rename_downstream  # noqa: E402  (the zero-shot experiment's downstream task)

SHOTS = (1, 5, 0)  # 0: all
#: per method: the learning-rate overrides (full: the official pre-training rates, which the docs call safe for
#: fine-tuning; prompt tuning: the official 0.05 is the default; linear probe: the predictors alone take 1e-3) and
#: the schedule per number of shots (steps, validation period)
METHODS = {
    "full": (["optim.lr=1e-4", "optim.language_lr=1e-5"], {1: (200, 25), 5: (300, 50), 0: (400, 50)}),
    "prompt_tuning": ([], {1: (200, 25), 5: (300, 50), 0: (400, 50)}),
    "linear_probe": (["optim.lr=1e-3"], {1: (200, 25), 5: (300, 50), 0: (400, 50)}),
}
SMOKE_STEPS = (4, 2)


def environment() -> dict:
    src = [str(REPO / "packages" / p / "src") for p in ("glip-fusion", "glip-encoders", "glip-data", "glip-train")]
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([*src, os.environ.get("PYTHONPATH", "")]))


def measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under this script's ``--measure`` (a parent whose only child is the job): wall time and the
    job's peak resident memory."""
    record = log.with_suffix(".measure.json")
    if not record.is_file():
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--measure", str(record),
                                    *map(str, cmd)], stdout=fh, stderr=subprocess.STDOUT, env=environment(), cwd=REPO)
        if code != 0:
            raise RuntimeError(f"failed ({code}), see {log}: {' '.join(map(str, cmd))}")
    return json.loads(record.read_text())


def measure(record: Path, cmd: list[str]) -> None:
    import resource

    start = time.time()
    code = subprocess.call(cmd)
    if code != 0:
        sys.exit(code)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest child: the job
    record.write_text(json.dumps({"wall_s": round(time.time() - start, 1), "peak_rss_mb": round(peak_kb / 1024)}))


GLIP = [sys.executable, "-m", "glip_train.cli"]


def world_files(world: Path) -> list[str]:
    return ["--coco", str(world / "detection_train.json"), "--images", str(world / "images"),
            "--val", str(world / "coco_val.json"), "--val-images", str(world / "images")]


def zero_shot(out: Path, world: Path) -> float:
    """The shipped model's AP on the downstream validation set, at its own test size."""
    folder = out / "zero_shot"
    if not (folder / "metrics.json").is_file():
        measured([*GLIP, "eval", "--protocol", "coco", "--weights", "default", "--annotations",
                  world / "coco_val.json", "--images", world / "images", "--out", folder, "--quiet", "--no-progress"],
                 out / "logs" / "zero_shot.log")
    return json.loads((folder / "metrics.json").read_text())["metrics"]["AP"]


def job(out: Path, world: Path, name: str, extra: list[str]) -> dict:
    """One ``glip train`` run of the benchmark and what it measured."""
    import yaml

    run = out / name
    cost = measured([*GLIP, "train", *world_files(world), "--init", "default", "-o", run, "--quiet", *extra],
                    out / "logs" / f"{name}.log")
    result = json.loads((run / "result.json").read_text())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {"command": " ".join(["glip train", *world_files(Path("WORLD")), "--init", "default", *extra]),
            "steps": result["steps"], "train_s": result["seconds"], "images_per_s": result["images_per_s"], **cost,
            "val_AP_curve": {e["step"]: round(100 * e["AP"], 1) for e in events if e.get("event") == "eval"},
            "final_AP": round(100 * result["val_metrics"]["AP"], 1),
            "train_sizes": config["data"]["min_sizes"], "max_size": config["data"]["max_size"],
            "warmup_iters": config["schedule"]["warmup_iters"], "lr": config["optim"]["lr"]}


def plan(smoke: bool) -> dict[str, list[str]]:
    """Job name -> the options it adds to ``glip train --coco ... --init default``."""
    jobs = {"first_finetune": ["schedule.max_iter=%d" % SMOKE_STEPS[0]] if smoke else []}
    for method, (rates, schedules) in METHODS.items():
        for shots in SHOTS:
            steps, every = SMOKE_STEPS if smoke else schedules[shots]
            jobs[f"{method}_{shots or 'all'}shot"] = [
                "--mode", method, *rates, f"data.train.0.few_shot={shots}", f"schedule.max_iter={steps}",
                f"eval_every={every}", "checkpoint_every=100"]
    return jobs


def markdown(record: dict) -> str:
    rows = record["runs"]
    lines = [f"# Fine-tuning the shipped model on a CPU ({record['date']})", "",
             f"Downstream task: {record['task']}. Zero-shot AP of the shipped model: "
             f"{record['zero_shot_AP']:.1f}. One torch thread per job, {record['jobs']} jobs at a time on "
             f"{record['machine']['cpus']} cores ({record['machine']['processor'] or record['machine']['platform']}).",
             "", "| run | mode | shots | steps | warm-up | final AP | best AP (step) | train time (s) | images/s | "
             "wall (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        method, _, shots = name.rpartition("_") if name != "first_finetune" else ("full (recipe)", "", "all")
        best_step = max(r["val_AP_curve"], key=lambda s: (r["val_AP_curve"][s], -int(s))) if r["val_AP_curve"] \
            else r["steps"]
        best = r["val_AP_curve"].get(best_step, r["final_AP"])
        lines.append(f"| {name} | {method} | {shots.replace('shot', '')} | {r['steps']} | {r['warmup_iters']} | "
                     f"{r['final_AP']:.1f} | {best:.1f} ({best_step}) | {r['train_s']:.0f} | {r['images_per_s']:.2f} "
                     f"| {r['wall_s']:.0f} | {r['peak_rss_mb']} |")
    lines += ["", "Validation AP (%) by step:", ""]
    for name, r in rows.items():
        if r["val_AP_curve"]:
            lines.append(f"- {name}: " + ", ".join(f"{s}: {ap}" for s, ap in r["val_AP_curve"].items()))
    lines += ["", "Commands (WORLD: the downstream world's folder):", ""]
    lines += [f"- {name}: `{r['command']}`" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:  # the measuring parent of one job: --measure RECORD COMMAND...
        measure(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_bench"))
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (one torch thread each)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per job: checks every path")
    args = parser.parse_args()
    from glip_data import SynthConfig, generate_world

    out = args.out.resolve()
    world = out / "downstream_world"
    if not (world / "world.json").is_file():
        generate_world(world, config=SynthConfig(**DOWNSTREAM_WORLD))
        rename_downstream(world)
    start = time.time()
    zero = zero_shot(out, world)
    runs: dict[str, dict] = {}
    with futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {pool.submit(job, out, world, name, extra): name for name, extra in plan(args.smoke).items()}
        for done in futures.as_completed(pending):
            name = pending[done]
            runs[name] = done.result()
            print(f"{name}: {runs[name]['steps']} steps, AP {runs[name]['final_AP']}, {runs[name]['wall_s']} s, "
                  f"{runs[name]['peak_rss_mb']} MB", flush=True)
    order = list(plan(args.smoke))
    record = {
        "benchmark": "finetune_cpu", "date": _dt.date.today().isoformat(),
        "task": "the zero-shot experiment's downstream world (seed 1; 160 training, 120 validation images of "
                "96-160 px; the eight shapes renamed)",
        "init": "default (the shipped model)", "zero_shot_AP": round(100 * zero, 1), "jobs": args.jobs,
        "total_wall_s": round(time.time() - start),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "runs": {name: runs[name] for name in order}}
    folder = out if args.smoke else REPO / "benchmarks" / "results"
    stem = f"finetune_cpu_{record['date']}"
    (folder / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown(record))
    print(f"wrote {folder / stem}.json and .md")


if __name__ == "__main__":
    main()
