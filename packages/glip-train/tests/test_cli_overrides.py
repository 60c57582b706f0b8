"""The one key=value grammar (``glip train`` overrides, ``glip eval --set``) and the shared validators."""
from __future__ import annotations

import pytest

from glip_train.evaluation.protocols import get_protocol, parse_overrides
from glip_train.overrides import OverrideError, apply_overrides, parse_value
from glip_train.training import ConfigError, load_train_config

BASE = {"model": {"small": {"text_encoder_dir": "minilm"}},
        "data": {"train": [{"kind": "coco", "annotations": "train.json"}]}}


@pytest.mark.parametrize("text,value", [
    ("none", None), ("None", None), ("NULL", None), ("~", None),
    ("true", True), ("False", False),
    ("12", 12), ("-3", -3), ("0.5", 0.5), ("1e-4", 1e-4), ("2E+3", 2000.0), (".5", 0.5), ("2.", 2.0),
    ("'none'", "none"), ('"true"', "true"), ("'12'", "12"),
    ("[a, 1, none, 'x y']", ["a", 1, None, "x y"]), ("[1, [2, 3e-1]]", [1, [2, 0.3]]),
    ("{k: 1e-4, n: null}", {"k": 1e-4, "n": None}),
    ("cuda:0", "cuda:0"), ("a #1", "a #1"), ("1,5,10", "1,5,10"), ("yes", "yes"), ("nan", "nan"),
])
def test_the_grammar_by_hand(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_train_overrides_and_eval_set_read_values_the_same_way():
    config = load_train_config(None, ["ema=none", "optim.lr=1e-4", "schedule.steps=[0.5, 0.8]", "amp=none",
                                      "init=null", "log_every=3"], base=BASE)
    assert config.ema is None and config.optim.lr == 1e-4 and config.schedule.steps == (0.5, 0.8)
    assert config.amp == "none"  # a text field takes the text; an optional one reads none as None
    assert config.init is None and config.log_every == 3
    protocol = get_protocol("lvis-val", **parse_overrides("lvis-val", [
        "max_detections=none", "fixed_ap=true", "threshold=1e-4", "max_detections_per_category=7"]))
    assert protocol.max_detections is None and protocol.fixed_ap is True and protocol.threshold == 1e-4
    assert protocol.max_detections_per_category == 7
    flickr = parse_overrides("flickr30k", ["recall_at=[1, 2]", "iou_threshold=1", "sentences_dir=none"])
    assert flickr == {"recall_at": (1, 2), "iou_threshold": 1.0, "sentences_dir": None}
    assert type(flickr["iou_threshold"]) is float


@pytest.mark.parametrize("item,match", [
    ("lr", "is not of the form key=value"), ("=3", "is not of the form key=value"),
    ("optim.lr=", "has no value: write optim.lr=none"), ("a..b=1", "empty key part"),
])
def test_malformed_overrides_are_named(item, match):
    with pytest.raises(OverrideError, match=match):
        apply_overrides({}, [item])
    with pytest.raises(ConfigError, match=match):  # the training config's error class
        load_train_config(None, [item], base=BASE)


def test_values_a_field_cannot_take_are_rejected_by_its_own_validation():
    with pytest.raises(ValueError, match=r"LVISProtocol.fixed_ap must be a bool, got 'maybe'"):
        get_protocol("lvis-val", **parse_overrides("lvis-val", ["fixed_ap=maybe"]))
    with pytest.raises(ValueError, match=r"DetectionProtocol.batch_size: must be an integer >= 1; got None"):
        get_protocol("coco", **parse_overrides("coco", ["batch_size=none"]))
    with pytest.raises(ValueError, match=r"DetectionProtocol.threshold: must be a finite number; got 'high'"):
        get_protocol("coco", **parse_overrides("coco", ["threshold=high"]))
    with pytest.raises(ConfigError, match=r"data.batch_size: must be an integer >= 1; got 2.5"):
        load_train_config(None, ["data.batch_size=2.5"], base=BASE)
