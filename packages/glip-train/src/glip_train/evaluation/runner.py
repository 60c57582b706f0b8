"""The evaluation runner: images through the model (sharded over ranks), predictions gathered on rank 0, scored,
written (``detections.json``, ``metrics.json``) and printed.

The model is reached only through :class:`~glip_train.evaluation.model_api.Detector` (``detect`` / ``ground``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glip_data import ImageFrame, load_image
from glip_data.io import RunLock, atomic_write_json
from glip_data.report import SkipReport

from .datasets import (
    DetectionDataset,
    EvaluationError,
    FlickrDataset,
    discover_odinw,
    load_class_names,
    load_detection_dataset,
    load_flickr_dataset,
)
from .detections import ImagePredictions, ResultColumns, collect_results, load_results, top_k_per_group, write_results
from .distributed import barrier, dist_info, gather_to_main, shard_indices
from .metrics import coco_box_metrics, grounding_recall, lvis_box_metrics
from .protocols import DetectionProtocol, EvalProtocol, FlickrProtocol, LVISProtocol, ODinWProtocol, get_protocol
from .report import counts_lines, metrics_table

__all__ = [
    "DETECTIONS_FILE",
    "EvalData",
    "EvalResult",
    "METRICS_FILE",
    "evaluate",
    "evaluate_detections",
    "load_eval_data",
    "predict_detections",
    "predict_grounding",
    "score_detections",
    "score_grounding",
]


#: the two files of an evaluation's output folder. ``metrics.json`` vouches for the pair: it is removed before
#: ``detections.json`` is replaced and written last, with the checksum of the ``detections.json`` it was computed from,
#: so a ``metrics.json`` always sits beside its own ``detections.json`` (a killed run leaves at most a lone
#: ``detections.json``).
DETECTIONS_FILE, METRICS_FILE = "detections.json", "metrics.json"


@dataclass
class EvalResult:
    """The outcome of one evaluation (on rank 0).

    Attributes:
        protocol: every parameter of the protocol.
        metrics: the metrics (fractions in [0, 1]; -1 where a group has no ground truth).
        report: counts of images, detections, and everything skipped, filled or relocated.
        table: the printed table.
        out_dir: where ``detections.json`` and ``metrics.json`` were written (None: not written).
        skipped: the skipped inputs (:meth:`glip_data.report.SkipReport.to_dict`: total, counts by reason, names).
    """

    protocol: dict[str, Any]
    metrics: dict[str, Any]
    report: dict[str, Any]
    table: str
    out_dir: Path | None = None
    skipped: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalData:
    """The annotations of one evaluation, read and validated (a command reads them before it loads the model).

    Attributes:
        kind: ``"detection"`` (one COCO / LVIS dataset), ``"odinw"`` (several) or ``"flickr"``.
        datasets: the :class:`DetectionDataset` s, or the one :class:`FlickrDataset`.
        sources: what ``metrics.json`` records about the inputs.
    """

    kind: str
    datasets: list[Any]
    sources: dict[str, Any]


# --------------------------------------------------------------------------------------------------------------------
# prediction (every rank)


def _batches(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def _read(path: Path, where: str, frame: ImageFrame, on_bad_image: str, counts: Counter,
          skips: SkipReport) -> Any | None:
    """The image as PIL RGB in the frame of its annotation, or None (counted and named in ``skips``) when it cannot
    be read and ``on_bad_image="skip"``.

    The annotation's width/height choose between the stored pixels (the official loader's frame) and the EXIF
    orientation applied (:meth:`glip_data.ImageFrame.matching`); images with an orientation are counted by how
    their frame was chosen. The image reaches the model as loaded: the processor takes it in this frame.
    """
    try:
        image = load_image(path, where=where, frame=frame)
    except OSError as exc:
        if on_bad_image == "raise":
            raise EvaluationError(f"{exc} (pass on_bad_image='skip' to evaluate it as an image without "
                                  "detections)") from None
        counts["images_unreadable_skipped"] += 1
        skips.skip("unreadable image", where, str(exc))
        return None
    if image.info["exif_orientation"] != 1:
        upright = "upright" if image.info["exif_applied"] else "as_stored"
        counts[f"images_exif_read_{upright}_by_{image.info['frame_reason']}"] += 1
    return image


def _scale(image: Any, annotated: tuple[int, int], counts: Counter) -> tuple[float, float]:
    """Boxes of the decoded image -> the annotated frame (the official evaluation rescales to the annotated size)."""
    w, h = annotated
    if image.width == w and image.height == h:
        return 1.0, 1.0
    counts["images_size_differs_from_annotation"] += 1
    return w / image.width, h / image.height


def _call_model(fn, where: str, **kwargs) -> list[dict[str, Any]]:
    try:
        return fn(**kwargs)
    except ValueError as exc:  # e.g. a class name or phrase that maps to no token
        raise EvaluationError(f"{where}: the model refused the input: {exc}") from exc


def _listed(items: list[str], limit: int = 10) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def check_class_tokens(tokenizer: Any, dataset: DetectionDataset, classes_per_prompt: int,
                       max_text_len: int = 256) -> int | None:
    """Pre-flight: check that the model can read every class name of ``dataset`` (the readability rule
    :func:`glip_data.check_phrases`, in the prompts the model will be given) and return the number of prompts per
    image (None without a tokenizer: nothing can be checked).

    Raises:
        EvaluationError: names that map to no token, only to unknown tokens, or beyond the text limit, or that do
            not fit alone in a prompt (the file, and each id, name and problem).
    """
    if tokenizer is None:
        return None
    from glip_data import PHRASE_PROBLEMS, check_phrases, chunk_classes, detection_prompt

    names = dataset.class_names
    try:
        chunks = chunk_classes(names, tokenizer, max_classes=classes_per_prompt or None, max_tokens=max_text_len)
    except ValueError as exc:
        raise EvaluationError(f"{dataset.ann_file}: {exc}") from None
    bad = []
    for chunk in chunks:
        prompt, spans = detection_prompt([names[i] for i in chunk])
        check = check_phrases(tokenizer, prompt, spans, max_length=max_text_len)
        bad += [f"id {dataset.category_ids[chunk[j]]!r} ({names[chunk[j]]!r}): {PHRASE_PROBLEMS[check.status[j]]}"
                for j in check.unreadable()]
    if bad:
        raise EvaluationError(f"{dataset.ann_file}: category names the model cannot read: {_listed(bad)}; give them "
                              "a usable name with a class-name override file (--prompt-file)")
    return len(chunks)


def check_phrase_tokens(tokenizer: Any, dataset: FlickrDataset, max_text_len: int = 256) -> None:
    """Pre-flight of grounding: check that the model can read every phrase of every sentence (the readability rule
    :func:`glip_data.check_phrases`, each phrase at its first occurrence as the model grounds it). No tokenizer:
    nothing is checked.

    Raises:
        EvaluationError: the file, and each unreadable phrase with its entry id and problem.
    """
    if tokenizer is None:
        return
    from glip_data import PHRASE_PROBLEMS, check_phrases, find_phrase_spans

    bad = []
    for entry in dataset.entries:
        spans = find_phrase_spans(entry.caption, entry.phrases)
        check = check_phrases(tokenizer, entry.caption, spans, max_length=max_text_len)
        bad += [f"entry id {entry.entry_id!r} {entry.phrases[j]!r}: {PHRASE_PROBLEMS[check.status[j]]}"
                for j in check.unreadable()]
    if bad:
        raise EvaluationError(f"{dataset.ann_file}: {len(bad)} phrase(s) the model cannot read: {_listed(bad)}")


def _text_limit(model: Any) -> int:
    return int(getattr(getattr(model, "config", None), "max_text_len", 256))


def _ready(model: Any, protocol: EvalProtocol, method: str) -> tuple[Any, EvalProtocol]:
    """The model to run (a model function is called now, after the pre-flight) and the protocol with unset test
    sizes resolved to the model's own (recorded resolved)."""
    if not callable(getattr(model, method, None)) and callable(model):
        model = model()
    _check_model(model, method)
    processor = getattr(model, "processor", None)
    if hasattr(processor, "resize_limits"):
        min_size, max_size = processor.resize_limits(protocol.min_size, protocol.max_size)
        protocol = dataclasses.replace(protocol, min_size=min_size, max_size=max_size)
    return model, protocol


