"""benchmarks/zero_shot/protocol.py: the seen / unseen split of COCO AP (hand-computed cases) and the synthetic
runner end to end on a tiny world with a tiny model."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str, path: Path):
    """A benchmark script as a module (the scripts are not in a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def protocol():
    return _load_script("zero_shot_protocol", REPO / "benchmarks/zero_shot/protocol.py")


def _annotations():
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(("circle", "square", "diamond", "ring"))]
    boxes = {1: [10, 10, 30, 30], 2: [50, 50, 20, 40], 3: [5, 60, 25, 25], 4: [60, 5, 30, 20]}
    annotations = [{"id": 10 * img + cat, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0} for img in (1, 2) for cat, box in boxes.items()]
    return {"images": images, "categories": categories, "annotations": annotations}, boxes


def test_seen_and_unseen_ap_are_averaged_over_their_own_categories(protocol):
    gt, boxes = _annotations()
    manifest = {"detection_shapes": ["circle", "square"], "unseen_shapes": ["diamond", "ring"]}
    # perfect boxes for the seen shapes and for one unseen shape (diamond), nothing for ring
    dets = [{"image_id": img, "category_id": cat, "bbox": boxes[cat], "score": 0.9}
            for img in (1, 2) for cat in (1, 2, 3)]
    got = protocol.split_coco_ap(gt, dets, manifest)
    assert got["AP_seen"] == pytest.approx(1.0) and got["AP50_seen"] == pytest.approx(1.0)
    assert got["AP_unseen"] == pytest.approx(0.5)  # diamond 1.0, ring 0.0
    assert got["AP_all"] == pytest.approx(0.75)
    # a world without unseen shapes has no unseen group
    assert "AP_unseen" not in protocol.split_coco_ap(gt, dets, {"detection_shapes": ["circle"], "unseen_shapes": []})


def test_the_synthetic_runner_writes_its_table(protocol, minilm_dir, tmp_path, capsys):
    from glip_data import SynthConfig, generate_world
    from glip_train import GLIP, GLIPConfig

    world = generate_world(tmp_path / "world", config=SynthConfig(
        seed=2, num_detection=0, num_grounding=0, num_captions=0, num_val=2, min_size=64, max_size=80))
    torch.manual_seed(0)
    GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1)).save_pretrained(tmp_path / "m")
    assert protocol.main(["--weights", str(tmp_path / "m"), "--world", str(world.root), "--out", str(tmp_path / "o")]) == 0
    result = json.loads(next((tmp_path / "o").glob("zero_shot_protocol_*.json")).read_text())
    synthetic = result["synthetic"]
    assert synthetic["images"] == 2 and result["expected"] is None  # not the shipped model: nothing to compare
    assert set(synthetic["coco"]) >= {"AP_all", "AP_seen", "AP_unseen"}
    assert {"AP", "APr", "APc", "APf"} <= set(synthetic["lvis"])
    assert "| measured |" in capsys.readouterr().out


def test_bad_paths_are_named(protocol, tmp_path, capsys):
    with pytest.raises(SystemExit):
        protocol.main(["--coco-annotations", str(tmp_path / "missing.json"), "--coco-images", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--coco-annotations" in err and "missing.json" in err
    with pytest.raises(SystemExit):
        protocol.main(["--lvis-annotations", str(tmp_path)])  # annotations without their images
    assert "together" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_module():
    return _load_script("zero_shot_run", REPO / "benchmarks/zero_shot/run.py")


def test_the_shipped_model_is_the_best_run_by_coco_ap_over_every_shape(run_module):
    rows = {"A": {"seeds": {"0": {"coco_AP_all": 0.20}, "1": {"coco_AP_all": 0.31}}},
            "full": {"seeds": {"0": {"coco_AP_all": 0.30}, "1": {"coco_AP_all": 0.29}}}}
    assert run_module.best_run({"rows": rows}) == ("A", 1)


def test_the_demo_scene_is_chosen_by_its_content(run_module, tmp_path):
    manifest = {"detection_shapes": ["circle", "square"], "unseen_shapes": ["ring"]}
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "ring"}]
    contents = {1: [1, 2, 2], 2: [1, 3], 3: [3, 3, 3], 4: [2, 3, 1], 5: [1, 2, 3, 3]}  # image 4: first with all rules
    data = {"images": [{"id": i} for i in (5, 3, 4, 2, 1)], "categories": categories,
            "annotations": [{"image_id": i, "category_id": c} for i, cs in contents.items() for c in cs]}
    (tmp_path / "world.json").write_text(json.dumps(manifest))
    (tmp_path / "coco_val.json").write_text(json.dumps(data))
    assert run_module.demo_scene_index(tmp_path) == 4


