"""Pseudo-labelling WebDataset shards exactly once: output shards and manifest, bad inputs counted and named, killed
runs resumed, settings and teachers that would mix labels refused, class-list mode and its COCO file."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from glip_data import CaptionReader, SynthConfig, generate_world
from glip_data.io import OutputLockedError, RunLock, temporary_path
from glip_data.shards import ShardedStream
from glip_data.webdataset import ShardListError, add_member, iter_tar_samples, write_img2dataset_shards
from glip_train import GLIP
from glip_train.pseudo_label_shards import ShardJob, open_shard_job, write_coco

SETTINGS = dict(mode="captions", classes=None, threshold=0.5, nms=None, min_boxes=1, phrases="entities",
                max_detections=100, min_size=96, max_size=160, batch_size=2, shard_size=None)


@pytest.fixture(scope="module")
def teacher():
    return GLIP.from_pretrained().eval()  # the shipped model: it reads the synthetic world's words


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("pl_world"), config=SynthConfig(
        seed=6, num_detection=1, num_grounding=1, num_captions=7, num_val=1, min_size=96, max_size=128))


def _web(world, out: Path, per_shard: int) -> Path:
    """The world's caption images as img2dataset shards of ``per_shard`` samples."""
    reader = CaptionReader(world.captions_train, world.image_root, min_boxes=0)
    write_img2dataset_shards(reader, out, samples_per_shard=per_shard, progress=False)
    return out


@pytest.fixture(scope="module")
def web(world, tmp_path_factory):
    return _web(world, tmp_path_factory.mktemp("pl_web"), 3)  # 00000.tar (3), 00001.tar (3), 00002.tar (1)


def run_job(source, out, model, **changes):
    with open_shard_job(source, out, tokenizer=model.processor.tokenizer, **{**SETTINGS, **changes}) as job:
        return job.run(model, progress=False)


def records(out: Path) -> dict[str, dict]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for _, key, members in iter_tar_samples(shard):
            assert key not in found, f"{key} written twice"
            found[key] = json.loads(members["json"])
    return found


def test_output_shards_hold_caption_records_with_the_input_keys_and_images(world, web, teacher, tmp_path, capsys):
    report = run_job(web, tmp_path / "out", teacher, threshold=0.3)
    assert report.labelled == 3 and report.counts["samples"] == 7 and not report.failed
    lines = [json.loads(x) for x in world.captions_train.read_text().splitlines()]
    found = records(tmp_path / "out")
    assert report.counts["written"] == len(found) >= 5
    for key, record in found.items():
        line = lines[int(key)]
        assert record["key"] == key and record["caption"] == line["caption"]
        assert (record["width"], record["height"]) == (line["width"], line["height"])
        spans = [e["tokens_positive"] for e in line["entities"]]
        for entity in record["entities"]:
            assert entity["tokens_positive"] in spans and len(entity["boxes"]) == len(entity["scores"]) > 0
            assert all(s >= 0.3 for s in entity["scores"])
            for x1, y1, x2, y2 in entity["boxes"]:
                assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:  # the image bytes travel with the record
        name = next(n for n in tar.getnames() if n.endswith(".jpg"))
        assert tar.extractfile(name).read() == (world.image_root / lines[int(name[:9])]["image"]).read_bytes()
    # the folder is a glip-data shard folder: the manifest lists every shard, glip train streams it
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [(s["name"], s["input"], s["samples"]) for s in index["shards"]] == \
        [("00000.tar", str(web / "00000.tar"), 3), ("00001.tar", str(web / "00001.tar"), 3),
         ("00002.tar", str(web / "00002.tar"), 1)]
    streamed = list(ShardedStream(tmp_path / "out", load_image=True))
    assert len(streamed) == sum(1 for r in found.values() if any(s > 0.5 for e in r["entities"] for s in e["scores"]))
    assert all(s.image.size == (s.width, s.height) for s in streamed)
    from glip_data.cli import main as glip_data_main

    capsys.readouterr()
    assert glip_data_main(["inspect", str(tmp_path / "out"), "--json", "--quiet"]) == 0  # glip-data counts them
    printed = capsys.readouterr().out
    counted = json.loads(printed[printed.index("{\n"):])
    assert counted["samples"] == len(streamed) and counted["boxes"] == sum(len(s.boxes) for s in streamed)


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


