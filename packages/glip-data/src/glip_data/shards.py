"""Sharded, streaming data for large mixtures: write any reader to shards, stream them split by rank and worker.

Two shard kinds, both listed in an ``index.json`` next to them:

* ``tar`` (WebDataset-style): ``shard-000000.tar`` holding, per sample, ``<key>.json`` (the record below) and
  ``<key>.jpg`` / ``.png`` / ... (the original image bytes, copied, not re-encoded). Self-contained: move the folder
  anywhere. ``.tar.gz`` with ``compress=True``.
* ``jsonl``: ``shard-000000.jsonl`` (``.jsonl.gz`` with ``compress=True``), one record per line whose ``image`` is a
  path — absolute, or relative to ``image_root`` given at read time (or the one recorded in the index).

A record is a serialised :class:`~glip_data.sample.GroundingSample`::

    {"key": "000000042", "image": "000000042.jpg", "width": 640, "height": 480,
     "caption": "person. dog", "boxes": [[x1, y1, x2, y2], ...], "tokens_positive": [[[0, 6]], ...],
     "labels": [1, ...], "metadata": {...}}

Boxes are stored as the reader produced them (``metadata["box_convention"]`` says which convention).

:class:`ShardedStream` is an ``IterableDataset`` that reads its share of the shards only: the shards (optionally
shuffled per epoch with a seed shared by all ranks) are dealt round-robin to the ``world_size * num_workers``
readers (``torch.distributed`` rank and world size, ``torch.utils.data.get_worker_info()``), so a multi-node job never
loads every annotation in every worker. With fewer shards than readers every reader scans every shard and keeps every
``total``-th record (correct, but slower: write more shards). ``equal_split=True`` truncates every reader to the
smallest share (known from the index), so all ranks run the same number of steps (no DDP hang at the epoch's end).
:class:`MixedStream` mixes several streams with seeded weights.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from glip_data.images import ImageFrame, load_image as _load_image
from glip_data.sample import GroundingSample

INDEX_NAME = "index.json"
FORMAT_NAME = "glip-data-shards"


# ---------------------------------------------------------------------------------------------------------------------
# records


def _jsonable(value: Any) -> Any:
    """Metadata -> plain JSON types (tensors and numpy values become lists/numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def sample_to_record(sample: GroundingSample, key: str, image: str) -> dict[str, Any]:
    """Serialise a sample (without its decoded image) to a JSON-ready record."""
    return {
        "key": key,
        "image": image,
        "width": int(sample.width),
        "height": int(sample.height),
        "caption": sample.caption,
        "boxes": sample.boxes.tolist(),
        "tokens_positive": [[list(span) for span in spans] for spans in sample.tokens_positive],
        "labels": sample.labels.tolist(),
        "metadata": _jsonable(sample.metadata),
    }


def record_to_sample(record: dict[str, Any], image_path: str, where: str = "") -> GroundingSample:
    """Inverse of :func:`sample_to_record` (the key goes to ``metadata["shard_key"]``); errors name ``where``."""
    missing = [k for k in ("width", "height", "caption", "boxes", "tokens_positive", "labels") if k not in record]
    if missing:
        raise ValueError(f"{where}: record misses {missing}")
    try:
        return GroundingSample(
            image_path=image_path,
            width=int(record["width"]),
            height=int(record["height"]),
            boxes=torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4),
            caption=record["caption"],
            tokens_positive=[[tuple(span) for span in spans] for spans in record["tokens_positive"]],
            labels=torch.tensor(record["labels"], dtype=torch.int64).reshape(-1),
            metadata={**record.get("metadata", {}), "shard_key": record.get("key")},
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: bad record: {err}") from None


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible archives
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    def __init__(self, out: Path, kind: str, compress: bool, prefix: str) -> None:
        self.out, self.kind, self.compress, self.prefix = out, kind, compress, prefix
        self.shards: list[dict[str, Any]] = []
        self._handle: Any = None
        self._raw: Any = None

    def _suffix(self) -> str:
        return {("tar", False): ".tar", ("tar", True): ".tar.gz",
                ("jsonl", False): ".jsonl", ("jsonl", True): ".jsonl.gz"}[(self.kind, self.compress)]

    def open_next(self) -> None:
        from glip_data.io import temporary_path

        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}{self._suffix()}"
        self._path = self.out / name
        self._raw = open(temporary_path(self._path), "wb")  # renamed into place when complete
        stream = gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0, filename="") if self.compress else self._raw
        if self.kind == "tar":
            self._handle = tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT)
            self._gz = stream if self.compress else None
        else:
            self._handle = stream
            self._gz = None
        self.shards.append({"name": name, "count": 0})

    def write(self, record: dict[str, Any], image_name: str | None, image_bytes: bytes | None) -> None:
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        if self.kind == "tar":
            _add_bytes(self._handle, f"{record['key']}.json", data)
            if image_name is not None:
                _add_bytes(self._handle, image_name, image_bytes)
        else:
            self._handle.write(data)
        self.shards[-1]["count"] += 1

    def close(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        if self.kind == "tar" and self._gz is not None:
            self._gz.close()
        self._raw.close()
        os.replace(self._raw.name, self._path)
        self._handle = self._raw = None

    def abort(self) -> None:
        """Drop the shard being written (an error stopped the run): its temporary file goes, nothing is renamed."""
        if self._handle is None:
            return
        for stream in (self._handle, self._gz, self._raw):
            try:
                if stream is not None:
                    stream.close()
            except (OSError, ValueError, tarfile.TarError):
                pass  # a half-written stream may refuse to finish; it is removed below
        Path(self._raw.name).unlink(missing_ok=True)
        self._handle = self._raw = None


def write_shards(
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    kind: Literal["tar", "jsonl"] = "tar",
    samples_per_shard: int = 1000,
    compress: bool = False,
    image_root: str | os.PathLike | None = None,
    prefix: str = "shard",
    progress: bool = True,
) -> dict[str, Any]:
    """Write every sample of a map-style dataset (any reader, a mixture, ...) to shards in ``out_dir``.

    Args:
        dataset: ``len()`` and ``dataset[i] -> GroundingSample`` (images are not decoded: tar shards copy the files).
        out_dir: created if needed; ``index.json`` and the shards are written there (locked against a second writer;
            each shard written under a temporary name and renamed; ``index.json`` removed first and written last, so
            an index always lists complete shards of its own run).
        kind: ``"tar"`` (images inside) or ``"jsonl"`` (image paths).
        samples_per_shard: records per shard (write at least ``world_size * num_workers`` shards for streaming).
        compress: gzip the shards.
        image_root: for ``jsonl``: store image paths relative to this folder (default: absolute paths).
        prefix: shard file-name prefix.
        progress: show a tqdm progress bar.

    Returns:
        The index (also written to ``out_dir/index.json``).
    """
    if kind not in ("tar", "jsonl"):
        raise ValueError(f"kind must be 'tar' or 'jsonl', got {kind!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    from glip_data.io import RunLock

    out = Path(out_dir)
    lock = None if RunLock.held_here(out) else RunLock(out, "glip-data shard").acquire()
    try:
        (out / INDEX_NAME).unlink(missing_ok=True)  # the index vouches for the shards: removed first, written last
        return _write_shards(dataset, out, kind, samples_per_shard, compress, image_root, prefix, progress)
    finally:
        if lock is not None:
            lock.release()


def _write_shards(dataset: Any, out: Path, kind: str, samples_per_shard: int, compress: bool,
                  image_root: str | os.PathLike | None, prefix: str, progress: bool) -> dict[str, Any]:
    from glip_data.io import atomic_write_json

    root = Path(image_root).resolve() if image_root is not None else None
    writer = _ShardWriter(out, kind, compress, prefix)
    indices: Any = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"writing {kind} shards", unit="sample")
    try:
        for i in indices:
            if i % samples_per_shard == 0:
                writer.open_next()
            sample = dataset[i]
            key = f"{i:09d}"
            src = Path(sample.image_path)
            if kind == "tar":
                try:
                    image_bytes = src.read_bytes()
                except OSError as err:
                    raise OSError(f"sample {i}: cannot read image {src}: {err}") from err
                ext = src.suffix.lower() or ".jpg"
                image_name = f"{key}{ext}"
                writer.write(sample_to_record(sample, key, image_name), image_name, image_bytes)
            else:
                path = src.resolve()
                image = os.path.relpath(path, root) if root is not None else str(path)
                writer.write(sample_to_record(sample, key, image), None, None)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    index = {
        "format": FORMAT_NAME,
        "version": 1,
        "kind": kind,
        "compress": bool(compress),
        "num_samples": sum(s["count"] for s in writer.shards),
        "shards": writer.shards,
        "image_root": str(root) if root is not None else None,
        "categories": {str(k): v for k, v in getattr(dataset, "categories", {}).items()},
        "source": repr(dataset),
    }
    atomic_write_json(out / INDEX_NAME, index, indent=1)
    return index


# ---------------------------------------------------------------------------------------------------------------------
# reading


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from the arguments, else ``torch.distributed`` when initialised, else ``(0, 1)``."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _kind_of(path: Path) -> str:
    name = path.name
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    raise ValueError(f"{path}: not a shard (expected .tar, .tar.gz, .jsonl or .jsonl.gz)")


def iter_shard(path: str | os.PathLike, *, load_image: bool = True, image_root: str | os.PathLike | None = None,
               keep: Any = None) -> Iterator[GroundingSample]:
    """Yield the samples of one shard, in order. ``keep(position) -> bool`` selects records by their position."""
    path = Path(path)
    kind = _kind_of(path)
    position = -1
    if kind == "jsonl":
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                position += 1
                if keep is not None and not keep(position):
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
                image = Path(record.get("image", ""))
                if not image.is_absolute() and image_root is not None:
                    image = Path(image_root) / image
                sample = record_to_sample(record, str(image), where)
                if load_image:
                    _attach(sample, image, where, where)
                yield sample
        return
    with tarfile.open(path, mode="r|*") as tar:
        # Members of one sample are consecutive and share the key (the name up to the first dot).
        group_key: str | None = None
        group: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            if key != group_key:
                if group_key is not None and (keep is None or keep(position)):
                    yield _from_group(path, group_key, group, load_image)
                group_key, group = key, {}
                position += 1
            if keep is None or keep(position):  # skipped records are not even read
                group[ext] = tar.extractfile(member).read()
        if group_key is not None and (keep is None or keep(position)):
            yield _from_group(path, group_key, group, load_image)


def _attach(sample: GroundingSample, source: Any, name: str, where: str) -> None:
    """Load ``source`` in the frame of the record's width/height into ``sample.image``, checked against them."""
    image = _load_image(source, where=name, frame=ImageFrame.matching(sample.width, sample.height))
    if image.size != (sample.width, sample.height):
        raise ValueError(f"{where}: image is {image.size[0]}x{image.size[1]} but the record says "
                         f"{sample.width}x{sample.height}")
    sample.image = image


def _from_group(path: Path, key: str, group: dict[str, bytes], load_image: bool) -> GroundingSample:
    where = f"{path}#{key}"
    if "json" not in group:
        raise ValueError(f"{where}: no {key}.json in the shard (members: {sorted(group)})")
    try:
        record = json.loads(group["json"].decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}.json: not valid JSON ({err})") from None
    image_name = record.get("image", "")
    ext = image_name.partition(".")[2]
    sample = record_to_sample(record, f"{path}#{image_name}", where)
    if load_image:
        if ext not in group:
            raise ValueError(f"{where}: the record names image {image_name!r}, which is not in the shard")
        _attach(sample, group[ext], f"{path}#{image_name}", where)
    return sample


def _resolve_source(source: Any) -> tuple[list[Path], dict[str, Any] | None, Path | None]:
    """Shard paths, the index (when there is one) and the folder of the index."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / INDEX_NAME
        if path.name == INDEX_NAME or path.suffix == ".json":
            if not path.is_file():
                raise FileNotFoundError(f"no shard index at {path}")
            index = json.loads(path.read_text(encoding="utf-8"))
            if index.get("format") != FORMAT_NAME:
                raise ValueError(f"{path}: not a glip-data shard index (format={index.get('format')!r})")
            return [path.parent / s["name"] for s in index["shards"]], index, path.parent
        return [path], None, None
    paths = [Path(p) for p in source]
    if not paths:
        raise ValueError("no shards given")
    return paths, None, None


class ShardedStream(IterableDataset):
    """Stream :class:`GroundingSample` s from shards, each (rank, worker) reading only its share.

    Args:
        source: a shard folder (with ``index.json``), an index file, one shard, or a list of shard paths.
        shuffle: shuffle the shard order every epoch (seeded by ``(seed, epoch)``, identical on every rank) and the
            samples within a reader's stream through a buffer of ``shuffle_buffer`` samples.
        seed: the seed.
        shuffle_buffer: size of the in-stream shuffle buffer (0: no sample shuffling; only with ``shuffle``).
        load_image: decode the images.
        image_root: for jsonl shards with relative paths (default: the index's ``image_root``).
        tokenizer, max_text_len: fill ``sample.positive_map`` (:func:`glip_data.positive_map.build_positive_map`).
        equal_split: every (rank, worker) yields the same number of samples (the smallest share; needs an index).
        rank, world_size: override ``torch.distributed`` (e.g. for another launcher).
    """

    def __init__(self, source: Any, *, shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 0,
                 load_image: bool = True, image_root: str | os.PathLike | None = None, tokenizer: Any = None,
                 max_text_len: int = 256, equal_split: bool = False, rank: int | None = None,
                 world_size: int | None = None) -> None:
        super().__init__()
        self.shards, self.index, folder = _resolve_source(source)
        for p in self.shards:
            _kind_of(p)
        self.counts = [int(s["count"]) for s in self.index["shards"]] if self.index else None
        self.num_samples = sum(self.counts) if self.counts is not None else None
        if image_root is None and self.index is not None and self.index.get("image_root"):
            image_root = self.index["image_root"]
        self.image_root = image_root
        self.categories = {int(k): v for k, v in self.index.get("categories", {}).items()} if self.index else {}
        self.shuffle, self.seed, self.shuffle_buffer = bool(shuffle), int(seed), int(shuffle_buffer)
        self.load_image = bool(load_image)
        self.tokenizer, self.max_text_len = tokenizer, int(max_text_len)
        if equal_split and self.counts is None:
            raise ValueError("equal_split needs shard counts: give the shard folder or its index.json")
        self.equal_split = bool(equal_split)
        self._rank, self._world = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = [int(i) for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        return order

    def assignment(self, reader: int, readers: int) -> tuple[list[int], bool, int | None]:
        """What reader ``reader`` of ``readers`` reads: ``(shard indices, strided, sample limit)``.

        With at least as many shards as readers, the reader gets every ``readers``-th shard of the epoch's order
        (``strided`` False). Otherwise it scans all shards and keeps the records whose global position is
        ``reader`` modulo ``readers`` (``strided`` True). ``limit`` is the equal-split cap or ``None``.
        """
        order = self._shard_order()
        if len(order) >= readers:
            limit = None
            if self.equal_split:
                limit = min(sum(self.counts[i] for i in order[r::readers]) for r in range(readers))
            return order[reader::readers], False, limit
        return order, True, (self.num_samples // readers if self.equal_split else None)

    def __iter__(self) -> Iterator[GroundingSample]:
        rank, world = dist_info(self._rank, self._world)
        worker, workers = _worker()
        readers = world * workers
        reader = rank * workers + worker
        mine, strided, limit = self.assignment(reader, readers)
        if strided and reader == 0:
            warnings.warn(f"{len(self.shards)} shards for {readers} readers: every reader scans every shard; "
                          "write more shards", stacklevel=2)
        stream = self._samples(mine, reader if strided else None, readers)
        if self.shuffle and self.shuffle_buffer > 1:
            stream = _buffer_shuffle(stream, self.shuffle_buffer,
                                     np.random.default_rng([self.seed, self.epoch, reader + 1]))
        for n, sample in enumerate(stream):
            if limit is not None and n >= limit:
                return
            yield sample

    def _samples(self, mine: list[int], strided: int | None, readers: int) -> Iterator[GroundingSample]:
        global_position = 0
        for i in mine:
            if strided is None:
                keep = None
            else:
                base = global_position

                def keep(pos: int, base: int = base) -> bool:
                    return (base + pos) % readers == strided

            for sample in iter_shard(self.shards[i], load_image=self.load_image, image_root=self.image_root,
                                     keep=keep):
                if self.tokenizer is not None:
                    from glip_data.positive_map import build_positive_map

                    sample.positive_map = build_positive_map(self.tokenizer, sample.caption, sample.tokens_positive,
                                                             max_len=self.max_text_len)
                yield sample
            if strided is not None:
                global_position += self.counts[i] if self.counts is not None else _count_records(self.shards[i])


def _count_records(path: Path) -> int:
    return sum(1 for _ in iter_shard(path, load_image=False))


def _buffer_shuffle(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    order = rng.permutation(len(buffer))
    for j in order:
        yield buffer[int(j)]


class MixedStream(IterableDataset):
    """A seeded weighted mixture of streams (each split by rank/worker on its own).

    Every step draws a stream with probabilities ``weights / sum(weights)`` (seeded by ``(seed, epoch, reader)``).
    With ``num_samples=None`` the epoch ends when the first stream runs out (the proportions hold throughout);
    otherwise exhausted streams restart and each reader yields its share of ``num_samples``.
    """

    def __init__(self, streams: Sequence[IterableDataset], weights: Sequence[float], seed: int = 0,
                 num_samples: int | None = None, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        if len(streams) != len(weights) or not streams:
            raise ValueError(f"{len(streams)} streams but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
        self.streams, self.probabilities = list(streams), (w / w.sum()).tolist()
        self.seed, self.num_samples, self.epoch = int(seed), num_samples, 0
        self._rank, self._world = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for s in self.streams:
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def __iter__(self) -> Iterator[GroundingSample]:
        rank, world = dist_info(self._rank, self._world)
        worker, workers = _worker()
        readers, reader = world * workers, rank * workers + worker
        rng = np.random.default_rng([self.seed, self.epoch, reader])
        its = [iter(s) for s in self.streams]
        probs = np.asarray(self.probabilities)
        quota = None
        if self.num_samples is not None:
            quota = self.num_samples // readers + (1 if reader < self.num_samples % readers else 0)
        produced = 0
        while quota is None or produced < quota:
            if probs.sum() <= 0:
                return
            i = int(rng.choice(len(its), p=probs / probs.sum()))
            try:
                sample = next(its[i])
            except StopIteration:
                if quota is None:
                    return
                its[i] = iter(self.streams[i])
                try:
                    sample = next(its[i])
                except StopIteration:  # this reader has nothing of stream i at all
                    probs[i] = 0.0
                    continue
            produced += 1
            yield sample


__all__ = ["INDEX_NAME", "MixedStream", "ShardedStream", "dist_info", "iter_shard", "record_to_sample",
           "sample_to_record", "write_shards"]