def test_the_table_reports_every_finished_seed_and_the_commands_that_made_them(run_module, tmp_path):
    paths = run_module.Paths(tmp_path)
    for row, seed in (("C", 0), ("C", 1), ("A", 0), ("A", 3)):
        (paths.run(row, seed) / "eval").mkdir(parents=True)
    for row, seed in (("C", 0), ("C", 1), ("A", 0)):  # A seed 3 is still running: no metrics yet
        (paths.run(row, seed) / "eval" / "metrics.json").write_text("{}")
    assert run_module.finished_seeds(paths, "C") == [0, 1]
    assert run_module.finished_seeds(paths, "A") == [0]
    rows = {"A": {"seeds": {"0": {}}}, "C": {"seeds": {"0": {}, "1": {}}}, "C_lr3e-4": {"seeds": {"0": {}}}}
    assert run_module.commands(rows, ["A", "full", "C_lr3e-4", "full_lr3e-4_seed1"]) == [
        "python benchmarks/zero_shot/run.py all --jobs 2 --seeds 0", "python benchmarks/zero_shot/run.py row C --seed 1",
        "python benchmarks/zero_shot/run.py row C_lr3e-4 --seed 0",
        "python benchmarks/zero_shot/run.py downstream C_lr3e-4",
        "python benchmarks/zero_shot/run.py downstream full_lr3e-4 --seed 1"]


def test_learning_rate_variants_of_a_row(run_module, tmp_path):
    paths = run_module.Paths(tmp_path)
    assert run_module.parse_row("B") == ("B", run_module.LR)
    assert run_module.parse_row("C_lr3e-4") == ("C", 3e-4)
    for bad in ("D", "D_lr1e-4", "B_lrx"):
        with pytest.raises(ValueError):
            run_module.parse_row(bad)
    assert run_module.teacher_of("full") == "C" and run_module.teacher_of("full_lr3e-4") == "C_lr3e-4"
    full = run_module.row_config(paths, "full_lr3e-4", 1)  # no pseudo-labels yet: trains without captions
    paths.pseudo(1, "C_lr3e-4").parent.mkdir(parents=True)
    paths.pseudo(1, "C_lr3e-4").write_text('{"image": "x"}\n')
    with_captions = run_module.row_config(paths, "full_lr3e-4", 1)
    assert with_captions["data"]["train"][:-1] == full["data"]["train"]
    assert with_captions["data"]["train"][-1]["annotations"] == str(paths.pseudo(1, "C_lr3e-4"))
    variant = run_module.row_config(paths, "C_lr3e-4", 1)
    default = run_module.row_config(paths, "C", 1)
    assert variant["optim"] == {"lr": 3e-4, "language_lr": pytest.approx(3e-5)}
    assert variant["output_dir"] == str(paths.run("C_lr3e-4", 1)) != default["output_dir"]
    assert {k: v for k, v in variant.items() if k not in ("optim", "output_dir")} == \
        {k: v for k, v in default.items() if k not in ("optim", "output_dir")}
    (paths.run("C_lr3e-4", 1) / "eval").mkdir(parents=True)
    (paths.run("C_lr3e-4", 1) / "eval" / "metrics.json").write_text("{}")
    assert run_module.lr_variants(paths) == ["C_lr3e-4"] and run_module.finished_seeds(paths, "C") == []