def test_bad_samples_are_counted_and_named_per_shard_and_bad_shards_retried(world, web, teacher, tmp_path):
    good = dict(next(m for _, _, m in iter_tar_samples(web / "00000.tar")))
    meta = json.loads(good["json"])
    source = tmp_path / "in"
    source.mkdir()
    _shard(source / "a.tar", [
        ("ok", good),
        ("nocaption", {"jpg": good["jpg"], "json": json.dumps({k: v for k, v in meta.items()
                                                               if k != "caption"}).encode()}),
        ("badimage", {**good, "jpg": b"\xff\xd8 not a jpeg"}),
        ("noimage", {"txt": good["txt"], "json": good["json"]}),
        ("badjson", {**good, "json": b"{not json"}),
        ("nophrase", {**good, "json": json.dumps({**meta, "entities": []}).encode()}),
        ("unknown", {"jpg": good["jpg"], "txt": b"zebra quokka", "json": json.dumps(
            {"width": meta["width"], "height": meta["height"],
             "entities": [{"phrase": "zebra quokka", "tokens_positive": [[0, 12]]}]}).encode()}),
    ])
    with tarfile.open(source / "b.tar", "w"):
        pass  # an empty shard
    data = (web / "00001.tar").read_bytes()
    (source / "c.tar").write_bytes(data[: len(data) // 2])  # cut short
    report = run_job(source, tmp_path / "out", teacher, threshold=0.0)
    assert report.labelled == 2 and [name for name, _ in report.failed] == ["c"]
    assert "c.tar: not a readable tar archive" in report.failed[0][1]
    entry = json.loads((tmp_path / "out" / "a_stats.json").read_text())
    assert entry["samples"] == 7 and entry["written"] == 1
    assert entry["skipped"]["by_reason"] == {"bad metadata": 1, "no caption": 1, "no image": 1, "no phrases": 1,
                                             "no readable phrase": 1, "unreadable image": 1}
    assert entry["skipped_phrases"]["examples"] == {"phrase is only unknown tokens": [
        f"{source / 'a.tar'}#unknown 'zebra quokka'"]}
    named = {reason: [n.split("#")[1].split(":")[0] for n in names]
             for reason, names in entry["skipped"]["examples"].items()}
    assert named["no caption"] == ["nocaption"] and named["unreadable image"] == ["badimage"]
    assert named["bad metadata"] == ["badjson"] and named["no readable phrase"] == ["unknown"]
    assert json.loads((tmp_path / "out" / "b_stats.json").read_text())["samples"] == 0
    assert not (tmp_path / "out" / "c.tar").exists() and report.exit_code() == 1
    assert json.loads((tmp_path / "out" / "index.json").read_text())["unfinished"] == ["c"]
    # every sample accounted for exactly once: written, or named as skipped
    assert set(records(tmp_path / "out")) | {n for names in named.values() for n in names} == \
        {"ok", "nocaption", "badimage", "noimage", "badjson", "nophrase", "unknown"}
    # the shard repaired, a rerun labels it and only it
    (source / "c.tar").write_bytes(data)
    again = run_job(source, tmp_path / "out", teacher, threshold=0.0)
    assert (again.labelled, again.done_before, again.failed) == (1, 2, [])
    assert json.loads((tmp_path / "out" / "index.json").read_text())["unfinished"] == []


def test_a_missing_shard_in_a_list_is_one_error_before_anything_is_written(web, teacher, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{web / '00000.tar'}\n{web / 'gone.tar'}\n")
    with pytest.raises(ShardListError, match=r"1 of its 2 shards do not exist: .*gone.tar"):
        run_job(listing, tmp_path / "out", teacher)
    assert not (tmp_path / "out").exists()


def test_a_killed_run_resumes_exactly_once_with_the_same_labels(web, teacher, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run_job(web, clean, teacher)
    broken = tmp_path / "broken"
    original = ShardJob.label_shard
    calls = []

    def dies_on_the_second(self, model, shard):
        calls.append(shard.name)
        if len(calls) == 2:  # killed mid-write: the entry written, the shard's temporary file half full
            (self.out / f"{shard.name}_stats.json").write_text("{}")
            temporary_path(self.out / f"{shard.name}.tar").write_bytes(b"half")
            raise KeyboardInterrupt
        return original(self, model, shard)

    monkeypatch.setattr(ShardJob, "label_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_job(web, broken, teacher)
    monkeypatch.setattr(ShardJob, "label_shard", original)
    assert sorted(p.name for p in broken.glob("*.tar")) == ["00000.tar"]
    report = run_job(web, broken, teacher)
    assert (report.done_before, report.labelled) == (1, 2)
    assert not list(broken.glob("*.glip-tmp"))  # the killed write's leftovers are gone
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (broken / name).read_bytes() == (clean / name).read_bytes()
    assert json.loads((broken / "index.json").read_text())["shards"] == \
        json.loads((clean / "index.json").read_text())["shards"]


def test_other_settings_another_teacher_or_a_second_job_are_refused(web, teacher, tmp_path):
    out = tmp_path / "out"
    run_job(web, out, teacher)
    with pytest.raises(ValueError, match=r"other settings \(threshold: 0.5 before, 0.3 now\)"):
        run_job(web, out, teacher, threshold=0.3)
    other = GLIP.from_pretrained().eval()
    with __import__("torch").no_grad():
        other.head.bias0.add_(1.0)
    with pytest.raises(ValueError, match="labelled by another teacher"):
        run_job(web, out, other)
    with RunLock(out, "another job"):
        with pytest.raises(OutputLockedError, match="in use by another run"):
            run_job(web, out, teacher)


def test_class_lists_label_image_folders_and_write_a_coco_file(world, teacher, tmp_path):
    classes = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring"]
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, path in enumerate(sorted(world.image_root.rglob("*.jpg"))[:5]):
        (images / ("sub" if i % 2 else "") / path.name).write_bytes(path.read_bytes())
    report = run_job(images, tmp_path / "out", teacher, mode="classes", classes=classes, shard_size=2,
                     phrases=None)
    assert report.labelled == 3 and report.counts["samples"] == 5
    found = records(tmp_path / "out")
    assert found and set(found) <= {str(p.relative_to(images).with_suffix("")) for p in images.rglob("*.jpg")}
    for record in found.values():
        names = [e["phrase"] for e in record["entities"]]
        assert record["caption"] == ". ".join(names)  # the prompt of the classes found
        assert all(classes[e["category_id"] - 1] == e["phrase"] for e in record["entities"])
    coco = json.loads(write_coco(tmp_path / "out", tmp_path / "labels.json", classes).read_text())
    assert [c["name"] for c in coco["categories"]] == classes
    assert {i["file_name"] for i in coco["images"]} == {r["image"] for r in found.values()}
    assert all((images / i["file_name"]).is_file() for i in coco["images"])  # names relative to the folder
    assert len(coco["annotations"]) == report.counts["boxes_kept"]


# ---- the command line under torchrun: any world size, killed anywhere -----------------------------------------------

def _cli(nproc: int, *args: str) -> list[str]:
    import socket
    import sys

    if nproc == 1:
        return [sys.executable, "-m", "glip_train.cli", "pseudo-label", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", "glip_train.cli", "pseudo-label", *args]


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def many(world, tmp_path_factory):
    """The world's 7 caption images as 7 shards of one sample: room for kills between shards."""
    return _web(world, tmp_path_factory.mktemp("pl_many"), 1)


ARGS = ("--threshold", "0.3", "--min-size", "96", "--max-size", "160", "--batch-size", "2", "--quiet")


def test_one_and_two_gloo_processes_write_identical_shards(web, tmp_path):
    import subprocess

    subprocess.run(_cli(1, "--captions", str(web), "--out", str(tmp_path / "one"), *ARGS), check=True, env=_env(),
                   timeout=600)
    subprocess.run(_cli(2, "--captions", str(web), "--out", str(tmp_path / "two"), *ARGS), check=True, env=_env(),
                   timeout=600)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    one, two = (json.loads((tmp_path / d / "index.json").read_text())["shards"] for d in ("one", "two"))
    assert one == two


def test_a_job_killed_with_sigkill_and_resumed_by_another_world_size_labels_everything_once(many, tmp_path):
    import signal
    import subprocess
    import time

    clean = tmp_path / "clean"
    subprocess.run(_cli(1, "--captions", str(many), "--out", str(clean), *ARGS), check=True, env=_env(),
                   timeout=600)
    out = tmp_path / "out"
    job = subprocess.Popen(_cli(2, "--captions", str(many), "--out", str(out), *ARGS), env=_env(),
                           start_new_session=True)
    deadline = time.time() + 600
    while len(list(out.glob("*.tar"))) < 2 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if job.poll() is None:
        os_kill = __import__("os").killpg
        os_kill(job.pid, signal.SIGKILL)  # the launcher and both ranks, mid-shard
    job.wait(timeout=60)
    done = len(list(out.glob("*.tar")))
    assert 2 <= done < 7, f"{done} shards finished before the kill"
    subprocess.run(_cli(1, "--captions", str(many), "--out", str(out), *ARGS), check=True, env=_env(), timeout=600)
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) == 7 and index["unfinished"] == []
    assert not list(out.glob(".*glip-tmp"))
    written = records(out)
    skipped = {name.split("#")[1].split(":")[0] for entry in index["shards"] for part in ("skipped", "filtered")
               for names in entry[part]["examples"].values() for name in names}
    assert not set(written) & skipped and set(written) | skipped == {f"{i:09d}" for i in range(7)}
    for i in range(7):  # the same labels as an uninterrupted single process
        assert (out / f"{i:05d}.tar").read_bytes() == (clean / f"{i:05d}.tar").read_bytes()


def test_command_line_mistakes_are_one_line_before_the_teacher_loads(web, tmp_path, capsys):
    from glip_train.cli import main

    listing = tmp_path / "shards.txt"
    listing.write_text(f"{web / '00000.tar'}\n{web / 'gone.tar'}\n")
    cases = [(["--captions", str(listing), "--out", str(tmp_path / "a")], "do not exist: " + str(web / "gone.tar")),
             (["--captions", str(web), "--out", str(tmp_path / "b"), "--images", str(tmp_path)],
              "--images applies to a JSON Lines --captions file"),
             (["--captions", str(web), "--out", str(tmp_path / "c"), "--coco", str(tmp_path / "c.json")],
              "--coco needs --classes")]
    for argv, message in cases:
        assert main(["pseudo-label", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_image_with_no_class_above_the_threshold_is_left_out_not_an_error():
    from collections import Counter

    import torch

    from glip_train.pseudo_label_shards import _class_entities

    result = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]]),
              "scores": torch.tensor([0.2, 0.4]), "labels": torch.tensor([0, 1])}
    counts = Counter()
    assert _class_entities(result, ["circle", "square"], 0.5, None, counts) == ("", [], 0)
    assert counts["boxes_below_threshold"] == 2
    # one class above it: its prompt, one entity, the other class's box counted below the threshold
    counts = Counter()
    caption, entities, kept = _class_entities({**result, "scores": torch.tensor([0.2, 0.7])}, ["circle", "square"],
                                              0.5, None, counts)
    assert caption == "square" and [e["category_id"] for e in entities] == [2] and kept == 1
    assert counts["boxes_below_threshold"] == 1
