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
    assert main(["inspect", str(tmp_path / "bad.json"), "--format", "coco", "--quiet"]) == 2  # a bad input
    err = capsys.readouterr().err
    assert "bad.json: annotations[0]: missing key(s)" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_dropped_records_are_named_and_exit_1(world_dir, tmp_path, capsys):
    data = json.loads((world_dir / "detection_train.json").read_text())
    data["annotations"][1]["bbox"] = [1, 2, "wide", 4]
    data["annotations"][2]["image_id"] = 999
    (tmp_path / "drops.json").write_text(json.dumps(data))
    argv = ["inspect", str(tmp_path / "drops.json"), "--images", str(world_dir / "images"), "--quiet"]
    assert main([*argv, "--errors", "drop"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[0] for line in err] == ["glip-data inspect"] * 3
    assert f"skipped {tmp_path / 'drops.json'} annotations[1] (id=2, image_id=2): bad bbox (bbox must be" in err[0]
    assert f"skipped {tmp_path / 'drops.json'} annotations[2] " in err[1] and ": unknown image id (" in err[1]
    assert err[2] == "glip-data inspect: skipped 2 inputs: bad bbox 1, unknown image id 1"
    assert main(argv) == 2  # the default policy: the first problem is an error


def test_convert_names_the_file_and_the_missing_key(tmp_path, capsys):
    src = tmp_path / "nocat.json"
    src.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]}]}))
    for to in ("odvg", "mdetr", "coco"):
        assert main(["convert", str(src), str(tmp_path / f"out.{to}"), "--from", "coco", "--to", to]) == 2
        err = capsys.readouterr().err
        assert f"{src}: has no 'categories' key, but annotations[0] has category_id 3" in err, err
        assert not (tmp_path / f"out.{to}").exists()


def test_convert_is_locked_and_writes_the_odvg_pair_atomically(world_dir, tmp_path, capsys, monkeypatch,
                                                              lock_holder):
    import glip_data.io

    src, dst = world_dir / "detection_train.json", tmp_path / "d.jsonl"
    argv = ["convert", str(src), str(dst), "--from", "coco", "--to", "odvg", "--quiet"]
    release = lock_holder(dst, "glip-data convert")
    assert main(argv) == 2
    assert f"glip-data convert: error: {dst} is in use by another run (glip-data convert" in capsys.readouterr().err
    release()
    assert main(argv) == 0
    first = dst.read_bytes()
    real = glip_data.io.atomic_write_text

    def killed(path, text):  # the label map is written; the kill comes before the jsonl
        if path == dst:
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(glip_data.io, "atomic_write_text", killed)
    assert main(argv) == 130
    # the new label map is written, the jsonl of the first run is gone: never a jsonl beside another run's label map
    assert not dst.exists() and (tmp_path / "d_label_map.json").exists()
    monkeypatch.setattr(glip_data.io, "atomic_write_text", real)
    assert main(argv) == 0 and dst.read_bytes() == first


def test_a_killed_shard_run_leaves_no_index_and_no_partial_shard(world_dir, tmp_path, monkeypatch, capsys):
    import glip_data.shards

    src, out = world_dir / "detection_train.json", tmp_path / "shards"
    argv = ["shard", str(src), str(out), "--images", str(world_dir / "images"), "--per-shard", "3", "--quiet"]
    assert main(argv) == 0
    real = glip_data.shards.sample_to_record
    calls = []

    def killed(*args, **kwargs):  # killed while writing the second shard
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(glip_data.shards, "sample_to_record", killed)
    assert main(argv) == 130
    assert not (out / "index.json").exists()  # the index of the first run went when the second started
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["shard-000000.tar",
                                                                                    "shard-000001.tar"]
    monkeypatch.setattr(glip_data.shards, "sample_to_record", real)
    assert main(argv) == 0 and json.loads((out / "index.json").read_text())["num_samples"] == 4
    assert sorted(p.name for p in out.iterdir()) == [".glip.lock", "index.json", "shard-000000.tar",
                                                     "shard-000001.tar"]


def test_synth_refuses_a_folder_with_content_and_replaces_it_whole(tmp_path, capsys):
    out = tmp_path / "w"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    assert main(["synth", "--out", str(out), "--seed", "1", *SMALL]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err and (out / "mine.txt").exists()
    assert main(["synth", "--out", str(out), "--seed", "1", "--overwrite", *SMALL]) == 0
    assert (out / "world.json").is_file() and not (out / "mine.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".glip-tmp")]


def test_help_explains_every_option(capsys):
    parser = build_parser()
    assert "exit codes: 0 success, 1 some inputs skipped" in parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"inspect", "convert", "shard", "synth"}
    for name, command in sub.choices.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "exit codes: 0 success, 1 some inputs skipped" in text, name
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
    assert code == 0 and len(list((tmp_path / "r").glob("*.jpg"))) == 1
