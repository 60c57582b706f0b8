"""``glip eval`` options -> protocol, runs through the command line with a scripted detector: inputs checked before the
model loads, skips named and recorded, the output locked, and detections.json / metrics.json never mismatched."""
from __future__ import annotations

import hashlib
import json

import pytest

from glip_data.io import RunLock
from glip_train.cli import eval as cli
from glip_train.cli import UsageError
from glip_train.cli import main as glip_main
from glip_train.evaluation import get_protocol, runner


def _args(*argv):
    return cli.build_parser().parse_args(["--annotations", "a.json", *argv])


def _never_loaded(args, choice):
    raise AssertionError("the model was loaded")


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def dataset(tmp_path, detection_dataset_writer):
    return detection_dataset_writer(tmp_path, [(100, 80), (90, 90)], [(1, "circle")],
                                    [(0, 1, [10, 10, 20, 20]), (1, 1, [5, 5, 30, 30])])


@pytest.fixture
def model(scripted_detector):
    return scripted_detector({0: [("circle", [10, 10, 29, 29], 0.7)], 1: [("circle", [5, 5, 34, 34], 0.8)]})


def test_flags_override_the_preset():
    p = cli.protocol_from_args(_args("--protocol", "lvis-val", "--classes-per-prompt", "20", "--max-detections",
                                     "none", "--set", "fixed_ap=true", "--set", "max_detections_per_category=500"))
    assert (p.name, p.classes_per_prompt, p.max_detections, p.fixed_ap, p.max_detections_per_category) == \
        ("lvis-val", 20, None, True, 500)
    untouched = cli.protocol_from_args(_args("--protocol", "coco"))
    assert untouched.to_dict() == get_protocol("coco").to_dict()
    with pytest.raises(UsageError, match="--sentences-dir does not apply to the coco protocol"):
        cli.protocol_from_args(_args("--protocol", "coco", "--sentences-dir", "S"))
    with pytest.raises(ValueError, match="no parameter 'chunks'"):
        cli.protocol_from_args(_args("--protocol", "coco", "--set", "chunks=3"))


