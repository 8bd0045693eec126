"""Bytes of an input file: local paths and fsspec URLs, plain or compressed.

`open_input(path)` gives a buffered binary stream, decompressed (gzip or zstd, by extension
or magic bytes) with truncation detected: a damaged or cut-off stream raises one of
`CORRUPT_ERRORS` after handing out the bytes before the damage, which the readers turn into
one ``corrupt_file`` document. Any other ``OSError`` (network, permissions, a file deleted
under us) propagates: the task fails and is retried rather than recording an infrastructure
hiccup as bad data. Remote failures to list or open become one `DataInputError` sentence
(`remote_error`).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from pathlib import Path
from typing import IO, Any

import zstandard

from smelt.data.errors import CorruptInputError, DataInputError

__all__ = [
    "CORRUPT_ERRORS",
    "GLOB_MAGIC",
    "basename",
    "glob_root",
    "is_url",
    "local_path",
    "open_input",
    "remote_error",
    "split_ext",
    "url_fs",
]

# Errors that mean "this file's bytes are damaged" (-> one corrupt_file document).
CORRUPT_ERRORS = (CorruptInputError, zstandard.ZstdError, EOFError, zlib.error, gzip.BadGzipFile)

COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
GLOB_MAGIC = re.compile(r"[*?\[]")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

READ_BUFFER = 1 << 20       # 1 MiB reads: few syscalls, small next to a worker's memory
# Compressed bytes fed to zstd per call. Small, because output decoded in a call that then hits
# damage is lost with the exception: 16 KiB bounds what a corrupt .zst costs beyond the damaged
# block itself, for ~1 Python call per 50-100 KiB of text.
_ZSTD_CHUNK = 1 << 14


# --------------------------------------------------------------------------------------------
# names and URLs


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def split_ext(path: str) -> tuple[str, str | None]:
    """(base extension, compression) of a file name: ``a.jsonl.zst`` -> (``.jsonl``, ``zstd``)."""
    name = basename(path).lower()
    comp = None
    for suf, kind in COMPRESSION_SUFFIXES.items():
        if name.endswith(suf):
            comp, name = kind, name[: -len(suf)]
            break
    return os.path.splitext(name)[1], comp


def strip_compression(name: str) -> str:
    """`name` without a trailing compression suffix (case kept): ``A.jsonl.ZST`` -> ``A.jsonl``."""
    low = name.lower()
    for suf in COMPRESSION_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard."""
    m = GLOB_MAGIC.search(pattern)
    head = pattern[: m.start()] if m else pattern
    return head.rsplit("/", 1)[0] if "/" in head else ""


def remote_error(url: str, e: BaseException) -> DataInputError:
    """One sentence for a remote input that cannot be listed or opened. Network stacks (httpx,
    requests, botocore, aiohttp) raise their own exception types, often with 80-line
    tracebacks through retry layers; the cause's first line is what a user can act on."""
    cause = (str(e).strip().splitlines() or [""])[0][:300]
    return DataInputError(f"cannot reach input {url}: {type(e).__name__}" + (f": {cause}" if cause else ""))


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL; `DataInputError` when it cannot be set up."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataInputError(f"cannot open {url}: {e} (remote protocols need their fsspec "
                             "package, e.g. s3fs for s3://, gcsfs for gs://)") from None
    except Exception as e:  # noqa: BLE001 - any failure to set up a remote filesystem
        raise remote_error(url, e) from None


def local_copy(url: str) -> Path:
    """A local copy of a remote file or directory (an evaluation set, a model) for code that
    reads by path: downloaded once into ``$SMELT_STAGE_DIR/downloads`` (default
    ``~/.cache/smelt/stage``), keyed by URL, size and modification time, and reused after."""
    import hashlib
    import shutil
    import tempfile

    fs, path = url_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: not found") from None
    except Exception as e:  # noqa: BLE001 - network and credential errors of any fsspec backend
        raise remote_error(url, e) from None
    stamp = f"{url}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('created')}"
    from smelt.fsutil import stage_base

    base = stage_base() / "downloads"
    dest = base / hashlib.sha256(stamp.encode()).hexdigest()[:16] / path.rstrip("/").rsplit("/", 1)[-1]
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        target = tmp / dest.name
        if info.get("type") == "directory":
            fs.get(path.rstrip("/") + "/", str(target) + "/", recursive=True)
        else:
            fs.get_file(path, str(target))
        os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------
# byte streams


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


class open_input:  # noqa: N801 - used like open()
    """Context manager: a buffered binary stream of `path`, decompressed when compressed.

    Compression is taken from the extension and, for names without one, from the magic bytes
    (gzip ``1f 8b``, zstd ``28 b5 2f fd``), so a misnamed compressed file still reads.
    """

    def __init__(self, path: str, decompress: bool = True) -> None:
        self.path = path
        self.decompress = decompress
        self._closers: list[Any] = []

    def __enter__(self) -> io.BufferedIOBase:
        if is_url(self.path):
            import fsspec

            try:
                raw = fsspec.open(self.path, "rb").open()
            except Exception as e:  # noqa: BLE001 - network and credential errors of any fsspec backend
                raise remote_error(self.path, e) from None
            self._closers.append(raw)
            raw = io.BufferedReader(raw, READ_BUFFER) if not hasattr(raw, "peek") else raw
        else:
            raw = open(local_path(self.path), "rb", buffering=READ_BUFFER)  # noqa: SIM115
            self._closers.append(raw)
        if not self.decompress:
            return raw
        comp = split_ext(self.path)[1]
        if comp is None:
            magic = raw.peek(4)[:4]
            comp = "gzip" if magic[:2] == _GZIP_MAGIC else "zstd" if magic == _ZSTD_MAGIC else None
        if comp == "gzip":
            return io.BufferedReader(_GzipReader(raw), READ_BUFFER)
        if comp == "zstd":
            return io.BufferedReader(_ZstdReader(raw), READ_BUFFER)
        return raw

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self._closers):
            c.close()