def test_training_time_counts_each_logged_step_once(run_module, tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 4\n")
    log = [{"step": 25, "images_per_s": 2.0}, {"step": 50, "images_per_s": 4.0},
           {"step": 25, "images_per_s": 2.0}, {"step": 50, "images_per_s": 4.0},  # resumed from step 0: logged again
           {"step": 100, "images_per_s": 5.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert run_module.training_seconds(tmp_path) == pytest.approx(25 * 4 / 2 + 25 * 4 / 4 + 50 * 4 / 5)
    assert run_module.training_seconds(tmp_path / "missing") is None


def test_downstream_bases_are_found_from_their_runs(run_module, tmp_path):
    paths = run_module.Paths(tmp_path)
    for name in ("C_lr3e-4_prompt_tuning_1shot", "full_full_allshot", "A_zero_shot", "full_linear_probe_5shot",
                 "full_lr3e-4_seed1_full_1shot"):
        (tmp_path / "downstream" / name).mkdir(parents=True)
    (tmp_path / "downstream" / "full_full_allshot.yaml").write_text("")
    assert run_module.downstream_bases(paths) == ["A", "full", "C_lr3e-4", "full_lr3e-4_seed1"]
    for row, seed in (("full", 0), ("full_lr3e-4", 1), ("C_lr3e-4", 12)):
        assert run_module.parse_downstream_base(run_module.downstream_base(row, seed)) == (row, seed)
    assert run_module.downstream_base("full_lr3e-4", 1) == "full_lr3e-4_seed1"


def test_the_table_takes_over_the_runs_an_earlier_result_file_holds_and_this_root_lacks(run_module, tmp_path):
    paths = run_module.Paths(tmp_path / "root")
    run = paths.run("A", 1)
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"coco": {"AP_all": 0.5}, "lvis": {"AP": 0.25}}))
    (run / "config.yaml").write_text("data:\n  batch_size: 4\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 250, "images_per_s": 4.0,
                                                   "loss_dot_product_token": 0.5}) + "\n")
    setting = run_module.experiment_setting()
    previous = {**setting, "date": "2026-01-01",
                "rows": {"A": {"seeds": {"0": {"coco_AP_all": 0.3, "lvis_AP": 0.15, "train_seconds": 100.0},
                                         "1": {"coco_AP_all": 0.9, "lvis_AP": 0.9, "train_seconds": 1.0}}},
                         "C_lr3e-4": {"seeds": {"0": {"coco_AP_all": 0.4, "train_seconds": 7.0}}}},
                "classification_loss_per_250_steps": {"A_seed0": [0.7], "A_seed1": [9.0]},
                "pseudo_labels": {"C_seed0": {"precision": 0.5, "recall": 0.6}}, "downstream": {"A/zero_shot": {"AP": 0.1}}}
    previous_file = tmp_path / "zero_shot_2026-01-01.json"
    previous_file.write_text(json.dumps(previous))
    result = json.loads(run_module.table(paths, tmp_path / "out", previous_file).read_text())
    a = result["rows"]["A"]
    assert list(a["seeds"]) == ["0", "1"]
    assert a["seeds"]["1"] == {"coco_AP_all": 0.5, "lvis_AP": 0.25, "train_seconds": 250.0}  # this root's run wins
    assert a["summary"]["coco_AP_all"]["mean"] == pytest.approx(0.4)
    assert a["summary"]["lvis_AP"]["values"] == [0.15, 0.25]
    assert list(result["rows"]) == ["A", "C_lr3e-4"]
    assert result["classification_loss_per_250_steps"] == {"A_seed0": [0.7], "A_seed1": [0.5]}
    assert result["pseudo_labels"] == previous["pseudo_labels"] and result["downstream"] == previous["downstream"]
    assert sorted(result["merged_from"]["runs"]) == sorted(
        ["A_seed0", "C_lr3e-4_seed0", "classification_loss_per_250_steps:A_seed0", "pseudo_labels:C_seed0",
         "downstream:A/zero_shot"])
    assert "| A | 0,1 | 40.0 ± 10.0 |" in (tmp_path / "out" / f"zero_shot_{result['date']}.md").read_text()
    # a downstream table is one base model's: a base with runs here takes none of the earlier file's cells
    (tmp_path / "root" / "downstream" / "A_zero_shot").mkdir(parents=True)
    (tmp_path / "root" / "downstream" / "A_zero_shot" / "metrics.json").write_text('{"AP": 0.2}')
    previous_file.write_text(json.dumps({**previous, "downstream": {"A/zero_shot": {"AP": 0.1},
                                                                    "A/full/1": {"AP": 0.3}}}))
    result = json.loads(run_module.table(paths, tmp_path / "out", previous_file).read_text())
    assert result["downstream"] == {"A/zero_shot": {"AP": 0.2}}
    # runs of another experiment (another schedule, another learning rate) never join the table: an error for a
    # file asked for by name, a warning for the newest file found
    other_lr = json.loads(json.dumps(setting))
    other_lr["training"]["optim"]["lr"] *= 2
    for other in ({"train_steps": setting["train_steps"] + 1}, other_lr):
        previous_file.write_text(json.dumps({**previous, **other}))
        with pytest.raises(ValueError, match="train_steps|training"):
            run_module.table(paths, tmp_path / "out", previous_file)
        lenient = json.loads(run_module.table(paths, tmp_path / "out", previous_file, strict=False).read_text())
        assert list(lenient["rows"]) == ["A"] and list(lenient["rows"]["A"]["seeds"]) == ["1"]


