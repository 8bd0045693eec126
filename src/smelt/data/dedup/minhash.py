"""Near-duplicate detection: MinHash signatures, LSH band keys, bucket pairs, clusters.

The executor runs it as sharded stages, all of them pure functions of their inputs:

1. signatures: per input shard, ``MinHasher.signatures(texts)`` -> ``band_keys`` -> an
   ``(N, bands)`` uint64 table next to the documents' global ``order``;
2. buckets: per band, the keys of all shards -> ``bucket_pairs`` -> candidate pairs;
3. clusters: all bands' pairs -> ``clusters`` (union-find, optional Jaccard verification)
   -> ``{duplicate order: kept order}``;
4. filter: documents whose order is in that mapping go to ``duplicates/``.

The kept document of a cluster is its smallest order, so the result does not depend on
sharding, worker count or the order in which pairs arrive.

Defaults (recipe ``dedup.minhash``) follow FineWeb (Penedo et al. 2024, Section 3.5):
5-gram shingles, 14 bands x 8 rows = 112 permutations. The LSH merge probability of a pair
with Jaccard similarity s is ``1 - (1 - s**rows)**bands`` (Leskovec, Rajaraman & Ullman,
Mining of Massive Datasets, Section 3.4.2). For 14 x 8: 0.9996 at s = 0.9, 0.988 at 0.85,
0.924 at 0.8, 0.50 at s = 0.685, 0.053 at 0.5, 9.1e-3 at 0.4 and 9.2e-4 at 0.3 (see
`lsh_probability`). So a pair at s = 0.5 still becomes a candidate 5% of the time: set
``verify_jaccard`` when no pair below a similarity may ever be merged.

Shingles: word n-grams over `smelt.data.text.tokens`, which makes one token of every Han/kana
character, so CJK text (no spaces) is shingled by character n-grams (``cjk_ngram``).
Tokens are lowercased and punctuation is not a token, as in datatrove's ``simplify_text``.

Permutations: ``h_i(x) = (a_i * x + b_i) mod p`` with p = 2^61 - 1 (a Mersenne prime),
x the low 32 bits of a shingle hash, a_i in [1, p), b_i in [0, p) from
``np.random.default_rng(seed)``; this is the universal family of Carter & Wegman (1979) as
used by datasketch and datatrove. The product a*x needs up to 93 bits, so it is computed
exactly with 64-bit limbs and Mersenne folding (datatrove multiplies in uint64 and silently
wraps, which breaks the modular arithmetic). The minimum over shingles is stored in 32 bits
(uint32): equal minima stay equal, unequal ones collide with probability 2^-32 per row.

``hash_family: multiply_shift`` uses ``h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32`` instead, with
a_i, b_i uniform 64-bit and x the low 32 bits of a shingle hash: strongly universal (2-independent;
Dietzfelbinger 1996, "Universal hashing and k-wise independent random variables via integer
arithmetic without primes"), and exactly what uint64 arithmetic computes, wrap-around included.
The shift is monotone, so the minimum is taken on the 64-bit values and shifted once per document:
one multiply and one add per shingle and permutation, against ~14 passes for the Mersenne family.
Like any 2-independent family its minimum is not exactly min-wise independent; Thorup (2013,
"Bottom-k and priority sampling, set similarity and subset sums with minimal independence")
bounds the bias of similarity estimates from such hashes, and `bench/curate.py` compares the
decisions of both families.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from smelt.config import MinHashConfig
from smelt.data.text import is_cjk_text, ngram_hashes, token_hashes, tokens

__all__ = [
    "EMPTY_BAND_KEY",
    "MERSENNE_PRIME",
    "SENTINEL",
    "MinHasher",
    "UnionFind",
    "band_keys",
    "bucket_pairs",
    "clusters",
    "connected_components",
    "estimate_jaccard",
    "jaccard",
    "large_star",
    "lsh_probability",
    "node_partition",
    "pair_partition",
    "small_star",
]

log = logging.getLogger(__name__)

MERSENNE_PRIME = (1 << 61) - 1
_P = np.uint64(MERSENNE_PRIME)
_M32 = np.uint64(0xFFFFFFFF)
_M29 = np.uint64((1 << 29) - 1)
_S29, _S32, _S61 = np.uint64(29), np.uint64(32), np.uint64(61)

# Signature of a text without shingles (empty, or only punctuation/whitespace): every row
# is SENTINEL (as datatrove's ``SENTINEL = 2**32 - 1``). `band_keys` gives such rows the key
# EMPTY_BAND_KEY, which `bucket_pairs` ignores: empty documents are never near-duplicates of
# anything, not even of each other (identical empty texts are exact dedup's business).
SENTINEL = np.uint32(0xFFFFFFFF)
EMPTY_BAND_KEY = np.uint64(0)

# Shingles permuted per block: 112 x 512 x 8 B = 0.46 MB per buffer, so the three buffers of the
# Mersenne family's ~14 elementwise passes stay in a 2 MB L2 cache, and the buffers do not grow
# with document size (a 50 MB document is ~10M shingles: 9 GB as one block). Measured on the
# 2-core dev machine (WikiText-2 paragraphs, us/doc, Mersenne / multiply-shift): 256 rows 65 / 25,
# 512: 71 / 23, 1024: 97 / 24, 2048: 133 / 27.
_BLOCK_ROWS = 512

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finalizer (Steele et al. 2014)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def lsh_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that a pair with Jaccard ``s`` shares at least one of ``bands`` bands."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


class MinHasher:
    """Shingles and MinHash signatures for one `MinHashConfig` (bands x rows permutations)."""

    def __init__(self, cfg: MinHashConfig) -> None:
        self.cfg = cfg
        self.num_perm = cfg.bands * cfg.rows
        rng = np.random.default_rng(cfg.seed)
        a = rng.integers(1, MERSENNE_PRIME, size=self.num_perm, dtype=np.uint64)
        b = rng.integers(0, MERSENNE_PRIME, size=self.num_perm, dtype=np.uint64)
        self.a, self.b = a, b
        self.family = cfg.hash_family
        if self.family == "rensa":
            self._rensa = load_rensa()
        if self.family == "multiply_shift":  # its own draws: a, b uniform over all of uint64
            ms = np.random.default_rng([cfg.seed, 0x6D73])
            self.a = ms.integers(0, 2**64, size=self.num_perm, dtype=np.uint64, endpoint=False)
            self.b = ms.integers(0, 2**64, size=self.num_perm, dtype=np.uint64, endpoint=False)
            self._ms_a, self._ms_b = self.a[:, None], self.b[:, None]
        # a = a_hi * 2^32 + a_lo with a_hi < 2^29, so x * a_hi < 2^61 and x * a_lo < 2^64.
        # Columns: a block is (permutations, shingles), so each inner loop runs along the shingles,
        # contiguous, with one scalar parameter (1.5x faster than rows of 112 permutations).
        self._a_hi = (a >> _S32)[:, None]
        self._a_lo = (a & _M32)[:, None]
        self._b = b[:, None]

    @property
    def params_digest(self) -> str:
        """Short digest of the permutation parameters, for stage manifests.

        numpy documents that `Generator` streams may change between releases; signatures
        computed under another numpy must not be mixed with these. Compare this digest.
        """
        h = hashlib.sha256(self.a.tobytes() + self.b.tobytes()).hexdigest()[:16]
        family = {"mersenne": "", "multiply_shift": "ms-"}.get(self.family) or f"rensa{rensa_version()[1]}-"
        return f"minhash-{family}{self.cfg.bands}x{self.cfg.rows}-{h}"

    # ---------------------------------------------------------------------------- shingles

    def ngram_for(self, text: str) -> int:
        """Shingle length for this text: ``cjk_ngram`` for CJK text, else ``ngram``."""
        return self.cfg.cjk_ngram if is_cjk_text(text) else self.cfg.ngram

    def _shingle_hashes(self, text: str) -> np.ndarray:
        """64-bit hashes of all n-grams, repeats included (the minimum does not mind)."""
        return ngram_hashes(token_hashes(tokens(text)), self.ngram_for(text))

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique 64-bit shingle hashes of ``text`` (empty array when it has no tokens)."""
        return np.unique(self._shingle_hashes(text))

    # -------------------------------------------------------------------------- signatures

    def _permute(self, x: np.ndarray, out: np.ndarray, tmp: np.ndarray, tmp2: np.ndarray) -> np.ndarray:
        """``out[j, i] = (a_j * x[i] + b_j) mod p`` exactly, for x < 2^32; shapes (1, S) -> (K, S).

        Mersenne reduction: 2^61 = 1 (mod p), so v mod p = (v & p) + (v >> 61) up to one
        final subtraction. All work is in caller-provided buffers (no allocation per block).
        """
        # high limb: (x * a_hi) * 2^32, with t = x * a_hi < 2^61:
        #   t * 2^32 = (t >> 29) * 2^61 + (t & (2^29 - 1)) * 2^32 = (t >> 29) + ((t & M29) << 32)
        np.multiply(x, self._a_hi, out=tmp)
        np.bitwise_and(tmp, _M29, out=out)
        np.left_shift(out, _S32, out=out)
        np.right_shift(tmp, _S29, out=tmp)
        out += tmp  # < 2^61 + 2^32
        # low limb: u = x * a_lo < 2^64, folded to < 2^61 + 8
        np.multiply(x, self._a_lo, out=tmp)
        np.right_shift(tmp, _S61, out=tmp2)
        out += tmp2
        np.bitwise_and(tmp, _P, out=tmp)
        out += tmp
        out += self._b  # total < 3 * 2^61 + 2^33 < 2^63: no overflow
        # fold once more: < 2^61 + 4, then subtract p where >= p. With unsigned wrap-around
        # min(v, v - p) is exactly that: v - p is huge unless v >= p.
        np.right_shift(out, _S61, out=tmp)
        np.bitwise_and(out, _P, out=out)
        out += tmp
        np.subtract(out, _P, out=tmp)
        np.minimum(out, tmp, out=out)
        return out

    def _multiply_shift(self, x: np.ndarray, out: np.ndarray, tmp: np.ndarray, tmp2: np.ndarray) -> np.ndarray:
        """``out[i, j] = (a_j * x[i] + b_j) mod 2^64`` (uint64 wrap-around); the ``>> 32`` comes
        after the minimum. Shapes (1, S) -> (K, S)."""
        np.multiply(x, self._ms_a, out=out)
        out += self._ms_b
        return out

    def _signatures_from_hashes(self, hashes: Sequence[np.ndarray]) -> np.ndarray:
        """MinHash of each shingle-hash array; rows of empty arrays are SENTINEL."""
        n, k = len(hashes), self.num_perm
        lengths = np.fromiter((h.size for h in hashes), dtype=np.int64, count=n)
        if self.family == "rensa":  # one call for the batch; a document without shingles is all SENTINEL
            flat = np.concatenate([np.asarray(h, dtype=np.uint64) for h in hashes]) if n else np.zeros(0, np.uint64)
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.uint64)
            m = self._rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, k, self.cfg.seed)
            res = np.array(m.to_rows(), dtype=np.uint32).reshape(n, k)
            res[lengths == 0] = SENTINEL
            return res
        sig = np.full((n, k), np.iinfo(np.uint64).max, dtype=np.uint64)
        total = int(lengths.sum())
        if total:
            x = np.concatenate([h for h in hashes if h.size]) & _M32
            docs = np.flatnonzero(lengths)  # documents with shingles, in order
            starts = np.concatenate(([0], np.cumsum(lengths[docs])[:-1]))
            rows = min(_BLOCK_ROWS, total)
            out = np.empty((k, rows), dtype=np.uint64)
            tmp = np.empty_like(out)
            tmp2 = np.empty_like(out)
            permute = self._permute if self.family == "mersenne" else self._multiply_shift
            for c0 in range(0, total, rows):
                c1 = min(c0 + rows, total)
                m = c1 - c0
                block = permute(x[None, c0:c1], out[:, :m], tmp[:, :m], tmp2[:, :m])
                # documents overlapping [c0, c1): the one containing c0 and those starting inside
                lo = int(np.searchsorted(starts, c0, side="right")) - 1
                hi = int(np.searchsorted(starts, c1, side="left"))
                seg = starts[lo:hi] - c0
                seg[0] = 0  # the first document may have started in an earlier block
                mins = np.minimum.reduceat(block, seg, axis=1).T
                d = docs[lo:hi]
                sig[d] = np.minimum(sig[d], mins)
        if self.family == "multiply_shift":
            res = (sig >> _S32).astype(np.uint32)  # the shift, once per document (it is monotone)
        else:
            res = (sig & _M32).astype(np.uint32)
        res[lengths == 0] = SENTINEL
        return res

    def signature(self, text: str) -> np.ndarray:
        """uint32 array of length bands * rows; all SENTINEL for a text without shingles."""
        return self._signatures_from_hashes([self._shingle_hashes(text)])[0]

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """uint32 array of shape (N, bands * rows): `signature` of every text, batched.

        Batching concatenates the shingles of many documents so the permutation runs on
        large blocks, amortizing numpy's per-call overhead over documents.
        """
        return self._signatures_from_hashes([self._shingle_hashes(t) for t in texts])


