"""Self-training at web scale: a teacher labels WebDataset shards, under ``torchrun``, exactly once.

Input: tar shards in img2dataset's layout (``glip_data.webdataset``: per sample ``{key}.jpg`` + ``{key}.txt``
caption [+ ``{key}.json`` metadata]; a folder, a glob, a brace range or a list file), or, with a class list, image
shards or a folder of images. Output: a folder holding, per input shard ``NAME``,

* ``NAME.tar`` -- per labelled sample ``{key}.json`` (a caption line of ``glip_data.CaptionReader``'s format plus
  the input ``key``: the caption, its phrases with character spans, per phrase ``boxes`` x1, y1, x2, y2 in
  input-image pixels and ``scores``) and ``{key}.<ext>`` (the image bytes, copied), so the folder is a glip-data
  shard folder ``glip train`` streams (``kind: shards``) and ``glip-data inspect`` counts;
* ``NAME_stats.json`` -- its manifest entry: the input shard, its sample count, the samples written, the skips by
  reason with every skipped sample named;

plus ``index.json`` (the manifest: every finished shard, written by rank 0 when a run starts and ends) and
``job.json`` (the settings and the teacher's weights digest; a rerun with other ones is refused).

The rules that make the output the same for any number of processes and restarts:

* the unit of work is an input shard; a shard is finished when ``NAME.tar`` exists (its entry is written first,
  both under temporary names renamed into place), so a killed process leaves no partial shard, only temporaries
  the next start removes;
* rank 0 holds the output folder's lock for the job (a second job is refused), lists the unfinished shards and
  hands the same list to every rank, which takes every ``world``-th one;
* a shard's samples are read in order and the usable ones (a caption, a readable image, a phrase the teacher can
  read) batched as ``[k * B, (k + 1) * B)``: the same batches, so the same numbers, whatever the world size (the
  model in eval mode; on CPUs the thread count of each process can change the last bits of a float).

Skipped samples (no caption, bad metadata, unreadable image, no phrase, no readable phrase) are counted and named
per shard and make the exit code 1; samples labelled with fewer than ``min_boxes`` boxes are *filtered* (counted
and named per shard, not a skip: the teacher read them, as ``glip_train.pseudo_label`` counts them); a shard that is not a readable archive is named, not written, and retried by the next
run. See ``docs/self_training.md``.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .pseudo_label import group_by_entity

__all__ = ["ShardJob", "ShardJobReport", "InputShard", "open_shard_job", "ground_batch", "group_by_entity",
           "weights_digest", "write_coco"]

JOB_NAME = "job.json"
STATS_SUFFIX = "_stats.json"
#: settings that change the labels: a rerun into the same folder must use the same ones
LABEL_SETTINGS = ("mode", "classes", "threshold", "nms", "min_boxes", "phrases", "max_detections", "min_size",
                  "max_size", "batch_size", "shard_size")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class InputShard:
    """One unit of work: a tar shard, or a slice of an image folder (``files``, relative to ``path``)."""

    name: str
    path: Path
    files: list[str] | None = None

    def samples(self):
        """``(key, {extension: bytes})`` in order (a folder slice: the key is the file's relative path without its
        extension)."""
        from glip_data.webdataset import iter_tar_samples

        if self.files is None:
            for _, key, members in iter_tar_samples(self.path):
                yield key, members
            return
        for relative in self.files:
            stem, _, ext = relative.rpartition(".")
            try:
                data = (self.path / relative).read_bytes()
            except OSError:
                data = b""  # named as an unreadable image
            yield stem, {ext.lower(): data}

    def describe(self) -> str:
        """The shard's absolute path (a folder slice: the folder and its first and last file)."""
        path = self.path.resolve()
        return str(path) if self.files is None else f"{path} ({self.files[0]} ... {self.files[-1]})"


def input_shards(source: str | os.PathLike, *, images_ok: bool, shard_size: int) -> list[InputShard]:
    """The input shards of ``source`` (``glip_data.webdataset.resolve_shards``); with ``images_ok``, a folder of
    images (and no shards) is cut into slices of ``shard_size`` files in sorted order.

    Raises:
        glip_data.webdataset.ShardListError: nothing to read, missing shards, or two shards with the same name.
    """
    from glip_data.webdataset import ShardListError, is_shard_path, resolve_shards, shard_stem

    path = Path(source)
    if images_ok and path.is_dir() and not any(is_shard_path(p.name) for p in path.iterdir()):
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ShardListError(f"{path}: a folder without .tar shards or images")
        return [InputShard(f"images-{i // shard_size:05d}", path, files[i:i + shard_size])
                for i in range(0, len(files), shard_size)]
    shards = [InputShard(shard_stem(p), p) for p in resolve_shards(source)]
    seen: dict[str, Path] = {}
    for shard in shards:
        if shard.name in seen:
            raise ShardListError(f"{seen[shard.name]} and {shard.path} would both be written as {shard.name}.tar; "
                                 "give shards distinct names")
        seen[shard.name] = shard.path
    return shards