def test_the_row_order_is_each_learning_rates_series_in_the_papers_order(run_module):
    names = ["full_lr3e-4", "C", "B_lr3e-4", "full", "A", "C_lr3e-4", "B", "A_lr3e-4", "C_lr1e-4"]
    assert sorted(names, key=run_module.row_order) == [
        "A", "B", "C", "full", "A_lr3e-4", "B_lr3e-4", "C_lr3e-4", "full_lr3e-4", "C_lr1e-4"]


def test_bench_runner_gpu_part_runs_every_gpu_script(tmp_path, monkeypatch):
    """``hatch run bench`` on a machine with CUDA: the GPU part calls each ``*/gpu_bench.py`` with the output folder
    (it once referred to the command line's options it is not given, a NameError on the first GPU)."""
    import subprocess

    runner = _load_script("bench_runner", REPO / "benchmarks/run.py")
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or 0)
    assert runner.gpu_part(tmp_path, ["--smoke"]) == 0
    scripts = sorted(str(p) for p in (REPO / "benchmarks").glob("*/gpu_bench.py"))
    assert scripts and [c[1] for c in calls] == scripts
    assert all(c[2:] == ["--out", str(tmp_path), "--smoke"] for c in calls)


@pytest.fixture(scope="module")
def default_model():
    return _load_script("zero_shot_default_model", REPO / "benchmarks/zero_shot/default_model.py")


def _protocol_result(seen50, unseen50):
    return {"coco": {"AP_all": 0.4, "AP50_seen": seen50, "AP50_unseen": unseen50, "AP_seen": 0.3, "AP_unseen": 0.2},
            "lvis": {"AP": 0.1}}


def test_the_default_model_is_summarised_over_unseen_worlds_against_its_target(default_model):
    summary = default_model.summarise({7: _protocol_result(0.62, 0.50), 8: _protocol_result(0.54, 0.58)})
    assert summary["AP50 seen"]["mean"] == pytest.approx(0.58) and summary["AP50 seen"]["half_spread"] == pytest.approx(0.04)
    assert summary["AP50 unseen"]["min"] == pytest.approx(0.50) and summary["AP50 unseen"]["values"] == [0.50, 0.58]
    assert summary["meets_target"]  # 0.5 on both groups of every world
    # one world below the bar on one group is enough to miss it, whatever the mean
    assert not default_model.summarise({7: _protocol_result(0.9, 0.9), 8: _protocol_result(0.9, 0.49)})["meets_target"]


def test_the_default_model_trains_the_c_recipe_on_every_training_world(default_model, run_module, tmp_path):
    paths = default_model.Paths(tmp_path)
    config = default_model.train_config(paths, tmp_path / "text", (100, 101))
    sources = [(s["kind"], Path(s["annotations"]).parent.name) for s in config["data"]["train"]]
    assert sources == [("coco", "train_seed100"), ("mdetr", "train_seed100"), ("coco", "train_seed101"),
                       ("mdetr", "train_seed101")]
    row = run_module.row_config(run_module.Paths(tmp_path / "x"), "C_lr3e-4", 0)
    assert config["optim"] == row["optim"] and config["optim"]["lr"] == 3e-4
    # the row's schedule (warm-up, a tenth at 67% and 89%) stretched to the model's steps
    assert config["schedule"] == {**row["schedule"], "max_iter": default_model.TRAIN_STEPS}
    assert default_model.train_config(paths, tmp_path / "text", (100,), steps=40)["schedule"]["max_iter"] == 40
    assert config["model"]["small"]["early_fusion"] and config["output_dir"] == str(paths.run)


