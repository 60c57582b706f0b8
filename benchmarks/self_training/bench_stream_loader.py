"""The training loader's samples per second: a streamed source (``kind: shards``) against the map-style reader of
the same records.

The records are the self-training recipe's pseudo-labels (``runs/self_training/pseudo_seed0``, or any
``glip pseudo-label`` output given with ``--shards``): once as that shard folder, streamed, and once as one caption
JSON Lines file over the same images (the world's image folder), read map-style. Each is the only source of a
``glip train`` data config at the recipe's settings (batch 2, 128-160 px, caption packing) and the loader
(``TrainData.batches``: reading, decoding, packing, transforms, collation) runs for ``--batches`` micro-batches,
with 0 and 2 DataLoader workers. Building the sources (the map-style reader parses its file and checks every image
file; the stream reads its index) is timed separately.

    python benchmarks/self_training/bench_stream_loader.py [--shards DIR] [--batches 150]

Writes ``benchmarks/results/stream_loader_cpu_<date>.json`` and prints a table. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def as_jsonl(shards: Path, world_images: Path, out: Path) -> Path:
    """The shard folder's caption records as one JSON Lines file whose images are the world's files (key i is
    caption line i of the world)."""
    from glip_data.shards import INDEX_NAME
    from glip_data.webdataset import iter_tar_samples

    world = world_images.parent
    lines = [json.loads(x) for x in (world / "captions_train.jsonl").read_text().splitlines()]
    records = []
    for shard in json.loads((shards / INDEX_NAME).read_text())["shards"]:
        for _, key, members in iter_tar_samples(shards / shard["name"]):
            record = json.loads(members["json"])
            record["image"] = lines[int(key)]["image"]
            records.append(json.dumps(record))
    from glip_data.io import atomic_write_text

    return atomic_write_text(out, "\n".join(records) + "\n")


def measure(name: str, source: dict, workers: int, batches: int, model, root: Path) -> dict:
    from glip_train.training.config import TrainConfig
    from glip_train.training.data import build_data, build_sources

    config = TrainConfig.from_dict({
        "output_dir": str(root / "unused"), "init": "default", "seed": 0,
        "data": {"train": [source], "batch_size": 2, "min_sizes": [128, 160], "max_size": 240,
                 "pad_text_to": "longest", "num_workers": workers}})
    start = time.perf_counter()
    sources = build_sources(config.data, seed=0)
    data = build_data(config, sources, model)
    built = time.perf_counter() - start
    iterator = data.batches(0)
    next(iterator)  # workers started, first batch
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += next(iterator).images.shape[0]
    seconds = time.perf_counter() - start
    row = {"name": name, "workers": workers, "build_s": round(built, 3), "batches": batches, "samples": images,
           "seconds": round(seconds, 2), "samples_per_s": round(images / seconds, 2),
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(REPO / "runs" / "self_training" / "pseudo_seed0"))
    parser.add_argument("--world", default=str(REPO / "runs" / "self_training" / "zero_shot" / "world"))
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from glip_train import GLIP

    torch.set_num_threads(1)
    shards, world = Path(args.shards), Path(args.world)
    root = REPO / "runs" / "bench_stream_loader"
    root.mkdir(parents=True, exist_ok=True)
    lines = as_jsonl(shards, world / "images", root / "pseudo.jsonl")
    model = GLIP.from_pretrained()  # its tokenizer and text length
    stream = {"kind": "shards", "annotations": str(shards)}
    mapped = {"kind": "captions", "annotations": str(lines), "images": str(world / "images")}
    rows = [measure(f"{name}", source, workers, args.batches, model, root)
            for workers in (0, 2) for name, source in (("map-style (captions jsonl)", mapped),
                                                       ("streamed (kind: shards)", stream))]
    date = dt.date.today().isoformat()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"stream_loader_cpu_{date}.json")
    out.write_text(json.dumps({"meta": {"date": date, "device": f"CPU: {platform.machine()}, {os.cpu_count()} cores",
                                        "torch": torch.__version__, "records": str(shards),
                                        "command": "python benchmarks/self_training/bench_stream_loader.py "
                                                   + " ".join(sys.argv[1:]),
                                        "note": "one torch thread in the main process; batch 2, 128-160 px, "
                                                "caption packing; other jobs shared the machine"},
                               "rows": rows}, indent=2) + "\n")
    print("\n| source | workers | build s | samples/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['workers']} | {r['build_s']} | {r['samples_per_s']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
