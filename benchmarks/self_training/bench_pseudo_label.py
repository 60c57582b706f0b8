"""Pseudo-labelling throughput on CPU: images per second and per process, and the scaling from 1 to 2 processes.

Two teachers on img2dataset-style shards:

* the shipped model on the synthetic world's caption images (96-160 px, test size 160/240, the recipe's setting),
  batches of 1 and 4, with 1 process and with 2 processes under torchrun (gloo);
* GLIP-T (synthetic weights from ``assets/``; the time does not depend on the values) at the official test size
  800x1333: the street picture resized to 1333x800 with a caption whose noun phrases the chunker finds, batch 1.

Each configuration runs ``glip_train.pseudo_label_shards`` (what ``glip pseudo-label --captions SHARDS`` runs) in
fresh processes; the time counted is the labelling (reading, decoding, the teacher, writing), not the model load.

    python benchmarks/self_training/bench_pseudo_label.py [--images 48] [--glip-t-images 4] [--out FILE]

Writes ``benchmarks/results/pseudo_label_cpu_<date>.json`` and prints a table. A benchmark, not a test: nothing is
asserted; the machine's load average is recorded before and after each run (other jobs share the cores).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GLIP_T = REPO / "assets" / "glip_t_synthetic_weights.json"
STREET = REPO / "assets" / "street.png"
STREET_CAPTION = "a person with a red umbrella crosses the street near a car and a traffic light."


def worker(args: argparse.Namespace) -> None:
    """One labelling run (under torchrun for several processes); rank 0 prints the timing as JSON."""
    import torch

    from glip_train import GLIP
    from glip_train.evaluation.distributed import barrier, dist_info, gather_to_main, init_distributed_from_env
    from glip_train.pseudo_label_shards import open_shard_job

    torch.set_num_threads(args.threads)
    init_distributed_from_env()
    rank, world = dist_info()
    model = GLIP.from_pretrained(args.weights if args.weights != "default" else None).eval()
    settings = dict(mode="captions", classes=None, threshold=0.0, nms=None, min_boxes=0, phrases=args.phrases,
                    max_detections=100, min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size,
                    shard_size=None)
    with open_shard_job(args.source, args.job_out, tokenizer=model.processor.tokenizer, stream=None,
                        **settings) as job:
        mine = job.todo[rank::world]
        barrier()
        start = time.perf_counter()
        report = job.run(model, progress=False)
        seconds = time.perf_counter() - start
    done = gather_to_main({"rank": rank, "shards": len(mine), "seconds": seconds})
    if rank == 0:
        print("RESULT " + json.dumps({"per_rank": done, "samples": report.counts["samples"],
                                      "written": report.counts["written"], "world": world}))


def write_world_shards(out: Path, images: int) -> Path:
    from glip_data import CaptionReader, SynthConfig, generate_world
    from glip_data.webdataset import write_img2dataset_shards

    if not (out / "web").is_dir():
        world = generate_world(out / "world", config=SynthConfig(seed=11, num_detection=1, num_grounding=1,
                                                                 num_captions=images, num_val=1, min_size=96,
                                                                 max_size=160))
        write_img2dataset_shards(CaptionReader(world.captions_train, world.image_root, min_boxes=0), out / "web",
                                 samples_per_shard=max(1, images // 8), progress=False)
    return out / "web"


def write_street_shards(out: Path, images: int) -> Path:
    import io
    import tarfile

    from PIL import Image

    from glip_data.webdataset import add_member

    web = out / "street"
    if not web.is_dir():
        web.mkdir(parents=True)
        buffer = io.BytesIO()
        Image.open(STREET).convert("RGB").resize((1333, 800), Image.BILINEAR).save(buffer, "JPEG", quality=95)
        for shard in range(2):
            with tarfile.open(web / f"{shard:05d}.tar", "w") as tar:
                for i in range(shard, images, 2):
                    key = f"{i:09d}"
                    add_member(tar, f"{key}.jpg", buffer.getvalue())
                    add_member(tar, f"{key}.txt", STREET_CAPTION.encode())
                    add_member(tar, f"{key}.json", json.dumps({"key": key, "width": 1333, "height": 800}).encode())
    return web


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(name: str, source: Path, nproc: int, threads: int, batch: int, weights: str, phrases: str, sizes: tuple,
        scratch: Path) -> dict:
    out = scratch / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)
    script = [str(Path(__file__).resolve()), "--worker", "--source", str(source), "--job-out", str(out),
              "--threads", str(threads), "--batch-size", str(batch), "--weights", weights, "--phrases", phrases,
              "--min-size", str(sizes[0]), "--max-size", str(sizes[1])]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    before = load()
    text = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    after = load()
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    wall = max(r["seconds"] for r in result["per_rank"])
    images = result["samples"]
    row = {"name": name, "processes": nproc, "threads_per_process": threads, "batch_size": batch,
           "images": images, "labelling_s": round(wall, 2), "images_per_s": round(images / wall, 3),
           "images_per_s_per_process": round(images / wall / nproc, 3),
           "s_per_image_per_process": round(wall * nproc / images, 3), "per_rank": result["per_rank"],
           "load_average_before": before, "load_average_after": after}
    print(json.dumps({k: v for k, v in row.items() if k != "per_rank"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source"), parser.add_argument("--job-out")
    parser.add_argument("--threads", type=int, default=1), parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--weights", default="default"), parser.add_argument("--phrases", default="entities")
    parser.add_argument("--min-size", type=int, default=160), parser.add_argument("--max-size", type=int, default=240)
    parser.add_argument("--images", type=int, default=48, help="synthetic-world images per run (default 48)")
    parser.add_argument("--glip-t-images", type=int, default=4, help="GLIP-T 800x1333 images (default 4)")
    parser.add_argument("--scratch", default=str(REPO / "runs" / "bench_pseudo_label"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    scratch = Path(args.scratch)
    web = write_world_shards(scratch, args.images)
    street = write_street_shards(scratch, args.glip_t_images)
    rows = [
        run("shipped_1proc_b1", web, 1, 1, 1, "default", "entities", (160, 240), scratch),
        run("shipped_1proc_b4", web, 1, 1, 4, "default", "entities", (160, 240), scratch),
        run("shipped_2proc_b1", web, 2, 1, 1, "default", "entities", (160, 240), scratch),
        run("shipped_2proc_b4", web, 2, 1, 4, "default", "entities", (160, 240), scratch),
        run("shipped_1proc_2threads_b4", web, 1, 2, 4, "default", "entities", (160, 240), scratch),
        run("glip_t_800x1333_1proc_2threads_b1", street, 1, 2, 1, str(GLIP_T), "chunker", (800, 1333), scratch),
        run("glip_t_800x1333_2proc_b1", street, 2, 1, 1, str(GLIP_T), "chunker", (800, 1333), scratch),
    ]
    import torch

    date = dt.date.today().isoformat()
    result = {"meta": {"date": date, "device": f"CPU: {platform.machine()}, {os.cpu_count()} cores",
                       "torch": torch.__version__,
                       "command": "python benchmarks/self_training/bench_pseudo_label.py " + " ".join(sys.argv[1:]),
                       "note": "labelling time only (model load excluded); threshold 0, every labelled sample "
                               "written; other jobs shared the machine: see the load averages"},
              "rows": rows}
    out = Path(args.out or REPO / "benchmarks" / "results" / f"pseudo_label_cpu_{date}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| run | processes x threads | batch | images | s | images/s | images/s per process |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['processes']} x {r['threads_per_process']} | {r['batch_size']} | {r['images']} | "
              f"{r['labelling_s']} | {r['images_per_s']} | {r['images_per_s_per_process']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
