"""Why the fused rows of the zero-shot experiment diverge at a learning rate of 1e-3, and a remedy.

At 1e-3 (the experiment's first rate) the fused rows' classification loss stops falling and climbs back after
about 1,250 steps (row C) to 1,750 (row B), while box regression keeps improving; at 3e-4 they train. This script
trains row (C) -- the experiment's exact config, seed 0 -- with :class:`glip_train.training.monitor.StabilityMonitor`
attached (per-module gradient and update norms, X-MHA logits before the clamp, layer scales, the token-logit bias,
the text tower's activations; every 25 steps), so the part that drifts first can be read off, and then the same run
with a remedy.

    python benchmarks/zero_shot/instability.py run C_lr1e-3              # the diverging run, monitored
    python benchmarks/zero_shot/instability.py run C_lr1e-3 --stop-at 1750  # only up to the divergence
    python benchmarks/zero_shot/instability.py run C_lr3e-4              # the stable rate, for comparison
    python benchmarks/zero_shot/instability.py report                    # tables -> benchmarks/results/

Variants: see ``VARIANTS``. Runs go to --root (default runs/instability) and resume from their checkpoints; a run
stopped with --stop-at continues when run again with a later (or no) --stop-at. A monitored run trains bit for bit as
the unmonitored one (the monitor only reads).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import run as experiment  # noqa: E402  (the experiment's world, row config and evaluation)
from glip_data.io import atomic_write_text  # noqa: E402

EVERY = 25

#: the remedy: the fusion's attention layers -- X-MHA and the tower's text BERT layers, whose relative updates grew
#: first -- at a tenth of the rate (the text tower's, and the official recipe's 1e-4), DyConv and the rest at 1e-3
FUSION_LAYERS = ("b_attn", "*dyhead_tower.*.attention.*", "*dyhead_tower.*.intermediate.*",
                 "*dyhead_tower.*.output.*")
#: variant -> (row of the experiment, overrides of its config in ``glip train``'s key=value grammar)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "C_lr1e-3": ("C", []),
    "C_lr3e-4": ("C_lr3e-4", []),
    "C_lr1e-3_fusion_lr0.1": ("C", ["optim.lr_factors=" + json.dumps({key: 0.1 for key in FUSION_LAYERS})]),
}


def variant_config(paths: "experiment.Paths", variant: str, seed: int, out: Path) -> dict:
    """The experiment's row config of ``variant`` with its overrides applied (the ``glip train KEY=VALUE`` rules)."""
    from glip_train.training.config import apply_overrides

    row, overrides = VARIANTS[variant]
    config = experiment.row_config(paths, row, seed)
    config["output_dir"] = str(out)
    return apply_overrides(config, overrides)


class StopAt(Exception):
    """Raised by the hook that ends a run early (the checkpoint before it is intact; a rerun continues)."""


def train(paths: "experiment.Paths", variant: str, seed: int, root: Path, stop_at: int | None) -> Path:
    import torch
    import yaml

    from glip_train.training import Trainer, load_train_config
    from glip_train.training.hooks import HookBase
    from glip_train.training.monitor import StabilityMonitor

    torch.set_num_threads(1)  # as every run of the experiment (run.py's jobs)
    out = root / f"{variant}_seed{seed}"
    if (out / "model" / "model.safetensors").is_file():
        experiment.evaluate_model(out / "model", out / "eval", paths.world)
        return out
    config_file = root / f"{variant}_seed{seed}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, yaml.safe_dump(variant_config(paths, variant, seed, out), sort_keys=False))

    class Stop(HookBase):
        def after_step(self) -> None:
            if stop_at is not None and self.trainer.step >= stop_at:
                raise StopAt

    trainer = Trainer(load_train_config(config_file), progress=True,
                      hooks=[StabilityMonitor(every=EVERY), Stop()])
    try:
        trainer.train()
    except StopAt:
        print(f"instability.py: stopped at step {trainer.step} (--stop-at {stop_at}); run again to continue")
        return out
    finally:
        trainer.close()
    experiment.evaluate_model(out / "model", out / "eval", paths.world)  # as run.py evaluates its rows
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the report

#: the parts of the small GLIP model the report follows (groups of StabilityMonitor records, summed in quadrature)
PARTS = {
    "image backbone": lambda g: g.startswith("backbone.body"),
    "FPN": lambda g: g.startswith("backbone.fpn"),
    "text tower": lambda g: g.startswith("language_backbone"),
    "X-MHA (fusion)": lambda g: _tower_kind(g) == 0,
    "text BERT layers (tower)": lambda g: _tower_kind(g) == 1,
    "DyConv": lambda g: _tower_kind(g) == 2,
    "predictors": lambda g: g.startswith("head.") and not g.startswith("head.dyhead_tower"),
    "token bias (bias0, bias_lang, log_scale)": lambda g: g == "head",
}


def _tower_kind(group: str) -> int | None:
    """The fusion tower repeats [X-MHA, text BERT layer, DyConv] per fusion layer: the kind of a tower block."""
    prefix = "head.dyhead_tower."
    if not group.startswith(prefix):
        return None
    return int(group[len(prefix):].split(".")[0]) % 3


