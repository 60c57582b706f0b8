"""Training building blocks: run configs, overrides, parameter groups, LR schedules, the global-batch sampler,
freezing modes and adapters."""
from __future__ import annotations

import math

import pytest
import torch

from glip_train import GLIP, GLIPConfig
from glip_train.adapters import AdapterError, linear_probe_parameters, load_adapter, save_adapter
from glip_train.training import ConfigError, TrainConfig, load_train_config
from glip_train.training.checkpointing import config_differences
from glip_train.training.config import ScheduleConfig, apply_overrides
from glip_train.training.data import GlobalBatchSampler
from glip_train.training.optim import LRSchedule, parameter_groups
from glip_train.training.trainer import freeze_for_mode

BASE = {"model": {"small": {"text_encoder_dir": "minilm"}},
        "data": {"train": [{"kind": "coco", "annotations": "train.json"}]}}


# ---- configs --------------------------------------------------------------------------------------------------------

def test_yaml_file_overrides_and_saved_config_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nmodel: {small: {text_encoder_dir: minilm}}\n"
                    "data:\n  train:\n    - {kind: coco, annotations: train.json}\n"
                    "optim: {lr: 0.001}\n")
    config = load_train_config(path, ["optim.lr=2e-5", "data.batch_size=8", "data.train.0.weight=3",
                                      "schedule.steps=[0.5, 0.8]", "ema=null"])
    assert config.optim.lr == 2e-5 and config.data.batch_size == 8 and config.data.train[0].weight == 3.0
    assert config.schedule.steps == (0.5, 0.8) and config.ema is None
    assert config.data.train[0].annotations == str(tmp_path / "train.json")  # relative to the file
    saved = config.save(tmp_path / "saved.yaml")
    assert load_train_config(saved) == config
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], r"optim.lrr: unknown key"),
    (["mode=prompt"], r"mode: must be one of \('full', 'prompt_tuning', 'linear_probe'\)"),
    (["data.train.0.kind=voc"], r"data.train.0.kind: must be one of"),
    (["data.batch_size=0"], r"data.batch_size: must be an integer >= 1"),
    (["schedule.steps=[0.9, 0.5]"], r"schedule.steps: must be increasing"),
    (["amp=fp8"], r"amp: must be one of"),
    (["freeze.backbone=stage2"], r"freeze.backbone: must be null, 'all' or an integer"),
    (["data.train.3.kind=coco"], r"data.train.3 is not an index of a list of 1"),
    (["optim"], r"is not of the form key=value"),
])
def test_bad_configs_name_the_dotted_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, overrides, base=BASE)


def test_a_config_needs_a_model_or_init_weights():
    with pytest.raises(ConfigError, match="model: without init weights"):
        TrainConfig.from_dict({"data": BASE["data"]})
    with pytest.raises(FileNotFoundError, match="shipped configs: .*tiny_synth"):
        load_train_config("no_such_config")


def test_resume_refuses_another_config_naming_the_keys():
    a = TrainConfig.from_dict(BASE).to_dict()
    b = TrainConfig.from_dict(apply_overrides(BASE, ["optim.lr=0.5", "log_every=3"])).to_dict()
    diffs = config_differences(a, b)
    assert diffs == ["optim.lr: checkpoint 0.0001 vs now 0.5"]  # log_every may change on resume


# ---- optimizer and schedule ------------------------------------------------------------------------------------------

def test_official_parameter_groups_on_a_glip_t():
    with torch.device("meta"):
        model = GLIP(GLIPConfig.glip_t())
    from glip_train.training.config import OptimConfig

    groups = {g["name"]: g for g in parameter_groups(model, OptimConfig())}
    table = "backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"
    assert groups[table]["lr"] == 2e-4 and groups[table]["weight_decay"] == 0.0  # "bias" substring, as officially
    assert groups["head.bias_lang"]["lr"] == 2e-4 and groups["head.bias0"]["weight_decay"] == 0.0
    assert groups["language_backbone.model.encoder.layer.0.attention.self.query.weight"]["lr"] == 1e-5
    assert groups["language_backbone.model.encoder.layer.0.attention.self.query.bias"]["lr"] == 2e-5
    assert groups["head.dyhead_tower.0.b_attn.attn.v_proj.weight"]["weight_decay"] == 1e-4
    assert "head.cls_logits.weight" not in groups  # frozen
    assert len(groups) == sum(p.requires_grad for p in model.parameters())


