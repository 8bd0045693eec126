"""Token shard format: one `.bin` of token ids and one `.idx` of document end offsets.

Written and read only through this module (format version 1):

``<name>.bin``  64-byte header, then the token ids, little-endian, uint16 (vocabulary
                <= 65,536) or uint32, documents back to back, each ending with EOS.

    offset  size  field
    0       8     magic  b"SMELTTOK"
    8       4     version (uint32) = 1
    12      4     bytes per token (uint32): 2 or 4
    16      8     number of tokens (uint64)
    24      8     number of documents (uint64)
    32      32    reserved (zeros)

``<name>.idx``  64-byte header (magic b"SMELTIDX", version, 0, number of documents, zeros), then
                one int64 per document: the offset (in tokens) one past its last token (EOS
                included), so document i spans ``[end[i-1], end[i])``.

A truncated or foreign file fails `open_shard` with a message naming the file; the header's
counts must agree with the file sizes. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smelt.fsutil import atomic_open, staged

VERSION = 1
HEADER_BYTES = 64
TOK_MAGIC = b"SMELTTOK"
IDX_MAGIC = b"SMELTIDX"
_HEADER = struct.Struct("<8sIIQQ32x")
assert _HEADER.size == HEADER_BYTES


class ShardFormatError(ValueError):
    """A token shard that is truncated, foreign, or inconsistent with its index."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65_536 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Shard:
    """A memory-mapped shard: ``tokens`` (uint16/uint32) and document ``ends`` (int64)."""

    path: Path
    tokens: np.ndarray
    ends: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.ends.shape[0])

    def document(self, i: int) -> np.ndarray:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.tokens[start: int(self.ends[i])]


def write_shard(path: str | Path, docs: list[np.ndarray] | np.ndarray, ends: np.ndarray | None = None,
                dtype: np.dtype | type = np.uint16) -> tuple[int, int]:
    """Write a shard from a list of per-document token arrays (each already ending in EOS), or
    from one flat array plus its document ``ends``. Returns (tokens, documents)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"token dtype must be uint16 or uint32, not {dtype}")
    if ends is None:
        lens = np.array([len(d) for d in docs], dtype=np.int64)
        ends = np.cumsum(lens, dtype=np.int64)
        flat = np.concatenate(docs) if len(docs) else np.zeros(0, dtype=dtype)
    else:
        flat = np.asarray(docs)
        ends = np.asarray(ends, dtype=np.int64)
    if len(flat) and int(flat.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(flat.max())} does not fit {dtype}")
    if len(ends) and int(ends[-1]) != len(flat):
        raise ValueError("document ends do not cover the tokens")
    flat = flat.astype(dtype.newbyteorder("<"), copy=False)
    path = Path(path)
    n_tok, n_doc = len(flat), len(ends)
    with atomic_open(path.with_suffix(".bin"), "wb") as f:
        f.write(_HEADER.pack(TOK_MAGIC, VERSION, dtype.itemsize, n_tok, n_doc))
        f.write(flat.tobytes())
    with atomic_open(path.with_suffix(".idx"), "wb") as f:
        f.write(_HEADER.pack(IDX_MAGIC, VERSION, 0, n_doc, n_doc))
        f.write(ends.astype("<i8").tobytes())
    return n_tok, n_doc


def _read_header(path: Path, magic: bytes) -> tuple[int, int, int, int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: missing") from None
    if len(raw) < HEADER_BYTES:
        raise ShardFormatError(f"{path}: truncated header ({len(raw)} bytes)")
    got, version, width, a, b = _HEADER.unpack(raw)
    if got != magic:
        raise ShardFormatError(f"{path}: not a smelt token file (magic {got!r})")
    if version != VERSION:
        raise ShardFormatError(f"{path}: format version {version}, this smelt reads {VERSION}")
    return version, width, a, b


def open_shard(path: str | Path) -> Shard:
    """Memory-map ``<path>.bin`` and ``<path>.idx`` (suffix optional) after checking headers and sizes."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    bin_p, idx_p = staged(base.with_suffix(".bin")), staged(base.with_suffix(".idx"))
    _, width, n_tok, n_doc = _read_header(bin_p, TOK_MAGIC)
    if width not in (2, 4):
        raise ShardFormatError(f"{bin_p}: {width} bytes per token is not supported")
    expect = HEADER_BYTES + n_tok * width
    if bin_p.stat().st_size != expect:
        raise ShardFormatError(f"{bin_p}: {bin_p.stat().st_size} bytes, header says {expect} (truncated?)")
    _, _, n_doc_idx, _ = _read_header(idx_p, IDX_MAGIC)
    if n_doc_idx != n_doc or idx_p.stat().st_size != HEADER_BYTES + 8 * n_doc:
        raise ShardFormatError(f"{idx_p}: does not match {bin_p.name} ({n_doc} documents expected)")
    dtype = np.dtype("<u2" if width == 2 else "<u4")
    tokens = (np.memmap(bin_p, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tok,))
              if n_tok else np.zeros(0, dtype=dtype))
    ends = (np.memmap(idx_p, dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(n_doc,))
            if n_doc else np.zeros(0, dtype=np.int64))
    if n_doc and int(ends[-1]) != n_tok:
        raise ShardFormatError(f"{idx_p}: last document ends at {int(ends[-1])}, shard has {n_tok} tokens")
    return Shard(path=base, tokens=tokens, ends=ends)
