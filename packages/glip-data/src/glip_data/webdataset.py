"""WebDataset shards in img2dataset's layout: finding them, reading their samples, writing them.

Web image–text corpora (CC3M, CC12M, LAION, COYO, ... as `img2dataset <https://github.com/rom1504/img2dataset>`_
downloads them) come as tar shards ``00000.tar``, ``00001.tar``, ... holding, per sample, consecutive members that
share a key::

    000010042.jpg    the image (``.png`` / ``.webp`` / ... too)
    000010042.txt    the caption (absent for image-only data)
    000010042.json   metadata: {"key", "url", "width", "height", "caption", "status", ...}

and beside each shard ``00000_stats.json`` (counts of the download). glip reads them as they are and
:func:`write_img2dataset_shards` writes any caption or detection source in the same layout (``glip-data shard
--kind img2dataset``), for tests and for the self-training recipe. A caption's phrases may travel in the metadata
as ``"entities": [{"phrase": ..., "tokens_positive": [[start, end], ...]}, ...]`` (glip's extension; the synthetic
world's caption file carries them).

:func:`resolve_shards` turns what a user names (a folder, a glob, a brace range, a list file, one shard) into the
sorted list of shard files; :func:`iter_tar_samples` yields a shard's samples in order, raising
:class:`CorruptShardError` (naming the shard and how far it got) on a damaged archive.
"""
from __future__ import annotations

import glob as _glob
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SHARD_SUFFIXES", "IMAGE_EXTENSIONS", "ShardListError", "CorruptShardError", "expand_braces",
           "is_shard_path", "resolve_shards", "shard_stem", "iter_tar_samples", "sample_caption", "sample_image",
           "sample_metadata", "write_img2dataset_shards"]

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: member extensions read as the sample's image, in order of preference
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = set("*?[")


class ShardListError(ValueError):
    """A shard source that names no shard or a shard that does not exist (the message names them)."""


class CorruptShardError(ValueError):
    """A shard that is not a readable tar archive (truncated, not a tar, a bad gzip stream)."""


def is_shard_path(path: str | os.PathLike) -> bool:
    """True for a ``.tar`` / ``.tar.gz`` / ``.tgz`` file name."""
    return str(path).endswith(SHARD_SUFFIXES)


