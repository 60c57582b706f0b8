"""CPU detection time per image for GLIP-T at 800x1333: text padded to 256 (official) vs to the longest prompt.

Run:  python benchmarks/detect/bench_detect_cpu.py [--repeats 2] [--threads N] [--weights PATH]

Uses the synthetic GLIP-T weights recipe shipped in assets/ (the timing does not depend on the weight values) and the
drawn street scene resized to 1333x800, so the network input is exactly 800x1333 (padded to 800x1344). Prints a
table and writes benchmarks/results/detect_cpu_<date>.json. A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from glip_t_cpu import add_common_arguments, load_model_and_street  # noqa: E402
COCO_CLASSES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,parking meter,"
    "bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,"
    "skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,"
    "cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,"
    "potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,"
    "refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush"
).split(",")
PROMPTS = {
    "4 classes": ["person", "car", "red umbrella", "traffic light"],
    "80 COCO classes": COCO_CLASSES,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (after one warm-up)")
    args = parser.parse_args()

    from glip_data import detection_prompt

    model, image = load_model_and_street(args)
    rows = []
    for prompt_name, classes in PROMPTS.items():
        n_tokens = int(model.processor.tokenize([detection_prompt(classes)[0]])[1].sum())
        for pad_to_max in (True, False):
            # one prompt per image, as the official COCO protocol (no 40-class chunking)
            kwargs = dict(classes=classes, threshold=0.0, pad_text_to_max=pad_to_max, classes_per_prompt=len(classes))
            model.detect(image, **kwargs)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.detect(image, **kwargs)
                times.append(time.perf_counter() - start)
            rows.append({
                "prompt": prompt_name,
                "prompt_tokens": n_tokens,
                "text_padding": "256 (official)" if pad_to_max else "longest",
                "median_s": statistics.median(times),
                "times_s": times,
            })
            print(f"{prompt_name:16s} {rows[-1]['text_padding']:15s} {rows[-1]['median_s']:7.2f} s", flush=True)

    meta = {
        "date": dt.date.today().isoformat(),
        "device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "input": "1 image, 800x1333 (padded 800x1344), GLIP-T (synthetic weights), fp32",
        "command": "python benchmarks/detect/bench_detect_cpu.py",
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"detect_cpu_{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nGLIP-T detection time per image ({meta['device']}, torch {meta['torch']})")
    print(f"{'prompt':16s} {'tokens':>6s}  {'pad 256 (s)':>11s}  {'pad longest (s)':>15s}  {'speed-up':>8s}")
    for prompt_name in PROMPTS:
        full = next(r for r in rows if r["prompt"] == prompt_name and r["text_padding"].startswith("256"))
        short = next(r for r in rows if r["prompt"] == prompt_name and r["text_padding"] == "longest")
        print(f"{prompt_name:16s} {full['prompt_tokens']:6d}  {full['median_s']:11.2f}  {short['median_s']:15.2f}  "
              f"{full['median_s'] / short['median_s']:7.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
