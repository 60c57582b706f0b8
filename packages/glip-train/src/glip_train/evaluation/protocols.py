"""Evaluation protocols as typed, validated dataclasses: every parameter that changes a number is a field.

A protocol is recorded in full in ``metrics.json``; two runs with equal protocols (and equal model, data and
software) give equal numbers. The presets in :data:`PROTOCOLS` are the official GLIP protocols (docs/evaluation.md
says where each value comes from); :func:`get_protocol` copies a preset with overrides, validated.

Box conventions (how ``xyxy`` detections become COCO ``[x, y, w, h]`` results):

* ``"inclusive"``: ``w = x2 - x1 + 1``. GLIP's post-processing produces legacy *inclusive-pixel* boxes (a box
  covering pixel columns 10..19 is ``x1 = 10, x2 = 19``), and the official COCO evaluation converts them with the
  ``+1``; this is what the official COCO and ODinW numbers were computed with.
* ``"exact"``: ``w = x2 - x1``. The official LVIS evaluation converts without the ``+1`` (its boxes come out one pixel
  smaller than COCO's for the same detection); we keep that for parity with the published LVIS numbers.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from glip_data.validators import check_int, check_number

__all__ = [
    "BOX_CONVENTIONS",
    "DetectionProtocol",
    "LVISProtocol",
    "FlickrProtocol",
    "ODinWProtocol",
    "EvalProtocol",
    "PROTOCOLS",
    "get_protocol",
    "parse_overrides",
]

BOX_CONVENTIONS = ("inclusive", "exact")


def _positive_int(obj: Any, name: str, allow_zero: bool = False) -> None:
    check_int(getattr(obj, name), f"{type(obj).__name__}.{name}", low=0 if allow_zero else 1)


@dataclass(frozen=True)
class _InferenceSettings:
    """What the model is asked to do for every image (shared by all protocols)."""

    kind: ClassVar[str] = "base"
    name: str = "custom"
    threshold: float = 0.0  # keep every post-processed detection (the official evaluation has no score threshold)
    # test resize (shorter side, longer-side cap); None: the model's own (``GLIPConfig.test_min_size`` /
    # ``test_max_size``, 800 / 1333 for the official checkpoints), recorded resolved in metrics.json
    min_size: Union[int, None] = None
    max_size: Union[int, None] = None
    batch_size: int = 1  # images per forward pass; the official numbers use 1 (padding changes GLIP's outputs)
    # the pixel frame of an image whose EXIF orientation the annotated width/height cannot settle (a square image,
    # an upside-down one): "stored" as the official loader reads every image, or "upright" (glip_data.ImageFrame)
    image_frame: str = "stored"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{type(self).__name__}.name must be a non-empty string, got {self.name!r}")
        if self.image_frame not in ("stored", "upright"):
            raise ValueError(f"{type(self).__name__}.image_frame must be 'stored' or 'upright', "
                             f"got {self.image_frame!r}")
        check_number(self.threshold, f"{type(self).__name__}.threshold", low=0.0, high=1.0)
        _positive_int(self, "batch_size")
        for field in ("min_size", "max_size"):  # max_size < min_size is allowed: the longer side's cap wins
            if getattr(self, field) is not None:
                _positive_int(self, field)

    def to_dict(self) -> dict[str, Any]:
        """Every parameter, plus the protocol kind (what ``metrics.json`` records)."""
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class DetectionProtocol(_InferenceSettings):
    """COCO-format detection scored with pycocotools ``COCOeval`` (box AP).

    Attributes:
        classes_per_prompt: classes per prompt; 0: as many as fit 256 tokens (the official COCO protocol runs its 80
            classes as one prompt).
        max_detections_per_prompt: cap on each prompt's post-processed output (official ``DETECTIONS_PER_IMG``).
        max_detections: cap per image after merging prompts; ``None``: no cap.
        box_convention: ``"inclusive"`` (``w = x2 - x1 + 1``) or ``"exact"`` (``w = x2 - x1``); see the module doc.
        class_names: optional file of class-name overrides (what the prompt says for a category; the official
            ``OVERRIDE_CATEGORY``): JSON ``{"<category id>": "name"}``, a JSON list of ``{"id", "name"}``, or a text
            file with one name per line in category-id order.
    """

    kind: ClassVar[str] = "coco"
    classes_per_prompt: int = 0
    max_detections_per_prompt: int = 100
    max_detections: Union[int, None] = 100
    box_convention: str = "inclusive"
    class_names: Union[str, None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self, "classes_per_prompt", allow_zero=True)
        _positive_int(self, "max_detections_per_prompt")
        if self.max_detections is not None:
            _positive_int(self, "max_detections")
        if self.box_convention not in BOX_CONVENTIONS:
            raise ValueError(f"{type(self).__name__}.box_convention must be one of {BOX_CONVENTIONS}, "
                             f"got {self.box_convention!r}")


@dataclass(frozen=True)
class LVISProtocol(DetectionProtocol):
    """LVIS v1 scored with the ``lvis`` package's ``LVISEval`` (AP, APr, APc, APf).

    Attributes:
        fixed_ap: Fixed AP (Dave et al. 2021, the GLIP paper's LVIS metric): the detections of each category are
            pooled over the whole dataset and only the ``max_detections_per_category`` best are kept, with no
            per-image limit. False: the standard LVIS AP (``max_detections`` per image, 300).
        max_detections_per_category: the per-category budget of Fixed AP (10,000 for LVIS).
    """

    kind: ClassVar[str] = "lvis"
    name: str = "lvis-minival"
    classes_per_prompt: int = 40
    max_detections_per_prompt: int = 300
    max_detections: Union[int, None] = None
    box_convention: str = "exact"
    fixed_ap: bool = True
    max_detections_per_category: int = 10000

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self, "max_detections_per_category")
        if not isinstance(self.fixed_ap, bool):
            raise ValueError(f"LVISProtocol.fixed_ap must be a bool, got {self.fixed_ap!r}")
        if not self.fixed_ap and self.max_detections is None:
            raise ValueError("LVISProtocol: the standard LVIS AP (fixed_ap=False) needs max_detections per image "
                             "(300 officially), got None")


@dataclass(frozen=True)
class ODinWProtocol(DetectionProtocol):
    """A set of COCO-format datasets (ODinW), each scored with COCOeval with its own class names; AP per dataset and
    the mean over datasets.

    Attributes:
        dataset_glob: under an annotations *folder*, the pattern that finds one annotation file per dataset (the
            official ODinW-13 numbers use the ``valid`` split; EgoHands uses ``mini_val``: list such cases in a
            manifest instead).
        class_names: JSON ``{"<dataset name>": overrides}`` with overrides as for :class:`DetectionProtocol`.
    """

    kind: ClassVar[str] = "odinw"
    name: str = "odinw"
    dataset_glob: str = "**/valid/annotations_without_background.json"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.dataset_glob, str) or not self.dataset_glob:
            raise ValueError(f"ODinWProtocol.dataset_glob must be a non-empty pattern, got {self.dataset_glob!r}")


@dataclass(frozen=True)
class FlickrProtocol(_InferenceSettings):
    """Phrase grounding on MDETR-format Flickr30k Entities annotations: Recall@k at an IoU threshold.

    Attributes:
        max_detections: detections per sentence (one prompt per sentence).
        recall_at: the k of Recall@k (plus the upper bound over all boxes, always reported).
        iou_threshold: a phrase is recalled at k when one of its k best boxes has IoU >= this with one of its
            ground-truth boxes (the any-box protocol) or with the box enclosing them (the merged-box protocol).
        sentences_dir: optional Flickr30k Entities ``Sentences/`` folder; gives each phrase its types (people,
            clothing, ...) for the per-type recall.
    """

    kind: ClassVar[str] = "flickr"
    name: str = "flickr30k"
    max_detections: int = 100
    recall_at: tuple[int, ...] = (1, 5, 10)
    iou_threshold: float = 0.5
    sentences_dir: Union[str, None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self, "max_detections")
        ks = tuple(self.recall_at)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"FlickrProtocol.recall_at must be positive integers, got {self.recall_at!r}")
        object.__setattr__(self, "recall_at", ks)
        check_number(self.iou_threshold, "FlickrProtocol.iou_threshold", low=0.0, high=1.0, low_open=True)


EvalProtocol = Union[DetectionProtocol, LVISProtocol, ODinWProtocol, FlickrProtocol]

#: The official protocols (and ``custom``, a COCO-format dataset with the COCO defaults to override).
PROTOCOLS: dict[str, EvalProtocol] = {
    "coco": DetectionProtocol(name="coco"),
    "lvis-minival": LVISProtocol(name="lvis-minival"),
    "lvis-val": LVISProtocol(name="lvis-val", fixed_ap=False, max_detections=300),
    "lvis-val-fixed": LVISProtocol(name="lvis-val-fixed"),  # the paper's "Val v1.0" column is Fixed AP too
    "flickr30k": FlickrProtocol(name="flickr30k"),
    "odinw": ODinWProtocol(name="odinw"),
    "custom": DetectionProtocol(name="custom"),
}


def get_protocol(protocol: str | EvalProtocol, **overrides: Any) -> EvalProtocol:
    """A preset (by name) or a protocol instance, with fields replaced by ``overrides`` (validated).

    Raises:
        ValueError: an unknown protocol name or field (the valid ones are listed), or an invalid value.
    """
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
        protocol = PROTOCOLS[protocol]
    if not dataclasses.is_dataclass(protocol) or not isinstance(protocol, _InferenceSettings):
        raise TypeError(f"protocol must be a name or a protocol dataclass, got {type(protocol).__name__}")
    if not overrides:
        return protocol
    names = {f.name for f in dataclasses.fields(protocol)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{type(protocol).__name__} ({protocol.name}) has no parameter(s) {unknown}; "
                         f"valid: {sorted(names)}")
    return dataclasses.replace(protocol, **overrides)


def parse_overrides(protocol: str | EvalProtocol, assignments: list[str]) -> dict[str, Any]:
    """Turn ``["key=value", ...]`` (the command line's ``--set``) into overrides for ``protocol``, each value read by
    the one override grammar (:mod:`glip_train.overrides`) with its field's type; :func:`get_protocol` validates
    them."""
    from ..overrides import parse_for, split_assignment

    base = get_protocol(protocol)
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    out: dict[str, Any] = {}
    for item in assignments:
        key, text = split_assignment(item, "--set")
        key = key.replace("-", "_")
        if key not in names:
            raise ValueError(f"{base.name} has no parameter {key!r}; valid: {sorted(names)}")
        out[key] = parse_for(hints[key], text)
    return out