def test_the_default_model_is_never_measured_on_a_world_it_trained_on(default_model, capsys):
    with pytest.raises(SystemExit):
        default_model.main(["evaluate", "--eval-seeds", f"7,{default_model.TRAIN_SEEDS[0]}"])
    assert f"[{default_model.TRAIN_SEEDS[0]}] trained the model" in capsys.readouterr().err


def test_the_default_model_table_is_what_ship_reads(default_model, tmp_path):
    per_seed = {7: _protocol_result(0.62, 0.55), 9: _protocol_result(0.48, 0.70)}
    models = {"multi_world": {"weights": "w", "per_seed": {str(s): r for s, r in per_seed.items()},
                              "summary": default_model.summarise(per_seed)}}
    recipe = {"train_seeds": [100, 101, 102], "images_per_world": 50, "steps": 1234}
    md = default_model.table(tmp_path, models, (7, 9), recipe, default_model.REPO / "runs" / "dm_small")
    assert md.name.endswith("_3worlds_50img_1234steps.md")  # a recipe other than the default names itself
    result = json.loads(md.with_suffix(".json").read_text())
    assert result["train_worlds"]["seeds"] == [100, 101, 102] and result["train_steps"] == 1234
    assert result["train_worlds"]["per_world"]["num_detection"] == 50 == result["train_worlds"]["per_world"]["num_grounding"]
    assert result["command"] == ("python benchmarks/zero_shot/default_model.py all --root runs/dm_small "
                                 "--train-seeds 100-102 --images-per-world 50 --steps 1234 --eval-seeds 7,9")
    text = md.read_text()
    assert "| multi_world | 40.0 ± 0.0 (40.0) | 55.0 ± 7.0 (48.0) | 62.5 ± 7.5 (55.0) |" in text
    assert text.rstrip().endswith("| multi_world | 62.0 / 55.0 | 48.0 / 70.0 |")
    protocol = {"coco": {"AP_all": 0.4, "AP50_seen": 0.6, "AP50_unseen": 0.5}, "lvis": {"AP": 0.3}}
    readme = default_model.shipped_readme(result, protocol, 22_000_000, md.with_suffix(".json").name)
    assert "3 worlds" in readme and "seeds 100-102" in readme and "1234 steps" in readme
    assert f"benchmarks/results/{md.name}" in readme and result["command"] in readme
    assert "met on average, not on every world" in readme  # both means >= 50, seed 9's labelled shapes below
    assert "AP50\n48.0 on the labelled shapes of the seed-9 world" in readme
    low = {7: _protocol_result(0.45, 0.55), 9: _protocol_result(0.48, 0.70)}  # the labelled shapes' mean is 46.5
    result["models"]["multi_world"]["summary"] = default_model.summarise(low)
    assert "is not met" in default_model.shipped_readme(result, protocol, 1, "x.json")
    # the default recipe in the default root: the plain file name and command
    assert default_model.table(tmp_path, models, (7, 9), default_model.DEFAULT_RECIPE).name == \
        f"default_model_{result['date']}.md"
    assert default_model.reproduce_command(default_model.DEFAULT_RECIPE, default_model.DEFAULT_ROOT,
                                           default_model.EVAL_SEEDS) == "python benchmarks/zero_shot/default_model.py all"


def test_the_default_model_ships_the_newest_result_of_its_own_recipe(default_model, tmp_path):
    def write(name, seeds, steps, images=100):
        (tmp_path / name).write_text(json.dumps({"train_steps": steps, "train_worlds": {
            "seeds": seeds, "per_world": {"num_detection": images}}}))

    recipe = {"train_seeds": [100, 101], "images_per_world": 100, "steps": 3500}
    assert default_model.result_of(tmp_path, recipe) is None
    write("default_model_2026-12-07.json", [100, 101], 3500)
    write("default_model_2026-12-08_24worlds.json", list(range(100, 124)), 3500)  # sorts last: another recipe
    write("default_model_2026-12-09_50img.json", [100, 101], 3500, images=50)
    assert default_model.result_of(tmp_path, recipe).name == "default_model_2026-12-07.json"
    write("default_model_2026-12-10.json", [100, 101], 3500)
    assert default_model.result_of(tmp_path, recipe).name == "default_model_2026-12-10.json"


