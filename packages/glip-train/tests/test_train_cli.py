"""The ``glip`` command line: help, detect/ground outputs, unreadable images, errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glip_train import GLIP, GLIPConfig
from glip_train.cli import build_parser, main


@pytest.fixture(scope="module")
def weights_dir(minilm_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1)).eval()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)
    return model.save_pretrained(tmp_path_factory.mktemp("weights") / "small")


@pytest.fixture()
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (100, 80, 3), dtype=np.uint8)).save(folder / "b.jpg")
    return folder


def test_help_lists_every_command_and_option():
    out = subprocess.run([sys.executable, "-m", "glip_train.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("detect", "ground", "convert"):
        assert command in out.stdout
    detect_help = build_parser()._subparsers._group_actions[0].choices["detect"].format_help()
    for option in ("--prompt", "--classes", "--classes-file", "--weights", "--threshold", "--device", "--dtype",
                   "--batch-size", "--max-detections", "--min-size", "--max-size", "--output", "--pad-text-to-max"):
        assert option in detect_help, option


def test_console_script_is_installed():
    # the console script sits next to the interpreter running the tests (a venv's bin/, or on PATH)
    exe = shutil.which("glip", path=str(Path(sys.executable).parent)) or shutil.which("glip")
    assert exe is not None, "the glip console script is not installed"
    out = subprocess.run([exe, "detect", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--classes" in out.stdout


def test_detect_writes_json_and_drawing_per_image(weights_dir, image_dir, tmp_path):
    out_dir = tmp_path / "out"
    code = main(["detect", str(image_dir), "--classes", "dog,cat", "--weights", str(weights_dir), "--threshold",
                 "0.0", "--min-size", "96", "--max-size", "160", "--batch-size", "2", "-o", str(out_dir), "--quiet"])
    assert code == 0
    for stem, size in (("a", (120, 90)), ("b", (80, 100))):
        record = json.loads((out_dir / f"{stem}.json").read_text())
        assert (record["width"], record["height"]) == size
        assert record["prompt"] == "dog. cat" and record["classes"] == ["dog", "cat"]
        assert record["params"]["threshold"] == 0.0
        assert record["detections"], "threshold 0 keeps post-processed detections"
        for det in record["detections"]:
            assert set(det) == {"box", "score", "label", "text_label"}
            assert det["text_label"] == ["dog", "cat"][det["label"]]
        with Image.open(out_dir / f"{stem}.jpg") as drawn:
            assert drawn.size == size


def test_unreadable_images_are_named_skipped_and_fail_the_run(weights_dir, image_dir, tmp_path, capsys):
    (image_dir / "c.png").write_bytes(b"garbage")
    out_dir = tmp_path / "out"
    code = main(["detect", str(image_dir), str(image_dir / "missing.png"), "--prompt", "a dog.", "--weights",
                 str(weights_dir), "--min-size", "96", "--max-size", "160", "-o", str(out_dir), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "c.png" in err and "missing.png" in err
    assert (out_dir / "a.json").exists() and (out_dir / "b.json").exists() and not (out_dir / "c.json").exists()


def test_ground_command(weights_dir, image_dir, tmp_path):
    out_dir = tmp_path / "g"
    code = main(["ground", str(image_dir / "a.png"), "--caption", "a dog chasing a red ball", "--phrases",
                 "a dog|a red ball", "--weights", str(weights_dir), "--threshold", "0", "--min-size", "96",
                 "--max-size", "160", "-o", str(out_dir), "--quiet", "--no-draw"])
    assert code == 0
    record = json.loads((out_dir / "a.json").read_text())
    assert record["classes"] == ["a dog", "a red ball"] and not (out_dir / "a.jpg").exists()


def test_clear_errors(weights_dir, image_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GLIP_WEIGHTS", raising=False)
    with pytest.raises(SystemExit, match="no weights"):
        main(["detect", str(image_dir), "--classes", "dog"])
    with pytest.raises(SystemExit, match="no phrases"):
        main(["detect", str(image_dir), "--prompt", " . ", "--weights", str(weights_dir)])
    assert main(["detect", str(image_dir), "--classes", "dog", "--weights", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --prompt and --classes are exclusive
        main(["detect", str(image_dir), "--classes", "dog", "--prompt", "dog."])
