"""Exact deduplication: one 64-bit hash of the normalized text per document.

The executor runs it as two sharded stages: every shard emits ``(exact_key, order)`` for its
documents; the keys of all shards are concatenated and `first_occurrence` tells each
document which earlier document (smallest global ``order``) it duplicates. The kept copy of a
duplicate group is therefore always the first one in corpus order, whatever the sharding.

Collisions: with 64-bit keys the chance of any false merge among N documents is about
N^2 / 2^65, i.e. ~3e-2 for N = 1e9 documents and ~3e-8 for N = 1e6 (birthday bound).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xxhash

__all__ = ["exact_key", "exact_keys", "first_occurrence", "normalize_for_exact"]

_xxh3 = xxhash.xxh3_64_intdigest


def normalize_for_exact(text: str) -> str:
    """Lowercase, collapse every run of whitespace to one space, strip the ends.

    Why: the same page crawled twice, or copied between sites, routinely differs only in
    letter case of headings, line wrapping, indentation and trailing newlines; none of that
    makes it a different training document. Punctuation and digits are kept on purpose: they
    carry content (prices, dates, code), and near-duplicates that differ there are MinHash's
    job, not exact dedup's. ``str.split()`` without arguments splits on all Unicode
    whitespace (including U+3000 IDEOGRAPHIC SPACE and NBSP) in C, which is both faster and
    more complete than a regex.
    """
    return " ".join(text.lower().split())


def exact_key(text: str) -> int:
    """64-bit xxh3 of `normalize_for_exact(text)` as a Python int in ``[0, 2**64)``."""
    # surrogatepass: a reader that decoded bad bytes with surrogateescape must not crash dedup
    return _xxh3(normalize_for_exact(text).encode("utf-8", "surrogatepass"))


def exact_keys(texts: Iterable[str]) -> np.ndarray:
    """`exact_key` of every text, as a uint64 array (the per-shard output of stage one)."""
    return np.fromiter((exact_key(t) for t in texts), dtype=np.uint64)


def first_occurrence(keys: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """For each element, the smallest ``order`` among the elements with the same key.

    An element whose result equals its own order is the kept (first) copy; every other
    element is a duplicate of the document with the returned order. Vectorized: one lexsort
    (key, then order), a group-start mask, and a scatter back to input positions.

    Args:
        keys: uint64 array of exact keys, shape (N,).
        orders: int64 global corpus orders, shape (N,); need not be sorted or unique.

    Returns:
        int64 array, shape (N,).
    """
    keys = np.asarray(keys, dtype=np.uint64)
    orders = np.asarray(orders, dtype=np.int64)
    if keys.shape != orders.shape or keys.ndim != 1:
        raise ValueError(f"keys and orders must be 1-D of equal length, got {keys.shape} and {orders.shape}")
    n = keys.size
    if n == 0:
        return np.empty(0, dtype=np.int64)
    idx = np.lexsort((orders, keys))  # primary: key, secondary: order
    sk = keys[idx]
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    np.not_equal(sk[1:], sk[:-1], out=starts[1:])
    group = np.cumsum(starts) - 1
    first_sorted = orders[idx][starts][group]
    out = np.empty(n, dtype=np.int64)
    out[idx] = first_sorted
    return out