def load_rensa() -> Any:
    """The rensa module; ImportError with the install command when it is missing."""
    try:
        import rensa
    except ImportError as e:
        raise ImportError(f"dedup.minhash.hash_family: rensa needs the rensa package (pip install 'smelt[rensa]'): "
                          f"{e}") from None
    return rensa


def rensa_version() -> tuple[str, int]:
    """(package version, RMinHash.ALGORITHM_VERSION): the signatures change with the latter, so a
    stage's key holds it and a resumed stage never mixes two algorithms."""
    from importlib.metadata import version

    return version("rensa"), int(load_rensa().RMinHash.ALGORITHM_VERSION)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Share of equal signature rows: an unbiased estimate of the shingle Jaccard similarity."""
    return float(np.mean(np.asarray(sig_a) == np.asarray(sig_b)))


# --------------------------------------------------------------------------------- bands


def band_keys(sigs: np.ndarray, bands: int, rows: int, band: int | None = None) -> np.ndarray:
    """One 64-bit key per band: shape (N, bands) uint64; with `band`, that band's keys only,
    shape (N,), equal to column `band` of the full result (what one LSH band task needs).

    A polynomial hash over the band's rows seeded with the band index, through the
    splitmix64 finalizer; keys of different bands differ even for equal rows, so pooled
    tables stay safe. Documents whose signature is all SENTINEL (no shingles) get
    EMPTY_BAND_KEY in every band; a real key that happens to equal it is moved to 1.
    """
    sigs = np.asarray(sigs)
    if sigs.ndim != 2 or sigs.shape[1] != bands * rows:
        raise ValueError(f"signatures must have shape (N, {bands * rows}), got {sigs.shape}")
    n = sigs.shape[0]
    if band is not None:
        if not 0 <= band < bands:
            raise ValueError(f"band must be in [0, {bands}), got {band}")
        one = _band_keys_of(sigs[:, band * rows:(band + 1) * rows].reshape(n, 1, rows), np.array([band + 1]), rows)
        one[(sigs == SENTINEL).all(axis=1), 0] = EMPTY_BAND_KEY
        return one[:, 0]
    acc = _band_keys_of(sigs.reshape(n, bands, rows), np.arange(1, bands + 1), rows)
    empty = (sigs == SENTINEL).all(axis=1)
    acc[empty] = EMPTY_BAND_KEY
    return acc


def _band_keys_of(v: np.ndarray, seeds: np.ndarray, rows: int) -> np.ndarray:
    """Keys of (N, b, rows) band values, band j seeded with ``seeds[j]`` (its 1-based index)."""
    n, b = v.shape[0], v.shape[1]
    v = v.astype(np.uint64)
    with np.errstate(over="ignore"):
        acc = np.broadcast_to(seeds.astype(np.uint64) * _GOLDEN, (n, b)).copy()
        for j in range(rows):
            acc *= _GOLDEN
            acc += v[:, :, j]
        acc ^= acc >> np.uint64(30)
        acc *= _MIX1
        acc ^= acc >> np.uint64(27)
        acc *= _MIX2
        acc ^= acc >> np.uint64(31)
    acc[acc == EMPTY_BAND_KEY] = np.uint64(1)
    return acc


def bucket_pairs(keys: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Candidate pairs of ONE band: ``(min order in bucket, other order)``, shape (P, 2) int64.

    A bucket is the set of documents with equal key; each member other than the earliest is
    paired with the earliest (a star: enough for connectivity, and linear in bucket size
    where all pairs would be quadratic). Keys equal to EMPTY_BAND_KEY are ignored. Rows are
    sorted by (key, order), so the output is deterministic.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    orders = np.asarray(orders, dtype=np.int64)
    if keys.shape != orders.shape or keys.ndim != 1:
        raise ValueError(f"keys and orders must be 1-D of equal length, got {keys.shape} and {orders.shape}")
    live = keys != EMPTY_BAND_KEY
    keys, orders = keys[live], orders[live]
    n = keys.size
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    idx = np.lexsort((orders, keys))
    sk, so = keys[idx], orders[idx]
    head = np.empty(n, dtype=bool)
    head[0] = True
    np.not_equal(sk[1:], sk[:-1], out=head[1:])
    first = so[head][np.cumsum(head) - 1]
    member = ~head & (so != first)  # a repeated (key, order) must not pair with itself
    return np.stack((first[member], so[member]), axis=1)


# ------------------------------------------------------------------------------ clusters


class UnionFind:
    """Disjoint sets over arbitrary int64 orders; the root of a set is always its minimum.

    Union by minimum (the larger root is linked under the smaller one) keeps the kept
    document of a cluster deterministic; path splitting keeps `find` near O(1) amortized.
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        p = parent.get(x, x)
        while p != x:
            gp = parent.get(p, p)
            if gp != p:
                parent[x] = gp  # path splitting: every visited node skips to its grandparent
            x, p = p, gp
        return x

    def union(self, a: int, b: int) -> int:
        """Merge the sets of ``a`` and ``b``; return the new root (the smaller one)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return lo

    def mapping(self) -> dict[int, int]:
        """Every non-root element -> the root (smallest element) of its set."""
        out = {}
        for x in list(self.parent):
            r = self.find(x)
            if r != x:
                out[x] = r
        return out


def connected_components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized connected components of an edge list over int64 orders.

    Returns ``(nodes, roots)``: every order that appears in ``pairs`` (sorted) and the
    smallest order of its component. Hooking plus pointer jumping (Shiloach & Vishkin 1982,
    without the unconditional hooking step): each round, every root with an edge to a
    smaller root is linked to the smallest such root, then all paths are compressed; rounds
    repeat until no edge joins two roots. Few rounds in practice, each a handful of numpy
    passes, so millions of pairs take well under a second.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy()
    nodes, inv = np.unique(pairs, return_inverse=True)
    inv = inv.reshape(-1, 2)
    u, v = inv[:, 0], inv[:, 1]
    keep = u != v
    u, v = u[keep], v[keep]
    parent = np.arange(nodes.size, dtype=np.int64)  # node index order == order order
    while u.size:
        pu, pv = parent[u], parent[v]
        lo, hi = np.minimum(pu, pv), np.maximum(pu, pv)
        cross = lo != hi
        if not cross.any():
            break
        np.minimum.at(parent, hi[cross], lo[cross])
        while True:  # pointer jumping until every node points at a root
            gp = parent[parent]
            if np.array_equal(gp, parent):
                break
            parent = gp
        u, v = u[cross], v[cross]  # edges already inside one tree stay there
    return nodes, nodes[parent]


# ------------------------------------------------------------- components over node partitions
#
# The connected components of a pair list too large for one process, as tasks: alternating
# large-star and small-star steps (Kiveris, Lattanzi, Mirrokni, Rastogi & Vassilvitskii 2014,
# "Connected Components in MapReduce and Beyond"), each a pure function of the edges incident to
# one partition of the nodes, until a large-star and the small-star after it change nothing. The
# edges are then a forest of stars, each node pointing at the smallest node of its component:
# exactly `connected_components`' (nodes, roots), without any process holding every edge.


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (np.asarray(x, dtype=np.int64).astype(np.uint64) + _GOLDEN) * _MIX1
        x ^= x >> np.uint64(29)
        x *= _MIX2
        return x ^ (x >> np.uint64(32))


def node_partition(nodes: np.ndarray, parts: int) -> np.ndarray:
    """The partition (0..parts-1) of each node (an int64 order): a hash, so partitions are even."""
    return (_mix(nodes) % np.uint64(parts)).astype(np.int64)


def pair_partition(pairs: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each pair (rows of an (N, 2) int64 array), by both ends."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    with np.errstate(over="ignore"):
        h = _mix(pairs[:, 0]) ^ (_mix(pairs[:, 1]) * _MIX2)
    return (h % np.uint64(parts)).astype(np.int64)


def _groups(recs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (u, w) records sorted by (u, w), the start of each u's run, and each record's run."""
    recs = np.unique(np.asarray(recs, dtype=np.int64).reshape(-1, 2), axis=0)
    recs = recs[recs[:, 0] != recs[:, 1]]
    u, w = recs[:, 0], recs[:, 1]
    head = np.ones(len(u), dtype=bool)
    head[1:] = u[1:] != u[:-1]
    return u, w, np.flatnonzero(head), np.cumsum(head) - 1