def _predict_in_batches(indices: Sequence[int], protocol: EvalProtocol, desc: str, progress: bool,
                        on_bad_image: str, image_of: Callable[[int], tuple[Any, str, tuple[int, int]]],
                        run: Callable[[list[int], list[Any]], tuple[list[dict], str]],
                        skips: SkipReport | None) -> tuple[dict[int, ImagePredictions], Counter]:
    """The loop both kinds of protocol share: read each batch's images (an unreadable one is counted, or an error),
    run the model on the readable ones, bring its boxes back to the annotated frame.

    ``image_of(i)`` -> ``(path, where, annotated (w, h))``; ``run(positions, images)`` -> ``(results, where)``.
    """
    counts: Counter = Counter()
    skips = skips if skips is not None else SkipReport("glip eval")
    out: dict[int, ImagePredictions] = {}
    bar = _progress(len(indices), desc, progress)
    for batch in _batches(indices, protocol.batch_size):
        loaded = []
        for i in batch:
            path, where, (width, height) = image_of(i)
            frame = ImageFrame.matching(width, height, ambiguous=protocol.image_frame)
            image = _read(path, where, frame, on_bad_image, counts, skips)
            if image is None:
                out[i] = ImagePredictions.empty(unreadable=True)
            else:
                loaded.append((i, image))
        if loaded:
            results, where = run([i for i, _ in loaded], [img for _, img in loaded])
            if len(results) != len(loaded):
                raise RuntimeError(f"the model returned {len(results)} results for {len(loaded)} images")
            for (i, image), res in zip(loaded, results):
                out[i] = ImagePredictions.from_model(res, _scale(image, image_of(i)[2], counts))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return out, counts


