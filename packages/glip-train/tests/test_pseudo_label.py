"""Self-training: pseudo-labelling caption data with a teacher, resuming, grading, and the bad inputs of a long run."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from glip_data import CaptionReader, SynthConfig, generate_world
from glip_train import GLIP, GLIPConfig
from glip_train.pseudo_label import grade_pseudo_labels, pseudo_label


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), config=SynthConfig(
        seed=4, num_detection=1, num_grounding=1, num_captions=6, num_val=1, min_size=64, max_size=96))


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1)).eval()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)  # an untrained head that still scores around 0.5
    return model


KW = dict(min_size=64, max_size=96, progress=False)


def test_pseudo_labels_are_caption_lines_glip_data_reads(world, teacher, tmp_path):
    out = tmp_path / "pseudo.jsonl"
    report = pseudo_label(teacher, world.captions_train, out, threshold=0.0, max_detections=5, **KW)
    assert report.counts["captions_written"] == 6 and not report.failed
    source = {json.loads(l)["image"]: json.loads(l) for l in world.captions_train.read_text().splitlines()}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        original = source[record["image"]]
        assert record["caption"] == original["caption"]
        spans = [e["tokens_positive"] for e in original["entities"]]
        assert all(e["tokens_positive"] in spans for e in record["entities"])  # the entities' own spans
        for entity in record["entities"]:
            assert len(entity["boxes"]) == len(entity["scores"]) and all(s > 0 for s in entity["scores"])
            for x1, y1, x2, y2 in entity["boxes"]:
                assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
    reader = CaptionReader(out, world.image_root, score_threshold=0.0)
    assert len(reader) == 6 and reader.num_boxes == report.counts["boxes_kept"]


def test_threshold_and_nms_and_min_boxes(world, teacher, tmp_path):
    loose = pseudo_label(teacher, world.captions_train, tmp_path / "a.jsonl", threshold=0.0, max_detections=20, **KW)
    nms = pseudo_label(teacher, world.captions_train, tmp_path / "b.jsonl", threshold=0.0, max_detections=20,
                       nms=0.3, **KW)
    assert nms.counts["boxes_kept"] < loose.counts["boxes_kept"] and nms.counts["boxes_removed_by_nms"] > 0
    with pytest.warns(UserWarning, match="wrote no caption"):
        strict = pseudo_label(teacher, world.captions_train, tmp_path / "c.jsonl", threshold=0.99, **KW)
    assert strict.counts["captions_written"] == 0 and strict.counts["skipped_too_few_boxes"] == 6


def fake_predict(model, processor, images, queries, **kwargs):
    """A fast, deterministic stand-in for the teacher's forward pass: per entity one box, scored 0.9 (kept) for
    captions of even length and 0.2 (too few boxes) for the others."""
    from types import SimpleNamespace

    out = []
    for query in queries:
        w, h = images[query.image_index].size
        n = len(query.labels)
        score = 0.9 if len(query.text) % 2 == 0 else 0.2
        out.append([SimpleNamespace(boxes=torch.tensor([[1.0, 1.0, w / 2, h / 2]] * n).reshape(-1, 4),
                                    scores=torch.full((n,), score), labels=torch.tensor(query.labels))])
    return out


class Killed(BaseException):
    """What a kill looks like to the writer: the process stops in the middle of a write."""


def _streams(real, budget: list[int] | None = None, sizes: list[int] | None = None):
    """``_open_append`` whose streams record the size of every write (``sizes``) and, with a ``budget``, stop for good
    after ``budget[0]`` bytes in all (the bytes before the cut are written, as a kill inside ``write`` leaves them)."""

    class Stream:
        def __init__(self, path):
            self.fh = real(path)

        def write(self, text: str) -> int:
            data = text.encode("utf-8")
            if sizes is not None:
                sizes.append(len(data))
            if budget is not None and len(data) > budget[0]:
                self.fh.buffer.write(data[: budget[0]])
                self.fh.flush()
                budget[0] = 0
                raise Killed
            if budget is not None:
                budget[0] -= len(data)
            return self.fh.write(text)

        def flush(self):
            self.fh.flush()

        def close(self):
            self.fh.close()

    return Stream


def test_a_kill_at_any_point_of_any_write_then_a_resume_labels_every_caption_exactly_once(world, teacher, tmp_path,
                                                                                          monkeypatch):
    import glip_train.inference
    import glip_train.pseudo_label as pl

    monkeypatch.setattr(glip_train.inference, "predict", fake_predict)
    real = pl._open_append
    sizes: list[int] = []
    monkeypatch.setattr(pl, "_open_append", _streams(real, sizes=sizes))
    reference = tmp_path / "reference.jsonl"
    pseudo_label(teacher, world.captions_train, reference, threshold=0.5, **KW)
    expected_out = reference.read_text()
    expected_done = sorted(reference.with_name("reference.jsonl.progress").read_text().splitlines())
    written = len(expected_out.splitlines())
    assert 0 < written < 6 and len(expected_done) == 6 - written  # both kinds of "done" are exercised
    assert len(sizes) == 6
    # every distinct state: before each write, one byte into it, halfway, one byte short, and after the last
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    cuts = sorted({s + d for s, n in zip(starts, sizes) for d in (0, 1, n // 2, n - 1)} | {sum(sizes)})
    for cut in cuts:
        out = tmp_path / f"cut{cut}" / "pseudo.jsonl"
        monkeypatch.setattr(pl, "_open_append", _streams(real, budget=[cut]))
        try:
            pseudo_label(teacher, world.captions_train, out, threshold=0.5, **KW)
        except Killed:
            pass
        monkeypatch.setattr(pl, "_open_append", real)
        report = pseudo_label(teacher, world.captions_train, out, threshold=0.5, **KW)
        assert out.read_text() == expected_out, cut
        assert sorted(out.with_name("pseudo.jsonl.progress").read_text().splitlines()) == expected_done, cut
        assert report.counts["already_done"] + report.counts["captions_written"] + \
            report.counts["skipped_too_few_boxes"] == 6


def test_a_resume_keeps_one_line_per_caption_of_an_older_run(world, teacher, tmp_path, monkeypatch):
    import glip_train.inference

    monkeypatch.setattr(glip_train.inference, "predict", fake_predict)
    out = tmp_path / "pseudo.jsonl"
    pseudo_label(teacher, world.captions_train, out, threshold=0.5, **KW)
    full = out.read_text().splitlines()
    # an older version killed between writing a line and recording it wrote that caption twice
    out.write_text("\n".join(full[:1] + full[:1] + full[1:]) + "\n")
    report = pseudo_label(teacher, world.captions_train, out, threshold=0.5, **KW)
    assert out.read_text().splitlines() == full and report.counts["captions_written"] == 0


KILL_SCRIPT = """
import sys, time
import torch
import glip_train.inference, glip_train.pseudo_label as pl
from glip_train import GLIP
sys.path.insert(0, {tests!r})
from test_pseudo_label import fake_predict
glip_train.inference.predict = fake_predict
real = pl._open_append
class Slow:
    def __init__(self, path):
        self.fh = real(path)
    def write(self, text):
        half = len(text) // 2
        self.fh.write(text[:half]); self.fh.flush(); time.sleep(0.15)  # a kill often lands mid-line
        return self.fh.write(text[half:])
    def flush(self):
        self.fh.flush()
    def close(self):
        self.fh.close()