def test_lr_factors_multiply_the_official_rates_of_matching_names_and_are_checked():
    with torch.device("meta"):
        model = GLIP(GLIPConfig.glip_t())
    from glip_train.training.config import OptimConfig

    config = OptimConfig(lr_factors={"b_attn": 0.1, "attn.v_proj": 0.5, "*dyhead_tower.*.attention.*": 0.25})
    groups = {g["name"]: g for g in parameter_groups(model, config)}
    # the official rule first (bias: 2x), then every matching factor (0.1 and 0.5)
    assert groups["head.dyhead_tower.0.b_attn.attn.v_proj.bias"]["lr"] == pytest.approx(1e-4 * 2 * 0.1 * 0.5)
    assert groups["head.dyhead_tower.0.b_attn.attn.l_proj.weight"]["lr"] == pytest.approx(1e-5)
    # a glob names the whole name: the tower's text layer, not the text encoder's layer of the same shape
    assert groups["head.dyhead_tower.1.attention.self.query.weight"]["lr"] == pytest.approx(0.25e-4)
    assert groups["head.dyhead_tower.1.intermediate.dense.weight"]["lr"] == 1e-4  # no factor
    assert groups["language_backbone.model.encoder.layer.0.attention.self.query.weight"]["lr"] == 1e-5
    for bad, message in (({"b_attn": -1}, "optim.lr_factors.b_attn"), ({"": 0.5}, "non-empty"),
                         ([0.1], "must map name substrings")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({**BASE, "optim": {"lr_factors": bad}}).validate()


def test_lr_schedules_by_hand():
    multistep = LRSchedule(ScheduleConfig(max_iter=100, warmup_iters=10, warmup_factor=0.1, steps=(0.5, 0.8)))
    assert multistep(0) == pytest.approx(0.1) and multistep(5) == pytest.approx(0.1 * 0.5 + 0.5)
    assert multistep(10) == 1.0 and multistep(49) == 1.0
    assert multistep(50) == pytest.approx(0.1) and multistep(80) == pytest.approx(0.01)
    cosine = LRSchedule(ScheduleConfig(max_iter=100, warmup_iters=10, kind="cosine", min_lr_factor=0.2))
    assert cosine(10) == pytest.approx(1.0)
    # the official formula divides by max_iter, not by the 90 post-warm-up steps
    assert cosine(60) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * 50 / 100)) / 2)
    assert ScheduleConfig(max_iter=1000, steps=(0.667, 1500)).milestones() == [667, 1500]


def test_the_users_length_wins_over_the_recipes_and_both_is_an_error(tmp_path):
    recipe = {**BASE, "schedule": {"epochs": 24}}
    steps = load_train_config(None, ["schedule.max_iter=50"], base=recipe).schedule
    assert (steps.max_iter, steps.epochs) == (50, None)  # the recipe's 24 epochs no longer decide the length
    assert load_train_config(None, [], base=recipe).schedule.epochs == 24
    path = tmp_path / "run.yaml"
    path.write_text("model: {small: {text_encoder_dir: minilm}}\ndata: {train: [{kind: coco, annotations: t.json}]}\n"
                    "schedule: {max_iter: 120}\n")
    assert load_train_config(path, ["schedule.epochs=2"]).schedule.epochs == 2  # max_iter comes from the data
    with pytest.raises(ConfigError, match=r"schedule.max_iter and schedule.epochs: both given; give one"):
        load_train_config(path, ["schedule.epochs=2", "schedule.max_iter=5"])
    path.write_text(path.read_text().replace("max_iter: 120", "max_iter: 120, epochs: 3"))
    with pytest.raises(ConfigError, match=r"run.yaml: schedule.max_iter and schedule.epochs are both set; keep one"):
        load_train_config(path)


