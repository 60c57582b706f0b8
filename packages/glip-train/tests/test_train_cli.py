"""The ``glip`` command line, run as users run it (the installed entry point in a subprocess): outputs, exit codes,
hostile input, and checks that happen before any model is loaded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glip_train import GLIP, GLIPConfig
from glip_train.cli import build_parser


def _glip() -> str:
    exe = shutil.which("glip", path=str(Path(sys.executable).parent)) or shutil.which("glip")
    assert exe is not None, "the glip console script is not installed"
    return exe


def run(*args, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GLIP_WEIGHTS", None)
    return subprocess.run([_glip(), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def weights_dir(minilm_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1)).eval()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)
    return model.save_pretrained(tmp_path_factory.mktemp("weights") / "small")


@pytest.fixture(scope="module")
def broken_weights(tmp_path_factory):
    """A weights file whose loading fails: any error about it shows the model was being loaded."""
    path = tmp_path_factory.mktemp("broken") / "broken.pth"
    path.write_bytes(b"PK\x03\x04 truncated")
    return path


@pytest.fixture()
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (100, 80, 3), dtype=np.uint8)).save(folder / "b.jpg")
    return folder


SIZE = ["--min-size", "96", "--max-size", "160"]


def test_help_version_and_exit_codes_are_documented():
    out = run("--help")
    assert out.returncode == 0
    for command in ("detect", "ground", "convert", "train", "eval", "pseudo-label", "export"):
        assert command in out.stdout
    assert "exit codes: 0 success, 1 some inputs skipped" in out.stdout
    version = run("--version")
    assert version.returncode == 0 and "glip-train" in version.stdout and "glip-data" in version.stdout
    detect_help = build_parser()._subparsers._group_actions[0].choices["detect"].format_help()
    for option in ("--prompt", "--classes", "--classes-file", "--weights", "--adapter", "--threshold", "--device",
                   "--dtype", "--batch-size", "--max-detections", "--min-size", "--max-size", "--output",
                   "--overwrite", "--pad-text-to-max"):
        assert option in detect_help, option


def test_detect_writes_json_and_drawing_per_image_and_resumes(weights_dir, image_dir, tmp_path):
    out_dir = tmp_path / "out"
    args = ["detect", image_dir, "--classes", "dog,cat", "--weights", weights_dir, "--threshold", "0", *SIZE,
            "--batch-size", "2", "-o", out_dir]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert "2 processed, 0 already done, 0 skipped" in first.stdout
    for stem, size in (("a", (120, 90)), ("b", (80, 100))):
        record = json.loads((out_dir / f"{stem}.json").read_text())
        assert (record["width"], record["height"]) == size and record["exif_orientation"] == 1
        assert record["prompt"] == "dog. cat" and record["classes"] == ["dog", "cat"]
        assert record["params"]["threshold"] == 0.0 and record["detections"]
        for det in record["detections"]:
            assert det["text_label"] == ["dog", "cat"][det["label"]]
        with Image.open(out_dir / f"{stem}.jpg") as drawn:
            assert drawn.size == size
    stamp = (out_dir / "a.json").stat().st_mtime_ns
    again = run(*args)  # a re-run resumes: nothing redone, nothing overwritten
    assert again.returncode == 0 and "0 processed, 2 already done" in again.stdout
    assert (out_dir / "a.json").stat().st_mtime_ns == stamp
    redo = run(*args, "--overwrite")
    assert redo.returncode == 0 and "2 processed" in redo.stdout
    assert not list(out_dir.glob("*.tmp")) and not list(out_dir.glob(".*.tmp"))


def test_exif_orientation_is_applied_and_recorded(weights_dir, tmp_path):
    """A phone photo stored 120x80 with orientation 6 is displayed (and processed) 80x120."""
    folder = tmp_path / "phone"
    folder.mkdir()
    stored = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "photo.jpg", exif=exif.tobytes())
    out = run("detect", folder, "--classes", "dog", "--weights", weights_dir, "--threshold", "0", *SIZE,
              "-o", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert (record["width"], record["height"]) == (80, 120) and record["exif_orientation"] == 6
    assert all(d["box"][2] <= 80 and d["box"][3] <= 120 for d in record["detections"])
    with Image.open(tmp_path / "out" / "photo.jpg") as drawn:
        assert drawn.size == (80, 120)


def test_unreadable_and_unusable_images_are_named_skipped_and_the_run_continues(weights_dir, image_dir, tmp_path):
    (image_dir / "c.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((1, 4000, 3), dtype=np.uint8)).save(image_dir / "strip.png")
    out_dir = tmp_path / "out"
    out = run("detect", image_dir, image_dir / "missing.png", "--prompt", "a dog.", "--weights", weights_dir, *SIZE,
              "-o", out_dir)
    assert out.returncode == 1
    for name in ("c.png", "strip.png", "missing.png"):
        assert name in out.stderr
    assert "2 processed, 0 already done, 3 skipped" in out.stdout
    assert "glip detect: skipped 3 inputs: no such file or folder 1, unreadable image 2" in out.stderr
    assert (out_dir / "a.json").exists() and (out_dir / "b.json").exists()
    record = json.loads((out_dir / "glip-run.json").read_text())  # the skips are recorded with the outputs
    assert record["processed"] == 2 and record["skipped"]["by_reason"] == {"no such file or folder": 1,
                                                                           "unreadable image": 2}
    assert not (out_dir / "c.json").exists() and not (out_dir / "strip.json").exists()


def test_ground_command(weights_dir, image_dir, tmp_path):
    out_dir = tmp_path / "g"
    out = run("ground", image_dir / "a.png", "--caption", "a dog chasing a red ball", "--phrases", "a dog|a red ball",
              "--weights", weights_dir, "--threshold", "0", *SIZE, "-o", out_dir, "--no-draw")
    assert out.returncode == 0, out.stderr
    record = json.loads((out_dir / "a.json").read_text())
    assert record["classes"] == ["a dog", "a red ball"] and not (out_dir / "a.jpg").exists()


@pytest.mark.parametrize("options,message", [
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--batch-size", "-1"], "--batch-size: must be >= 1"),
    (["--max-detections", "0"], "--max-detections: must be >= 1"),
    (["--threshold", "5"], "--threshold: must be a score in [0, 1]"),
    (["--threshold", "-1"], "--threshold: must be a score in [0, 1]"),
    (["--threshold", "nan"], "--threshold: must be a score in [0, 1]"),
])
def test_bad_option_values_are_usage_errors(image_dir, broken_weights, options, message):
    out = run("detect", image_dir, "--classes", "dog", "--weights", broken_weights, *options)
    assert out.returncode == 2 and message in out.stderr


def test_train_monitor_needs_a_positive_step_count():
    out = run("train", "tiny_synth", "--monitor", "0")
    assert out.returncode == 2 and "--monitor 0: give a number of steps >= 1" in out.stderr


def test_input_problems_are_reported_before_the_model_loads(image_dir, broken_weights, tmp_path):
    """With unreadable weights, every error below must be about the input: the model was never being loaded."""
    cases = [
        (["detect", tmp_path / "nothing_here.png", "--classes", "dog"], "no images found"),
        (["detect", image_dir, "--classes", "dog", "--device", "cuda:7"], "--device cuda:7"),
        (["detect", image_dir, "--classes", "\N{GRINNING FACE}"], "unknown token"),
        (["detect", image_dir, "--classes", " , ,"], "holds no class name"),
        (["ground", image_dir, "--caption", ""], "--caption is empty"),
        (["ground", image_dir, "--caption", "a dog on the grass", "--phrases", "a zebra"], "zebra"),
        (["ground", image_dir, "--caption", "running quickly"], "--phrases"),
    ]
    if torch.cuda.is_available():
        cases.pop(1)
    for args, message in cases:
        out = run(*args, "--weights", broken_weights, "-o", tmp_path / "o")
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "broken.pth" not in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one line, no traceback


def test_output_folder_problems_are_usage_errors(image_dir, broken_weights, weights_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = run("detect", image_dir, "--classes", "dog", "--weights", broken_weights, "-o", a_file)
    assert out.returncode == 2 and "is not a folder" in out.stderr
    if sys.platform.startswith("linux"):  # even root cannot create folders in procfs
        out = run("detect", image_dir, "--classes", "dog", "--weights", broken_weights, "-o", "/proc/glip-out")
        assert out.returncode == 2 and "cannot write to the output folder /proc/glip-out" in out.stderr
    from glip_data.io import RunLock

    locked = tmp_path / "busy"
    with RunLock(locked, "glip detect"):  # another run writes there (the command runs in another process)
        out = run("detect", image_dir, "--classes", "dog", "--weights", broken_weights, "-o", locked, *SIZE)
    assert out.returncode == 2 and f"glip detect: error: {locked} is in use by another run (glip detect, pid" \
        in out.stderr and "broken.pth" not in out.stderr  # refused before the model loads


@pytest.mark.parametrize("content,message", [
    (b"PK\x03\x04" + b"\0" * 64, "truncated or damaged"),
    (b"\x89PNG\r\n\x1a\n", "not a PyTorch checkpoint"),
    (b"hello", "not a PyTorch checkpoint"),
])
def test_bad_weights_files_give_one_line(image_dir, tmp_path, content, message):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    out = run("detect", image_dir, "--classes", "dog", "--weights", path, "-o", tmp_path / "o")
    assert out.returncode == 2 and message in out.stderr and str(path) in out.stderr
    assert "--trust-pickle" not in out.stderr  # it would not help
    assert len(out.stderr.strip().splitlines()) == 1


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_a_pickle_with_objects_suggests_trust_pickle(image_dir, tmp_path):
    import argparse

    path = tmp_path / "objects.pth"
    torch.save({"model": {}, "cfg": argparse.Namespace(lr=1)}, path)
    out = run("detect", image_dir, "--classes", "dog", "--weights", path, "-o", tmp_path / "o")
    assert out.returncode == 2 and "refuses to unpickle argparse.Namespace" in out.stderr
    assert "(pass --trust-pickle only for files you trust)" in out.stderr and "trust_pickle=" not in out.stderr
    malicious = tmp_path / "malicious.pth"  # a torch.save zip whose unpickling would run a command
    torch.save({"model": _RunsCode()}, malicious)
    out = run("detect", image_dir, "--classes", "dog", "--weights", malicious, "-o", tmp_path / "o")
    assert out.returncode == 2 and f"{malicious}: refuses to unpickle {os.system.__module__}.system" in out.stderr
    assert "truncated or damaged" not in out.stderr and "unpickled" not in out.stdout
    assert "pass --trust-pickle only for files you trust" in out.stderr


def test_damaged_model_directories_are_named(weights_dir, image_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(weights_dir, bad)
    (bad / "config.json").write_text('{"name": "small", ')
    out = run("detect", image_dir, "--classes", "dog", "--weights", bad, "-o", tmp_path / "o")
    assert out.returncode == 2 and f"{bad / 'config.json'}: not a valid JSON config" in out.stderr
    shutil.copy(weights_dir / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    out = run("detect", image_dir, "--classes", "dog", "--weights", bad, "-o", tmp_path / "o")
    assert out.returncode == 2 and "model.safetensors: not a readable safetensors file" in out.stderr


def test_convert_end_to_end_and_destination_checks(parity_dir, tmp_path):
    recipe = parity_dir / "weights_recipe.json"
    target = tmp_path / "exists"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    out = run("convert", recipe, target)
    assert out.returncode == 2 and "is not empty" in out.stderr and (target / "keep.txt").exists()
    out = run("convert", tmp_path / "missing.pth", tmp_path / "x")
    assert out.returncode == 2 and "missing.pth" in out.stderr
    converted = tmp_path / "glip_t"
    out = run("convert", recipe, converted, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "glip_t" in out.stdout and "231,780,222 parameters" in out.stdout
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".glip-tmp")]  # no staging folder left
    from safetensors import safe_open

    with torch.device("meta"):
        expected = GLIP(GLIPConfig.glip_t()).state_dict()
    with safe_open(str(converted / "model.safetensors"), "pt") as fh:
        assert set(fh.keys()) == set(expected)
        # the recipe sets the official bias init -ln(99) as a constant (docs/official_model.md#predictors)
        assert torch.allclose(fh.get_tensor("head.bias0"), torch.tensor([-4.595119953155518]))


def test_eval_applies_an_adapter_and_names_a_missing_one(weights_dir, tmp_path):
    from glip_data import SynthConfig, generate_world
    from glip_train.adapters import save_adapter

    world = generate_world(tmp_path / "world", config=SynthConfig(
        seed=5, num_detection=0, num_grounding=0, num_captions=0, num_val=2, min_size=64, max_size=80))
    model = GLIP.from_pretrained(weights_dir)
    table = model.enable_prompt_tuning(positions=64)
    with torch.no_grad():
        table.weight.normal_(0, 2.0)  # large offsets: the detections must change
    save_adapter(model, tmp_path / "adapter.safetensors", "prompt_tuning")
    common = ["eval", "--protocol", "coco", "--weights", weights_dir, "--annotations", world.coco_val,
              "--min-size", "64", "--max-size", "80", "--no-progress", "--quiet", "--set", "threshold=0.0"]
    plain = run(*common, "--out", tmp_path / "plain")
    tuned = run(*common, "--out", tmp_path / "tuned", "--adapter", tmp_path / "adapter.safetensors")
    assert plain.returncode == tuned.returncode == 0, plain.stderr + tuned.stderr
    scores = [[d["score"] for d in json.loads((tmp_path / name / "detections.json").read_text())]
              for name in ("plain", "tuned")]
    assert scores[0] != scores[1]
    missing = run(*common, "--out", tmp_path / "x", "--adapter", tmp_path / "nope.safetensors")
    assert missing.returncode == 2 and "--adapter" in missing.stderr and "nope.safetensors" in missing.stderr


def test_names_of_the_same_box_share_one_caption_in_score_order():
    import torch

    from glip_train.drawing import label_groups

    result = {"boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90], [10.5, 10, 50, 50], [11, 11, 50, 50]]),
              "scores": torch.tensor([0.9, 0.8, 0.7, 0.95]), "labels": torch.tensor([1, 2, 3, 0]),
              "text_labels": ["square", "ring", "triangle", "cross"]}
    groups = label_groups(result)
    # detections 3, 0, 2 overlap (IoU > 0.9 with the best, 3); detection 1 is elsewhere
    assert [(label, caption) for _, label, caption in groups] == [
        (0, "cross 0.95, square 0.90, triangle 0.70"), (2, "ring 0.80")]
    assert groups[0][0] == [11.0, 11.0, 50.0, 50.0]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
             "text_labels": []}
    assert label_groups(empty) == []
