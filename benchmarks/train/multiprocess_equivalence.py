"""How far N training processes are from one process with the same global batch, measured.

Fine-tunes the model shipped with glip-train for a few steps on a small synthetic world, once in one process with
batch 2 and once in two gloo processes (``torchrun``) with batch 1 each -- the same samples in the same order, the
same loss normalisers -- and compares

* the first step's gradients (after DDP's all-reduce, before the optimizer): per tensor ``|g2 - g1| / |g1|``
  (L2 norms), the quantity the processes are supposed to agree on;
* the weights after ``--steps`` steps: per tensor ``|w2 - w1| / |w1 - w0|``, the difference as a share of the
  update (AdamW divides each gradient element by its own running magnitude, so a gradient element that is rounding
  noise -- e.g. BERT's key biases, whose exact gradient is zero -- still moves its weight by about the learning rate).

Cases: images of one size with dropout off (the test suite's claim: float rounding only), images of mixed sizes with
dropout off (each process pads its own batch: the official fusion and DyConv see the padding), the same with
``batch_invariant`` (padding masked in the X-MHA text-direction softmax), and mixed sizes with the official dropout
(every process draws its own masks).

    python benchmarks/train/multiprocess_equivalence.py --out runs/mp_equivalence
    python benchmarks/train/multiprocess_equivalence.py --out runs/mp_equivalence --write-results

``--write-results`` also writes ``benchmarks/results/multiprocess_equivalence_cpu_<date>.json``. About ten minutes on
2 CPU cores (eight short training runs, one torch thread each).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

#: the cases: (name, world image sizes, dropout off, batch_invariant)
CASES = (
    ("one_size_no_dropout", (128, 128), True, False),
    ("mixed_sizes_no_dropout", (96, 160), True, False),
    ("mixed_sizes_no_dropout_batch_invariant", (96, 160), True, True),
    ("mixed_sizes_official_dropout", (96, 160), False, False),
)


def model_overrides(no_dropout: bool, batch_invariant: bool) -> dict:
    """``model`` overrides of the shipped model: every dropout (text encoder, X-MHA, head BERT, FPN DropBlock) off."""
    from glip_train.shipped import DEFAULT_MODEL_DIR

    shipped = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    overrides: dict = {"batch_invariant": batch_invariant}
    if no_dropout:
        text = dict(shipped["text_encoder"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        overrides.update(text_encoder=text, fusion={"dropout": 0.0, "bert_dropout": 0.0},
                         image_encoder_kwargs={**shipped["image_encoder_kwargs"], "drop_block": False})
    return overrides


def run_config(world: Path, out: Path, batch_size: int, steps: int, image_sizes: tuple[int, int],
               no_dropout: bool, batch_invariant: bool) -> dict:
    low, high = image_sizes
    return {
        "output_dir": str(out), "seed": 0, "init": "default", "mode": "full", "device": "cpu",
        "model": model_overrides(no_dropout, batch_invariant),
        "data": {"train": [{"kind": "coco", "annotations": str(world / "detection_train.json"),
                            "images": str(world / "images"), "prompt": "fixed"}],
                 # one resize for every image: the shorter side 128, so mixed aspect ratios stay mixed sizes
                 "batch_size": batch_size, "min_sizes": [128], "max_size": 128 * high // low, "flip_prob": 0.5,
                 "pad_text_to": "longest", "num_workers": 0},
        "optim": {"lr": 1e-4, "language_lr": 1e-5},
        "schedule": {"max_iter": steps, "warmup_iters": 0},
        "ema": None, "checkpoint_every": 1000, "log_every": 1,
    }


# ---- the worker: one training run (one process, or one of several under torchrun) ------------------------------------

def worker(config_path: Path, gradients_path: Path) -> None:
    import torch

    from glip_train.training import HookBase, Trainer, load_train_config

    class FirstGradients(HookBase):
        """The gradients of the first step (all-reduced by DDP; clipping scales every process alike)."""

        def after_step(self):
            if self.trainer.step == 1 and self.trainer.is_main:
                torch.save({n: p.grad.detach().clone() for n, p in self.trainer.model.named_parameters()
                            if p.grad is not None}, gradients_path)

    trainer = Trainer(load_train_config(config_path), progress=False, hooks=[FirstGradients()])
    if trainer.is_main:
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                   gradients_path.with_name("initial.pt"))
    trainer.train()


# ---- the driver -----------------------------------------------------------------------------------------------------

def _env() -> dict:
    src = [str(REPO / "packages" / p / "src") for p in ("glip-fusion", "glip-encoders", "glip-data", "glip-train")]
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([*src, os.environ.get("PYTHONPATH", "")]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(folder: Path, config: dict, processes: int) -> None:
    import yaml

    if (folder / "out" / "result.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    me = [str(Path(__file__).resolve()), "--worker", str(path), str(folder / "gradients.pt")]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *me]
    with open(folder / "log.txt", "w") as log:
        subprocess.run(cmd, check=True, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=3600)


def _relative(diffs: dict[str, float]) -> dict:
    values = sorted(diffs.values())
    worst = max(diffs, key=diffs.get)
    return {"tensors": len(values), "median": statistics.median(values),
            "p90": values[int(0.9 * (len(values) - 1))], "max": values[-1], "max_tensor": worst,
            "above_1e-3": sum(v > 1e-3 for v in values), "above_1e-2": sum(v > 1e-2 for v in values)}


def compare(one: Path, two: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    g1, g2 = torch.load(one / "gradients.pt"), torch.load(two / "gradients.pt")
    w0 = torch.load(one / "initial.pt")
    w1, w2 = load_file(str(one / "out" / "model" / "model.safetensors")), \
        load_file(str(two / "out" / "model" / "model.safetensors"))
    # the attention key biases: a key bias adds one score to every key of a query, which the softmax cancels; their
    # exact gradient is zero, the computed one rounding noise, which AdamW still turns into steps of about the LR
    key_biases = sorted(k for k in g1 if k.endswith("attention.self.key.bias"))
    gradients = {k: float((g2[k] - g1[k]).norm() / g1[k].norm()) for k in g1 if float(g1[k].norm()) > 0}
    updates = {}
    for k in w1:
        moved = float((w1[k] - w0[k]).norm()) if w1[k].is_floating_point() else 0.0
        if moved > 0:
            updates[k] = float((w2[k] - w1[k]).norm()) / moved
    return {"gradient_step1": _relative(gradients), "weights_vs_update": _relative(updates),
            "gradient_step1_without_key_biases": _relative({k: v for k, v in gradients.items() if k not in key_biases}),
            "weights_vs_update_without_key_biases": _relative({k: v for k, v in updates.items()
                                                               if k not in key_biases}),
            "key_biases": key_biases}


def padding_sensitivity(world: Path, extra: int = 64) -> dict:
    """Where the padding enters: one training image of the mixed-size world through the shipped model (eval mode,
    no dropout), alone (padded to a multiple of 32) and with ``extra`` more pixels of padding right and below; the
    relative change ``|a - b| / |a|`` over the image's own cells at the backbone's first level, the FPN's first
    level, the fused text and the token logits; official and with ``batch_invariant``."""
    import torch

    from glip_data import load_image
    from glip_train import GLIP

    annotations = json.loads((world / "detection_train.json").read_text())
    image = load_image(world / "images" / annotations["images"][0]["file_name"])
    out: dict = {"image": list(image.size), "extra_padding_px": extra}
    for batch_invariant in (False, True):
        model = GLIP.from_pretrained(None, batch_invariant=batch_invariant).eval()
        batch = model.processor.preprocess([image], 128, 128 * 160 // 96)
        pixels, sizes = batch.pixel_values, batch.image_sizes
        h, w = sizes[0]
        padded = torch.zeros(1, 3, pixels.shape[-2] + extra, pixels.shape[-1] + extra)
        padded[..., :pixels.shape[-2], :pixels.shape[-1]] = pixels
        ids, mask = model.processor.tokenize(["circle. square. triangle. star. hexagon."])
        with torch.no_grad():
            a, b = (model(x, ids, mask, sizes, return_backbone_features=True) for x in (pixels, padded))

        def change(x: torch.Tensor, y: torch.Tensor) -> float:
            y = y[..., :x.shape[-2], :x.shape[-1]] if x.dim() == 4 else y[:, :x.shape[1]]
            return float((y - x).norm() / x.norm())

        logits_a = a.head.token_logits[0].reshape(1, *a.fpn_features[0].shape[-2:], -1)
        logits_b = b.head.token_logits[0].reshape(1, *b.fpn_features[0].shape[-2:], -1)
        own = (slice(None), slice(0, -(-h // 8)), slice(0, -(-w // 8)))  # the image's own cells of P3
        out["batch_invariant" if batch_invariant else "official"] = {
            "backbone_level0": change(a.backbone_features[0], b.backbone_features[0]),
            "fpn_p3": change(a.fpn_features[0], b.fpn_features[0]),
            "fused_text": change(a.head.lang_hidden, b.head.lang_hidden),
            "token_logits_p3": float((logits_b[own] - logits_a[own]).norm() / logits_a[own].norm())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/mp_equivalence"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "GRADIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    from glip_data import SynthConfig, generate_world

    results = {}
    for name, sizes, no_dropout, batch_invariant in CASES:
        world = args.out / f"world_{sizes[0]}_{sizes[1]}"
        if not (world / "world.json").is_file():
            generate_world(world, config=SynthConfig(seed=5, num_detection=16, num_grounding=0, num_captions=0,
                                                     num_val=0, min_size=sizes[0], max_size=sizes[1]))
        runs = {}
        for processes, batch in ((1, 2), (2, 1)):
            folder = args.out / name / f"{processes}proc"
            train(folder, run_config(world, folder / "out", batch, args.steps, sizes, no_dropout, batch_invariant),
                  processes)
            runs[processes] = folder
        results[name] = compare(runs[1], runs[2])
        summary = results[name]
        grads, weights = summary["gradient_step1_without_key_biases"], summary["weights_vs_update_without_key_biases"]
        print(f"{name} (without the key biases): step-1 gradients median {grads['median']:.2e} max "
              f"{grads['max']:.2e}; weights after {args.steps} steps: median {weights['median']:.2e}, max "
              f"{weights['max']:.2e} of the update ({weights['above_1e-2']} of {weights['tensors']} tensors above 1 %)",
              flush=True)
    results["padding_sensitivity"] = padding_sensitivity(args.out / "world_96_160")
    print(f"padding sensitivity: {json.dumps(results['padding_sensitivity'])}", flush=True)
    record = {"benchmark": "multiprocess_equivalence", "date": _dt.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count()},
              "setting": {"init": "default (the shipped model)", "steps": args.steps, "lr": 1e-4,
                          "one_process_batch": 2, "two_processes_batch": 1, "backend": "gloo",
                          "cases": {n: {"image_sizes": s, "dropout_off": d, "batch_invariant": b}
                                    for n, s, d, b in CASES}},
              "results": results}
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    if args.write_results:
        path = REPO / "benchmarks" / "results" / f"multiprocess_equivalence_cpu_{record['date']}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
