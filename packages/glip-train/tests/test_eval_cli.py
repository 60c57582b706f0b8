"""``glip eval`` options -> protocol, and a run through the command line with a scripted detector."""
from __future__ import annotations

import json

import pytest

from glip_train.evaluation import cli


def _args(*argv):
    return cli.build_parser().parse_args(["--annotations", "a.json", *argv])


def test_flags_override_the_preset():
    p = cli.protocol_from_args(_args("--protocol", "lvis-val", "--classes-per-prompt", "20", "--max-detections",
                                     "none", "--set", "fixed_ap=true", "--set", "max_detections_per_category=500"))
    assert (p.name, p.classes_per_prompt, p.max_detections, p.fixed_ap, p.max_detections_per_category) == \
        ("lvis-val", 20, None, True, 500)
    untouched = cli.protocol_from_args(_args("--protocol", "coco"))
    assert untouched.to_dict() == cli.get_protocol("coco").to_dict()
    with pytest.raises(ValueError, match="does not apply"):
        cli.protocol_from_args(_args("--protocol", "coco", "--sentences-dir", "S"))
    with pytest.raises(ValueError, match="no parameter 'chunks'"):
        cli.protocol_from_args(_args("--protocol", "coco", "--set", "chunks=3"))


def test_command_line_run(tmp_path, monkeypatch, capsys, scripted_detector, detection_dataset_writer):
    ann = detection_dataset_writer(tmp_path, [(100, 80)], [(1, "cat")], [(0, 1, [10, 10, 20, 20])])
    model = scripted_detector({0: [("cat", [10, 10, 29, 29], 0.7)]})
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    code = cli.main(["--protocol", "custom", "--annotations", str(ann), "--out", str(tmp_path / "o"),
                     "--classes-per-prompt", "7", "--no-progress"])
    assert code == 0
    assert model.calls[0]["classes_per_prompt"] == 7
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["metrics"]["AP"] == pytest.approx(1.0) and saved["protocol"]["classes_per_prompt"] == 7
    assert "AP" in capsys.readouterr().out
    (tmp_path / "images" / "000.png").unlink()
    assert cli.main(["--protocol", "coco", "--annotations", str(ann), "--out", str(tmp_path / "o2"),
                     "--no-progress"]) == 2
    assert "000.png" in capsys.readouterr().err
