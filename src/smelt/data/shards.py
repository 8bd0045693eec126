"""Document shards: the files curation writes (``clean/``, ``rejects/``, ``duplicates/``) and
the next stages read back. The format is specified here, once, and read back only here.

Version 1:

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
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import zstandard

from smelt.data.document import Document
from smelt.data.fs import CORRUPT_ERRORS, open_input
from smelt.fsutil import FSYNC, committed, maybe_fsync

log = logging.getLogger(__name__)

__all__ = ["SHARD_FORMAT_VERSION", "ShardFormat", "ShardWriter", "count_shard", "read_shard", "shard_suffix"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_READ_BATCH_ROWS = 256      # Parquet rows converted to Python at a time

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
    as input, see `smelt.data.inputs.is_ignored_name`); `close` renames it to `path` (after an
    fsync when SMELT_FSYNC=1). If the block raises, the temp file is removed and nothing
    appears at `path`.
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
        committed(self.path)  # uploaded when the run directory is on a store

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

    Unlike `smelt.data.readers.read_documents` this is strict: our own files must be intact, so damage raises
    ``ValueError`` naming the file and line.
    """
    p = str(path)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        for batch in pf.iter_batches(batch_size=_READ_BATCH_ROWS):
            cols = batch.to_pydict()
            for i, t, d, m in zip(cols["id"], cols["text"], cols["domain"], cols["meta"], strict=True):
                yield Document(id=i, text=t, domain=d, meta=json.loads(m) if m else {})
        return
    n = 0
    with open_input(p) as stream:
        lines = enumerate(stream, 1)
        while True:
            try:
                n, line = next(lines, (0, None))
            except CORRUPT_ERRORS as e:
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
        with open_input(p) as stream:
            while True:
                chunk = stream.read(1 << 20)
                if not chunk:
                    return n
                n += chunk.count(b"\n")
    except CORRUPT_ERRORS as e:
        raise ValueError(f"{p}: damaged shard: {type(e).__name__}: {e}") from e
