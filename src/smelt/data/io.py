"""Document readers and shard writers.

Input side (what the recipe's ``data.inputs`` point at):

* `resolve_files` turns one `InputSource` (a file, a directory, a glob or an fsspec URL) into a
  sorted list of files, and raises `DataInputError` *before any work starts* for a missing
  path, a glob that matches nothing, an unreadable directory or a file of unknown type.
* `read_documents` streams `Document`s out of one file: plain text (``.txt``/``.md``, one
  document per file or per blank-line-separated block), JSON lines (``.jsonl``/``.ndjson``,
  optionally ``.gz``/``.zst``; also dolma-style ``.json.gz``), Parquet, SQuAD-style ``.json``
  (one document per ``data[].paragraphs[].context``), WARC/WET and ``.html`` (main text by
  trafilatura).

  Bad input never raises in the middle of a file and is never dropped silently: a record that
  cannot be read becomes a `Document` with ``meta["read_error"]`` (a stable reason, see
  `READ_ERRORS`), ``meta["error"]`` (a short message) and, as text, the raw record decoded
  with ``errors="replace"``. The pipeline rejects it at step ``read`` with that reason, so it
  lands in ``rejects/`` and in the funnel. A damaged or truncated compressed file yields the
  documents before the damage, then one ``corrupt_file`` document, then stops. Failures of
  the storage itself (a network error, a file deleted under us) do raise: the task is retried
  and, since outputs are written atomically, nothing partial is left behind.

Output side (shards in ``kept/``, ``rejects/``, ``duplicates/``): `ShardWriter` and
`read_shard`. The shard format, version 1:

* ``.jsonl.zst``: one JSON object ``{"id", "text", "domain", "meta"}`` per line, UTF-8
  (``ensure_ascii=False``, compact separators), in one zstd frame at level 3 with a content
  checksum (so corruption is detected on read) and no content size in the header.
* ``.parquet``: columns ``id: string, text: string, domain: string, meta: string`` (``meta`` is
  the JSON object as text, so documents with different meta keys share one fixed schema),
  zstd-compressed, statistics only on ``id`` and ``domain``.

Both are byte-for-byte deterministic: the same documents in the same order give the same file
(for a given zstandard/pyarrow version), which the executor relies on for kill-and-resume
identity. A shard appears at its final path only when complete (temp file + rename; fsync with
SMELT_FSYNC=1, see `smelt.fsutil`).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

import zstandard

from smelt.data.document import Document
from smelt.fsutil import FSYNC, maybe_fsync

if TYPE_CHECKING:
    from smelt.config import InputSource

log = logging.getLogger(__name__)

__all__ = [
    "DataInputError",
    "READ_ERRORS",
    "SUPPORTED_EXTENSIONS",
    "ShardWriter",
    "detect_format",
    "is_ignored_name",
    "read_documents",
    "read_shard",
    "resolve_files",
    "shard_suffix",
]


class DataInputError(Exception):
    """An input that cannot be read at all; raised before any work starts."""


class CorruptInputError(Exception):
    """A compressed stream that is damaged or ends early (inside the readers only)."""


# Errors that mean "this file's bytes are damaged" (-> one corrupt_file document). Any other
# OSError (network, permissions, a file deleted under us) propagates: the task fails and is
# retried rather than recording an infrastructure hiccup as bad data.
_CORRUPT_ERRORS = (CorruptInputError, zstandard.ZstdError, EOFError, zlib.error, gzip.BadGzipFile)


# Stable ``meta["read_error"]`` reasons (the keys of the funnel at step "read").
READ_ERRORS = (
    "invalid_utf8",           # the line / block / file is not valid UTF-8
    "invalid_unicode",        # valid JSON whose text holds lone UTF-16 surrogates ("\ud800")
    "invalid_json",           # a JSON line that does not parse
    "not_an_object",          # a JSON line that parses to a list, string, number, ...
    "missing_text",           # no text field (nor `content`), or it is null
    "non_string_text",        # the text field holds a number, list, object, ...
    "not_squad_layout",       # a .json file without data[].paragraphs[].context
    "corrupt_file",           # damaged / truncated compressed stream or container
    "html_extraction_failed", # trafilatura raised
    "html_no_text",           # trafilatura found no main text (navigation-only pages, ...)
)

# --------------------------------------------------------------------------------------------
# formats and file names

_COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Base extension -> format. ".json" is sniffed (SQuAD layout or JSON lines).
_BASE_EXT = {
    ".txt": "txt", ".md": "txt",
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".warc": "warc", ".wet": "warc",  # CommonCrawl WET files are named *.warc.wet.gz
    ".html": "html", ".htm": "html",
}
# Which compression suffixes each format accepts (warcio reads gzip WARCs; Parquet compresses
# its pages internally).
_ALLOWED_COMPRESSION = {
    "txt": {None, "gzip", "zstd"}, "jsonl": {None, "gzip", "zstd"}, "json": {None, "gzip", "zstd"},
    "parquet": {None}, "warc": {None, "gzip"}, "html": {None, "gzip", "zstd"},
}
SUPPORTED_EXTENSIONS = (
    ".txt", ".md", ".jsonl", ".ndjson", ".json (SQuAD layout or JSON lines)", ".parquet",
    ".warc", ".warc.gz", ".warc.wet.gz", ".html", ".htm",
    "(text, JSON and HTML also as .gz / .zst)",
)
FORMATS = ("txt", "jsonl", "parquet", "warc", "html", "json-squad")

# Files never read as input: hidden files ("."; also our own temp files, see ShardWriter) and
# "_"-prefixed ones (the Hadoop/Spark convention that Parquet datasets follow: _SUCCESS,
# _metadata, _common_metadata), plus the manifests / stats / markers smelt itself writes, so a
# previous stage's output directory can be used as an input.
_IGNORED_NAMES = frozenset({"manifest.json", "stats.json", "recipe.yaml"})
_IGNORED_SUFFIXES = (".done", ".tmp", ".lock", ".crc")

_GLOB_MAGIC = re.compile(r"[*?\[]")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_READ_BUFFER = 1 << 20      # 1 MiB reads: few syscalls, small next to a worker's memory
# Compressed bytes fed to zstd per call. Small, because output decoded in a call that then hits
# damage is lost with the exception: 16 KiB bounds what a corrupt .zst costs beyond the damaged
# block itself, for ~1 Python call per 50-100 KiB of text.
_ZSTD_CHUNK = 1 << 14
_SNIFF_BYTES = 1 << 16      # bytes of a .json file examined to tell SQuAD from JSON lines

# A top-level string field longer than this is not copied into meta (e.g. raw HTML kept next
# to extracted text, a second copy of the text). Our own choice: meta travels with the
# document through every step and into every shard, and 2 KiB is above any URL, title, date
# or label, yet far below a page. Dropped fields are counted and logged once per file.
_META_MAX_CHARS = 2048
# meta keys we set ourselves; a record's own values for them move to "orig_<key>".
_RESERVED_META = ("source", "read_error", "error")
_MAX_ERROR_CHARS = 200      # meta["error"] is a short message, not a dump
_WARN_PER_FILE = 10         # individual warnings per file; the rest is summed up at the end
_PARQUET_BATCH_ROWS = 256   # rows converted to Python at a time (memory ~ one row group anyway)

# HTML -> text. datatrove's Trafilatura extractor (used for FineWeb, Penedo et al. 2024):
# favor_precision=True, include_comments=False; tables are kept (trafilatura's default, kept by
# FineWeb): specs, schedules and infobox facts are real content. We do NOT enable trafilatura's
# `deduplicate` (datatrove does): it is a process-wide LRU cache of seen text segments, so
# output would depend on which pages the same worker process extracted before, breaking
# reproducibility across worker counts and resume. Repeated boilerplate is the job of the
# dedup stage (`data.dedup.lines`).
_TRAFILATURA_OPTIONS: dict[str, Any] = dict(
    output_format="txt", favor_precision=True, include_comments=False, include_tables=True,
    include_images=False, include_links=False, include_formatting=False, deduplicate=False,
)
_HTML_TYPES = ("text/html", "application/xhtml+xml")


def is_ignored_name(name: str) -> bool:
    """True for file names `resolve_files` never returns (hidden, ``_``-prefixed, our markers)."""
    return (name.startswith((".", "_")) or name in _IGNORED_NAMES
            or name.endswith(_IGNORED_SUFFIXES))


def _split_ext(path: str) -> tuple[str, str | None]:
    """(base extension, compression) of a file name: ``a.jsonl.zst`` -> (``.jsonl``, ``zstd``)."""
    name = _basename(path).lower()
    comp = None
    for suf, kind in _COMPRESSION_SUFFIXES.items():
        if name.endswith(suf):
            comp, name = kind, name[: -len(suf)]
            break
    return os.path.splitext(name)[1], comp


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _stem(path: str) -> str:
    """File name without its format and compression suffixes (``a.jsonl.zst`` -> ``a``)."""
    name = _basename(path)
    low = name.lower()
    for suf in _COMPRESSION_SUFFIXES:
        if low.endswith(suf):
            name, low = name[: -len(suf)], low[: -len(suf)]
            break
    base, ext = os.path.splitext(name)
    if ext.lower() == ".wet" and base.lower().endswith(".warc"):
        base = base[:-5]
    return base if ext.lower() in _BASE_EXT else name


def _known_format(path: str) -> str | None:
    """Format from the extension alone (``json`` still needs sniffing); None if unknown."""
    ext, comp = _split_ext(path)
    fmt = _BASE_EXT.get(ext)
    if fmt is None or comp not in _ALLOWED_COMPRESSION[fmt]:
        return None
    return fmt


def detect_format(path: str) -> str:
    """One of ``txt, jsonl, parquet, warc, html, json-squad`` for `path`, by extension.

    A ``.json`` file (optionally ``.gz``/``.zst``) is sniffed: SQuAD layout
    (``{"data": [{"paragraphs": [{"context": ...}]}]}``) gives ``json-squad``; JSON lines (as
    dolma's ``*.json.gz`` document files) give ``jsonl``. Anything else raises `DataInputError`.
    """
    fmt = _known_format(path)
    if fmt is None:
        raise DataInputError(
            f"unknown file type: {path}\n  supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}\n"
            "  set `format:` on the input, or narrow its `glob:`")
    if fmt != "json":
        return fmt
    try:
        sniffed = _sniff_json(path)
    except DataInputError:
        raise
    except OSError as e:
        raise DataInputError(f"cannot read {path} to detect its layout: {e}") from None
    except Exception as e:  # noqa: BLE001 - a remote file's network errors
        if not _is_url(path):
            raise
        raise _remote_error(path, e) from None
    if sniffed is None:
        raise DataInputError(
            f"{path}: a .json input must be SQuAD-style (data[].paragraphs[].context) or JSON "
            "lines (one object per line); set `format:` on the input to read it otherwise")
    return sniffed


_SQUAD_HINT = re.compile(rb'"data"\s*:\s*\[')


def _sniff_json(path: str) -> str | None:
    parts: list[bytes] = []
    size = 0
    with _open_input(path) as stream:
        try:
            while size < _SNIFF_BYTES and (part := stream.read1(_SNIFF_BYTES - size)):
                parts.append(part)
                size += len(part)
        except _CORRUPT_ERRORS:
            # Damaged compressed file: judge by what could be read. If nothing could, call it
            # JSON lines, so the reader turns the damage into a counted corrupt_file document
            # (as for .jsonl.gz) instead of failing the whole run here.
            if not size:
                return "jsonl"
    head = b"".join(parts).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"{"):
        return None
    first, nl, rest = head.partition(b"\n")
    if nl or size < _SNIFF_BYTES:  # the first line is complete inside the window
        try:
            obj = json.loads(first)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if _is_squad(obj):
                return "json-squad"
            rest = rest.lstrip()
            if not rest or rest.startswith(b"{"):
                return "jsonl"
    # A pretty-printed or single-line SQuAD file larger than the window (cmrc2018, DRCD).
    if _SQUAD_HINT.search(head) and b'"paragraphs"' in head:
        return "json-squad"
    return None


def _is_squad(obj: dict) -> bool:
    data = obj.get("data")
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
            and isinstance(data[0].get("paragraphs"), list))


# --------------------------------------------------------------------------------------------
# resolving inputs


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def resolve_files(src: InputSource) -> list[str]:
    """The files of one input source, sorted; raises `DataInputError` before any work starts.

    `src.path` may be a file, a directory (searched with `src.glob`, recursively for ``**``,
    skipping hidden and ``_``-prefixed files and smelt's own manifests/markers), a glob pattern
    or an fsspec URL (``memory://``, ``s3://``, ...). With ``format: auto`` every file must have
    a known extension (see `SUPPORTED_EXTENSIONS`); ``.json`` files are sniffed here too.
    """
    files = _resolve_url(src) if _is_url(src.path) else _resolve_local(src)
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
                f"  supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}\n"
                "  set `format:` on the input, or narrow its `glob:`")
    return files


def _resolve_local(src: InputSource) -> list[str]:
    path = _local(src.path)
    if os.path.isfile(path):
        if not os.access(path, os.R_OK):
            raise DataInputError(f"input file is not readable: {path}")
        return [path]
    if os.path.isdir(path):
        return _walk_dir(path, src.glob)
    if _GLOB_MAGIC.search(path):
        import glob as _glob

        root = _glob_root(path)
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


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard."""
    m = _GLOB_MAGIC.search(pattern)
    head = pattern[: m.start()] if m else pattern
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _hidden_rel(rel: str) -> bool:
    parts = rel.replace(os.sep, "/").split("/")
    return any(p.startswith((".", "_")) for p in parts[:-1]) or is_ignored_name(parts[-1])


def _remote_error(url: str, e: BaseException) -> DataInputError:
    """One sentence for a remote input that cannot be listed or opened. Network stacks (httpx,
    requests, botocore, aiohttp) raise their own exception types, often with 80-line
    tracebacks through retry layers; the cause's first line is what a user can act on."""
    cause = (str(e).strip().splitlines() or [""])[0][:300]
    return DataInputError(f"cannot reach input {url}: {type(e).__name__}" + (f": {cause}" if cause else ""))


def _url_fs(url: str) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataInputError(f"cannot open {url}: {e} (remote protocols need their fsspec "
                             "package, e.g. s3fs for s3://, gcsfs for gs://)") from None
    except Exception as e:  # noqa: BLE001 - any failure to set up a remote filesystem
        raise _remote_error(url, e) from None


def _resolve_url(src: InputSource) -> list[str]:
    fs, root = _url_fs(src.path)
    try:
        if _GLOB_MAGIC.search(root):
            base = _glob_root(root)
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
        raise _remote_error(src.path, e) from None
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


# --------------------------------------------------------------------------------------------
# byte streams: local or fsspec, plain or compressed


class _ZstdReader(io.RawIOBase):
    """zstd decompression that, unlike `ZstdDecompressor.stream_reader`, detects truncation.

    Reads concatenated frames (``cat a.zst b.zst``); a stream ending inside a frame raises
    `CorruptInputError`, damaged data raises `zstandard.ZstdError`.
    """

    def __init__(self, src: IO[bytes]) -> None:
        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: Any = None
        self._buf = memoryview(b"")
        self._error: Exception | None = None  # raised once the output before it is consumed

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            if not self._fill():
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _fill(self) -> bool:
        if self._error is not None:
            raise self._error
        chunk = self._src.read(_ZSTD_CHUNK)
        if not chunk:
            if self._obj is not None:
                raise CorruptInputError("zstd stream ends inside a frame (truncated file)")
            return False
        out = []
        try:
            while chunk:
                if self._obj is None:
                    self._obj = self._dctx.decompressobj()
                out.append(self._obj.decompress(chunk))
                if self._obj.eof:
                    chunk, self._obj = self._obj.unused_data, None
                else:
                    chunk = b""
        except zstandard.ZstdError as e:
            if not any(out):
                raise
            self._error = e  # e.g. garbage after a good frame: hand out that frame first
        self._buf = memoryview(b"".join(out))
        return True


class _GzipReader(io.RawIOBase):
    """`gzip.GzipFile` whose truncation/corruption errors become `CorruptInputError`.

    (warcio swallows ``EOFError`` as a normal end of archive, so a truncated ``.warc.gz`` would
    otherwise end silently.)
    """

    def __init__(self, src: IO[bytes]) -> None:
        self._gz = gzip.GzipFile(fileobj=src, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            # read1, not readinto: one underlying read per call, so the data decoded before
            # the damage is handed out instead of being discarded with the exception.
            data = self._gz.read1(len(b))
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorruptInputError(f"gzip: {e}") from e
        b[: len(data)] = data
        return len(data)


class _open_input:
    """Context manager: a buffered binary stream of `path`, decompressed when compressed.

    Compression is taken from the extension and, for names without one, from the magic bytes
    (gzip ``1f 8b``, zstd ``28 b5 2f fd``), so a misnamed compressed file still reads.
    """

    def __init__(self, path: str, decompress: bool = True) -> None:
        self.path = path
        self.decompress = decompress
        self._closers: list[Any] = []

    def __enter__(self) -> io.BufferedIOBase:
        if _is_url(self.path):
            import fsspec

            try:
                raw = fsspec.open(self.path, "rb").open()
            except Exception as e:  # noqa: BLE001 - network and credential errors of any fsspec backend
                raise _remote_error(self.path, e) from None
            self._closers.append(raw)
            raw = io.BufferedReader(raw, _READ_BUFFER) if not hasattr(raw, "peek") else raw
        else:
            raw = open(_local(self.path), "rb", buffering=_READ_BUFFER)  # noqa: SIM115
            self._closers.append(raw)
        if not self.decompress:
            return raw
        comp = _split_ext(self.path)[1]
        if comp is None:
            magic = raw.peek(4)[:4]
            comp = "gzip" if magic[:2] == _GZIP_MAGIC else "zstd" if magic == _ZSTD_MAGIC else None
        if comp == "gzip":
            return io.BufferedReader(_GzipReader(raw), _READ_BUFFER)
        if comp == "zstd":
            return io.BufferedReader(_ZstdReader(raw), _READ_BUFFER)
        return raw

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self._closers):
            c.close()


# --------------------------------------------------------------------------------------------
# reading documents


@dataclass(slots=True)
class _FileReader:
    """Per-file state shared by the format readers: naming, field mapping, error accounting."""

    path: str
    display: str        # file name relative to the source root: used in ids and meta.source
    name: str           # id prefix: src.name or the file stem
    domain: str
    text_field: str
    id_field: str
    skipped: Counter | None
    problems: Counter = field(default_factory=Counter)
    dropped_fields: Counter = field(default_factory=Counter)

    def gen_id(self, n: int) -> str:
        return f"{self.name}/{self.display}:{n}"

    def error_doc(self, n: int, reason: str, message: str, raw: str = "",
                  doc_id: str | None = None) -> Document:
        message = message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."
        self.problems[reason] += 1
        if sum(self.problems.values()) <= _WARN_PER_FILE:
            log.warning("%s:%d: %s: %s", self.path, n, reason, message)
        return Document(id=doc_id or self.gen_id(n), text=raw, domain=self.domain,
                        meta={"source": f"{self.display}:{n}", "read_error": reason, "error": message})

    def skip(self, key: str, n: int, why: str) -> None:
        log.debug("%s:%d: skipped (%s)", self.path, n, why)
        if self.skipped is not None:
            self.skipped[key] += 1

    def finish(self) -> None:
        total = sum(self.problems.values())
        if total > _WARN_PER_FILE:
            log.warning("%s: %d bad records in all (%d not logged individually): %s", self.path,
                        total, total - _WARN_PER_FILE, dict(sorted(self.problems.items())))
        if self.dropped_fields:
            log.info("%s: bulky fields not copied into meta (> %d chars or binary): %s",
                     self.path, _META_MAX_CHARS, dict(sorted(self.dropped_fields.items())))

    def from_record(self, rec: dict[str, Any], n: int) -> Document | tuple[str, str, str | None]:
        """A `Document` from one JSON object / Parquet row, or ``(reason, message, id)``."""
        rid = rec.get(self.id_field)
        doc_id = str(rid) if rid is not None and rid != "" else None
        text_key = self.text_field if self.text_field in rec else "content"
        text = rec.get(text_key)
        if text is None:
            return ("missing_text", f"no {self.text_field!r} or 'content' field (or it is null)", doc_id)
        if type(text) is not str:
            return ("non_string_text", f"field {text_key!r} holds {type(text).__name__}, not a string", doc_id)
        meta: dict[str, Any] = {}
        # datatrove/dolma keep metadata nested under "metadata", smelt under "meta": flatten
        # it, then let top-level fields win (datatrove's `metadata | data`).
        nested_keys = ()
        for key in ("metadata", "meta"):
            nested = rec.get(key)
            if isinstance(nested, str) and nested[:1] == "{":
                try:
                    nested = json.loads(nested)
                except ValueError:
                    continue
            if isinstance(nested, dict):
                meta.update(nested)
                nested_keys += (key,)
        for k, v in rec.items():
            if k == text_key or k == self.id_field or k in nested_keys:
                continue
            if (type(v) is str and len(v) > _META_MAX_CHARS) or isinstance(v, (bytes, bytearray)):
                self.dropped_fields[k] += 1
                continue
            meta[k] = v
        for k in _RESERVED_META:
            if k in meta:
                meta["orig_" + k] = meta.pop(k)
        meta["source"] = f"{self.display}:{n}"
        return Document(id=doc_id or self.gen_id(n), text=text, domain=self.domain, meta=meta)


def read_documents(path: str, src: InputSource, *, skipped: Counter | None = None) -> Iterator[Document]:
    """Stream the documents of one input file (see the module docstring for the formats).

    ``id`` is the record's `src.id_field` when present, else ``<name>/<file>:<n>`` (``name`` =
    `src.name` or the file stem, ``file`` = the path relative to the source root, ``n`` = the
    1-based line, block-start line or record number); ``meta["source"]`` is ``<file>:<n>``.
    At most `src.limit` documents are read. Records that are not documents (blank JSON lines,
    WARC requests, non-HTML responses) are counted into `skipped` when given.
    """
    fmt = src.format if src.format != "auto" else detect_format(path)
    reader = _FileReader(
        path=path, display=_display_name(path, src), name=src.name or _stem(path),
        domain=src.domain, text_field=src.text_field, id_field=src.id_field, skipped=skipped)
    if fmt == "txt":
        gen = _read_txt_paragraphs(reader) if src.txt_split == "paragraph" else _read_txt_file(reader)
    else:
        gen = _READERS[fmt](reader)
    n = 0
    try:
        for doc in gen:
            yield doc
            n += 1
            if src.limit is not None and n >= src.limit:
                break
    finally:
        gen.close()
        reader.finish()


def _display_name(path: str, src: InputSource) -> str:
    """`path` relative to the source root (its file name for a single-file source).

    Relative rather than the bare file name so that ``en/000.jsonl`` and ``zh/000.jsonl`` in one
    directory source get distinct ids.
    """
    root = src.path
    if _is_url(root):
        fs, root = _url_fs(root)
        path = fs._strip_protocol(path)
    else:
        root, path = _local(root), _local(path)
    root = _glob_root(root) if _GLOB_MAGIC.search(root) else root
    root = root.rstrip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1:]
    return _basename(path)


def _decode_line(line: bytes) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _read_jsonl(r: _FileReader) -> Iterator[Document]:
    loads = json.loads
    blank = 0
    n = 0
    with _open_input(r.path) as stream:
        try:
            for n, line in enumerate(stream, 1):  # noqa: B007 - n is used after the loop
                if line.isspace():
                    blank += 1
                    continue
                try:
                    s = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield r.error_doc(n, "invalid_utf8", f"invalid UTF-8 at byte {e.start}",
                                      line.decode("utf-8", "replace").rstrip("\r\n"))
                    continue
                if n == 1 and s.startswith("\ufeff"):
                    s = s[1:]
                try:
                    rec = loads(s)
                except (ValueError, RecursionError) as e:
                    yield r.error_doc(n, "invalid_json", str(e) or type(e).__name__, s.rstrip("\r\n"))
                    continue
                if type(rec) is not dict:
                    yield r.error_doc(n, "not_an_object", f"a JSON {type(rec).__name__}, not an object",
                                      s.rstrip("\r\n"))
                    continue
                doc = r.from_record(rec, n)
                if type(doc) is tuple:
                    yield r.error_doc(n, doc[0], doc[1], s.rstrip("\r\n"), doc[2])
                    continue
                # JSON may spell lone surrogates ("\ud800"): such text cannot be written as
                # UTF-8 by any later stage. Only lines with a \u escape can hold one.
                if "\\u" in s and _SURROGATE.search(doc.text):
                    yield r.error_doc(n, "invalid_unicode", "text holds lone UTF-16 surrogates",
                                      _SURROGATE.sub("\ufffd", doc.text), doc.id)
                    continue
                yield doc
        except _CORRUPT_ERRORS as e:
            yield r.error_doc(n + 1, "corrupt_file", f"{type(e).__name__}: {e}")
    if blank:
        log.debug("%s: skipped %d blank line(s)", r.path, blank)
        if r.skipped is not None:
            r.skipped["blank_line"] += blank


def _read_txt_file(r: _FileReader) -> Iterator[Document]:
    with _open_input(r.path) as stream:
        try:
            data = stream.read()
        except _CORRUPT_ERRORS as e:
            yield r.error_doc(1, "corrupt_file", f"{type(e).__name__}: {e}")
            return
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield r.error_doc(1, "invalid_utf8", f"invalid UTF-8 at line {line}, byte {e.start}",
                          data.decode("utf-8", "replace"))
        return
    yield Document(id=r.gen_id(1), text=text, domain=r.domain, meta={"source": f"{r.display}:1"})


def _read_txt_paragraphs(r: _FileReader) -> Iterator[Document]:
    """One document per block of non-blank lines; n = the block's first line number."""
    block: list[bytes] = []
    start = 0
    n = 0

    def emit() -> Document:
        data = b"".join(block).rstrip(b"\r\n")
        if start == 1:
            data = data.removeprefix(b"\xef\xbb\xbf")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = start + data.count(b"\n", 0, e.start)
            return r.error_doc(start, "invalid_utf8", f"invalid UTF-8 at line {line}",
                               data.decode("utf-8", "replace"))
        return Document(id=r.gen_id(start), text=text, domain=r.domain,
                        meta={"source": f"{r.display}:{start}"})

    with _open_input(r.path) as stream:
        try:
            for n, line in enumerate(stream, 1):  # noqa: B007
                if line.isspace():
                    if block:
                        yield emit()
                        block = []
                    continue
                if not block:
                    start = n
                block.append(line)
        except _CORRUPT_ERRORS as e:
            # The block in progress may be cut anywhere: report it as part of the damage.
            yield r.error_doc(start if block else n + 1, "corrupt_file", f"{type(e).__name__}: {e}")
            return
    if block:
        yield emit()


def _read_squad(r: _FileReader) -> Iterator[Document]:
    """SQuAD layout (CMRC 2018, DRCD): one document per ``data[].paragraphs[].context``.

    The file is parsed whole: SQuAD files are evaluation-sized (a few MB) and JSON offers no
    record boundaries to stream on. ``qas`` (questions and answers) are not copied into meta:
    they are bulky, and they are evaluation material that the corpus should not carry along.
    """
    with _open_input(r.path) as stream:
        try:
            data = stream.read()
        except _CORRUPT_ERRORS as e:
            yield r.error_doc(1, "corrupt_file", f"{type(e).__name__}: {e}")
            return
    try:
        obj = json.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError as e:
        yield r.error_doc(1, "invalid_utf8", f"invalid UTF-8 at byte {e.start}", "")
        return
    except (ValueError, RecursionError) as e:
        yield r.error_doc(1, "corrupt_file", f"not valid JSON: {e}")
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        yield r.error_doc(1, "not_squad_layout", "expected an object with a `data` list")
        return
    n = 0
    for article in obj["data"]:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            n += 1
            yield r.error_doc(n, "not_squad_layout", "a data[] entry without a `paragraphs` list",
                              json.dumps(article, ensure_ascii=False)[:10_000])
            continue
        title = article.get("title")
        for para in paragraphs:
            n += 1
            ctx = para.get("context") if isinstance(para, dict) else None
            pid = para.get(r.id_field) if isinstance(para, dict) else None
            pid = str(pid) if pid not in (None, "") else None
            if type(ctx) is not str:
                reason = "missing_text" if ctx is None else "non_string_text"
                yield r.error_doc(n, reason, "paragraph without a string `context`",
                                  json.dumps(para, ensure_ascii=False)[:10_000], pid)
                continue
            meta: dict[str, Any] = {"title": title} if isinstance(title, str) else {}
            meta["source"] = f"{r.display}:{n}"
            yield Document(id=pid or r.gen_id(n), text=ctx, domain=r.domain, meta=meta)


def _read_parquet(r: _FileReader) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    # Local files go to Arrow's native reader by path; fsspec URLs as Python file objects.
    with _open_input(r.path, decompress=False) if _is_url(r.path) else _nullctx(_local(r.path)) as raw:
        try:
            pf = pq.ParquetFile(raw)
            # Binary columns (images, raw bytes) never become text or meta: do not even read them.
            schema = pf.schema_arrow
            binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                      or pa.types.is_fixed_size_binary(f.type)]
            for name in binary:
                r.dropped_fields[name] += pf.metadata.num_rows
            columns = [f.name for f in schema if f.name not in binary]
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    n += 1
                    doc = r.from_record(row, n)
                    if type(doc) is tuple:
                        yield r.error_doc(n, doc[0], doc[1],
                                          json.dumps(row, ensure_ascii=False, default=str), doc[2])
                    else:
                        yield doc
        except (pa.ArrowException, *_CORRUPT_ERRORS) as e:
            yield r.error_doc(n + 1, "corrupt_file", f"{type(e).__name__}: {e}")


class _nullctx:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def _charset(content_type: str | None) -> str | None:
    if content_type:
        m = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", content_type, re.I)
        if m:
            return m.group(1)
    return None


def _html_to_text(payload: bytes, charset: str | None, url: str | None) -> tuple[str | None, str | None]:
    """(main text, None), or (None, error) when trafilatura raised."""
    import trafilatura

    html: str | bytes = payload
    # Declared charset, then UTF-8 (most of the web); otherwise hand trafilatura the bytes and
    # let it detect the encoding (slower, so only as a fallback). Same order as datatrove.
    for enc in (charset, "utf-8"):
        if enc:
            try:
                html = payload.decode(enc)
                break
            except (UnicodeDecodeError, LookupError):
                continue
    try:
        return trafilatura.extract(html, url=url, **_TRAFILATURA_OPTIONS), None
    except Exception as e:  # noqa: BLE001 - lxml/trafilatura raise many kinds on bad HTML
        return None, f"{type(e).__name__}: {e}"


def _html_doc(r: _FileReader, n: int, payload: bytes, charset: str | None, url: str | None,
              doc_id: str, meta: dict[str, Any]) -> Document:
    text, err = _html_to_text(payload, charset, url)
    if err is not None or not text:
        try:
            raw = payload.decode(charset or "utf-8", "replace")
        except LookupError:  # unknown charset name
            raw = payload.decode("utf-8", "replace")
        doc = r.error_doc(n, "html_extraction_failed" if err else "html_no_text",
                          err or "no main text found", raw, doc_id)
        doc.meta.update({k: v for k, v in meta.items() if k not in doc.meta})
        return doc
    meta["source"] = f"{r.display}:{n}"
    return Document(id=doc_id, text=text, domain=r.domain, meta=meta)


def _read_html(r: _FileReader) -> Iterator[Document]:
    with _open_input(r.path) as stream:
        try:
            payload = stream.read()
        except _CORRUPT_ERRORS as e:
            yield r.error_doc(1, "corrupt_file", f"{type(e).__name__}: {e}")
            return
    yield _html_doc(r, 1, payload, None, None, r.gen_id(1), {})


def _read_warc(r: _FileReader) -> Iterator[Document]:
    """HTML responses of a WARC (main text by trafilatura) and text records of a WET file.

    id = WARC-Record-ID, meta url (WARC-Target-URI) and date (WARC-Date); n counts all WARC
    records of the file (requests and metadata included), so it is stable. Records that are
    not documents (warcinfo, requests, metadata, non-HTML or non-2xx responses) are skipped
    and counted.
    """
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    with _open_input(r.path) as stream:
        # `_open_input` decompresses gzip itself: warcio would end a truncated .warc.gz silently.
        reads = _ShortReads(stream)
        archive = ArchiveIterator(reads)
        it = iter(archive)
        n = 0
        record = None
        end = 0  # where the last complete record ends, in (decompressed) stream bytes
        while True:
            try:
                nxt = next(it, None)  # also drains the previous record: damage may show here
            except (ArchiveLoadFailed, ValueError, *_CORRUPT_ERRORS) as e:
                yield r.error_doc(n + 1, "corrupt_file", f"{type(e).__name__}: {e}")
                return
            if nxt is None:
                break
            record = nxt
            n += 1
            try:
                doc = _warc_record(r, n, record)
                end = archive.get_record_offset() + archive.get_record_length()
            except (ArchiveLoadFailed, ValueError, *_CORRUPT_ERRORS) as e:
                yield r.error_doc(n, "corrupt_file", f"{type(e).__name__}: {e}")
                return
            if doc is not None:
                yield doc
        # Truncation that gzip can't see (an uncompressed .warc): the last record has fewer
        # bytes than its Content-Length, or a cut header follows it, which warcio takes for
        # the end of the archive. Records are separated by CRLF CRLF: allow a little slack.
        if record is not None and getattr(record.raw_stream, "limit", 0) > 0:
            yield r.error_doc(n, "corrupt_file", "WARC record shorter than its Content-Length")
        elif reads.tell() - end > 16:
            yield r.error_doc(n + 1, "corrupt_file",
                              f"{reads.tell() - end} bytes after the last record are not a complete record")


class _ShortReads:
    """``read(n)`` as ``read1(n)``: at most one underlying read per call.

    `io.BufferedReader.read(n)` gathers several reads and throws them all away if one raises;
    warcio reads in 16 KiB blocks, so the records before a damaged spot would be lost.
    """

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self._s = stream
        self._pos = 0  # decompressed streams can't tell(); warcio asks for record offsets

    def read(self, n: int = -1) -> bytes:
        data = self._s.read1(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._s.close()


def _warc_record(r: _FileReader, n: int, record: Any) -> Document | None:
    headers = record.rec_headers
    kind = record.rec_type
    url = headers.get_header("WARC-Target-URI")
    date = headers.get_header("WARC-Date")
    rid = headers.get_header("WARC-Record-ID") or r.gen_id(n)
    if kind == "conversion":  # WET: text extracted by CommonCrawl
        payload = record.content_stream().read()
        text = payload.decode("utf-8", "replace")
        return Document(id=rid, text=text, domain=r.domain,
                        meta={"url": url, "date": date, "source": f"{r.display}:{n}"})
    if kind == "response" and record.http_headers is not None:
        status = record.http_headers.get_statuscode()
        if not status.startswith("2"):
            r.skip("warc_non_2xx", n, f"HTTP status {status}")
            return None
        content_type = record.http_headers.get_header("Content-Type") or ""
    elif kind == "resource":
        content_type = headers.get_header("Content-Type") or ""
    else:
        r.skip(f"warc_{kind}", n, f"{kind} record")
        return None
    # CommonCrawl's detected type (WARC-Identified-Payload-Type) beats the server's header.
    mime = (headers.get_header("WARC-Identified-Payload-Type") or content_type).split(";")[0].strip().lower()
    if mime not in _HTML_TYPES:
        r.skip("warc_non_html", n, f"{kind} of type {mime or 'unknown'}")
        return None
    payload = record.content_stream().read()
    return _html_doc(r, n, payload, _charset(content_type), url, rid, {"url": url, "date": date})


_READERS = {
    "jsonl": _read_jsonl,
    "json-squad": _read_squad,
    "parquet": _read_parquet,
    "warc": _read_warc,
    "html": _read_html,
}  # txt: read_documents picks the file or paragraph reader from src.txt_split


# --------------------------------------------------------------------------------------------
# writing shards

ShardFormat = Literal["jsonl.zst", "parquet"]
SHARD_FORMAT_VERSION = 1
_ZSTD_LEVEL = 3             # zstd's own default: ~4x on text at >100 MB/s per core
_WRITE_BUFFER = 1 << 20     # JSONL bytes gathered before one compress call
# Parquet row groups: flush at this many rows or text bytes, whichever first. ~64 MiB keeps a
# row group a sensible unit of parallel reading without holding a whole shard in memory.
_PARQUET_GROUP_ROWS = 65_536
_PARQUET_GROUP_BYTES = 64 << 20


def shard_suffix(fmt: ShardFormat) -> str:
    """File suffix of a shard format: ``.jsonl.zst`` or ``.parquet``."""
    if fmt == "jsonl.zst":
        return ".jsonl.zst"
    if fmt == "parquet":
        return ".parquet"
    raise ValueError(f"unknown shard format {fmt!r}; expected 'jsonl.zst' or 'parquet'")


def _json_default(o: Any) -> Any:
    """JSON for the non-JSON values steps or Parquet inputs may leave in meta."""
    if hasattr(o, "item") and callable(o.item):  # numpy scalars
        return o.item()
    if isinstance(o, (_dt.datetime, _dt.date, _dt.time)):
        return o.isoformat()
    if isinstance(o, decimal.Decimal):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    if isinstance(o, (bytes, bytearray)):
        return f"<{len(o)} bytes>"
    if hasattr(o, "tolist"):  # numpy arrays
        return o.tolist()
    return str(o)


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be UTF-8: escape them (\udXXX) so the line is valid JSON that
        # reads back to exactly the same string.
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), default=_json_default).encode("ascii")