def _schedule_of(config: TrainConfig, samples: int, processes: int = 1):
    from glip_train.training.build import resolve_schedule

    resolved, changes = resolve_schedule(config, samples, processes)
    return resolved.schedule, {c.key: c for c in changes}


def test_the_official_coco_recipe_at_its_length_keeps_the_official_schedule():
    """COCO fine-tuning as the official README runs it: 118,287 images, batch 32 (here 16 processes x 2), 24
    epochs: 3696 steps per epoch, 88,704 steps, the official 2000 warm-up steps and LR drops at 67 % and 89 %."""
    from glip_train.training.finetune import coco_finetune_config

    base = coco_finetune_config(__file__, init="default")
    schedule, changes = _schedule_of(load_train_config(None, [], base=base), 118_287, processes=16)
    assert schedule.max_iter == 24 * 3696 and schedule.warmup_iters == 2000
    assert schedule.milestones() == [59_432, 78_947]  # round(0.67 x 88704), round(0.89 x 88704)
    assert str(changes["schedule.max_iter"]).startswith("schedule.max_iter: 24 epochs -> 88704 (3696 global ")
    lr = LRSchedule(schedule)
    assert lr(0) == pytest.approx(0.001) and lr(1000) == pytest.approx(0.001 * 0.5 + 0.5) and lr(2000) == 1.0
    assert lr(59_431) == 1.0 and lr(59_432) == pytest.approx(0.1) and lr(78_947) == pytest.approx(0.01)


def test_a_short_run_scales_its_warm_up_and_milestones():
    """16 training images at batch 2: 8 steps per epoch, 192 steps for 24 epochs; 5 % warm-up = floor(9.6) = 9
    steps; milestones round(0.67 x 192) = 129 and round(0.89 x 192) = 171. The issue's run never left the fixed
    2000-step warm-up: its LR was 0.001 + 0.999 x 168 / 2000 of the base at best."""
    from glip_train.training.finetune import coco_finetune_config

    base = coco_finetune_config(__file__, init="default")
    schedule, changes = _schedule_of(load_train_config(None, [], base=base), 16)
    assert (schedule.max_iter, schedule.warmup_iters, schedule.milestones()) == (192, 9, [129, 171])
    assert str(changes["schedule.warmup_iters"]) == ("schedule.warmup_iters: auto -> 9 (scaled: 5% of 192 steps, at "
                                                    "most the official 2000)")
    lr = LRSchedule(schedule)
    assert lr(9) == 1.0 and lr(4) == pytest.approx(0.001 + 0.999 * 4 / 9)
    assert ScheduleConfig(max_iter=19).warmup() == 0 and ScheduleConfig(max_iter=40_000).warmup() == 2000
    assert ScheduleConfig(max_iter=10 ** 6).warmup() == 2000 and ScheduleConfig(max_iter=50, warmup_iters=7).warmup() == 7
    explicit, changes = _schedule_of(load_train_config(None, ["schedule.warmup_iters=3"], base=base), 16)
    assert explicit.warmup_iters == 3 and "schedule.warmup_iters" not in changes  # a given warm-up is kept