pl._open_append = Slow
model = GLIP.from_pretrained({weights!r}).eval()
pl.pseudo_label(model, {captions!r}, {out!r}, threshold=0.5, min_size=64, max_size=96, progress=False)
"""


def test_a_process_killed_with_sigkill_resumes_exactly_once(world, teacher, tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import glip_train.inference

    monkeypatch.setattr(glip_train.inference, "predict", fake_predict)
    reference = tmp_path / "reference.jsonl"
    pseudo_label(teacher, world.captions_train, reference, threshold=0.5, **KW)
    weights = teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "pseudo.jsonl"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), weights=str(weights),
                                captions=str(world.captions_train), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 300
        while not (out.is_file() and out.stat().st_size > 10):  # killed once the first line is being written
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    pseudo_label(teacher, world.captions_train, out, threshold=0.5, **KW)
    assert out.read_text() == reference.read_text()


def test_a_second_run_on_the_same_output_is_refused(world, teacher, tmp_path, lock_holder):
    from glip_data.io import OutputLockedError

    out = tmp_path / "pseudo.jsonl"
    lock_holder(out, "glip pseudo-label")
    with pytest.raises(OutputLockedError, match=f"{out} is in use by another run \\(glip pseudo-label, pid"):
        pseudo_label(teacher, world.captions_train, out, threshold=0.0, **KW)
    assert not out.exists()


def test_bad_inputs_are_counted_never_a_crash(world, teacher, tmp_path, capsys):
    lines = [json.loads(l) for l in world.captions_train.read_text().splitlines()]
    lines[0]["entities"] = []  # a caption without phrases
    lines[1]["image"] = "captions/does_not_exist.jpg"
    lines[2]["caption"] = "\N{GRINNING FACE} " + lines[2]["caption"]  # spans shift; fixed below
    shift = 2
    for entity in lines[2]["entities"]:
        entity["tokens_positive"] = [[s + shift, e + shift] for s, e in entity["tokens_positive"]]
    lines[2]["entities"].append({"tokens_positive": [[0, 1]]})  # the emoji: only the unknown token
    lines[3]["caption"] += "  "
    lines[3]["entities"].append({"tokens_positive": [[len(lines[3]["caption"]) - 1, len(lines[3]["caption"])]]})
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(l) + "\n" for l in lines))
    report = pseudo_label(teacher, captions, tmp_path / "out.jsonl", images=str(world.image_root), threshold=0.0, **KW)
    assert report.counts["skipped_no_phrases"] == 1 and report.counts["skipped_unreadable_image"] == 1
    assert "does_not_exist.jpg" in report.failed[0] and report.counts["captions_written"] == 4
    err = capsys.readouterr().err.splitlines()  # each skip named with its file and line
    assert f"glip pseudo-label: skipped {captions}: line 1: caption without phrases" in err
    assert any(line.startswith(f"glip pseudo-label: skipped {captions}: line 2: unreadable image (") for line in err)
    # the entities the model cannot read are skipped and named; their captions keep the readable ones
    assert f"glip pseudo-label: skipped {captions}: line 3: phrase is only unknown tokens ('\N{GRINNING FACE}')" in err
    recorded = json.loads((tmp_path / "out.jsonl.report.json").read_text())["skipped"]
    assert recorded == report.skipped and recorded["by_reason"] == {
        "caption without phrases": 1, "unreadable image": 1, "phrase is only unknown tokens": 1,
        "phrase maps to no token": 1}


def test_pseudo_labels_keep_a_score_equal_to_the_threshold_as_detect_does():
    from glip_data import GroundingSample
    from glip_train import GLIPProcessor
    from glip_train.postprocess import Detections
    from glip_train.pseudo_label import _record

    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 6.0, 6.0]])
    scores = torch.tensor([0.5, 0.4999, 0.75])
    labels = torch.zeros(3, dtype=torch.int64)
    sample = GroundingSample(image_path="x.jpg", width=8, height=8, caption="a dog", boxes=torch.zeros(0, 4),
                             tokens_positive=[], labels=torch.zeros(0, dtype=torch.int64),
                             metadata={"file_name": "x.jpg", "line": 1})
    image = type("Image", (), {"width": 8, "height": 8})()
    record = _record(sample, image, Detections(boxes, scores, labels),
                     [{"phrase": "a dog", "tokens_positive": [(0, 5)]}], 0.5, None, collections.Counter())
    assert record["entities"][0]["scores"] == [0.5, 0.75]  # 0.5 >= 0.5 kept, 0.4999 dropped
    result = GLIPProcessor.to_results([Detections(boxes, scores, labels)], ["a dog"], 0.5, None)
    assert sorted(result["scores"].tolist()) == [0.5, 0.75]


def test_grading_by_hand(tmp_path):
    truth = tmp_path / "gt.jsonl"
    pred = tmp_path / "pred.jsonl"
    entity = {"tokens_positive": [[0, 5]], "phrase": "a dog"}
    truth.write_text(json.dumps({"image": "x.jpg", "width": 100, "height": 100, "caption": "a dog",
                                 "entities": [{**entity, "boxes": [[0, 0, 10, 10], [50, 50, 70, 70]],
                                               "scores": [1, 1]}]}) + "\n")
    # one exact box, one shifted to IoU 0.25, one duplicate of the exact box (a second match is not allowed)
    pred.write_text(json.dumps({"image": "x.jpg", "width": 100, "height": 100, "caption": "a dog",
                                "entities": [{**entity, "boxes": [[0, 0, 10, 10], [55, 55, 75, 75], [0, 0, 10, 10]],
                                              "scores": [0.9, 0.8, 0.7]}]}) + "\n")
    grade = grade_pseudo_labels(pred, truth)
    assert (grade.predicted, grade.true, grade.matched) == (3, 2, 1)
    assert grade.precision == pytest.approx(1 / 3) and grade.recall == pytest.approx(1 / 2)
    perfect = grade_pseudo_labels(truth, truth)
    assert perfect.precision == 1.0 and perfect.recall == 1.0


def test_the_command_checks_its_inputs_before_the_teacher_loads(world, tmp_path, monkeypatch, capsys):
    import glip_train.cli.pseudo_label as command
    from glip_train.cli import main

    def never(args, choice):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(command, "load_model", never)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.jpg", "width": 10, "height": 10}) + "\n")
    out = tmp_path / "out.jsonl"
    for argv, message in ((["--captions", str(bad)], f"{bad}: line 1: missing key(s) ['caption']"),
                          (["--captions", str(tmp_path / "nope.jsonl")], "--captions"),
                          (["--captions", str(world.captions_train), "--grade", str(tmp_path / "nope")], "--grade"),
                          (["--captions", str(world.captions_train), "--weights", str(tmp_path / "w.pth")],
                           "--weights"),
                          (["--captions", str(world.captions_train), "--out", str(tmp_path)], "is a folder")):
        code = main(["pseudo-label", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not out.exists()


def test_the_command_names_records_and_exits_1_on_skips(world, teacher, tmp_path, monkeypatch, capsys):
    import glip_train.cli.pseudo_label as command
    import glip_train.inference
    from glip_train.cli import main

    monkeypatch.setattr(glip_train.inference, "predict", fake_predict)
    monkeypatch.setattr(command, "load_model", lambda args, choice: teacher)
    lines = [json.loads(line) for line in world.captions_train.read_text().splitlines()]
    lines[3]["entities"] = []
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    argv = ["pseudo-label", "--captions", str(captions), "--images", str(world.image_root), "--out", str(out),
            "--min-size", "64", "--max-size", "96", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"glip pseudo-label: skipped {captions}: line 4: caption without phrases",
                   f"glip pseudo-label: skipped 1 input: caption without phrases 1 (recorded in {out}.report.json)"]
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["skipped"]["by_reason"] == {"caption without phrases": 1} and report["threshold"] == 0.5
    assert main(argv) == 0 and "already done" not in capsys.readouterr().err  # resumed: nothing left, nothing skipped