def _utf8_safe(s: str) -> str:
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        log.warning("replacing lone surrogates with U+FFFD for a Parquet string column")
        return _SURROGATE.sub("\ufffd", s)


class ShardWriter:
    """Write documents to one shard file, atomically and deterministically.

    Use as a context manager. Data goes to a hidden temp file beside `path` (never picked up
    as input, see `is_ignored_name`); `close` renames it to `path` (after an fsync when SMELT_FSYNC=1). If the block
    raises, the temp file is removed and nothing appears at `path`.
    """

    def __init__(self, path: Path | str, fmt: ShardFormat) -> None:
        shard_suffix(fmt)  # validates fmt
        self.path = Path(path)
        self.fmt = fmt
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._closed = False
        self._fh: IO[bytes] | None = None
        self._pq: Any = None
        if fmt == "jsonl.zst":
            self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
            # One frame, checksummed, no content size (unknown while streaming): the bytes
            # depend only on the input and the zstd version. Single-threaded on purpose: zstd's
            # multi-threaded mode produces different (still valid) output.
            self._cobj = zstandard.ZstdCompressor(
                level=_ZSTD_LEVEL, write_checksum=True, write_content_size=False).compressobj()
            self._buf: list[bytes] = []
            self._buf_bytes = 0
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._pa = pa
            self._schema = pa.schema([("id", pa.string()), ("text", pa.string()),
                                      ("domain", pa.string()), ("meta", pa.string())])
            self._pq = pq.ParquetWriter(
                str(self._tmp), self._schema, compression="zstd", use_dictionary=["domain"],
                # min/max of long text is useless and large; ids and domains are worth it.
                write_statistics=["id", "domain"])
            self._cols: tuple[list[str], ...] = ([], [], [], [])
            self._col_bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, doc: Document) -> None:
        if self._closed:
            raise ValueError(f"write to closed shard {self.path}")
        if self.fmt == "jsonl.zst":
            line = _dumps(doc.to_record()) + b"\n"
            self._buf.append(line)
            self._buf_bytes += len(line)
            if self._buf_bytes >= _WRITE_BUFFER:
                self._flush_jsonl()
        else:
            ids, texts, domains, metas = self._cols
            ids.append(doc.id)
            texts.append(doc.text)
            domains.append(doc.domain)
            metas.append(_dumps(doc.meta).decode("utf-8"))
            self._col_bytes += len(doc.text)
            if len(ids) >= _PARQUET_GROUP_ROWS or self._col_bytes >= _PARQUET_GROUP_BYTES:
                self._flush_parquet()
        self.count += 1

    def _flush_jsonl(self) -> None:
        if self._buf:
            self._fh.write(self._cobj.compress(b"".join(self._buf)))
            self._buf.clear()
            self._buf_bytes = 0

    def _flush_parquet(self) -> None:
        if not self._cols[0]:
            return
        pa = self._pa
        try:
            arrays = [pa.array(c, pa.string()) for c in self._cols]
        except (UnicodeEncodeError, pa.ArrowException):
            arrays = [pa.array([_utf8_safe(s) for s in c], pa.string()) for c in self._cols]
        self._pq.write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        for c in self._cols:
            c.clear()
        self._col_bytes = 0

    def close(self) -> None:
        """Finish the file and move it into place (idempotent)."""
        if self._closed:
            return
        try:
            if self.fmt == "jsonl.zst":
                self._flush_jsonl()
                self._fh.write(self._cobj.flush())
                self._fh.flush()
                maybe_fsync(self._fh.fileno())
                self._fh.close()
            else:
                self._flush_parquet()
                self._pq.close()
                if FSYNC:
                    fd = os.open(self._tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop the shard: close and delete the temp file; `path` is left untouched."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fh is not None:
                self._fh.close()
            if self._pq is not None:
                self._pq.close()
        except Exception:  # noqa: BLE001 - already failing; the temp file goes anyway
            log.debug("error while aborting %s", self._tmp, exc_info=True)
        finally:
            self._tmp.unlink(missing_ok=True)


def read_shard(path: str | Path) -> Iterator[Document]:
    """Read one of our own shards back (``.jsonl.zst``, ``.jsonl``, ``.parquet``).

    Unlike `read_documents` this is strict: our own files must be intact, so damage raises
    ``ValueError`` naming the file and line.
    """
    p = str(path)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            cols = batch.to_pydict()
            for i, t, d, m in zip(cols["id"], cols["text"], cols["domain"], cols["meta"], strict=True):
                yield Document(id=i, text=t, domain=d, meta=json.loads(m) if m else {})
        return
    n = 0
    with _open_input(p) as stream:
        lines = enumerate(stream, 1)
        while True:
            try:
                n, line = next(lines, (0, None))
            except _CORRUPT_ERRORS as e:
                raise ValueError(f"{p}: damaged shard after {n} record(s): {type(e).__name__}: {e}") from e
            if line is None:
                return
            try:
                yield Document.from_record(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{p}:{n}: damaged shard record: {type(e).__name__}: {e}") from e


def count_shard(path: str | Path) -> int:
    """Number of documents in one of our shards, without parsing them (accounting checks).

    Parquet: from the footer. JSON lines: newlines in the decompressed stream (every record
    `ShardWriter` writes ends with one, and JSON text never contains a raw newline).
    """
    p = str(path)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(p).metadata.num_rows)
    n = 0
    try:
        with _open_input(p) as stream:
            while True:
                chunk = stream.read(1 << 20)
                if not chunk:
                    return n
                n += chunk.count(b"\n")
    except _CORRUPT_ERRORS as e:
        raise ValueError(f"{p}: damaged shard: {type(e).__name__}: {e}") from e