def predict_detections(model: Any, protocol: DetectionProtocol, dataset: DetectionDataset, indices: Sequence[int],
                       *, on_bad_image: str = "raise", progress: bool = False, skips: SkipReport | None = None
                       ) -> tuple[dict[int, ImagePredictions], Counter]:
    """Run ``model.detect`` on the images at ``indices`` (one shard) with the dataset's classes; skipped images are
    named in ``skips`` (a new report on stderr by default).

    Returns:
        ``({image position: predictions in the annotated frame}, counts)``.
    """
    def image_of(i: int):
        return (dataset.image_paths[i], f"{dataset.ann_file.name}, image id {dataset.image_ids[i]!r}",
                dataset.image_sizes[i])

    def run(positions: list[int], images: list[Any]):
        where = f"{dataset.ann_file} (image ids {[dataset.image_ids[i] for i in positions]})"
        return _call_model(
            model.detect, where, images=images, classes=dataset.class_names, threshold=protocol.threshold,
            max_detections=protocol.max_detections, max_detections_per_prompt=protocol.max_detections_per_prompt,
            classes_per_prompt=protocol.classes_per_prompt, batch_size=len(images), min_size=protocol.min_size,
            max_size=protocol.max_size), where

    return _predict_in_batches(indices, protocol, f"{protocol.name} {dataset.name}", progress,
                               on_bad_image, image_of, run, skips)


def predict_grounding(model: Any, protocol: FlickrProtocol, dataset: FlickrDataset, indices: Sequence[int],
                      *, on_bad_image: str = "raise", progress: bool = False, skips: SkipReport | None = None
                      ) -> tuple[dict[int, ImagePredictions], Counter]:
    """Run ``model.ground`` on the sentences at ``indices``; labels of the predictions index the entry's phrases."""
    def image_of(i: int):
        entry = dataset.entries[i]
        return entry.image_path, f"{dataset.ann_file.name}, entry id {entry.entry_id!r}", entry.image_size

    def run(positions: list[int], images: list[Any]):
        entries = [dataset.entries[i] for i in positions]
        where = f"{dataset.ann_file} (entry ids {[e.entry_id for e in entries]})"
        return _call_model(
            model.ground, where, images=images, captions=[e.caption for e in entries],
            phrases=[e.phrases for e in entries], threshold=protocol.threshold,
            max_detections=protocol.max_detections, batch_size=len(images), min_size=protocol.min_size,
            max_size=protocol.max_size), where

    return _predict_in_batches(indices, protocol, f"{protocol.name} {dataset.name}", progress,
                               on_bad_image, image_of, run, skips)


def _gather(predictions: dict[int, ImagePredictions], counts: Counter, n: int, skips: SkipReport):
    """All ranks' predictions on rank 0 as a list in dataset order, with the summed counts, and every rank's skips
    added to ``skips`` (rank 0's; each rank named its own on stderr); (None, None) elsewhere."""
    mine = skips.to_dict()
    gathered = gather_to_main((predictions, counts, mine))
    if gathered is None:
        return None, None
    merged: dict[int, ImagePredictions] = {}
    total: Counter = Counter()
    for rank, (preds, c, skipped) in enumerate(gathered):
        merged.update(preds)
        total.update(c)
        if rank > 0:
            skips.merge(skipped)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"no predictions gathered for {len(missing)} items (first: position {missing[0]})")
    return [merged[i] for i in range(n)], total


