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