# ---------------------------------------------------------------------------------------------------------------------
# the teacher's labels of one batch


def ground_batch(model: Any, images: list[Any], captions: list[str], entities: list[list[dict[str, Any]]],
                 tokens: list[list[list[int]]], *, max_detections: int, min_size: int | None,
                 max_size: int | None) -> list[Any]:
    """Ground each caption's entities on its image, all images in one padded batch; the detections of each image
    (``glip_train.postprocess.Detections``, labels index its entities), in input-image pixels."""
    from .inference import predict
    from .processing_glip import TextQuery

    queries = [TextQuery(i, caption, [list(t) for t in toks], list(range(len(toks))))
               for i, (caption, toks) in enumerate(zip(captions, tokens))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = predict(model, model.processor, images, queries, min_size=min_size, max_size=max_size,
                        batch_size=len(images), max_detections_per_prompt=max_detections)
    return [dets[0] for dets in parts]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer of ``model`` (which teacher labelled a folder)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# the job


@dataclass
class ShardJobReport:
    """What a job produced (rank 0 sees everything; other ranks their own shards).

    Attributes:
        out: the output folder; shards: input shards; done_before: finished by earlier runs; labelled: finished by
        this run (all ranks); failed: ``(shard, message)`` of shards that could not be read (retried next run);
        counts: samples read / written / filtered (too few boxes) and boxes, all finished shards; skipped: every skipped sample of every
        finished shard (a ``glip_data.SkipReport``, to_dict form merged).
    """

    out: Path
    shards: int = 0
    done_before: int = 0
    labelled: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    skipped: Any = None

    def summary(self) -> str:
        c = self.counts
        return (f"glip pseudo-label: {self.labelled} shards labelled, {self.done_before} done before, "
                f"{len(self.failed)} unreadable of {self.shards}; {c['samples']} samples, {c['written']} written "
                f"({c['boxes_kept']} boxes), {c['filtered']} with too few boxes; {self.skipped.summary() if self.skipped else 'skipped nothing'} -> "
                f"{self.out}")

    def exit_code(self, ok: int = 0, skipped: int = 1) -> int:
        return skipped if self.failed or (self.skipped is not None and self.skipped.total) else ok


class ShardJob:
    """A pseudo-labelling job over shards, opened before the teacher loads (inputs checked, output locked, the
    unfinished shards listed), run with :meth:`run`, closed with :meth:`close` (``with`` works).

    Every rank of a ``torchrun`` job opens it (collectively: rank 0 locks and lists, every rank gets the list).

    Args:
        source: shards (folder, glob, brace range, list file, one shard) or, with ``classes``, an image folder.
        out: the output folder (on a filesystem every node sees).
        settings: the labelling settings (:data:`LABEL_SETTINGS`); a folder labelled with others is refused.
        command: how messages and the lock name the job.

    Raises:
        glip_data.webdataset.ShardListError: nothing to read or missing shards; glip_data.io.OutputLockedError:
            another job writes ``out``; ValueError: ``out`` holds labels made with other settings.
    """

    def __init__(self, source: str | os.PathLike, out: str | os.PathLike, settings: dict[str, Any], *,
                 command: str = "glip pseudo-label", stream: Any = "stderr"):
        from glip_data.io import RunLock
        from glip_data.report import SkipReport

        from .evaluation.distributed import dist_info

        self.out, self.settings, self.command = Path(out), dict(settings), command
        self.rank, self.world = dist_info()
        self.is_main = self.rank == 0
        self.lock = None
        self.skips = SkipReport(command, stream=stream if self.is_main else None)  # named as they happen (rank 0)
        self.shards = input_shards(source, images_ok=settings.get("mode") == "classes",
                                   shard_size=int(settings.get("shard_size") or 1000))
        self.source = str(source)
        error, todo = None, None
        if self.is_main:
            try:
                self.lock = RunLock(self.out, command).acquire()  # leftovers of killed writes removed
                self._check_settings()
                todo = [i for i, shard in enumerate(self.shards) if not self.finished(shard.name)]
                self.write_index()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
        decided = _from_main((error is None, str(error) if error else None, type(error).__name__, todo))
        if not decided[0]:
            self.close()
            if error is not None:
                raise error
            raise _remote_error(decided[2], decided[1])
        self.todo: list[int] = decided[3]

    # ---- the output folder ---------------------------------------------------------------------------------------
    def finished(self, name: str) -> bool:
        return (self.out / f"{name}.tar").is_file() and (self.out / f"{name}{STATS_SUFFIX}").is_file()

    def _job_record(self) -> dict[str, Any]:
        return {"format": "glip-pseudo-label-job", "source": self.source,
                "shards": [{"name": s.name, "input": s.describe()} for s in self.shards],
                "settings": {k: self.settings.get(k) for k in LABEL_SETTINGS}}

    def _check_settings(self) -> None:
        from glip_data.io import atomic_write_json

        path = self.out / JOB_NAME
        mine = self._job_record()
        if path.is_file():
            previous = json.loads(path.read_text(encoding="utf-8"))
            differences = [f"{k}: {previous['settings'].get(k)!r} before, {mine['settings'][k]!r} now"
                           for k in LABEL_SETTINGS if previous.get("settings", {}).get(k) != mine["settings"][k]]
            if previous.get("shards") != mine["shards"]:
                differences.append(f"the input shards ({len(previous.get('shards', []))} before, "
                                   f"{len(mine['shards'])} now, or other ones)")
            if differences:
                raise ValueError(f"{self.out} holds pseudo-labels made with other settings ({'; '.join(differences)}"
                                 "); rerun with the same ones to finish it, or write somewhere else")
            mine["teacher_sha256"] = previous.get("teacher_sha256")
        atomic_write_json(path, mine)

    def check_teacher(self, model: Any) -> None:
        """Refuse a teacher other than the one that labelled the finished shards (rank 0 decides)."""
        from glip_data.io import atomic_write_json

        error = None
        if self.is_main:
            record = json.loads((self.out / JOB_NAME).read_text(encoding="utf-8"))
            digest = weights_digest(model)
            if record.get("teacher_sha256") not in (None, digest):
                error = (f"{self.out} was labelled by another teacher (weights sha256 {record['teacher_sha256'][:12]}"
                         f"..., now {digest[:12]}...); use the same weights to finish it, or write somewhere else")
            else:
                record["teacher_sha256"] = digest
                atomic_write_json(self.out / JOB_NAME, record)
        error = _from_main(error)
        if error:
            raise ValueError(error)

    def entries(self) -> list[dict[str, Any]]:
        """The manifest entries of the finished shards, in input order."""
        out = []
        for shard in self.shards:
            if self.finished(shard.name):
                out.append(json.loads((self.out / f"{shard.name}{STATS_SUFFIX}").read_text(encoding="utf-8")))
        return out

    def write_index(self, failed: list[tuple[str, str]] = ()) -> dict[str, Any]:
        """``index.json``: the glip-data shard index of the finished shards, with their manifest entries (rank 0)."""
        from glip_data.io import atomic_write_json
        from glip_data.shards import FORMAT_NAME, INDEX_NAME

        entries = self.entries()
        index = {"format": FORMAT_NAME, "version": 1, "kind": "tar", "compress": False, "records": "captions",
                 "num_samples": sum(e["written"] for e in entries),
                 "shards": [{**e, "name": f"{e['name']}.tar", "count": e["written"]} for e in entries],
                 "unfinished": [s.name for s in self.shards if not self.finished(s.name)],
                 "failed": [{"shard": name, "error": message} for name, message in failed],
                 "image_root": None, "categories": {}, "source": self.source,
                 "settings": {k: self.settings.get(k) for k in LABEL_SETTINGS}}
        atomic_write_json(self.out / INDEX_NAME, index, indent=1)
        return index

    # ---- labelling -----------------------------------------------------------------------------------------------
    def run(self, model: Any, *, progress: bool = True) -> ShardJobReport:
        """Label this rank's share of the unfinished shards; every rank must call it. Returns the report (complete
        on rank 0)."""
        from glip_data.report import SkipReport

        from .evaluation.distributed import barrier, gather_to_main

        self.check_teacher(model)
        model.eval()
        mine = self.todo[self.rank::self.world]
        failed: list[tuple[str, str]] = []
        bar = None
        if progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=len(mine), unit="shard", desc=f"{self.command} (rank 0 of {self.world})",
                       dynamic_ncols=True)
        for i in mine:
            shard = self.shards[i]
            try:
                self.label_shard(model, shard)
            except ValueError as err:  # glip_data.webdataset.CorruptShardError: named, not written, retried later
                from glip_data.webdataset import CorruptShardError

                if not isinstance(err, CorruptShardError):
                    raise
                failed.append((shard.name, str(err)))
                self.skips.skip("unreadable shard", shard.describe(), str(err))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        gathered = gather_to_main(failed)
        barrier()
        report = ShardJobReport(self.out, shards=len(self.shards), done_before=len(self.shards) - len(self.todo))
        if self.is_main:
            report.failed = [f for part in gathered for f in part]
            report.labelled = len(self.todo) - len(report.failed)
            report.skipped = SkipReport(self.command, stream=None)
            for entry in self.write_index(report.failed)["shards"]:  # every finished shard, this run's and before
                report.counts.update({"samples": entry["samples"], "written": entry["written"],
                                      "boxes_kept": entry["boxes_kept"],
                                      "filtered": entry.get("filtered", {}).get("total", 0)})
                report.skipped.merge(entry["skipped"])
        return report

    def label_shard(self, model: Any, shard: InputShard) -> dict[str, Any]:
        """Label one shard into ``NAME.tar`` and its manifest entry (both atomic; the entry first)."""
        import tarfile

        from glip_data.io import atomic_open, atomic_write_json
        from glip_data.report import SkipReport
        from glip_data.webdataset import add_member

        # every skipped sample of the shard, and the phrases the teacher cannot read (of samples written or not)
        named = SkipReport(self.command, stream=None, keep=1 << 62)
        named.phrases = SkipReport(self.command, stream=None, keep=1 << 62)
        named.filtered = SkipReport(self.command, stream=None, keep=1 << 62)  # labelled, too few boxes: not a skip
        counts: Counter = Counter()
        records: list[tuple[str, bytes, str, dict[str, Any]]] = []
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            if batch:
                records.extend(self._label_batch(model, batch, named, counts))
                batch.clear()

        for key, members in shard.samples():
            counts["samples"] += 1
            item = self._prepare(model, shard, key, members, named)
            if item is not None:
                batch.append(item)
                if len(batch) == int(self.settings.get("batch_size") or 1):
                    flush()
        flush()
        entry = {"name": shard.name, "input": shard.describe(), "samples": counts["samples"],
                 "written": len(records), "boxes_kept": counts["boxes_kept"],
                 "boxes_below_threshold": counts["boxes_below_threshold"],
                 "boxes_removed_by_nms": counts["boxes_removed_by_nms"], "skipped": named.to_dict(),
                 "skipped_phrases": named.phrases.to_dict(), "filtered": named.filtered.to_dict()}
        atomic_write_json(self.out / f"{shard.name}{STATS_SUFFIX}", entry)  # the entry first: the shard vouches
        with atomic_open(self.out / f"{shard.name}.tar", "wb") as fh, \
                tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, image, ext, record in records:
                add_member(tar, f"{key}.json", json.dumps(record, separators=(",", ":")).encode("utf-8"))
                add_member(tar, f"{key}.{ext}", image)
        return entry

    def _skip(self, named: Any, reason: str, item: str, detail: str | None = None) -> None:
        named.skip(reason, item, detail)
        self.skips.skip(reason, item, detail)

    def _prepare(self, model: Any, shard: InputShard, key: str, members: dict[str, bytes],
                 named: Any) -> dict[str, Any] | None:
        """A sample ready for the teacher (image loaded, phrases checked), or None (skipped and named)."""
        from glip_data import ImageFrame, ImageLoadError
        from glip_data.webdataset import sample_caption, sample_image, sample_metadata

        where = f"{shard.path}#{key}" if shard.files is None else str(shard.path / key)
        try:
            meta = sample_metadata(members)
        except ValueError as err:
            self._skip(named, "bad metadata", where, str(err))
            return None
        found = sample_image(members)
        if found is None:
            self._skip(named, "no image", where)
            return None
        ext, data = found
        width, height = meta.get("width"), meta.get("height")
        frame = ImageFrame.matching(width, height) if isinstance(width, int) and isinstance(height, int) \
            else "stored"  # no recorded size: the pixels as stored, as the official loader reads them
        try:
            image = model.processor.load_image(data, self.settings.get("min_size"), self.settings.get("max_size"),
                                               frame=frame)
        except ImageLoadError as err:
            self._skip(named, "unreadable image", where, str(err))
            return None
        item = {"key": key, "where": where, "image": image, "bytes": data, "ext": ext, "meta": meta}
        if self.settings.get("mode") == "classes":
            return item
        caption = sample_caption(members, meta)
        if caption is None:
            self._skip(named, "no caption", where)
            return None
        entities = self._entities(caption, meta, where, named)
        if entities is None:
            return None
        item.update(caption=caption, entities=entities[0], tokens=entities[1])
        return item

    def _entities(self, caption: str, meta: dict[str, Any], where: str,
                  named: Any) -> tuple[list[dict[str, Any]], list[list[int]]] | None:
        """The phrases to ground and their tokens (unreadable phrases named), or None (the sample is skipped)."""
        from glip_data import PHRASE_PROBLEMS, ReaderError, check_phrases, find_noun_phrases, find_phrase_spans
        from glip_data.readers.base import check_spans

        if self.settings.get("phrases", "entities") == "entities":
            entities = []
            try:
                for e, entity in enumerate(meta.get("entities") or []):
                    spans = check_spans(entity.get("tokens_positive"), caption, f"entity {e}")
                    phrase = entity.get("phrase") or " ".join(caption[s:t] for s, t in spans)
                    entities.append({"phrase": phrase, "tokens_positive": [list(s) for s in spans]})
            except (ReaderError, AttributeError, TypeError) as err:
                self._skip(named, "bad entities", where, str(err))
                return None
        else:
            found = find_noun_phrases(caption)
            entities = [{"phrase": p, "tokens_positive": [list(s) for s in spans]}
                        for p, spans in zip(found, find_phrase_spans(caption, found))]
        entities = [e for e in entities if e["tokens_positive"]]
        if not entities:
            self._skip(named, "no phrases", where, "no entities in its metadata; --phrases chunker finds noun "
                       "phrases in plain captions" if self.settings.get("phrases", "entities") == "entities" else None)
            return None
        check = check_phrases(self.settings["tokenizer"], caption, [e["tokens_positive"] for e in entities],
                              max_length=self.settings["max_text_len"])
        for j in check.unreadable():
            self._skip(named.phrases, PHRASE_PROBLEMS[check.status[j]], f"{where} {entities[j]['phrase']!r}")
        usable = [(e, t) for e, t, s in zip(entities, check.tokens, check.status) if s == "ok"]
        if not usable:
            self._skip(named, "no readable phrase", where)
            return None
        return [e for e, _ in usable], [list(t) for _, t in usable]

    def _label_batch(self, model: Any, batch: list[dict[str, Any]], named: Any,
                     counts: Counter) -> list[tuple[str, bytes, str, dict[str, Any]]]:
        from glip_data.readers import caption_record

        s = self.settings
        images = [item["image"] for item in batch]
        if s.get("mode") == "classes":
            from .inference import detect

            classes = s["classes"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results = detect(model, model.processor, images, classes=classes, threshold=0.0,
                                 max_detections=s["max_detections"], min_size=s.get("min_size"),
                                 max_size=s.get("max_size"), batch_size=len(images))
            grouped_all = []
            for result in results:
                grouped_all.append(_class_entities(result, classes, s["threshold"], s.get("nms"), counts))
        else:
            detections = ground_batch(model, images, [item["caption"] for item in batch],
                                      [item["entities"] for item in batch], [item["tokens"] for item in batch],
                                      max_detections=s["max_detections"], min_size=s.get("min_size"),
                                      max_size=s.get("max_size"))
            grouped_all = [(item["caption"], *group_by_entity(dets, item["entities"], s["threshold"], s.get("nms"),
                                                              counts))
                           for item, dets in zip(batch, detections)]
        # class lists: a caption needs a class found, so at least one box
        min_boxes = int(s.get("min_boxes", 1)) if s.get("mode") != "classes" else max(1, int(s.get("min_boxes", 1)))
        out = []
        for item, (caption, entities, kept) in zip(batch, grouped_all):
            if kept < min_boxes:
                named.filtered.skip("too few boxes", item["where"], f"{kept} at or above the threshold")
                continue
            counts["boxes_kept"] += kept
            extra = {"image_id": item["meta"]["image_id"]} if item["meta"].get("image_id") is not None else {}
            record = caption_record(f"{item['key']}.{item['ext']}", item["image"].width, item["image"].height,
                                    caption, entities, box_convention="official", **extra)
            out.append((item["key"], item["bytes"], item["ext"], {"key": item["key"], **record}))
        return out

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "ShardJob":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _class_entities(result: dict[str, Any], classes: list[str], threshold: float, nms: float | None,
                    counts: Counter) -> tuple[str, list[dict[str, Any]], int]:
    """A detection result (every detection, threshold 0) as a caption line: the detection prompt of the classes
    found at or above ``threshold`` (in class-list order), one entity per class with its ``category_id`` (1-based
    position in the class list)."""
    from glip_data import detection_prompt

    from .postprocess import Detections, passes_threshold

    labels = result["labels"]
    found = sorted({int(x) for x in labels[passes_threshold(result["scores"], threshold)].tolist()})
    if not found:  # nothing at or above the threshold: no prompt to write; the caller names the image as skipped
        counts["boxes_below_threshold"] += len(labels)
        return "", [], 0
    caption, spans = detection_prompt([classes[i] for i in found])
    entities = [{"phrase": classes[i], "tokens_positive": [list(x) for x in span], "category_id": i + 1}
                for i, span in zip(found, spans)]
    position = {c: j for j, c in enumerate(found)}
    of_found = torch.tensor([int(x) in position for x in labels.tolist()], dtype=torch.bool)  # the others: below
    counts["boxes_below_threshold"] += int((~of_found).sum())
    relabelled = torch.tensor([position.get(int(x), -1) for x in labels.tolist()], dtype=torch.int64)
    grouped, kept = group_by_entity(Detections(result["boxes"][of_found], result["scores"][of_found],
                                               relabelled[of_found]), entities, threshold, nms, counts)
    return caption, grouped, kept


def _from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    from .training.distributed import all_gather

    return all_gather(obj)[0]


class RemoteError(RuntimeError):
    """An error rank 0 met, raised on the other ranks with its message."""


def _remote_error(kind: str, message: str) -> Exception:
    from glip_data.io import OutputLockedError
    from glip_data.webdataset import ShardListError

    known = {"OutputLockedError": OutputLockedError, "ShardListError": ShardListError, "ValueError": ValueError,
             "FileExistsError": FileExistsError}
    return known.get(kind, RemoteError)(message)


def open_shard_job(source: str | os.PathLike, out: str | os.PathLike, *, tokenizer: Any, max_text_len: int = 256,
                   command: str = "glip pseudo-label", stream: Any = "stderr", **settings: Any) -> ShardJob:
    """Open a :class:`ShardJob` (collectively under ``torchrun``) with the labelling ``settings``
    (:data:`LABEL_SETTINGS`); ``tokenizer`` is the teacher's, to check phrases; ``stream`` where skips are named
    (None: only recorded)."""
    return ShardJob(source, out, {**settings, "tokenizer": tokenizer, "max_text_len": max_text_len},
                    command=command, stream=stream)


def write_coco(out_dir: str | os.PathLike, path: str | os.PathLike, classes: list[str]) -> Path:
    """A COCO detection file of a class-list job's finished shards (rank 0): images by ``file_name`` =
    ``{key}.{ext}`` (an image folder's relative path; for tar shards, the names ``tar -x`` gives), boxes as
    ``[x, y, w, h]`` with their ``score``, categories in class-list order."""
    from glip_data import xyxy_to_xywh
    from glip_data.io import atomic_write_json
    from glip_data.shards import INDEX_NAME
    from glip_data.webdataset import iter_tar_samples

    out_dir = Path(out_dir)
    index = json.loads((out_dir / INDEX_NAME).read_text(encoding="utf-8"))
    images, annotations = [], []
    for shard in index["shards"]:
        for _, key, members in iter_tar_samples(out_dir / shard["name"]):
            record = json.loads(members["json"].decode("utf-8"))
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": record["image"], "width": record["width"],
                           "height": record["height"]})
            for entity in record["entities"]:
                boxes = torch.tensor(entity["boxes"], dtype=torch.float64).reshape(-1, 4)
                for box, score in zip(xyxy_to_xywh(boxes, legacy=False).tolist(), entity["scores"]):
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": entity["category_id"], "bbox": [round(v, 3) for v in box],
                                        "area": round(box[2] * box[3], 3), "iscrowd": 0, "score": score})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return atomic_write_json(path, {"images": images, "annotations": annotations, "categories": categories})