def large_star(recs: np.ndarray) -> tuple[np.ndarray, int]:
    """Large-star over one node partition. `recs`: (u, w) for every edge {u, w} incident to a
    node u of the partition, keyed by u (both orientations of each edge are written, so every
    node sees all its neighbours). Each u links its larger neighbours to m(u), the smallest of u
    and its neighbours. Returns the edges (w, m(u)), w > m(u), deduplicated, and how many of them
    are new (zero: the step left the edge set as it was)."""
    u, w, starts, gid = _groups(recs)
    if not len(u):
        return np.empty((0, 2), dtype=np.int64), 0
    m = np.minimum(u[starts], np.minimum.reduceat(w, starts))[gid]
    up = w > u
    out = np.unique(np.stack((w[up], m[up]), axis=1), axis=0)
    return out, int(np.count_nonzero(up & (m < u)))


def small_star(recs: np.ndarray) -> tuple[np.ndarray, int]:
    """Small-star over one node partition. `recs`: (u, w) with w < u, keyed by u (each edge once,
    at its larger end). Each u and its smaller neighbours are linked to the smallest of them.
    Returns the edges (x, m), x > m, deduplicated, and how many nodes had more than one smaller
    neighbour (zero: the step left the edge set as it was)."""
    u, w, starts, gid = _groups(recs)
    if not len(u):
        return np.empty((0, 2), dtype=np.int64), 0
    m_run = np.minimum.reduceat(w, starts)
    m = m_run[gid]
    lower = w != m
    out = np.concatenate([np.stack((w[lower], m[lower]), axis=1), np.stack((u[starts], m_run), axis=1)])
    return np.unique(out, axis=0), int(len(u) - len(starts))


