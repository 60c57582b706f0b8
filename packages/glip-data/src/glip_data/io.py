"""Writing outputs safely: the one discipline of every glip command that writes (detect, eval, pseudo-label, train,
convert, ``glip-data``).

* **Atomic files.** A file is written under a temporary name in its own folder, flushed to disk and renamed over its
  final name (``os.replace`` is atomic on POSIX and Windows): a reader sees the old file or the whole new one, never a
  truncated one. Temporary names all end in :data:`TEMP_SUFFIX`, so the leftovers of a killed write are recognisable
  and :func:`clean_temporaries` removes them when the next run starts.
* **Atomic folders.** :func:`atomic_directory` fills a staging folder and renames it into place when it is complete.
* **One writer per output.** :class:`RunLock` takes an advisory lock on an output folder (or, with
  :meth:`RunLock.for_output`, on one output file or folder by its name); a second run on the same output is refused
  with :class:`OutputLockedError`, naming the output and the process holding it. The lock dies with its process
  (``kill -9`` included), so a stale lock never blocks a rerun.
* **Pairs of files.** When two files belong together (``detections.json`` and the ``metrics.json`` computed from
  it, an ODVG file and its label map), the file that vouches for the pair is removed before the other is replaced
  and written last: whenever it exists, its partner is from the same run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "LOCK_NAME",
    "OutputLockedError",
    "RunLock",
    "TEMP_SUFFIX",
    "atomic_directory",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_temporaries",
    "is_temporary",
    "temporary_path",
]

#: every temporary file or folder glip writes ends with this; nothing else may
TEMP_SUFFIX = ".glip-tmp"
#: the lock file inside a locked output folder
LOCK_NAME = ".glip.lock"


class OutputLockedError(RuntimeError):
    """Another process is writing to the same output (the message names the folder and the holder)."""


def _default_file_mode() -> int:
    """0666 minus the process umask (what ``open(path, "w")`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (hidden, unique per process and call, ending in :data:`TEMP_SUFFIX`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a name made by :func:`temporary_path`."""
    return Path(path).name.endswith(TEMP_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the ``with`` block ends without an error.

    On an error (or a kill) ``path`` keeps its old content; the temporary file is removed (or, after a kill, left
    for :func:`clean_temporaries`). ``mode`` is ``"w"`` (text) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole new file: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    fh = open(tmp, mode, encoding=encoding if mode == "w" else None)
    try:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        fh.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **kwargs: Any) -> Path:
    """``json.dumps(obj)`` plus a newline, written atomically; ``kwargs`` go to ``json.dumps``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``path``; when the block ends without an error it replaces ``path``.

    ``path`` must not exist or be an empty folder unless ``overwrite``; an existing ``path`` is replaced only after
    the new content is complete (two renames: a kill between them leaves the new folder under its temporary name,
    which :func:`clean_temporaries` removes, and the old one intact).

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty folder without ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(path)
    staging.mkdir()
    try:
        yield staging
        old = None
        if path.exists():
            old = temporary_path(path)
            os.replace(path, old)
        os.replace(staging, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def clean_temporaries(folder: str | os.PathLike, *, recursive: bool = True,
                      names: list[str] | None = None) -> list[Path]:
    """Remove what killed writes left in ``folder`` (names made by :func:`temporary_path`); returns what was removed.

    ``names``: only the temporaries of these outputs (file or folder names in ``folder``, not recursive), for a
    folder shared with other writers.

    Call it only while holding the output's :class:`RunLock` (or knowing no other process writes there): a
    temporary of a live writer would be removed too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if names is not None:
        mine = re.compile("|".join(rf"\.{re.escape(n)}\.\d+-[0-9a-f]+{re.escape(TEMP_SUFFIX)}" for n in names))
        found = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if mine.fullmatch(p.name)] if names else []
    else:
        found = folder.rglob(f"*{TEMP_SUFFIX}") if recursive else folder.glob(f"*{TEMP_SUFFIX}")
    removed = []
    for p in sorted(found, key=lambda q: len(q.parts)):
        if not p.exists():  # inside a temporary folder removed just before
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


class RunLock:
    """An exclusive advisory lock on an output, held while a run writes there.

    ``with RunLock(folder, "glip eval"):`` creates the folder if needed and takes the lock; a second process (or a
    second lock in the same process) asking for the same output gets :class:`OutputLockedError` at once (never a
    wait, never interleaved outputs). The lock file records the holder (command, pid, host, start time) for that
    message. The operating system drops the lock when the process ends however it ends, so a killed run never blocks
    the next one. Locks are per process: processes of one distributed job take it on one rank only.

    Args:
        folder: the output folder.
        command: how the error names the holder, e.g. ``"glip eval"``.
        clean: remove the leftovers of killed writes (:func:`clean_temporaries`) once the lock is held.
        name: lock one output *in* ``folder`` instead of the whole folder (see :meth:`for_output`).
    """

    #: lock files held by this process (for :meth:`held_here`)
    _held: set[Path] = set()

    def __init__(self, folder: str | os.PathLike, command: str, *, clean: bool = True, name: str | None = None):
        self.folder = Path(folder)
        self.command = command
        self.clean = clean
        self.name = name
        self.removed: list[Path] = []
        self._fh: IO[str] | None = None

    @classmethod
    def for_output(cls, path: str | os.PathLike, command: str, *, clean: bool = True) -> "RunLock":
        """A lock on one output file or folder, ``path``, that shares its parent folder with other outputs: the lock
        file is ``.<name>.glip.lock`` beside it, and only ``path``'s own temporaries are cleaned."""
        path = Path(path)
        return cls(path.parent, command, clean=clean, name=path.name)

    @property
    def lock_path(self) -> Path:
        return self.folder / (LOCK_NAME if self.name is None else f".{self.name}{LOCK_NAME}")

    @property
    def output(self) -> Path:
        return self.folder if self.name is None else self.folder / self.name

    @property
    def held(self) -> bool:
        return self._fh is not None

    @classmethod
    def held_here(cls, folder: str | os.PathLike, name: str | None = None) -> bool:
        """True when this process holds the lock of that output (library code then need not take it again)."""
        return cls(folder, "", name=name).lock_path.resolve() in cls._held

    def acquire(self) -> "RunLock":
        if self.name is None and self.folder.exists() and not self.folder.is_dir():
            raise FileExistsError(f"output {self.folder} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.lock_path, "a+", encoding="utf-8")
        if not _try_lock(fh):
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OutputLockedError(f"{self.output} is in use by another run ({holder}); wait for it to finish or "
                                    "write somewhere else")
        fh.seek(0)
        fh.truncate()
        fh.write(f"{self.command}, pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        RunLock._held.add(self.lock_path.resolve())
        if self.clean:
            names = None if self.name is None else [self.name]
            self.removed = clean_temporaries(self.folder, names=names)
        return self

    def release(self) -> None:
        # the lock file stays: removing it would let a third process lock a new file while a second waits on the old
        if self._fh is not None:
            RunLock._held.discard(self.lock_path.resolve())
            _unlock(self._fh)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fh: IO[str]) -> bool:
        fh.seek(0)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fh: IO[str]) -> None:
        fh.seek(0)
        with contextlib.suppress(OSError):
            msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fh: IO[str]) -> bool:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def _unlock(fh: IO[str]) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