def test_the_default_model_reads_its_training_worlds_and_keeps_one_recipe_per_root(default_model, tmp_path, capsys):
    assert default_model.parse_seeds("100-103") == (100, 101, 102, 103)
    assert default_model.parse_seeds("5,3") == (5, 3)
    for seeds in ((100, 101, 102), (5, 3), (7,), (1, 2, 4)):  # what the result file's command names reads back
        assert default_model.parse_seeds(default_model.format_seeds(seeds)) == seeds
    assert default_model.format_seeds((100, 101, 102)) == "100-102"
    for bad in ("103-100", "4,4", ",", "100-101,105", "a"):
        with pytest.raises(ValueError, match="--train-seeds"):
            default_model.parse_seeds(bad)
    (tmp_path / "recipe.json").write_text(json.dumps({"train_seeds": [100, 101], "images_per_world": 10, "steps": 5}))
    with pytest.raises(SystemExit):  # refused before anything is generated or trained
        default_model.main(["train", "--root", str(tmp_path), "--steps", "6"])
    err = capsys.readouterr().err
    assert "recipe.json records" in err and '"steps": 6' in err and "another --root" in err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["recipe.json"]
    from glip_data.io import RunLock

    with RunLock(tmp_path, "another default_model.py"):  # a second command on a root in use is refused at once
        with pytest.raises(SystemExit):
            default_model.main(["table", "--root", str(tmp_path)])
    assert "in use by another run (another default_model.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the recorded worlds are the ones kept apart from the evaluation worlds
        default_model.main(["evaluate", "--root", str(tmp_path), "--eval-seeds", "7,101"])
    assert "[101] trained the model" in capsys.readouterr().err
    older = tmp_path / "older"  # trained before roots recorded a recipe: its model is not taken for the default's
    (older / "run").mkdir(parents=True)
    with pytest.raises(SystemExit):
        default_model.main(["table", "--root", str(older)])
    assert "recipe.json is missing" in capsys.readouterr().err and not (older / "recipe.json").exists()


@pytest.fixture(scope="module")
def instability():
    return _load_script("zero_shot_instability", REPO / "benchmarks/zero_shot/instability.py")


