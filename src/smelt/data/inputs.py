"""Resolving the recipe's ``data.inputs`` to files, before any work starts.

`resolve_files` turns one `InputSource` (a file, a directory, a glob or an fsspec URL) into a
sorted list of files, and raises `DataInputError` for a missing path, a glob that matches
nothing, an unreadable directory or (with ``format: auto``) a file of unknown type (see
`smelt.data.readers` for the formats).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from smelt.data.errors import DataInputError
from smelt.data.fs import GLOB_MAGIC, glob_root, is_url, local_path, remote_error, url_fs
from smelt.data.readers import detect_format, supported_extensions

if TYPE_CHECKING:
    from smelt.config import InputSource

__all__ = ["is_ignored_name", "resolve_files"]

# Files never read as input: hidden files ("."; also our own temp files, see ShardWriter) and
# "_"-prefixed ones (the Hadoop/Spark convention that Parquet datasets follow: _SUCCESS,
# _metadata, _common_metadata), plus the manifests / stats / markers smelt itself writes, so a
# previous stage's output directory can be used as an input.
_IGNORED_NAMES = frozenset({"manifest.json", "stats.json", "recipe.yaml"})
_IGNORED_SUFFIXES = (".done", ".tmp", ".lock", ".crc")


def is_ignored_name(name: str) -> bool:
    """True for file names `resolve_files` never returns (hidden, ``_``-prefixed, our markers)."""
    return (name.startswith((".", "_")) or name in _IGNORED_NAMES
            or name.endswith(_IGNORED_SUFFIXES))


def resolve_files(src: InputSource) -> list[str]:
    """The files of one input source, sorted; raises `DataInputError` before any work starts.

    `src.path` may be a file, a directory (searched with `src.glob`, recursively for ``**``,
    skipping hidden and ``_``-prefixed files and smelt's own manifests/markers), a glob pattern
    or an fsspec URL (``memory://``, ``s3://``, ...). With ``format: auto`` every file must have
    a registered extension (`smelt.data.readers`); ``.json`` files are sniffed here too.
    """
    files = _resolve_url(src) if is_url(src.path) else _resolve_local(src)
    files = sorted(set(files))
    if src.format == "auto":
        bad: list[str] = []
        for f in files:
            try:
                detect_format(f)
            except DataInputError as e:
                bad.append(str(e).splitlines()[0])
        if bad:
            shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise DataInputError(
                f"input {src.path!r}: {len(bad)} file(s) of unknown or unsupported type:\n  {shown}\n"
                f"  supported extensions: {supported_extensions()}\n"
                "  set `format:` on the input, or narrow its `glob:`")
    return files


def _resolve_local(src: InputSource) -> list[str]:
    path = local_path(src.path)
    if os.path.isfile(path):
        if not os.access(path, os.R_OK):
            raise DataInputError(f"input file is not readable: {path}")
        return [path]
    if os.path.isdir(path):
        return _walk_dir(path, src.glob)
    if GLOB_MAGIC.search(path):
        import glob as _glob

        root = glob_root(path)
        found = [p for p in _glob.glob(path, recursive=True) if os.path.isfile(p)
                 and not _hidden_rel(os.path.relpath(p, root) if root else p)]
        if not found:
            raise DataInputError(f"input glob matches no files: {path}")
        return found
    raise DataInputError(
        f"input path does not exist: {path} (expected a file, a directory, a glob pattern or an "
        "fsspec URL such as s3://bucket/prefix)")


def _walk_dir(root: str, pattern: str) -> list[str]:
    from fsspec.utils import glob_translate  # the Python 3.13 glob.translate, for 3.11

    match = re.compile(glob_translate(pattern)).match

    def fail(err: OSError) -> None:
        raise DataInputError(f"cannot list input directory {err.filename}: {err.strerror}")

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if is_ignored_name(name):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            if match(rel):
                found.append(os.path.join(dirpath, name))
    if not found:
        raise DataInputError(f"input directory {root} has no files matching glob {pattern!r}")
    return found


def _hidden_rel(rel: str) -> bool:
    parts = rel.replace(os.sep, "/").split("/")
    return any(p.startswith((".", "_")) for p in parts[:-1]) or is_ignored_name(parts[-1])


def _resolve_url(src: InputSource) -> list[str]:
    fs, root = url_fs(src.path)
    try:
        if GLOB_MAGIC.search(root):
            base = glob_root(root)
            hits = fs.glob(root, detail=True)
        elif fs.isfile(root):
            return [src.path]
        elif fs.isdir(root):
            base = root.rstrip("/")
            hits = fs.glob(f"{base}/{src.glob}", detail=True)
        else:
            raise DataInputError(f"input path does not exist: {src.path}")
    except PermissionError as e:
        raise DataInputError(f"cannot list input {src.path}: {e}") from None
    except DataInputError:
        raise
    except Exception as e:  # noqa: BLE001 - network and credential errors of any fsspec backend
        raise remote_error(src.path, e) from None
    found = []
    for p, info in hits.items():
        if info.get("type") != "file":
            continue
        rel = p[len(base):].lstrip("/") if base and p.startswith(base) else p
        if not _hidden_rel(rel):
            found.append(fs.unstrip_protocol(p))
    if not found:
        raise DataInputError(f"input {src.path} matches no files (glob {src.glob!r})")
    return found
