"""Atomic file writes: write to a temporary name in the same directory, then rename.

A reader never sees a half-written file: either the old content (or nothing) or the new one,
whatever happens to the writing process (exceptions, ``kill -9``). The rename is atomic on POSIX
file systems. Durability against power loss also needs an fsync before the rename; it costs
~3 ms per file here (a third of a small curation task), so it is on where losing the file is
expensive (checkpoints: ``fsync=True``) and otherwise follows ``SMELT_FSYNC=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FSYNC = os.environ.get("SMELT_FSYNC", "0") == "1"


def maybe_fsync(fd: int, fsync: bool | None = None) -> None:
    if FSYNC if fsync is None else fsync:
        os.fsync(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None,
                fsync: bool | None = None) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit (fsync and) rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            maybe_fsync(f.fileno(), fsync)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# never destroy work: moving old outputs aside


def move_aside(path: str | Path, why: str = "") -> Path | None:
    """Rename ``path`` to the first free ``<name>.prev-<N>`` beside it; None when it does not exist.

    What a fresh start does with the previous output (checkpoints, curated data, token shards)
    instead of deleting it: a rename costs nothing, and only the user decides to delete."""
    import logging

    path = Path(path)
    if not path.exists():
        return None
    n = 1
    while (dest := path.with_name(f"{path.name}.prev-{n}")).exists():
        n += 1
    os.replace(path, dest)
    logging.getLogger(__name__).warning("%s%smoved the previous %s aside to %s (delete it yourself when it is "
                                        "no longer needed)", why, ": " if why else "", path.name, dest)
    return dest


def set_aside(directory: str | Path) -> list[str]:
    """The ``*.prev-N`` copies `move_aside` left in ``directory`` (names, sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if ".prev-" in p.name)


# --------------------------------------------------------------------------------------------
# one writer per run directory


LOCK_FILE = ".smelt.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth): re-entrant in one process


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` for the duration (``fcntl.flock`` on ``.smelt.lock``).

    The OS releases a flock when its process dies, so ``kill -9`` never leaves a stale lock (the
    file itself stays, holding the last holder's PID and command for the message). A second
    process fails at once with `RunDirLocked` naming the holder; the same process may nest
    (``smelt run`` takes it, then the stages it calls). Under ``torchrun`` only global rank 0
    locks: the other ranks are the same job."""
    import fcntl
    import sys

    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        yield run_dir
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    key = str(lock_path.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield run_dir
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        pid, _, cmd = holder.partition(" ")
        raise RunDirLocked(f"{run_dir} is in use by another smelt process (PID {pid or '?'}: {cmd or 'unknown'}); "
                           "wait for it to finish or stop it, then run again") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command or ' '.join(sys.argv)}\n".encode(), 0)
        _held[key] = (fd, 1)
        try:
            yield run_dir
        finally:
            del _held[key]
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                # nothing was written (e.g. a refused import): leave no empty directory behind
                lock_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


# --------------------------------------------------------------------------------------------
# disk full, permissions: one sentence instead of a traceback

_OS_ADVICE = {
    "ENOSPC": "the disk is full: free space (or point runs_dir at a larger disk) and run the same command again; "
              "it resumes where it stopped",
    "EDQUOT": "the disk quota is exceeded: free space and run the same command again; it resumes where it stopped",
    "EACCES": "permission denied: make it writable by this user (or choose another runs_dir) and run again",
    "EPERM": "operation not permitted: check the owner and permissions of that path and run again",
    "EROFS": "the file system is read-only: choose a writable runs_dir and run again",
}


def describe_os_error(e: BaseException) -> str | None:
    """One sentence naming the path and what to do for disk-full and permission errors; None for
    any other error (those keep their own message)."""
    import errno

    if not isinstance(e, OSError) or e.errno is None:
        return None
    advice = _OS_ADVICE.get(errno.errorcode.get(e.errno, ""))
    if advice is None:
        return None
    where = e.filename if e.filename is not None else "a file in the run directory"
    return f"cannot write {where}: {advice}"


def locked(command: str, where: Any) -> Any:
    """Decorator: run the function under `run_lock` on ``where(arguments)``, a function of its
    bound arguments (by name) returning the run directory."""
    import functools
    import inspect

    def deco(fn: Any) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with run_lock(where(bound.arguments), command):
                return fn(*args, **kwargs)

        return wrapper

    return deco
