"""Cost per image of evaluating a 1,203-class (LVIS-sized) vocabulary with GLIP-T, the image encoder run once.

Run:  python benchmarks/eval/bench_lvis_vocab_cpu.py [--classes 1203] [--chunk 40] [--threads N] [--weights PATH]

The official LVIS protocol splits the 1,203 class names into prompts of 40 (31 prompts) and runs each prompt through
the text encoder, the deep-fusion head and post-processing. ``GLIP.detect`` (what ``glip_train.evaluation`` calls)
runs the image encoder (Swin-T + FPN) once per image and reuses its features for every prompt. This script times:

* ``detect``: the whole protocol call for one image (``classes_per_prompt=40``, 300 detections per prompt, no
  per-image cap, threshold 0), as the evaluation runs it;
* ``image encoder``: one pass of the image encoder alone on the same input;

and derives what a loop that re-ran the encoder for every prompt would cost (``detect + (prompts - 1) x encoder``).

The class names are synthetic LVIS-like names (1-3 words of the bert-base-uncased vocabulary, some with a
parenthesised qualifier, cleaned as LVIS names are); their prompts' token counts are reported. Uses the synthetic
GLIP-T weights recipe (timings do not depend on the values) and the street scene resized to 1333x800, so the network
input is exactly 800x1333. Writes benchmarks/results/eval_lvis_vocab_cpu_<date>.json. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from glip_t_cpu import add_common_arguments, load_model_and_street  # noqa: E402


def lvis_like_names(tokenizer, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct names of 1-3 alphabetic vocabulary words, about one in seven with ``_(qualifier)``."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3)
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
        name = "_".join(rng.choice(words) for _ in range(k))
        if rng.random() < 0.15:
            name += f"_({rng.choice(words)})"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--chunk", type=int, default=40, help="classes per prompt (official LVIS: 40)")
    parser.add_argument("--encoder-repeats", type=int, default=3, help="timed image-encoder passes")
    args = parser.parse_args()

    from glip_data import chunk_classes, detection_prompt

    model, image = load_model_and_street(args)
    names = lvis_like_names(model.tokenizer, args.classes)
    chunks = chunk_classes(names, model.tokenizer, max_classes=args.chunk, max_tokens=model.config.max_text_len)
    tokens = [int(model.processor.tokenize([detection_prompt([names[i] for i in c])[0]])[1].sum()) for c in chunks]

    batch = model.processor.preprocess([image]).pixel_values
    encoder_times = []
    with torch.no_grad():
        model.encode_images(batch)  # warm-up
        for _ in range(args.encoder_repeats):
            start = time.perf_counter()
            model.encode_images(batch)
            encoder_times.append(time.perf_counter() - start)
    encoder_s = statistics.median(encoder_times)
    print(f"image encoder (Swin-T + FPN, {tuple(batch.shape[-2:])}): {encoder_s:.2f} s", flush=True)

    calls = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: calls.append(1))
    start = time.perf_counter()
    result = model.detect(image, classes=names, threshold=0.0, max_detections=None, max_detections_per_prompt=300,
                          classes_per_prompt=args.chunk)[0]
    detect_s = time.perf_counter() - start
    hook.remove()
    n = len(chunks)
    rerun_s = detect_s + (n - 1) * encoder_s
    print(f"detect, {args.classes} classes in {n} prompts: {detect_s:.1f} s per image "
          f"({len(calls)} image-encoder pass(es), {len(result['scores'])} detections)", flush=True)
    print(f"re-running the encoder per prompt would take about {rerun_s:.1f} s ({rerun_s / detect_s:.2f}x)")

    meta = {
        "date": dt.date.today().isoformat(),
        "device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
                  "(machine shared with other jobs: absolute times are noisy)",
        "torch": torch.__version__,
        "input": "1 image, 800x1333 (padded 800x1344), GLIP-T (synthetic weights recipe), fp32, text padded to "
                 "the longest prompt",
        "command": "python benchmarks/eval/bench_lvis_vocab_cpu.py",
    }
    row = {
        "classes": args.classes,
        "classes_per_prompt": args.chunk,
        "prompts": n,
        "prompt_tokens_mean": statistics.mean(tokens),
        "prompt_tokens_max": max(tokens),
        "image_encoder_passes": len(calls),
        "image_encoder_s": encoder_s,
        "image_encoder_times_s": encoder_times,
        "detect_s_per_image": detect_s,
        "per_prompt_s": (detect_s - encoder_s) / n,
        "estimated_s_if_encoder_ran_per_prompt": rerun_s,
        "saving_factor": rerun_s / detect_s,
        "detections": int(len(result["scores"])),
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"eval_lvis_vocab_cpu_{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [row]}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
