"""The glip-data command line, run in-process."""
from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from glip_data.cli import build_parser, detect_format, main

SMALL = ["--num-detection", "4", "--num-grounding", "3", "--num-captions", "2", "--num-val", "3",
         "--min-size", "64", "--max-size", "96", "--quiet"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_world")
    assert main(["synth", "--out", str(out), "--seed", "4", *SMALL]) == 0
    return out


def test_synth_writes_the_world(world_dir):
    manifest = json.loads((world_dir / "world.json").read_text())
    assert manifest["config"]["seed"] == 4 and manifest["counts"]["detection_images"] == 4
    assert manifest["unseen_shapes"] == ["diamond", "cross", "ring"]
    assert len(list((world_dir / "images" / "val").iterdir())) == 3


def test_detect_format(world_dir, tmp_path):
    assert detect_format(world_dir / "detection_train.json") == "coco"
    assert detect_format(world_dir / "grounding_train.json") == "mdetr"
    assert detect_format(world_dir / "lvis_val.json") == "lvis"
    assert detect_format(world_dir / "captions_train.jsonl") == "captions"
    assert main(["convert", str(world_dir / "grounding_train.json"), str(tmp_path / "g.json"),
                 "--from", "mdetr", "--to", "odvg"]) == 0
    assert detect_format(tmp_path / "g.json") == "odvg"  # jsonl content under a .json name
    (tmp_path / "what.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(tmp_path / "what.json")


def test_inspect_counts_histogram_and_render(world_dir, tmp_path, capsys, minilm_dir):
    code = main(["inspect", str(world_dir / "grounding_train.json"), "--images", str(world_dir / "images"),
                 "--tokenizer", str(minilm_dir), "--render", "2", "--out", str(tmp_path / "r"), "--json", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])
    grounding = json.loads((world_dir / "grounding_train.json").read_text())
    assert result["samples"] == len(grounding["images"]) and result["boxes"] == len(grounding["annotations"])
    assert sum(result["prompt_lengths"].values()) == result["samples"]
    assert result["captions_over_max_len"] == 0
    assert "MDETRGrounding" in out and "prompt length in tokens" in out
    assert len(result["rendered"]) == 2
    for path in result["rendered"]:
        with Image.open(path) as im:
            assert im.width >= 64 and im.height > 64  # the picture plus a caption strip


def test_inspect_reports_prompts_over_the_text_length(world_dir, capsys, minilm_dir):
    # the LVIS prompt has 64 colour_shape names: over a 64-token budget, boxes lose their tokens
    assert main(["inspect", str(world_dir / "lvis_val.json"), "--tokenizer", str(minilm_dir),
                 "--max-text-len", "64", "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])
    assert result["reader"] == "LVISDetection" and result["captions_over_max_len"] == result["samples"]
    assert result["boxes_unmapped_by_truncation"] > 0


def test_convert_and_shard_commands(world_dir, tmp_path, capsys):
    src = world_dir / "detection_train.json"
    assert main(["convert", str(src), str(tmp_path / "d.jsonl"), "--from", "coco", "--to", "odvg"]) == 0
    assert main(["convert", str(tmp_path / "d.jsonl"), str(tmp_path / "d.json"), "--from", "odvg", "--to", "coco"]) == 0
    original, back = json.loads(src.read_text()), json.loads((tmp_path / "d.json").read_text())
    assert back["annotations"] == original["annotations"] and back["images"] == original["images"]
    assert main(["shard", str(src), str(tmp_path / "shards"), "--images", str(world_dir / "images"),
                 "--per-shard", "3", "--quiet"]) == 0
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 1]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "shards"), "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):])["boxes"] == len(original["annotations"])


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"images": [], "annotations": [{"id": 1}], "categories": [
        {"id": 1, "name": "x"}]}))
    assert main(["inspect", str(tmp_path / "bad.json"), "--format", "coco", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "bad.json: annotations[0]: missing key(s)" in err and "Traceback" not in err


def test_help_explains_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"inspect", "convert", "shard", "synth"}
    for name, command in sub.choices.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
            for flag in action.option_strings:
                assert flag in text, (name, flag)


def test_synthetic_world_files_find_their_images_without_images_option(world_dir, tmp_path):
    """world.json beside an annotation file tells the CLI where the world's images are."""
    code = main(["inspect", str(world_dir / "detection_train.json"), "--render", "1", "--out", str(tmp_path / "r"),
                 "--quiet"])
    assert code == 0 and len(list((tmp_path / "r").iterdir())) == 1