# --------------------------------------------------------------------------------------------------------------------
# scoring (rank 0)


def _select(protocol: DetectionProtocol, columns: ResultColumns, counts: Counter) -> ResultColumns:
    """The detections the protocol scores: Fixed AP's best per category, or the per-image cap of standard LVIS."""
    if isinstance(protocol, LVISProtocol):
        if protocol.fixed_ap:
            k = protocol.max_detections_per_category
            per_cat = np.bincount(columns.label) if len(columns) else np.zeros(0, np.int64)
            counts["categories_over_budget"] = int((per_cat > k).sum())
            counts["categories_below_budget"] = int(((per_cat > 0) & (per_cat < k)).sum())
            rows = top_k_per_group(columns.label, columns.score, k)
        else:
            rows = top_k_per_group(columns.image_index, columns.score, protocol.max_detections)
        counts["detections_dropped_by_selection"] = len(columns) - len(rows)
        return columns.take(rows)
    return columns


def score_detections(protocol: DetectionProtocol, dataset: DetectionDataset, columns: ResultColumns,
                     out_dir: Path | None = None, counts: Counter | None = None) -> dict[str, Any]:
    """Select (per the protocol), write ``detections.json`` and score with COCOeval / LVISEval.

    Args:
        columns: every detection, ``bbox`` already in COCO ``[x, y, w, h]``.
    """
    counts = counts if counts is not None else Counter()
    selected = _select(protocol, columns, counts)
    records = list(selected.records(dataset))
    counts["detections_scored"] = len(records)
    counts["images_without_detections"] = len(dataset) - len(np.unique(selected.image_index))
    if out_dir is not None:
        write_results(out_dir / DETECTIONS_FILE, records)
    if dataset.kind == "lvis":
        from .lvis_compat import lvis_from_dict

        fixed = isinstance(protocol, LVISProtocol) and protocol.fixed_ap
        max_dets = -1 if fixed or protocol.max_detections is None else protocol.max_detections
        return lvis_box_metrics(lvis_from_dict(dataset.gt), records, max_dets, copy=False)
    return coco_box_metrics(dataset.gt, records, dataset.category_ids, copy=False)  # records are written already


def _phrase_relocations(dataset: FlickrDataset) -> int:
    """Phrases whose text first occurs in the caption before the annotated span (the model grounds the first
    occurrence; the official code uses the annotated span)."""
    n = 0
    for e in dataset.entries:
        for text, spans in zip(e.phrases, e.phrase_spans):
            m = re.search(re.escape(text), e.caption, flags=re.IGNORECASE)
            n += int(m is not None and m.start() != spans[0][0])
    return n


def score_grounding(protocol: FlickrProtocol, dataset: FlickrDataset, predictions: Sequence[ImagePredictions],
                    out_dir: Path | None = None, counts: Counter | None = None) -> dict[str, Any]:
    """Rank each phrase's boxes, write ``detections.json`` (per sentence, per phrase: xyxy boxes best first, as the
    official Flickr predictions) and compute Recall@k under the any-box and merged-box protocols."""
    counts = counts if counts is not None else Counter()
    ranked, gts, types, records = [], [], [], []
    for entry, pred in zip(dataset.entries, predictions):
        per_phrase_boxes, per_phrase_scores = [], []
        for k in range(len(entry.phrases)):
            rows = np.nonzero(pred.labels == k)[0]
            rows = rows[np.argsort(-pred.scores[rows].astype(np.float64), kind="stable")]
            ranked.append(pred.boxes[rows])
            per_phrase_boxes.append(pred.boxes[rows].astype(np.float64).tolist())
            per_phrase_scores.append(pred.scores[rows].astype(np.float64).tolist())
        gts += entry.gt_boxes
        types += entry.phrase_types
        records.append({"image_id": entry.original_img_id, "sentence_id": entry.sentence_id,
                        "entry_id": entry.entry_id, "phrases": entry.phrases, "boxes": per_phrase_boxes,
                        "scores": per_phrase_scores})
    counts["phrases"] = len(gts)
    counts["phrases_grounded_at_an_earlier_occurrence"] = _phrase_relocations(dataset)
    if out_dir is not None:
        write_results(out_dir / DETECTIONS_FILE, records)
    kw = dict(recall_at=protocol.recall_at, iou_threshold=protocol.iou_threshold)
    return {"any_box": grounding_recall(ranked, gts, types, merge_gt=False, **kw),
            "merged_box": grounding_recall(ranked, gts, types, merge_gt=True, **kw)}