# ---- training sizes ----------------------------------------------------------------------------------------------

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("shorter,test_size,device,sizes,max_size", [
    # COCO-sized images, GLIP-T (tests at 800/1333), a GPU: exactly the official sizes
    ([480, 427, 480, 640, 480], (800, 1333), GPU, (480, 560, 640, 720, 800), 1333),
    # large images, a new model on a GPU: the official sizes too
    ([1200, 900, 1500], None, GPU, (480, 560, 640, 720, 800), 1333),
    # 128-pixel images and the shipped model (160/240): up to its test size, its test cap
    ([128, 128, 120, 136], (160, 240), CPU, (96, 112, 128, 144, 160), 240),
    # 128-pixel images and GLIP-T on a CPU: up to 5/3 x 128 = 213, the official shape, cap 213 x 1333 / 800 = 355
    ([128, 128, 128], (800, 1333), CPU, (128, 149, 170, 192, 213), 355),
    # large images and GLIP-T on a CPU: the CPU limit 512
    ([720, 1080], (800, 1333), CPU, (307, 358, 410, 461, 512), 853),
])
def test_training_sizes_fit_the_images_the_model_and_the_device(shorter, test_size, device, sizes, max_size):
    from glip_train.training.build import fit_train_sizes

    got_sizes, got_max, why = fit_train_sizes(shorter, test_size, device)
    assert (got_sizes, got_max) == (sizes, max_size)
    assert why.startswith("fit: largest = min(official 800, 5/3 x median image")


def test_sizes_without_known_images_follow_the_other_limits():
    """Streamed shards give no annotated sizes: the official sizes, the model's test size and the CPU limit decide."""
    from glip_train.training.build import fit_train_sizes

    assert fit_train_sizes([], None, GPU)[:2] == ((480, 560, 640, 720, 800), 1333)
    sizes, max_size, why = fit_train_sizes([], (160, 240), CPU)
    assert (sizes, max_size) == ((96, 112, 128, 144, 160), 240) and "median" not in why


def test_given_sizes_win_and_a_fine_tuned_model_keeps_its_test_size(small, tmp_path):
    """Only the sizes the config leaves open are fit; init weights keep their test size unless ``model`` sets
    one; a new model tests at its largest training size."""
    from glip_train.training.build import build_model, resolve_sizes

    init = small.config.replace(test_min_size=96, test_max_size=150)
    GLIP(init).save_pretrained(tmp_path / "init")

    class Source:  # a training source of 4 images (annotated width, height): shorter sides 60, 64, 64, 70
        sizes = [(80, 60), (64, 64), (64, 100), (90, 70)]
        indices = [0, 1, 2, 3]
        dataset = property(lambda self: self)

        def image_size(self, index):
            return self.sizes[index]

        def __len__(self):
            return len(self.indices)

    sources = {"0:x": Source()}
    config = load_train_config(None, ["data.max_size=120"], base={**BASE, "init": str(tmp_path / "init"),
                                                                  "model": {}})
    resolved, changes = resolve_sizes(config, sources, CPU)
    # largest = min(800, 5/3 x 64 = 107, 96, 512) = 96; the given max_size stays
    assert resolved.data.min_sizes == (58, 67, 77, 86, 96) and resolved.data.max_size == 120
    assert [c.key for c in changes] == ["data.min_sizes"]
    model = build_model(resolved)
    assert (model.config.test_min_size, model.config.test_max_size) == (96, 150)  # not the training sizes
    told = build_model(load_train_config(None, ["model.test_min_size=64", "data.min_sizes=[50]", "data.max_size=80"],
                                         base={**BASE, "init": str(tmp_path / "init"), "model": {}}))
    assert (told.config.test_min_size, told.config.test_max_size) == (64, 150)
    new = load_train_config(None, ["data.min_sizes=[48, 64]", "data.max_size=100",
                                   "model.small.image_encoder=resnet18", "model.small.fusion_layers=1"], base=BASE)
    assert build_model(new).processor.test_size == (64, 100)


# ---- data order --------------------------------------------------------------------------------------------------

def test_processes_share_the_global_batches_of_one_process():
    """W processes with batch b read exactly the samples one process with batch W*b reads, batch for batch."""
    single = iter(GlobalBatchSampler(23, batch_size=6, seed=3))
    ranks = [iter(GlobalBatchSampler(23, batch_size=2, seed=3, world_size=3, rank=r)) for r in range(3)]
    for _ in range(7):  # beyond one epoch (3 global batches per epoch, the last 5 samples dropped)
        whole = [next(single) for _ in range(6)]
        parts = [key for it in ranks for key in [next(it) for _ in range(2)]]
        assert parts == whole
    resumed = iter(GlobalBatchSampler(23, batch_size=6, seed=3, start=4))
    fresh = iter(GlobalBatchSampler(23, batch_size=6, seed=3))
    for _ in range(4 * 6):
        next(fresh)
    assert [next(resumed) for _ in range(12)] == [next(fresh) for _ in range(12)]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, batch_size=3, seed=0, world_size=2)