def test_the_instability_report_reads_the_fusion_tower_by_kind_of_block(instability):
    assert [instability._tower_kind(f"head.dyhead_tower.{i}") for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert instability._tower_kind("backbone.fpn") is None
    groups = {"head.dyhead_tower.0": {"update_norm": 3.0, "weight_norm": 100.0, "grad_norm": 0.3},
              "head.dyhead_tower.3": {"update_norm": 4.0, "weight_norm": 100.0, "grad_norm": 0.4},
              "head.dyhead_tower.2": {"update_norm": 1.0, "weight_norm": 10.0, "grad_norm": 0.1}}
    record = {"step": 25, "groups": groups, "xmha_logits": {"head.dyhead_tower.0.b_attn.attn": [-7.0, 5.0]}}
    series = instability.series([record])
    # both X-MHA blocks in quadrature: |(3, 4)| / |(100, 100)|
    assert series["update/weight: X-MHA (fusion)"][25] == pytest.approx(5.0 / (100 * 2 ** 0.5))
    assert series["gradient norm: X-MHA (fusion)"][25] == pytest.approx(0.5)
    assert series["update/weight: DyConv"][25] == pytest.approx(0.1)
    assert series["X-MHA max abs logit q·k/√d: block 0"][25] == 7.0


def test_the_instability_report_averages_each_window_and_names_a_second_seeds_file(instability, tmp_path):
    run = tmp_path / "runs" / "C_lr1e-3_fusion_lr0.1_seed1"
    run.mkdir(parents=True)
    groups = {"head.dyhead_tower.0": {"update_norm": 2.0, "weight_norm": 100.0, "grad_norm": 0.3}}
    lines = [{"step": s, "loss_dot_product_token": s / 1000, "loss_reg": 0.5} for s in range(25, 501, 25)]
    lines.append({"step": 250, "loss_dot_product_token": 9.0, "loss_reg": 0.5})  # logged again after a resume: last wins
    lines += [{"event": "stability", "step": s, "groups": groups,
               "xmha_logits": {"head.dyhead_tower.0.b_attn.attn": [-float(s), 1.0]}} for s in (100, 300, 400)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    md = instability.report(tmp_path / "runs", tmp_path / "results", seed=1)
    assert md.name.endswith("_seed1.md")
    result = json.loads(md.with_suffix(".json").read_text())
    first = [s / 1000 for s in range(25, 250, 25)] + [9.0]  # steps 25..250
    second = [s / 1000 for s in range(275, 501, 25)]
    assert result["runs"]["C_lr1e-3_fusion_lr0.1"]["token_loss_per_250"] == pytest.approx(
        [sum(first) / len(first), sum(second) / len(second)])
    assert "| X-MHA max abs logit q·k/√d: block 0 | 100 | 350 |" in md.read_text()


def test_the_instability_remedy_changes_only_the_fusion_layers_rates(instability, run_module, tmp_path):
    paths = run_module.Paths(tmp_path)
    config = instability.variant_config(paths, "C_lr1e-3_fusion_lr0.1", 0, tmp_path / "out")
    row = run_module.row_config(paths, "C", 0)
    assert config["optim"] == {**row["optim"], "lr_factors": {k: 0.1 for k in instability.FUSION_LAYERS}}
    assert {k: v for k, v in config.items() if k not in ("optim", "output_dir")} == \
        {k: v for k, v in row.items() if k not in ("optim", "output_dir")}


@pytest.fixture(scope="module")
def fusion_gap(run_module):
    return _load_script("zero_shot_fusion_gap", REPO / "benchmarks/zero_shot/fusion_gap.py")


def test_the_two_bases_differ_only_in_deep_fusion_and_the_large_size_has_over_3x_the_parameters(
        fusion_gap, minilm_dir, tmp_path):
    from glip_data import SynthConfig, generate_world
    from glip_train import GLIP, GLIPConfig

    paths = fusion_gap.Paths(tmp_path)
    generate_world(paths.world, config=SynthConfig(seed=3, num_detection=4, num_grounding=4, num_captions=0,
                                                   num_val=0, min_size=64, max_size=80))
    sys.path.insert(0, str(REPO / "benchmarks/zero_shot"))
    from text_tower import make_text_tower, world_texts

    params = {}
    for size, spec in fusion_gap.SIZES.items():
        make_text_tower(minilm_dir, paths.text_dir(size), world_texts(paths.world), layers=spec["text_layers"])
        configs = {base: fusion_gap.base_config(paths, size, base, "3e-4", 1) for base in fusion_gap.BASES}
        fused, plain = configs["fusion"], configs["nofusion"]
        assert fused["model"]["small"].pop("early_fusion") and not plain["model"]["small"].pop("early_fusion")
        assert {k: v for k, v in fused.items() if k != "output_dir"} == \
            {k: v for k, v in plain.items() if k != "output_dir"}  # same data, steps, rates, seed, model otherwise
        assert [s["kind"] for s in fused["data"]["train"]] == ["coco", "mdetr"]  # detection + grounding
        assert fused["optim"]["lr"] == 3e-4 and fused["seed"] == 1
        for base, config in configs.items():
            small = dict(config["model"]["small"], early_fusion=fusion_gap.BASES[base])
            text = small.pop("text_encoder_dir")
            params[size, base] = sum(p.numel() for p in GLIP(GLIPConfig.small(text, **small)).parameters())
    for base in fusion_gap.BASES:
        assert params["large", base] >= 3 * params["small", base], (base, params)
    assert params["small", "fusion"] > params["small", "nofusion"]  # the fusion layers are what the bases differ in


def _curve(val, test):
    return {"val": dict(val), "test": dict(test)}


def test_each_method_keeps_the_rate_and_step_best_on_validation_and_reports_the_test_ap_there(fusion_gap):
    runs = {1e-4: _curve({25: 0.30, 50: 0.42, 75: 0.41}, {25: 0.28, 50: 0.39, 75: 0.44}),
            3e-4: _curve({25: 0.35, 50: 0.40, 75: 0.42}, {25: 0.50, 50: 0.51, 75: 0.52})}
    chosen = fusion_gap.select(runs)
    # 0.42 at step 50 (1e-4) and at step 75 (3e-4): the fewer steps win; the test AP is read there, not its best
    assert (chosen["lr"], chosen["step"], chosen["val_AP"], chosen["test_AP"]) == (1e-4, 50, 0.42, 0.39)
    assert chosen["plateau"]  # last two validations 0.42, 0.41
    climbing = fusion_gap.select({0.05: _curve({25: 0.1, 50: 0.3}, {25: 0.1, 50: 0.2})})
    assert (climbing["step"], climbing["test_AP"], climbing["plateau"]) == (50, 0.2, False)
    with pytest.raises(ValueError, match="no test AP at step 50"):
        fusion_gap.select({0.05: _curve({50: 0.3}, {25: 0.1})})


def _chosen(test_ap):
    return {"lr": 1e-4, "step": 50, "val_AP": test_ap, "test_AP": test_ap, "plateau": True}


def test_the_gap_and_the_three_claims_are_read_from_the_cells(fusion_gap):
    cells = {}
    for size, base, gaps_by_shots in (("small", "fusion", {"1": (0.10, 0.14), "all": (0.02, 0.04)}),
                                      ("small", "nofusion", {"1": (0.20, 0.30), "all": (0.05, 0.01)}),
                                      ("large", "fusion", {"1": (0.05, 0.07)})):
        for shots, per_seed in gaps_by_shots.items():
            cells[f"{size}/{base}/full/{shots}"] = {str(s): _chosen(0.5) for s in range(2)}
            cells[f"{size}/{base}/prompt_tuning/{shots}"] = {str(s): _chosen(0.5 - g) for s, g in enumerate(per_seed)}
    cells["large/nofusion/full/1"] = {"0": _chosen(0.5)}  # no prompt-tuning cell: no gap
    gap = fusion_gap.gaps(cells)
    assert set(gap) == {"small/fusion/1", "small/fusion/all", "small/nofusion/1", "small/nofusion/all",
                        "large/fusion/1"}
    assert gap["small/fusion/1"]["mean"] == pytest.approx(0.12)
    assert gap["small/fusion/1"]["half_spread"] == pytest.approx(0.02)
    claims = fusion_gap.claims(gap)
    a = {c["shots"]: c["verdict"] for c in claims["a"] if c["size"] == "small"}
    # 1 shot: 0.12 +- 0.02 vs 0.25 +- 0.05, apart by more than the spreads; all: 0.03 +- 0.01 vs 0.03 +- 0.02
    assert a["1"] == "holds" and a["all"] in ("holds, within spread", "fails, within spread")
    assert [(c["base"], c["shots"], c["verdict"]) for c in claims["b"]] == [("fusion", "1", "holds")]  # 0.06 < 0.12
    c = {(x["base"], x["from"], x["to"]): x["verdict"] for x in claims["c"]}
    assert c[("fusion", "1", "all")] == "holds" and c[("nofusion", "1", "all")] == "holds"
    # a gap that grows with the data is a failure of the claim
    grows = fusion_gap.claims({"small/fusion/1": fusion_gap.summary([0.01, 0.01]),
                               "small/fusion/all": fusion_gap.summary([0.2, 0.3])})
    assert grows["c"][0]["verdict"] == "fails"
    text = fusion_gap.markdown({"date": "d", "machine": "m", "pretraining": {}, "cells": cells, "gaps": gap,
                                "claims": claims})
    assert "(b) the gap shrinks as the model grows: holds in 1 of 1 comparisons (1 beyond the seeds' spread)" in text


def test_the_tuning_split_holds_out_validation_images_with_their_boxes(fusion_gap, tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in (5, 3, 9, 1, 7)]
    annotations = [{"id": 10 * i + k, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0}
                   for i in (5, 3, 9, 1, 7) for k in range(i % 3 + 1)]
    (tmp_path / "detection_train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "orb"}]}))
    fusion_gap.split_tuning_set(tmp_path, 2)
    val = json.loads((tmp_path / "tune_val.json").read_text())
    train = json.loads((tmp_path / "tune_train.json").read_text())
    assert sorted(im["id"] for im in val["images"]) == [1, 3]  # the lowest ids
    assert sorted(im["id"] for im in train["images"]) == [5, 7, 9]
    assert sorted(a["id"] for a in val["annotations"] + train["annotations"]) == sorted(a["id"] for a in annotations)
    assert all(a["image_id"] in (1, 3) for a in val["annotations"]) and val["categories"] == train["categories"]
    with pytest.raises(ValueError, match="5 images cannot give 5"):
        fusion_gap.split_tuning_set(tmp_path, 5)