def shard_stem(path: str | os.PathLike) -> str:
    """``.../00042.tar.gz`` -> ``"00042"``."""
    name = Path(path).name
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as WebDataset URLs use it: ``{00000..00012}`` (numeric ranges keep their zero padding) and
    ``{a,b}`` alternatives, left to right: ``"cc3m-{000..002}.tar"`` -> ``["cc3m-000.tar", "cc3m-001.tar",
    "cc3m-002.tar"]``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        if int(hi) < int(lo):
            raise ShardListError(f"{pattern}: the range {{{body}}} runs backwards")
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _missing(paths: Sequence[Path], where: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        listed = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardListError(f"{where}: {len(missing)} of its {len(paths)} shards do not exist: {listed}")


def resolve_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files a user names, in a fixed order.

    ``source`` is one of: a folder (its ``.tar`` / ``.tar.gz`` files, sorted by name); a glob (``data/*.tar``,
    sorted); a brace pattern (``data/{00000..00099}.tar``, in its order); a list file (any other file: one shard per
    line, relative to the list's folder, ``#`` comments and blank lines ignored); one shard; or a Python list of any
    of these.

    Raises:
        ShardListError: nothing matches, or named shards are missing (all listed in one message).
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise ShardListError("no shards given")
        out: list[Path] = []
        for item in source:
            out.extend(resolve_shards(item))
        return out
    text = str(source)
    path = Path(text)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and is_shard_path(p.name))
        if not found:
            raise ShardListError(f"{path}: a folder without .tar / .tar.gz shards")
        return found
    if _BRACE.search(text):
        paths = [Path(p) for p in expand_braces(text)]
        _missing(paths, text)
        return paths
    if _GLOB_CHARS & set(text):
        found = sorted(Path(p) for p in _glob.glob(text) if is_shard_path(p))
        if not found:
            raise ShardListError(f"{text}: no .tar / .tar.gz shard matches")
        return found
    if not path.exists():
        raise ShardListError(f"{path}: no such shard, folder or list file")
    if is_shard_path(path.name):
        return [path]
    paths = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entry = Path(line)
            paths.append(entry if entry.is_absolute() else path.parent / entry)
    if not paths:
        raise ShardListError(f"{path}: a list file that names no shard")
    not_shards = [str(p) for p in paths if not is_shard_path(p.name)]
    if not_shards:
        raise ShardListError(f"{path}: lines that are not .tar / .tar.gz shards: {', '.join(not_shards[:5])}")
    _missing(paths, str(path))
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# reading


def _split_name(name: str) -> tuple[str, str]:
    """A member name -> ``(key, extension)``: the key is everything up to the first dot of the file name (folders
    included), as WebDataset groups members."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_samples(path: str | os.PathLike, *, keep: Callable[[int], bool] | None = None,
                     ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield ``(position, key, {extension: bytes})`` for every sample of a tar shard, in order (position counts
    the samples from 0).

    Members of one sample are consecutive and share the key. ``keep(position) -> bool`` selects samples by their
    position (those left out are not even read). A zero-byte file is an empty shard.

    Raises:
        CorruptShardError: the archive is damaged; the message names the shard and the samples read before.
    """
    path = Path(path)
    position = -1
    group_key: str | None = None
    group: dict[str, bytes] = {}
    try:
        if path.stat().st_size == 0:
            return
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if key != group_key:
                    if group_key is not None and (keep is None or keep(position)):
                        yield position, group_key, group
                    group_key, group = key, {}
                    position += 1
                if keep is None or keep(position):
                    group[ext] = tar.extractfile(member).read()
            _check_end(tar)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise ShardListError(f"{path}: no such shard") from None
        raise CorruptShardError(f"{path}: not a readable tar archive after {max(position, 0)} samples "
                                f"({type(err).__name__}: {err})") from None
    if group_key is not None and (keep is None or keep(position)):
        yield position, group_key, group


def _check_end(tar: tarfile.TarFile) -> None:
    """Refuse an archive cut at a member boundary, which :mod:`tarfile` takes for its end: a complete archive ends
    with two zero blocks, the first of which ended the iteration (a cut or garbage leaves less, or not zeros)."""
    stream = tar.fileobj  # stream mode: a sequential reader that counts what it consumed
    if stream.pos != tar.offset + tarfile.BLOCKSIZE or stream.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise tarfile.ReadError("the archive ends without its end-of-archive blocks (cut short?)")


def sample_metadata(members: dict[str, bytes]) -> dict[str, Any]:
    """The sample's ``.json`` metadata (``{}`` without one).

    Raises:
        ValueError: the member is not a JSON object.
    """
    if "json" not in members:
        return {}
    try:
        data = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"metadata is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError("metadata is not a JSON object")
    return data


def sample_caption(members: dict[str, bytes], metadata: dict[str, Any] | None = None) -> str | None:
    """The sample's caption: its ``.txt`` member (UTF-8, surrounding whitespace removed), else the metadata's
    ``"caption"``; None when there is none or it is empty."""
    text = None
    if "txt" in members:
        text = members["txt"].decode("utf-8", errors="replace")
    elif metadata and isinstance(metadata.get("caption"), str):
        text = metadata["caption"]
    text = text.strip() if text is not None else None
    return text or None


def sample_image(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    """``(extension, encoded bytes)`` of the sample's image member, or None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext, members[ext]
    return None


# ---------------------------------------------------------------------------------------------------------------------
# writing


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as member ``name`` (mtime 0 and mode 0644: the same samples give the same archive)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _entities(sample: Any) -> list[dict[str, Any]] | None:
    """The caption's phrases with their spans: a caption line's entities, else the distinct span groups of the
    boxes (grounding data); None for detection data (its caption is a class prompt, not a sentence)."""
    if sample.metadata.get("task") == "detection":
        return None
    groups = sample.metadata.get("entities_tokens_positive")
    if groups is None:
        groups = []
        for spans in sample.tokens_positive:
            spans = [list(s) for s in spans]
            if spans and spans not in groups:
                groups.append(spans)
    return [{"phrase": " ".join(sample.caption[s:e] for s, e in spans), "tokens_positive": [list(s) for s in spans]}
            for spans in groups if spans]


def write_img2dataset_shards(dataset: Any, out_dir: str | os.PathLike, *, samples_per_shard: int = 1000,
                             text: bool = True, progress: bool = True, command: str = "glip-data shard",
                             ) -> list[dict[str, Any]]:
    """Write every sample of a map-style dataset (any reader) as shards in img2dataset's layout.

    Sample ``i`` goes to shard ``i // samples_per_shard`` under key ``f"{i:09d}"``: the image file's bytes as they
    are (``.jpg`` / ``.png``), the caption as ``.txt`` (with ``text``; detection data has none), and ``.json``
    metadata (``key``, ``width``, ``height``, ``status``, the caption and, for captions and grounding data, its
    ``entities`` with their spans; the source's ``image_id``). Each shard and its ``NNNNN_stats.json`` are written
    under temporary names and renamed, in a folder locked against a second writer.

    Returns:
        The stats of every shard (what the ``_stats.json`` files hold).
    """
    from glip_data.io import RunLock, atomic_open, atomic_write_json

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    from tqdm import tqdm

    written: list[dict[str, Any]] = []
    with RunLock(out, command), tqdm(total=len(dataset), desc="writing img2dataset shards", unit="sample",
                                     disable=not progress) as bar:
        for first in range(0, len(dataset), samples_per_shard):
            name = f"{first // samples_per_shard:05d}"
            count = 0
            with atomic_open(out / f"{name}.tar", "wb") as fh, tarfile.open(fileobj=fh, mode="w",
                                                                             format=tarfile.PAX_FORMAT) as tar:
                for i in range(first, min(first + samples_per_shard, len(dataset))):
                    sample = dataset[i]
                    key = f"{i:09d}"
                    src = Path(sample.image_path)
                    try:
                        image = src.read_bytes()
                    except OSError as err:
                        raise OSError(f"sample {i}: cannot read image {src}: {err}") from None
                    ext = (src.suffix.lower().lstrip(".") or "jpg").replace("jpeg", "jpg")
                    meta: dict[str, Any] = {"key": key, "status": "success", "width": int(sample.width),
                                            "height": int(sample.height)}
                    if sample.metadata.get("image_id") is not None:
                        meta["image_id"] = sample.metadata["image_id"]
                    caption = sample.caption if text and sample.metadata.get("task") != "detection" else None
                    add_member(tar, f"{key}.{ext}", image)
                    if caption:
                        meta["caption"] = caption
                        entities = _entities(sample)
                        if entities:
                            meta["entities"] = entities
                        add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                    add_member(tar, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode("utf-8"))
                    count += 1
                    bar.update(1)
            stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
                     "status_dict": {"success": count}, "written_by": command}
            atomic_write_json(out / f"{name}_stats.json", stats)
            written.append({"name": f"{name}.tar", **stats})
    return written