def test_command_line_run(tmp_path, monkeypatch, capsys, dataset, model):
    monkeypatch.setattr(cli, "load_model", lambda args, choice: model)
    code = cli.main(["--protocol", "custom", "--annotations", str(dataset), "--out", str(tmp_path / "o"),
                     "--classes-per-prompt", "7", "--no-progress"])
    assert code == 0
    assert model.calls[0]["classes_per_prompt"] == 7
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["metrics"]["AP"] == pytest.approx(1.0) and saved["protocol"]["classes_per_prompt"] == 7
    assert saved["detections"] == {"file": "detections.json", "sha256": _sha256(tmp_path / "o" / "detections.json")}
    assert saved["skipped"]["total"] == 0
    assert "AP" in capsys.readouterr().out
    (tmp_path / "images" / "000.png").unlink()
    assert cli.main(["--protocol", "coco", "--annotations", str(dataset), "--out", str(tmp_path / "o2"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "000.png" in err and "pass --on-bad-image skip" in err and "on_bad_image=" not in err


def test_skipped_images_are_named_recorded_and_exit_1(tmp_path, monkeypatch, capsys, dataset, model):
    (tmp_path / "images" / "001.png").write_bytes(b"garbage")
    monkeypatch.setattr(cli, "load_model", lambda args, choice: model)
    code = glip_main(["eval", "--protocol", "coco", "--annotations", str(dataset), "--out", str(tmp_path / "o"),
                      "--no-progress", "--quiet", "--on-bad-image", "skip"])
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("glip eval: skipped ann.json, image id 2: unreadable image (")
    assert err[-1].startswith("glip eval: skipped 1 input: unreadable image 1")
    assert not any("Warning" in line for line in err) and len(err) == 2
    skipped = json.loads((tmp_path / "o" / "metrics.json").read_text())["skipped"]
    assert skipped["total"] == 1 and "001.png" in skipped["examples"]["unreadable image"][0]


def test_input_files_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, detection_dataset_writer):
    monkeypatch.setattr(cli, "load_model", _never_loaded)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
                               "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 2, 2]}],
                               "categories": [{"id": 1, "name": "circle"}]}))
    blank = detection_dataset_writer(tmp_path, [(10, 10)], [(1, "circle"), (7, "")], [], name="blank.json")
    cases = [
        (["--annotations", str(bad)], "bad.json: annotations[0]"),
        (["--annotations", str(blank)], "blank.json: category id 7"),
        (["--annotations", str(tmp_path / "nope.json")], "--annotations"),
        (["--annotations", str(bad), "--weights", str(tmp_path / "nope.pth")], "--weights"),
        (["--annotations", str(bad), "--adapter", str(tmp_path / "nope.safetensors")], "--adapter"),
        (["--annotations", str(bad), "--set", "batch_size=0"], "batch_size: must be an integer >= 1"),
    ]
    for argv, message in cases:
        code = cli.main(["--protocol", "coco", "--out", str(tmp_path / "o"), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()  # nothing was written either


def test_a_second_writer_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, dataset):
    monkeypatch.setattr(cli, "load_model", _never_loaded)
    out = tmp_path / "o"
    with RunLock(out, "glip eval"):  # held by another run (a separate lock file handle, as another process)
        code = glip_main(["eval", "--protocol", "coco", "--annotations", str(dataset), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"glip eval: error: {out} is in use by another run (glip eval, pid" in err


@pytest.mark.parametrize("where", ["predicting", "writing detections", "writing metrics"])
def test_a_killed_eval_never_leaves_a_mismatched_pair(tmp_path, monkeypatch, capsys, dataset, model, where):
    out = tmp_path / "o"
    monkeypatch.setattr(cli, "load_model", lambda args, choice: model)
    argv = ["eval", "--protocol", "coco", "--annotations", str(dataset), "--out", str(out), "--no-progress",
            "--quiet"]
    assert glip_main(argv) == 0
    first = (out / "detections.json").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    model.detections = {0: [("circle", [11, 11, 29, 29], 0.6)], 1: [("circle", [6, 6, 30, 30], 0.5)]}  # they differ
    if where == "predicting":
        monkeypatch.setattr(model, "detect", killed)
    elif where == "writing detections":  # killed in the middle of streaming detections.json
        real_write = runner.write_results
        monkeypatch.setattr(runner, "write_results", lambda path, records: real_write(
            path, (r if i == 0 else killed() for i, r in enumerate(records))))
    else:
        real = runner.atomic_write_json
        monkeypatch.setattr(runner, "atomic_write_json",
                            lambda path, *a, **k: killed() if path.name == "metrics.json" else real(path, *a, **k))
    assert glip_main(argv) == 130
    if (out / "metrics.json").exists():
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["detections"]["sha256"] == _sha256(out / "detections.json")
    else:
        assert where != "predicting" or (out / "detections.json").read_bytes() == first
    assert not (out / "metrics.json").exists()  # the first run's metrics went when the second started
    assert sorted(p.name for p in out.iterdir()) == [".glip.lock", "detections.json"]  # no temporary left
    monkeypatch.undo()
    monkeypatch.setattr(cli, "load_model", lambda args, choice: model)
    assert glip_main(argv) == 0  # the next run completes the pair
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["detections"]["sha256"] == _sha256(out / "detections.json")


def test_every_entry_point_falls_back_to_the_shipped_model(tmp_path, monkeypatch, dataset, model):
    from glip_train.shipped import default_model_dir

    if default_model_dir() is None:
        pytest.skip("this installation has no shipped model")
    seen = []
    monkeypatch.setattr(cli, "load_model", lambda args, choice: seen.append(choice.weights) or model)
    monkeypatch.delenv("GLIP_WEIGHTS", raising=False)
    common = ["--protocol", "coco", "--annotations", str(dataset), "--no-progress", "--quiet"]
    assert cli.main([*common, "--out", str(tmp_path / "a")]) == 0  # python -m glip_train.evaluation
    assert glip_main(["eval", *common, "--out", str(tmp_path / "b")]) == 0
    assert glip_main(["eval", *common, "--out", str(tmp_path / "c"), "--weights", "default"]) == 0
    assert seen == [str(default_model_dir())] * 3