def test_each_epoch_visits_every_sample_at_most_once():
    sampler = iter(GlobalBatchSampler(20, batch_size=4, seed=1))
    first = [next(sampler) for _ in range(20)]
    assert {e for e, _ in first} == {0} and sorted(i for _, i in first) == list(range(20))
    second = [next(sampler) for _ in range(20)]
    assert {e for e, _ in second} == {1} and [i for _, i in second] != [i for _, i in first]


# ---- freezing and adapters ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(minilm_dir):
    torch.manual_seed(0)
    return GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1))


def _mode_config(mode, **freeze):
    return TrainConfig.from_dict({**BASE, "mode": mode, "freeze": freeze})


def test_training_modes_train_exactly_their_parameters(minilm_dir):
    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1))
    names = freeze_for_mode(model, _mode_config("linear_probe"))
    assert sorted(names) == sorted(["head.bbox_pred.weight", "head.bbox_pred.bias", "head.centerness.weight", "head.centerness.bias",
                     "head.dot_product_projection_text.weight", "head.dot_product_projection_text.bias",
                     "head.log_scale", "head.bias_lang", "head.bias0"])
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1))
    assert freeze_for_mode(model, _mode_config("prompt_tuning")) == ["prompt_tuning.weight"]
    assert model.prompt_tuning.weight.shape == (1000, 384) and not model.prompt_tuning.weight.any()
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1))
    names = freeze_for_mode(model, _mode_config("full", backbone="all", language=True))
    assert not any(n.startswith(("backbone.body.", "language_backbone.")) for n in names)
    assert any(n.startswith("backbone.fpn.") for n in names) and "head.cls_logits.weight" not in names
    with pytest.raises(ValueError, match="stage freezing needs a Swin backbone"):
        freeze_for_mode(model, _mode_config("full", backbone=2))


def test_adapters_round_trip_and_refuse_other_base_weights(small, minilm_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    small.enable_prompt_tuning(8)
    with torch.no_grad():
        small.prompt_tuning.weight.copy_(torch.randn(8, 384, generator=g))
    path = save_adapter(small, tmp_path / "prompt.safetensors", "prompt_tuning")
    assert path.stat().st_size < 64 * 1024
    fresh = GLIP(small.config).eval()
    fresh.load_state_dict({k: v for k, v in small.state_dict().items() if not k.startswith("prompt_tuning.")})
    load_adapter(fresh, path)
    assert torch.equal(fresh.prompt_tuning.weight, small.prompt_tuning.weight)
    # the table is added to the text features: the model's outputs change accordingly
    ids, mask = small.processor.tokenize(["a dog. a cat."])
    with torch.no_grad():
        out = fresh(torch.zeros(1, 3, 64, 64), ids, mask)
        assert torch.allclose(out.text_hidden[0], fresh.language_backbone(ids, mask).hidden[0]
                              + small.prompt_tuning.weight[: ids.shape[1]], atol=1e-6)
    torch.manual_seed(1)
    other = GLIP(small.config)
    with pytest.raises(AdapterError, match="trained on other base weights"):
        load_adapter(other, path)
    probe = save_adapter(small, tmp_path / "probe.safetensors", "linear_probe")
    meta = load_adapter(fresh, probe)
    assert meta["kind"] == "linear_probe"
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="junk.safetensors"):
        load_adapter(fresh, tmp_path / "junk.safetensors")
    assert set(linear_probe_parameters(small)) <= {n for n, _ in small.named_parameters()}
