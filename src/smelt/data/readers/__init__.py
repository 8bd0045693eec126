"""Input formats: one module per format, found through one registry.

=========== ==================================== ==========================================
format      files (``format: auto``)             module
=========== ==================================== ==========================================
txt         .txt .md [.gz|.zst]                  `smelt.data.readers.text` (file or blocks)
jsonl       .jsonl .ndjson [.gz|.zst]            `smelt.data.readers.jsonl`
json-squad  .json [.gz|.zst], sniffed: SQuAD      `smelt.data.readers.squad` (JSON lines go
            layout or JSON lines (dolma)         to jsonl)
parquet     .parquet                             `smelt.data.readers.parquet`
warc        .warc .warc.gz .warc.wet.gz          `smelt.data.readers.warc` (HTML by trafilatura)
html        .html .htm [.gz|.zst]                `smelt.data.readers.html`
=========== ==================================== ==========================================

`read_documents(path, src)` streams the `Document`s of one file with the reader registered for
its format (`src.format`, or `detect_format(path)` for ``auto``). What a reader must do (error
documents, counted skips, ids) is in `smelt.data.readers.base`.

Adding a format
---------------
Write one module with a reader function, and register it with one line::

    # mypkg/csv_reader.py
    def read(r: FileReader) -> Iterator[Document]:
        with open_input(r.path) as stream:          # smelt.data.fs: decompression, fsspec
            for n, row in enumerate(csv.DictReader(io.TextIOWrapper(stream, "utf-8")), 1):
                doc = r.from_record(row, n)         # text/id fields, meta, bulky fields
                yield r.error_doc(n, *doc[:2]) if isinstance(doc, tuple) else doc

    register_reader("csv", (".csv",), "mypkg.csv_reader:read")      # here, or in mypkg

Files named ``*.csv`` (also ``.csv.gz``/``.csv.zst``, see `compression`) are then accepted by
``format: auto`` and read by every curation worker. The reader is named by its
``"module:attr"`` path, not held as an object: spawned workers import it themselves (see
`smelt.data.plugins`), so it must be importable; a module-level function can also be passed
directly (or with ``@register_reader("csv", (".csv",))`` as a decorator). A format whose
extension is ambiguous (``.json``) registers a `detect` function that names the actual format.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smelt.data.document import Document
from smelt.data.errors import DataInputError
from smelt.data.fs import basename, is_url, remote_error, split_ext, strip_compression
from smelt.data.plugins import import_path, load
from smelt.data.readers.base import FileReader, display_name

if TYPE_CHECKING:
    from smelt.config import InputSource

__all__ = [
    "ReaderEntry",
    "detect_format",
    "read_documents",
    "register_reader",
    "registered_readers",
    "restore_readers",
    "supported_extensions",
    "unregister_reader",
]

Reader = Callable[[FileReader], Iterator[Document]]


@dataclass(frozen=True)
class ReaderEntry:
    """One registered format. Only strings: entries travel to worker processes as they are."""

    name: str
    suffixes: tuple[str, ...]            # lower-case base extensions (".jsonl"), no compression
    read: str                            # "module:attr" of read(r: FileReader) -> Iterator[Document]
    compression: tuple[str, ...] = ("gzip", "zstd")  # accepted compression suffixes besides none
    detect: str | None = None            # "module:attr" of detect(path) -> format name
    note: str = ""                       # shown in the list of supported extensions


_READERS: dict[str, ReaderEntry] = {}
_BY_SUFFIX: dict[str, str] = {}


def register_reader(name: str, suffixes: tuple[str, ...] | list[str], read: Reader | str | None = None, *,
                    compression: tuple[str, ...] = ("gzip", "zstd"), detect: Callable[[str], str] | str | None = None,
                    note: str = "", replace: bool = False) -> Any:
    """Register format `name` for files ending in `suffixes`, read by `read`.

    `read` is a ``"module:attr"`` path or a module-level function; without it this returns a
    decorator. `compression` lists the compression suffixes (``gzip``: .gz, ``zstd``:
    .zst/.zstd) the format accepts on top of its own; `detect(path)`, when given, is asked for
    the actual format of a matching file (it may name another format, or raise
    `DataInputError`). A name or suffix already taken raises ``ValueError`` unless `replace`.
    """
    if read is None:
        def deco(fn: Reader) -> Reader:
            register_reader(name, suffixes, fn, compression=compression, detect=detect, note=note,
                            replace=replace)
            return fn
        return deco
    what = f"reader {name!r}"
    sufs = tuple(s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes)
    entry = ReaderEntry(name=name, suffixes=sufs, read=import_path(read, what),
                        compression=tuple(compression),
                        detect=import_path(detect, what) if detect is not None else None, note=note)
    _add(entry, replace)
    return None


def _add(entry: ReaderEntry, replace: bool) -> None:
    if not replace:
        if entry.name in _READERS and _READERS[entry.name] != entry:
            raise ValueError(f"reader {entry.name!r} is already registered ({_READERS[entry.name].read}); "
                             "pass replace=True to replace it")
        taken = [s for s in entry.suffixes if _BY_SUFFIX.get(s, entry.name) != entry.name]
        if taken:
            raise ValueError(f"reader {entry.name!r}: suffix {taken[0]} already belongs to format "
                             f"{_BY_SUFFIX[taken[0]]!r}; pass replace=True to take it over")
    old = _READERS.pop(entry.name, None)
    if old is not None:
        for s in old.suffixes:
            _BY_SUFFIX.pop(s, None)
    _READERS[entry.name] = entry
    for s in entry.suffixes:
        _BY_SUFFIX[s] = entry.name


def unregister_reader(name: str) -> None:
    """Remove format `name` (tests; a missing name is ignored)."""
    old = _READERS.pop(name, None)
    if old is not None:
        for s in old.suffixes:
            if _BY_SUFFIX.get(s) == name:
                del _BY_SUFFIX[s]


def registered_readers() -> dict[str, ReaderEntry]:
    """A copy of the registry: what the parent sends to its worker processes."""
    return dict(_READERS)


def restore_readers(entries: dict[str, ReaderEntry]) -> None:
    """Make this process's registry hold `entries` (in a worker: the parent's registrations)."""
    for entry in entries.values():
        if _READERS.get(entry.name) != entry:
            _add(entry, replace=True)


def supported_extensions() -> str:
    """The accepted file names, for error messages: ``.txt[.gz|.zst], .md[.gz|.zst], ...``."""
    comp = {"gzip": ".gz", "zstd": ".zst"}
    out = []
    for e in _READERS.values():
        tail = "[" + "|".join(comp[c] for c in e.compression if c in comp) + "]" if e.compression else ""
        names = ", ".join(s + tail for s in e.suffixes)
        out.append(f"{names} ({e.note})" if e.note else names)
    return ", ".join(out)


def detect_format(path: str) -> str:
    """The registered format of `path`, by extension (and the format's `detect`, for ``.json``).

    Raises `DataInputError` for an unknown extension or a compression the format does not
    accept, and whatever the format's `detect` raises for a file it does not recognise.
    """
    ext, comp = split_ext(path)
    entry = _READERS.get(_BY_SUFFIX.get(ext, ""))
    if entry is None or (comp is not None and comp not in entry.compression):
        raise DataInputError(
            f"unknown file type: {path}\n  supported extensions: {supported_extensions()}\n"
            "  set `format:` on the input, or narrow its `glob:`")
    if entry.detect is None:
        return entry.name
    try:
        return load(entry.detect)(path)
    except DataInputError:
        raise
    except OSError as e:
        raise DataInputError(f"cannot read {path} to detect its layout: {e}") from None
    except Exception as e:  # noqa: BLE001 - a remote file's network errors
        if not is_url(path):
            raise
        raise remote_error(path, e) from None


def stem(path: str) -> str:
    """File name without its format and compression suffixes (``a.jsonl.zst`` -> ``a``)."""
    name = strip_compression(basename(path))
    base, ext = os.path.splitext(name)
    ext = ext.lower()
    if ext == ".wet" and base.lower().endswith(".warc"):
        base = base[:-5]
    return base if ext in _BY_SUFFIX else name


# Decompressed / compressed size assumed when splitting a compressed JSON-lines file (zstd and gzip
# reach 3-5x on web text; only the number of parts depends on it).
COMPRESSION_RATIO = 4


def split_file(path: str, src: InputSource, max_bytes: int) -> list[tuple[int, int, int]] | None:
    """Parts of one input file of at most about `max_bytes` each, as ``(start, end, records
    before start)``, or None when it is read whole: small files, remote ones, formats other than
    JSON lines and Parquet, and sources with a `limit`.

    JSON lines: line-aligned byte ranges (each part starts after a newline), with the number of
    lines before it so that line numbers, and the ids made from them, are those of a whole read.
    Compressed JSON lines (gzip, zstd): ranges of the decompressed bytes, ``records before = -1``
    (the part counts the lines it skips; `smelt.data.readers.jsonl.read`), the last one open-ended.
    Parquet: runs of whole row groups by their compressed size, with the rows before them."""
    from smelt.data.fs import local_path

    if src.limit is not None or is_url(path):
        return None
    fmt = src.format if src.format != "auto" else detect_format(path)
    local = local_path(path)
    if fmt == "jsonl":
        size = os.path.getsize(local)
        with open(local, "rb") as fh:
            head = fh.read(4)
        if split_ext(path)[1] is not None or head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd":
            # Compressed: no random access, and the decompressed size is unknown without reading it
            # all. Assume COMPRESSION_RATIO to choose the number of parts; each part decompresses
            # the file from its beginning and keeps the lines that start in its decompressed byte
            # range (the last part: to the end), so a wrong guess changes part sizes, not output.
            k = math.ceil(size * COMPRESSION_RATIO / max_bytes)
            if k <= 1:
                return None
            return [(i * max_bytes, (i + 1) * max_bytes if i < k - 1 else -1, -1) for i in range(k)]
        if size <= max_bytes:
            return None
        with open(local, "rb") as fh:
            cuts = [0]
            while cuts[-1] + max_bytes < size:
                fh.seek(cuts[-1] + max_bytes)
                fh.readline()  # to the end of the line the cut falls in
                if fh.tell() >= size:
                    break
                cuts.append(fh.tell())
            cuts.append(size)
            parts, lines = [], 0
            fh.seek(0)
            for a, b in zip(cuts, cuts[1:]):
                parts.append((a, b, lines))
                remaining = b - a
                while remaining:
                    chunk = fh.read(min(remaining, 1 << 24))
                    lines += chunk.count(b"\n")
                    remaining -= len(chunk)
        return parts if len(parts) > 1 else None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(local).metadata
        parts, start, acc, rows, before = [], 0, 0, 0, 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if g > start and acc + rg.total_byte_size > max_bytes:
                parts.append((start, g, before))
                start, acc, before = g, 0, rows
            acc += rg.total_byte_size
            rows += rg.num_rows
        parts.append((start, meta.num_row_groups, before))
        return parts if len(parts) > 1 else None
    return None


def read_documents(path: str, src: InputSource, *, skipped: Counter | None = None,
                   part: tuple[int, int, int] | None = None) -> Iterator[Document]:
    """Stream the documents of one input file, with the reader of its format.

    ``id`` is the record's `src.id_field` when present, else ``<name>/<file>:<n>`` (``name`` =
    `src.name` or the file stem, ``file`` = the path relative to the source root, ``n`` = the
    1-based line, block-start line or record number); ``meta["source"]`` is ``<file>:<n>``.
    At most `src.limit` documents are read. Records that are not documents (blank JSON lines,
    WARC requests, non-HTML responses) are counted into `skipped` when given.
    """
    fmt = src.format if src.format != "auto" else detect_format(path)
    entry = _READERS.get(fmt)
    if entry is None:
        raise DataInputError(f"{path}: no reader registered for format {fmt!r} "
                             f"(registered: {', '.join(sorted(_READERS))})")
    reader = FileReader(
        path=path, display=display_name(path, src), name=src.name or stem(path),
        domain=src.domain, text_field=src.text_field, id_field=src.id_field, skipped=skipped, src=src, part=part)
    if part is not None and fmt not in ("jsonl", "parquet"):
        raise DataInputError(f"{path}: format {fmt!r} cannot be read in parts")
    gen = load(entry.read)(reader)
    n = 0
    try:
        for doc in gen:
            yield doc
            n += 1
            if src.limit is not None and n >= src.limit:
                break
    finally:
        close = getattr(gen, "close", None)  # a generator: closes the reader's file
        if close is not None:
            close()
        reader.finish()


# --------------------------------------------------------------------------------------------
# the built-in formats: one line each

register_reader("txt", (".txt", ".md"), "smelt.data.readers.text:read")
register_reader("jsonl", (".jsonl", ".ndjson"), "smelt.data.readers.jsonl:read")
register_reader("json-squad", (".json",), "smelt.data.readers.squad:read", detect="smelt.data.readers.squad:detect",
                note="SQuAD layout, or JSON lines")
register_reader("parquet", (".parquet",), "smelt.data.readers.parquet:read", compression=())
register_reader("warc", (".warc", ".wet"), "smelt.data.readers.warc:read", compression=("gzip",),
                note="CommonCrawl's .warc.wet.gz too")
register_reader("html", (".html", ".htm"), "smelt.data.readers.html:read")