def read_run(run: Path) -> tuple[list[dict], dict[int, float], dict[int, float]]:
    """The stability records of a run (each step once), its token loss and its box regression loss by step."""
    by_step, loss, reg = {}, {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "stability":
            by_step[record["step"]] = record
        elif record.get("loss_dot_product_token") is not None:
            loss[record["step"]] = record["loss_dot_product_token"]
            reg[record["step"]] = record["loss_reg"]
    return [by_step[s] for s in sorted(by_step)], loss, reg


def part_norm(record: dict, part: str, key: str) -> float:
    test = PARTS[part]
    return math.sqrt(sum(v[key] ** 2 for g, v in record["groups"].items() if test(g)))


def series(records: list[dict]) -> dict[str, dict[int, float]]:
    """Every quantity the report follows, by step."""
    out: dict[str, dict[int, float]] = {}

    def put(name, step, value):
        out.setdefault(name, {})[step] = value

    for r in records:
        step = r["step"]
        for part in PARTS:
            put(f"update/weight: {part}", step, part_norm(r, part, "update_norm") /
                max(part_norm(r, part, "weight_norm"), 1e-12))
            put(f"gradient norm: {part}", step, part_norm(r, part, "grad_norm"))
        for name, (low, high) in r.get("xmha_logits", {}).items():
            block = name.split(".")[2]
            put(f"X-MHA max abs logit q·k/√d: block {block}", step, max(abs(low), abs(high)))
        for name, (gv, gl) in r.get("layer_scale", {}).items():
            block = name.split(".")[2]
            put(f"layer scale |gamma_v|: block {block}", step, gv)
            put(f"layer scale |gamma_l|: block {block}", step, gl)
        for key, value in r.get("token_bias", {}).items():
            put(f"token bias: {key}", step, value)
        for key, value in r.get("text_activations", {}).items():
            put(f"text tower output: {key}", step, value)
    return out


#: the quantities of the closer table
CLOSER = ("update/weight: X-MHA", "update/weight: text BERT", "update/weight: DyConv", "update/weight: text tower",
          "X-MHA max abs", "token bias: bias_lang")


def window_mean(values: dict[int, float], start: int, end: int) -> float | None:
    inside = [v for s, v in values.items() if start < s <= end]
    return statistics.mean(inside) if inside else None


def report(root: Path, results_dir: Path, seed: int) -> Path:
    runs = {v: root / f"{v}_seed{seed}" for v in VARIANTS if (root / f"{v}_seed{seed}" / "metrics.jsonl").is_file()}
    if not runs:
        raise FileNotFoundError(f"no monitored run under {root}: run `instability.py run C_lr1e-3` first")
    date = _dt.date.today().isoformat()
    result = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only", "seed": seed,
              "variants": {v: {"row": VARIANTS[v][0], "overrides": VARIANTS[v][1]} for v in runs}, "runs": {}}
    lines = [f"# The learning-rate instability of the fused rows, instrumented ({date}, {result['machine']})", ""]
    for variant, run in runs.items():
        records, loss, reg = read_run(run)
        data = series(records)
        last = max(loss) if loss else 0
        edges = list(range(0, last + 1, 250))
        result["runs"][variant] = {"token_loss_per_250": [window_mean(loss, a, a + 250) for a in edges[:-1]],
                                   "series": {k: {str(s): v for s, v in vals.items()} for k, vals in data.items()}}
        metrics = run / "eval" / "metrics.json"
        if metrics.is_file():
            result["runs"][variant]["metrics"] = json.loads(metrics.read_text())
        overrides = " ".join(f"`{o}`" for o in VARIANTS[variant][1])
        lines += [f"## {variant} (row {VARIANTS[variant][0]}{', ' + overrides if overrides else ''}), seed {seed}",
                  "", "Mean over each 250 steps (the token loss: its training log; the rest: StabilityMonitor, every "
                  f"{EVERY} steps).", "",
                  "| quantity | " + " | ".join(f"{a + 1}-{a + 250}" for a in edges[:-1]) + " |",
                  "|---" * len(edges) + "|",
                  "| token loss | " + " | ".join(_fmt(window_mean(loss, a, a + 250)) for a in edges[:-1]) + " |"]
        for name, values in data.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(window_mean(values, a, a + 250)) for a in edges[:-1]) + " |")
        # closer: every 100 steps from step 800 (the fused rows' loss turned between 1,000 and 1,500)
        close = list(range(800, last + 1, 100))
        if len(close) > 1:
            lines += ["", "Closer, mean over each 100 steps:", "",
                      "| quantity | " + " | ".join(f"{a + 1}-{a + 100}" for a in close[:-1]) + " |",
                      "|---" * len(close) + "|",
                      "| token loss | " + " | ".join(_fmt(window_mean(loss, a, a + 100)) for a in close[:-1]) + " |",
                      "| box regression loss | " + " | ".join(_fmt(window_mean(reg, a, a + 100)) for a in close[:-1])
                      + " |"]
            for name, values in data.items():
                if name.startswith(CLOSER):
                    lines.append(f"| {name} | " + " | ".join(_fmt(window_mean(values, a, a + 100))
                                                          for a in close[:-1]) + " |")
        lines.append("")
    # seed 0's file keeps the plain name it has always had; another seed's names its seed
    json_path = results_dir / f"instability_{date}{'' if seed == 0 else f'_seed{seed}'}.json"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return md_path


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the learning-rate instability of the fused rows, instrumented",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("variant", nargs="?", choices=tuple(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-at", type=int, help="end the run after this step (it resumes when run again)")
    ap.add_argument("--root", default=str(REPO / "runs" / "instability"))
    ap.add_argument("--experiment-root", default=str(REPO / "runs" / "zero_shot"),
                    help="the zero-shot experiment's folder (its world and text tower)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    paths = experiment.Paths(Path(args.experiment_root))
    experiment.setup(paths)
    if args.what == "run":
        if args.variant is None:
            ap.error("run: name a variant: " + ", ".join(VARIANTS))
        print(train(paths, args.variant, args.seed, Path(args.root), args.stop_at))
        return 0
    print(report(Path(args.root), Path(args.results), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
