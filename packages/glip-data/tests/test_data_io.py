"""The write discipline (glip_data.io) and skip reporting (glip_data.report)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from glip_data.io import (LOCK_NAME, OutputLockedError, RunLock, atomic_directory, atomic_open, atomic_torch_save,
                          atomic_write_json, atomic_write_text, clean_temporaries, is_temporary, temporary_path)
from glip_data.report import SkipReport


# ---- atomic files ---------------------------------------------------------------------------------------------------

def test_a_write_that_dies_midway_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_atomic_writes_replace_whole_files_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "config.yaml"
    atomic_write_text(target, "a: 1\n")
    atomic_write_text(target, "a: 2\n")
    assert target.read_text() == "a: 2\n"
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
    umask = os.umask(0o022)
    os.umask(umask)
    plain = tmp_path / "plain"
    plain.write_text("x")  # what an ordinary open() gives under this umask
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_atomic_open_streams_into_a_temporary_and_publishes_only_on_success(tmp_path):
    path = tmp_path / "detections.json"
    atomic_write_json(path, [1])
    with pytest.raises(RuntimeError):
        with atomic_open(path) as fh:
            fh.write("[2, ")
            assert json.loads(path.read_text()) == [1]  # readers see the old file while the new one is written
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == [1]
    with atomic_open(path) as fh:
        fh.write("[3]")
    assert json.loads(path.read_text()) == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detections.json"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(path, "a"):
            pass


def test_temporary_names_are_recognisable_and_unique(tmp_path):
    a, b = temporary_path(tmp_path / "x.json"), temporary_path(tmp_path / "x.json")
    assert a != b and a.parent == tmp_path and is_temporary(a) and is_temporary(b)
    assert a.name.startswith(".x.json.") and not is_temporary(tmp_path / "x.json")


def test_atomic_directory_replaces_a_folder_only_when_complete(tmp_path):
    dst = tmp_path / "model"
    with atomic_directory(dst) as staging:
        (staging / "a.txt").write_text("1")
        assert not dst.exists()
    assert (dst / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(dst):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(dst, overwrite=True) as staging:
            (staging / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt"]  # the old folder is intact
    with atomic_directory(dst, overwrite=True) as staging:
        (staging / "b.txt").write_text("2")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it


def test_clean_temporaries_removes_only_leftovers_of_killed_writes(tmp_path):
    keep = [tmp_path / "a.json", tmp_path / "sub" / "b.pt", tmp_path / ".hidden"]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    stale_file = temporary_path(tmp_path / "sub" / "c.pt")
    stale_file.write_text("half")
    stale_dir = temporary_path(tmp_path / "model")
    (stale_dir / "inner").mkdir(parents=True)
    (stale_dir / "inner" / temporary_path("w").name).write_text("half")
    removed = clean_temporaries(tmp_path)
    assert stale_file in removed and stale_dir in removed
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(p.read_text() == "x" for p in keep)


# ---- the lock -------------------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_with_a_line_naming_the_folder_and_the_holder(tmp_path):
    out = tmp_path / "out"
    with RunLock(out, "glip eval") as first:
        assert first.held and (out / LOCK_NAME).is_file()
        with pytest.raises(OutputLockedError) as info:
            RunLock(out, "glip eval").acquire()
        message = str(info.value)
        assert str(out) in message and "glip eval" in message and f"pid {os.getpid()}" in message
    with RunLock(out, "glip eval") as again:  # released at the end of the block: the next run may start
        assert again.held


def test_taking_the_lock_cleans_leftovers_and_refuses_a_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = temporary_path(out / "detections.json")
    stale.write_text("[")
    with RunLock(out, "glip eval") as lock:
        assert lock.removed == [stale] and not stale.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        RunLock(tmp_path / "file", "glip eval").acquire()


def test_a_lock_on_one_output_leaves_its_neighbours_alone(tmp_path):
    """Two outputs in one folder (pseudo-labels a.jsonl and ab.jsonl) are locked and cleaned each on its own."""
    mine, other = tmp_path / "a.jsonl", tmp_path / "ab.jsonl"
    stale, live = temporary_path(mine), temporary_path(other)
    stale_dir = temporary_path(tmp_path / "a.jsonl")
    stale_dir.mkdir()
    for p in (stale, live):
        p.write_text("half")
    with RunLock.for_output(mine, "glip pseudo-label") as lock:
        assert sorted(lock.removed) == sorted([stale, stale_dir]) and live.exists()
        assert (tmp_path / f".a.jsonl{LOCK_NAME}").is_file() and RunLock.held_here(tmp_path, "a.jsonl")
        assert not RunLock.held_here(tmp_path) and not RunLock.held_here(tmp_path, "ab.jsonl")
        with RunLock.for_output(other, "glip pseudo-label"):  # a neighbour is not blocked
            pass
        with pytest.raises(OutputLockedError, match=f"{mine} is in use by another run"):
            RunLock.for_output(mine, "glip pseudo-label").acquire()
    assert not RunLock.held_here(tmp_path, "a.jsonl")


def test_a_killed_holder_never_blocks_the_next_run(tmp_path):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time
        from glip_data.io import RunLock
        lock = RunLock({str(out)!r}, "glip train").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match="glip train"):
            RunLock(out, "glip train").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            RunLock(out, "glip train").acquire().release()
            break
        except OutputLockedError:
            assert time.monotonic() < deadline, "the lock of a killed process was not released"
            time.sleep(0.05)


# ---- skip reports ---------------------------------------------------------------------------------------------------

def test_skips_are_counted_named_capped_and_recorded():
    stream = io.StringIO()
    report = SkipReport("glip eval", stream=stream, max_lines=2, keep=3)
    assert not report and report.exit_code() == 0 and report.summary() == "skipped nothing"
    for i in range(5):
        report.skip("unreadable image", f"img{i}.jpg", "truncated")
    report.skip("unknown category", "train.json#17")
    lines = stream.getvalue().splitlines()
    assert lines == ["glip eval: skipped img0.jpg: unreadable image (truncated)",
                     "glip eval: skipped img1.jpg: unreadable image (truncated)",
                     "glip eval: skipped train.json#17: unknown category"]
    assert report.total == 6 and report.exit_code() == 1
    assert report.summary() == "skipped 6 inputs: unknown category 1, unreadable image 5 (3 not named above)"
    record = report.to_dict()
    assert record["by_reason"] == {"unknown category": 1, "unreadable image": 5}
    assert record["examples"]["unreadable image"] == [f"img{i}.jpg: truncated" for i in range(3)]


def test_reports_of_several_processes_merge_without_printing_again():
    quiet = io.StringIO()
    a = SkipReport("glip pseudo-label", stream=quiet)
    b = SkipReport("glip pseudo-label", stream=None)
    a.skip("no caption", "00000.tar#0001")
    b.skip("no caption", "00001.tar#0007")
    b.skip("unreadable image", "00001.tar#0009")
    printed = quiet.getvalue()
    a.merge(b.to_dict())
    assert quiet.getvalue() == printed
    assert a.to_dict()["by_reason"] == {"no caption": 2, "unreadable image": 1}
    assert a.to_dict()["examples"]["no caption"] == ["00000.tar#0001", "00001.tar#0007"]