def clusters(pairs: np.ndarray, verify: Callable[[int, int], bool] | None = None) -> dict[int, int]:
    """Duplicate order -> smallest order of its connected component (roots are absent).

    Without ``verify`` the components are computed vectorized (`connected_components`).
    With ``verify`` (e.g. a Jaccard check on the two documents' shingles) a pair is only
    joined when ``verify(a, b)`` is True. Pairs are deduplicated and visited in sorted
    order, and a pair whose ends are already connected is not verified again (joining it
    would change nothing), so the result is deterministic and verify runs at most once per
    distinct pair.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if verify is None:
        nodes, roots = connected_components(pairs)
        dup = nodes != roots
        return dict(zip(nodes[dup].tolist(), roots[dup].tolist(), strict=True))
    if pairs.size == 0:
        return {}
    lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    uniq = np.unique(np.stack((lo, hi), axis=1)[lo != hi], axis=0)
    uf = UnionFind()
    checked = rejected = 0
    for a, b in uniq.tolist():
        if uf.find(a) == uf.find(b):
            continue
        checked += 1
        if verify(a, b):
            uf.union(a, b)
        else:
            rejected += 1
    log.debug("minhash clusters: %d candidate pairs, %d verified, %d rejected", len(uniq), checked, rejected)
    return uf.mapping()


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two unique shingle arrays (as from `MinHasher.shingles`).

    Two empty arrays give 0.0, not 1.0: a document without shingles carries no evidence
    of being a near-duplicate, and verification must never merge on no evidence.
    """
    if a.size == 0 or b.size == 0:
        return 0.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)
