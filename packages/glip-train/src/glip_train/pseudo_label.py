"""Self-training: a teacher GLIP labels caption data with boxes (``glip pseudo-label``).

GLIP's caption data (Cap4M / Cap24M) was labelled by a grounding-trained teacher: for every image-caption pair the
teacher grounds the caption's noun phrases, and the boxes it is confident about become training targets
(``docs/official_model.md#caption-data``). :func:`pseudo_label` does that for a caption file in the format glip-data
reads (JSON Lines; see ``glip_data.CaptionReader``):

* phrases are the line's annotated entities (their character spans are used as they are), or noun phrases found by
  the offline chunker;
* the teacher grounds all phrases of a caption in one pass; an entity the model cannot read
  (:func:`glip_data.check_phrases`: no token, only unknown tokens, beyond the 256-token text limit) is skipped and
  named in the report's :class:`glip_data.SkipReport` (``report.phrases``); boxes scoring **at least**
  ``threshold`` are kept (:func:`glip_train.postprocess.passes_threshold`, the rule of ``detect``; the official
  ``CAPTION_CONF`` 0.5 keeps scores above it, which differs only for a score of exactly 0.5), optionally followed by
  class-agnostic NMS over the caption's kept boxes (official ``CAPTION_NMS``, off by default);
* a caption with at least ``min_boxes`` kept boxes is written with, per entity, its spans, boxes and scores (boxes
  in the continuous convention of the caption format). Negative-caption packing happens when training reads the file.

Work is appended line by line with a ``<out>.progress`` record of the lines processed, so an interrupted run started
again continues where it stopped. Unreadable images, captions without phrases and entities the teacher cannot read
are counted in the report, never a crash.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["pseudo_label", "grade_pseudo_labels", "PseudoLabelReport", "PseudoLabelGrade"]


@dataclass
class PseudoLabelReport:
    """What a pseudo-labelling run did (``counts``: captions written, skipped by reason, boxes kept, ...)."""

    out: Path
    counts: Counter = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    phrases: Any = None  # glip_data.SkipReport of the entities skipped because the model cannot read them

    def __post_init__(self) -> None:
        if self.phrases is None:
            from glip_data import SkipReport

            self.phrases = SkipReport("glip pseudo-label")

    def summary(self) -> str:
        c = self.counts
        parts = [f"{c['captions_written']} captions written ({c['boxes_kept']} boxes)",
                 f"{c['already_done']} already done"]
        for key in sorted(k for k in c if k.startswith("skipped_")):
            parts.append(f"{key.replace('_', ' ')}: {c[key]}")
        if self.phrases:
            parts.append(f"entities {self.phrases.summary()}")
        text = f"glip pseudo-label: {'; '.join(parts)} -> {self.out}"
        for name in self.failed[:10]:
            text += f"\n  unreadable image: {name}"
        if len(self.failed) > 10:
            text += f"\n  ... and {len(self.failed) - 10} more unreadable images"
        return text


def _read_done(progress: Path) -> set[int]:
    if not progress.is_file():
        return set()
    done = set()
    for line in progress.read_text().splitlines():
        if line.strip().isdigit():
            done.add(int(line))
    return done


def _repair_tail(path: Path) -> None:
    """Drop a partial last line left by a run killed mid-write (the progress file did not record it)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def pseudo_label(model: Any, captions: str | os.PathLike, out: str | os.PathLike, *, images: str | None = None,
                 threshold: float = 0.5, nms: float | None = None, min_boxes: int = 1, phrases: str = "entities",
                 max_detections: int = 100, min_size: int | None = None, max_size: int | None = None,
                 batch_size: int = 1, progress: bool = True) -> PseudoLabelReport:
    """Label every caption of ``captions`` with the boxes ``model`` (a :class:`glip_train.GLIP`) grounds.

    Returns a :class:`PseudoLabelReport`; see the module doc for the rules.
    """
    from glip_data import PHRASE_PROBLEMS, CaptionReader, ImageFrame, ImageLoadError, check_phrases, find_noun_phrases
    from glip_data import find_phrase_spans, world_image_root
    from glip_data.readers import caption_record

    from .inference import predict
    from .processing_glip import TextQuery

    if phrases not in ("entities", "chunker"):
        raise ValueError(f"phrases must be 'entities' or 'chunker'; got {phrases!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress_file = out.with_name(out.name + ".progress")
    _repair_tail(out)
    done = _read_done(progress_file)
    if images is None:  # a synthetic world's caption file finds the world's images
        images = world_image_root(captions)
    reader = CaptionReader(captions, images, min_boxes=0, errors="drop")
    report = PseudoLabelReport(out)
    report.counts.update({f"skipped_{k}": v for k, v in reader.stats.items()})
    limit = model.config.max_text_len
    processor = model.processor
    todo = []
    for index in range(len(reader)):
        sample = reader[index]
        line = int(sample.metadata["line"])
        if line in done:
            report.counts["already_done"] += 1
            continue
        todo.append((line, sample))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="caption", desc="pseudo-label", dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as sink, open(progress_file, "a") as log:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            loaded, queries, entity_lists = [], [], []
            for line, sample in batch:
                entities = _entities(sample, phrases, find_noun_phrases, find_phrase_spans)
                if not entities:
                    report.counts["skipped_no_phrases"] += 1
                    _mark(log, line)
                    continue
                check = check_phrases(processor.tokenizer, sample.caption, [e["tokens_positive"] for e in entities],
                                      max_length=limit)
                for j in check.unreadable():
                    report.phrases.skip(PHRASE_PROBLEMS[check.status[j]],
                                        f"{captions}:{line} {entities[j]['phrase']!r}")
                usable = [(e, t) for e, t, s in zip(entities, check.tokens, check.status) if s == "ok"]
                if not usable:
                    report.counts["skipped_no_readable_phrase"] += 1
                    _mark(log, line)
                    continue
                try:
                    image = processor.load_image(sample.image_path, min_size, max_size,
                                                 frame=ImageFrame.matching(sample.width, sample.height))
                except ImageLoadError as exc:
                    report.counts["skipped_unreadable_image"] += 1
                    report.failed.append(str(exc))
                    continue  # not marked: a later run retries it (the file may be fixed)
                queries.append(TextQuery(len(loaded), sample.caption, [list(t) for _, t in usable],
                                         list(range(len(usable)))))
                loaded.append((line, sample, image))
                entity_lists.append([e for e, _ in usable])
            if loaded:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    parts = predict(model, processor, [x[2] for x in loaded], queries, min_size=min_size, max_size=max_size,
                                    batch_size=len(loaded), max_detections_per_prompt=max_detections)
                for (line, sample, image), dets, entities in zip(loaded, parts, entity_lists):
                    record = _record(sample, image, dets[0], entities, threshold, nms, report.counts)
                    if record is not None and record["boxes_kept"] >= min_boxes and record["boxes_kept"] > 0:
                        kept = record.pop("boxes_kept")
                        sink.write(json.dumps(caption_record(**record), separators=(",", ":")) + "\n")
                        sink.flush()
                        report.counts["captions_written"] += 1
                        report.counts["boxes_kept"] += kept
                    else:
                        report.counts["skipped_too_few_boxes"] += 1
                    _mark(log, line)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if report.counts["captions_written"] == 0 and not report.counts["already_done"]:
        warnings.warn(f"pseudo-labelling wrote no caption to {out} (threshold {threshold}, min_boxes {min_boxes}); "
                      "see the report's counts", stacklevel=2)
    return report


def _mark(log, line: int) -> None:
    log.write(f"{line}\n")
    log.flush()


def _entities(sample, phrases: str, find_noun_phrases, find_phrase_spans) -> list[dict[str, Any]]:
    """The phrases to ground: the line's entities (their own spans), or noun phrases found by the chunker."""
    if phrases == "entities":
        spans = sample.metadata.get("entities_tokens_positive") or []
        return [{"phrase": " ".join(sample.caption[s:e] for s, e in entity), "tokens_positive": [tuple(x) for x in entity]}
                for entity in spans if entity]
    found = find_noun_phrases(sample.caption)
    if not found:
        return []
    return [{"phrase": p, "tokens_positive": s} for p, s in zip(found, find_phrase_spans(sample.caption, found))]


def _record(sample, image, detections, entities, threshold: float, nms: float | None, counts: Counter):
    """The caption line of one image: kept boxes grouped by entity (None when nothing was kept)."""
    from glip_data import batched_nms

    from .postprocess import passes_threshold

    keep = passes_threshold(detections.scores, threshold)
    boxes, scores, labels = detections.boxes[keep], detections.scores[keep], detections.labels[keep]
    counts["boxes_below_threshold"] += int((~keep).sum())
    if nms is not None and boxes.numel():
        order = batched_nms(boxes, scores, torch.zeros_like(labels), nms, legacy=True)
        counts["boxes_removed_by_nms"] += int(boxes.shape[0] - order.numel())
        boxes, scores, labels = boxes[order], scores[order], labels[order]
    if boxes.numel() == 0:
        return None
    grouped = []
    for index, entity in enumerate(entities):
        mine = labels == index
        if bool(mine.any()):
            grouped.append({"phrase": entity["phrase"], "tokens_positive": [list(s) for s in entity["tokens_positive"]],
                            "boxes": boxes[mine].tolist(), "scores": [round(float(s), 5) for s in scores[mine]]})
    extra = {"image_id": sample.metadata.get("image_id")} if sample.metadata.get("image_id") is not None else {}
    return {"image": sample.metadata["file_name"], "width": image.width, "height": image.height,
            "caption": sample.caption, "entities": grouped, "box_convention": "official", "boxes_kept": len(boxes),
            "source_line": int(sample.metadata["line"]), **extra}


# ---------------------------------------------------------------------------------------------------------------------
# grading


@dataclass
class PseudoLabelGrade:
    """Precision and recall of pseudo-labels against the true boxes, at an IoU threshold, matched per entity."""

    iou_threshold: float
    predicted: int
    true: int
    matched: int
    captions: int

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.true if self.true else 0.0

    def summary(self) -> str:
        return (f"pseudo-labels vs ground truth over {self.captions} captions: precision {self.precision:.3f} "
                f"({self.matched}/{self.predicted}), recall {self.recall:.3f} ({self.matched}/{self.true}) at IoU "
                f">= {self.iou_threshold}")

    def to_dict(self) -> dict[str, Any]:
        return {"iou_threshold": self.iou_threshold, "predicted": self.predicted, "true": self.true,
                "matched": self.matched, "captions": self.captions, "precision": self.precision,
                "recall": self.recall}


def _lines_by_image(path: str | os.PathLike) -> dict[str, dict]:
    out = {}
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            if raw.strip():
                record = json.loads(raw)
                out[record["image"]] = record
    return out


def grade_pseudo_labels(predicted: str | os.PathLike, truth: str | os.PathLike,
                        iou_threshold: float = 0.5) -> PseudoLabelGrade:
    """Grade a pseudo-label file against a caption file with the true boxes (e.g. the synthetic world's
    ``captions_train_gt.jsonl``): per image and entity (same spans), greedy one-to-one matching by score at
    ``IoU >= iou_threshold`` (continuous boxes). Captions of the truth file the predictions skipped count as missed.
    """
    from glip_data import box_iou

    pred, gt = _lines_by_image(predicted), _lines_by_image(truth)
    predicted_n = true_n = matched = 0
    for image, record in gt.items():
        truth_entities = {json.dumps(e["tokens_positive"]): e for e in record.get("entities", [])}
        true_n += sum(len(e.get("boxes", [])) for e in truth_entities.values())
        for entity in (pred.get(image) or {}).get("entities", []):
            boxes = torch.tensor(entity["boxes"], dtype=torch.float64).reshape(-1, 4)
            predicted_n += len(boxes)
            target = truth_entities.get(json.dumps(entity["tokens_positive"]))
            if target is None or not target.get("boxes") or not len(boxes):
                continue
            ious = box_iou(boxes, torch.tensor(target["boxes"], dtype=torch.float64).reshape(-1, 4), legacy=False)
            used = torch.zeros(ious.shape[1], dtype=torch.bool)
            for row in torch.tensor(entity["scores"]).argsort(descending=True).tolist():
                candidates = (ious[row] >= iou_threshold) & ~used
                if bool(candidates.any()):
                    used[int(torch.where(candidates, ious[row], torch.tensor(-1.0, dtype=ious.dtype)).argmax())] = True
                    matched += 1
    return PseudoLabelGrade(iou_threshold, predicted_n, true_n, matched, len(gt))