# --------------------------------------------------------------------------------------------------------------------
# the entry points


def _software() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("glip-train", "glip-data", "torch", "numpy", "pycocotools", "lvis"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finish(protocol: EvalProtocol, metrics: dict[str, Any], counts: Counter, out_dir: Path | None,
            sources: dict[str, Any], verbose: bool, skips: SkipReport | None = None) -> EvalResult:
    report = dict(sorted(counts.items()))
    skipped = skips.to_dict() if skips is not None else SkipReport("glip eval", stream=None).to_dict()
    table = metrics_table(protocol.kind, metrics)
    text = f"glip eval: {protocol.name}\n{table}\nreport:\n{counts_lines(report)}"
    if out_dir is not None:  # written last: it vouches for the detections.json beside it (DETECTIONS_FILE)
        detections = out_dir / DETECTIONS_FILE
        payload = {"protocol": protocol.to_dict(), "metrics": metrics, "report": report, "skipped": skipped,
                   **sources, "detections": {"file": DETECTIONS_FILE, "sha256": _checksum(detections)},
                   "world_size": dist_info().world_size, "software": _software()}
        atomic_write_json(out_dir / METRICS_FILE, payload, default=str)
    if verbose:
        print(text)
    return EvalResult(protocol.to_dict(), metrics, report, text, out_dir, skipped)


@contextlib.contextmanager
def _output(out_dir: str | Path | None, is_main: bool) -> Iterator[Path | None]:
    """The output folder of a run, locked against a second writer (unless this process holds it already, e.g. the
    command line), with the previous run's ``metrics.json`` removed before anything of this run is written."""
    if out_dir is None:
        yield None
        return
    out = Path(out_dir)
    if not is_main:
        yield out
        return
    lock = None if RunLock.held_here(out) else RunLock(out, "glip eval").acquire()
    try:
        (out / METRICS_FILE).unlink(missing_ok=True)
        yield out
    finally:
        if lock is not None:
            lock.release()


def _check_model(model: Any, method: str) -> None:
    if not callable(getattr(model, method, None)):
        raise TypeError(f"the model has no {method}() method (see glip_train.evaluation.Detector)")
    if getattr(model, "training", False):
        warnings.warn("the model is in training mode; call model.eval() for evaluation", stacklevel=3)


def load_eval_data(protocol: str | EvalProtocol, annotations: str | Path | Sequence[Any],
                   images: str | Path | None = None) -> EvalData:
    """Read and validate the annotations of ``protocol`` (see :func:`evaluate` for the arguments), without a model.

    Raises:
        EvaluationError: a malformed file or record (named), an unusable category name (file and id).
    """
    protocol = get_protocol(protocol)
    if images is None and isinstance(annotations, (str, Path)):  # a synthetic world's file finds its images
        from glip_data import world_image_root

        images = world_image_root(annotations)
    sources = {"annotations": str(annotations) if isinstance(annotations, (str, Path)) else annotations,
               "images": None if images is None else str(images)}
    if isinstance(protocol, FlickrProtocol):
        return EvalData("flickr", [load_flickr_dataset(annotations, images, sentences_dir=protocol.sentences_dir)],
                        sources)
    if isinstance(protocol, ODinWProtocol):
        entries = discover_odinw(annotations, images, protocol.dataset_glob)
        overrides: dict[str, Any] = {}
        if protocol.class_names is not None:
            from glip_data.readers.base import read_json

            overrides = read_json(protocol.class_names)
            known = {e.name for e in entries}
            if not isinstance(overrides, dict) or not set(overrides) <= known:
                extra = sorted(set(overrides) - known) if isinstance(overrides, dict) else overrides
                raise EvaluationError(f"{protocol.class_names}: ODinW class names are {{dataset name: overrides}}; "
                                      f"unknown datasets {extra}; known: {sorted(known)}")
        datasets = []
        for entry in entries:
            dataset = load_detection_dataset(entry.ann_file, entry.image_root, kind="coco", name=entry.name)
            if entry.name in overrides:
                dataset.class_names = load_class_names(overrides[entry.name], dataset.category_ids,
                                                       dataset.class_names, where=f"{entry.ann_file} ({entry.name})")
            datasets.append(dataset)
        return EvalData("odinw", datasets, {**sources, "datasets": [dataclasses.asdict(e) for e in entries]})
    kind = "lvis" if isinstance(protocol, LVISProtocol) else "coco"
    return EvalData("detection", [load_detection_dataset(annotations, images, kind=kind,
                                                         class_names=protocol.class_names)], sources)


def evaluate(
    model: Any,
    protocol: str | EvalProtocol,
    annotations: str | Path | Sequence[Any] | EvalData,
    images: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    tokenizer: Any = None,
    on_bad_image: str = "raise",
    progress: bool = True,
    verbose: bool = True,
    **overrides: Any,
) -> EvalResult | None:
    """Evaluate a model with one of the official protocols (or ``custom``).

    Under ``torchrun`` (an initialised process group) every rank predicts its shard of the images; rank 0 gathers,
    scores, writes and prints, and returns the result (the other ranks return None).

    Before any image is read, every class name (detection) or phrase (grounding) is checked with the readability
    rule (:func:`glip_data.check_phrases`), so that an input the model cannot read fails at once, naming it.

    Args:
        model: anything with the :class:`~glip_train.evaluation.Detector` methods (a ``glip_train.GLIP`` in eval
            mode), or a function of no arguments returning one: it is called after the annotations were read and
            checked, so that a bad input fails before the model loads (``glip eval`` does that).
        protocol: a name of :data:`~glip_train.evaluation.PROTOCOLS` or a protocol instance.
        annotations: the annotation file (COCO / LVIS / MDETR format); for ``odinw`` a folder, a manifest or a list;
            or what :func:`load_eval_data` read from them.
        images: the image folder (default: the annotation file's folder; for a synthetic world's file, the world's
            image folder).
        out_dir: where to write ``detections.json`` and ``metrics.json`` (None: nothing is written); locked against a
            second writer while the run writes. ``metrics.json`` is removed when the run starts and written last
            (with the checksum of its ``detections.json``), so the two always belong to the same run.
        on_bad_image: ``"raise"`` (an error naming the file and the record) or ``"skip"`` (named on stderr, counted
            in ``metrics.json`` and :attr:`EvalResult.skipped`; the image is scored as one without detections).
        progress: show a progress bar (rank 0).
        verbose: print the table and the report.
        tokenizer: the model's tokenizer for the pre-flight (default: the model's ``tokenizer`` attribute; without
            one nothing is checked before the model runs).
        overrides: protocol parameters to change (``classes_per_prompt=...``, ``max_detections=...``, ...).

    Raises:
        EvaluationError: bad input (the file and the record are named).
        glip_data.io.OutputLockedError: another run is writing to ``out_dir``.
    """
    protocol = get_protocol(protocol, **overrides)
    if on_bad_image not in ("raise", "skip"):
        raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
    data = annotations if isinstance(annotations, EvalData) else load_eval_data(protocol, annotations, images)
    expected = {FlickrProtocol: "flickr", ODinWProtocol: "odinw"}.get(type(protocol), "detection")
    if data.kind != expected:
        raise ValueError(f"the data were read for a {data.kind} protocol, not for {protocol.name}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    text_limit = _text_limit(model)
    if data.kind == "flickr":  # the pre-flight: every phrase / class name, before the model runs (or loads)
        check_phrase_tokens(tokenizer, data.datasets[0], text_limit)
        prompts = [None]
    else:
        prompts = [check_class_tokens(tokenizer, d, protocol.classes_per_prompt, text_limit) for d in data.datasets]
    model, protocol = _ready(model, protocol, "ground" if data.kind == "flickr" else "detect")
    info = dist_info()
    show = progress and info.is_main
    skips = SkipReport("glip eval")
    with _output(out_dir, info.is_main) as out:
        if data.kind == "flickr":
            dataset = data.datasets[0]
            preds, counts = predict_grounding(model, protocol, dataset, shard_indices(len(dataset), *info),
                                              on_bad_image=on_bad_image, progress=show, skips=skips)
            preds, counts = _gather(preds, counts, len(dataset), skips)
            if preds is None:
                barrier()
                return None
            counts.update(dataset.notes)
            counts["sentences"] = len(dataset)
            metrics = score_grounding(protocol, dataset, preds, out, counts)
            result = _finish(protocol, metrics, counts, out, data.sources, verbose, skips)
            barrier()
            return result
        if data.kind == "odinw":
            return _evaluate_odinw(model, protocol, data, prompts, out, on_bad_image, show, verbose, skips)
        metrics, counts = _run_detection(model, protocol, data.datasets[0], prompts[0], out, on_bad_image, show,
                                         skips)
        if metrics is None:
            return None
        return _finish(protocol, metrics, counts, out, data.sources, verbose, skips)


def _run_detection(model, protocol, dataset, prompts, out, on_bad_image, show, skips):
    info = dist_info()
    preds, counts = predict_detections(model, protocol, dataset, shard_indices(len(dataset), *info),
                                       on_bad_image=on_bad_image, progress=show, skips=skips)
    preds, counts = _gather(preds, counts, len(dataset), skips)
    if preds is None:
        barrier()
        return None, None
    counts.update(dataset.notes)
    counts["images"] = len(dataset)
    counts["classes"] = len(dataset.class_names)
    if prompts is not None:
        counts["prompts_per_image"] = prompts
    counts["detections_predicted"] = sum(len(p.scores) for p in preds)
    columns = collect_results(dataset, preds, protocol.box_convention)
    metrics = score_detections(protocol, dataset, columns, out, counts)
    barrier()
    return metrics, counts


def _evaluate_odinw(model, protocol: ODinWProtocol, data: EvalData, prompts, out, on_bad_image, show, verbose,
                    skips):
    per_dataset: dict[str, Any] = {}
    counts: Counter = Counter()
    all_records: dict[str, Any] = {}
    for dataset, prompts_per_image in zip(data.datasets, prompts):
        sub_out = None
        if out is not None and dist_info().is_main:
            sub_out = out / "datasets" / dataset.name
            sub_out.mkdir(parents=True, exist_ok=True)
        metrics, sub_counts = _run_detection(model, protocol, dataset, prompts_per_image, sub_out, on_bad_image, show,
                                             skips)
        if metrics is None:
            continue
        per_dataset[dataset.name] = metrics
        counts.update({f"{dataset.name}: {k}": v for k, v in sub_counts.items()})
        if sub_out is not None:
            all_records[dataset.name] = json.loads((sub_out / DETECTIONS_FILE).read_text(encoding="utf-8"))
    if not dist_info().is_main:
        return None
    metrics = {"AP": float(np.mean([m["AP"] for m in per_dataset.values()])),
               "AP50": float(np.mean([m["AP50"] for m in per_dataset.values()])),
               "datasets": per_dataset}
    if out is not None:
        atomic_write_json(out / DETECTIONS_FILE, all_records, indent=None)
    return _finish(protocol, metrics, counts, out, data.sources, verbose, skips)


def evaluate_detections(
    protocol: str | EvalProtocol,
    annotations: str | Path,
    detections: str | Path | list,
    out_dir: str | Path | None = None,
    *,
    verbose: bool = False,
    **overrides: Any,
) -> EvalResult:
    """Score existing COCO-format detections (a ``detections.json`` or the list) with a detection protocol.

    The protocol's selection applies (Fixed AP keeps each category's best ``max_detections_per_category``; the
    standard LVIS AP keeps each image's best ``max_detections``); boxes are taken as written (``[x, y, w, h]``).

    Raises:
        EvaluationError: a detection with an image id or category id that the annotations do not have (named).
    """
    protocol = get_protocol(protocol, **overrides)
    if not isinstance(protocol, DetectionProtocol) or isinstance(protocol, ODinWProtocol):
        raise ValueError(f"evaluate_detections scores one COCO-format dataset; {protocol.name} is not such a "
                         "protocol")
    kind = "lvis" if isinstance(protocol, LVISProtocol) else "coco"
    dataset = load_detection_dataset(annotations, None, kind=kind)
    columns = load_results(detections, dataset)
    counts: Counter = Counter(dataset.notes)
    counts["images"] = len(dataset)
    counts["detections_read"] = len(columns)
    sources = {"annotations": str(annotations),
               "detections": str(detections) if isinstance(detections, (str, Path)) else "<list>"}
    with _output(out_dir, True) as out:
        metrics = score_detections(protocol, dataset, columns, out, counts)
        return _finish(protocol, metrics, counts, out, sources, verbose)
