"""The training data loader: a pure function from a global sample index to a training sequence.

``MixtureLoader(tokens_dir, cfg, seed)`` maps sample ``k`` to one window of ``seq_len + 1``
tokens of one domain and applies the objective. Nothing depends on history, worker count or
data-parallel size, so the loader's whole state is the next sample index: resume is exact,
also onto another number of ranks (DESIGN.md, "Data loading and resume").

How sample k is chosen
----------------------
1. **Schedule.** The sample stream is cut into *segments* with constant mixture probabilities.
   A segment ends at a curriculum stage boundary (sample ``ceil(until_tokens / seq_len)``: the
   first sample whose ``k * seq_len`` tokens consumed reach ``until_tokens``) or when a domain
   finishes an epoch or reaches its epoch cap; the next segment's probabilities are the stage
   weights with (a) capped domains removed and their share redistributed to the others in
   proportion to their weights, and (b) each domain scaled by ``reuse_decay ** epoch`` (epoch =
   complete passes already made over it), so repeated data is drawn less often. Default decay
   ``exp(-1 / 15.4)`` = 0.937 per extra epoch: the value of a repeated token in Muennighoff et
   al. 2023 ("Scaling Data-Constrained Language Models", R*_D = 15.4) decays as exp(-R / R*_D)
   after R repetitions. There are at most (domains x epochs + stages) segments, computed once at
   start-up from closed forms, never by replaying samples.
2. **Exact proportions.** Inside a segment with probabilities p, the first n samples hold
   ``c_d(n) = G_d(n) - G_{d-1}(n)`` samples of domain d, ``G_d(n) = floor(n * P_d + 1/2)``,
   ``P_d`` the cumulative probabilities: within one sample of ``n * p_d`` at every n, and summing
   to n. Samples are dealt in blocks of B (>= 1024, and >= 2 / min p so that every active domain
   gets at least one sample per block, which makes block counts non-negative); the labels of a
   block are shuffled with a generator seeded by (seed, segment, block). Domain and rank of
   sample k inside its domain are then O(1): ``base_d + c_d(block start) + rank within block``.
   (Megatron-LM's BlendableDataset builds a similar deterministic index, greedily, and stores it.)
3. **Windows.** A domain's train tokens (all its shards concatenated) are cut into
   non-overlapping windows of ``seq_len + 1`` tokens (the tail shorter than one window is not
   used). The i-th sample drawn from a domain is window ``perm_e(i mod n)`` of epoch
   ``e = i // n``, with ``perm_e`` a keyed Feistel permutation (cycle-walking, 6 rounds of a
   splitmix64 round function) seeded by (seed, domain name, epoch): a fresh shuffle every epoch
   with O(1) memory at any corpus size. The epoch cap is ``floor(max_epochs * n)`` windows.

Batches: ``batch(start, global_batch, rank, world)`` gives rank r the samples
``[start + r * B/R, start + (r + 1) * B/R)`` of the global batch ``[start, start + B)``, so the
concatenation of all ranks' slices is the world-1 batch.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from smelt.config import LoaderConfig
from smelt.fsutil import read_json
from smelt.tokens.objectives import IGNORE_INDEX, Example, SpecialIds, build_objective
from smelt.tokens.shards import Shard, ShardFormatError, open_shard

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
STATE_VERSION = 1
# Bump when a change alters which tokens a sample index maps to: saved loader states then fail
# their fingerprint check instead of silently resuming into a different stream.
SAMPLER_VERSION = 1

DEFAULT_REUSE_DECAY = math.exp(-1.0 / 15.4)  # Muennighoff et al. 2023, R*_D = 15.4 (see module doc)
DEFAULT_BLOCK = 1024
MAX_BLOCK = 1 << 22
_FEISTEL_ROUNDS = 6
_M64 = (1 << 64) - 1
# Stream tags keep the generators of unrelated random choices apart.
_TAG_MIX, _TAG_PERM, _TAG_OBJECTIVE = 0x4D4958, 0x5045524D, 0x4F424A

Split = Literal["train", "val"]


class TokenStoreError(ValueError):
    """tokens/ is missing, incomplete, or disagrees with its manifest."""


class DataExhausted(IndexError):
    """The requested sample lies past the end of the data under the epoch caps."""


class LoaderStateError(ValueError):
    """A saved loader state that does not belong to this recipe, seed and token shards."""


# --------------------------------------------------------------------------------------------
# token store: memory-mapped shards, one concatenated stream per domain


@dataclass
class DomainStream:
    """All shards of one domain and split, read as one token stream."""

    name: str
    shards: list[Shard]
    offsets: np.ndarray  # (S + 1,) int64: first token of each shard in the stream, then the total
    n_docs: int

    def __post_init__(self) -> None:
        # Plain ndarray views of the maps: slicing an np.memmap runs Python-level __getitem__ and
        # __array_finalize__ (2 us per slice here, vs 0.1 us for the view; a sample takes 3-4).
        self._tokens = [s.tokens.view(np.ndarray) for s in self.shards]
        self._ends = [s.ends.view(np.ndarray) for s in self.shards]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _pieces(self, start: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard index, local start, local end, position in the request) covering [start, start+length)."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"{self.name}: tokens [{start}, {start + length}) outside the stream of {len(self)}")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = 0
        while pos < length:
            a = start + pos - int(self.offsets[i])
            b = min(int(self.offsets[i + 1] - self.offsets[i]), a + length - pos)
            if b > a:
                yield i, a, b, pos
                pos += b - a
            i += 1

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (a copy)."""
        out = np.empty(length, dtype=np.int64)
        for i, a, b, pos in self._pieces(start, length):
            out[pos: pos + b - a] = self._tokens[i][a:b]
        return out

    def doc_starts(self, start: int, length: int) -> np.ndarray:
        """Positions in (0, length) of the request where a new document begins (from the .idx)."""
        found = []
        for i, a, b, pos in self._pieces(start, length):
            if pos > 0 and a == 0:  # shards hold whole documents: a shard start is a document start
                found.append(np.array([pos], dtype=np.int64))
            ends = self._ends[i]
            lo = int(ends.searchsorted(a, side="right"))
            hi = int(ends.searchsorted(b, side="left"))
            if hi > lo:
                found.append(ends[lo:hi] - (a - pos))
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def segment_ids(self, start: int, length: int) -> np.ndarray:
        """Document index (0 = the document the request starts in) of every requested token."""
        seg = np.zeros(length, dtype=np.int64)
        seg[self.doc_starts(start, length)] = 1
        return np.cumsum(seg, out=seg)


class TokenStore:
    """``tokens/manifest.json`` and every shard of one split, memory-mapped.

    ``store[domain]`` is that domain's `DomainStream`. Raises `TokenStoreError` when the
    manifest is missing, incomplete or of another format version, and `ShardFormatError`
    (naming the file) when a shard is truncated or disagrees with the manifest.
    """

    def __init__(self, tokens_dir: str | Path, split: Split = "train") -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.dir = Path(tokens_dir)
        self.split = split
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise TokenStoreError(f"{path}: missing; run `smelt pack` first")
        try:
            m = read_json(path)
        except (OSError, ValueError) as e:
            raise TokenStoreError(f"{path}: unreadable ({e})") from None
        if m.get("format_version") != MANIFEST_VERSION:
            raise TokenStoreError(f"{path}: format_version {m.get('format_version')!r}, "
                                  f"this smelt reads {MANIFEST_VERSION}")
        if m.get("complete") is not True:
            raise TokenStoreError(f"{path}: packing is not complete; re-run `smelt pack`")
        if m.get("dtype") not in ("uint16", "uint32") or not isinstance(m.get("domains"), dict) or not m["domains"]:
            raise TokenStoreError(f"{path}: needs dtype uint16|uint32 and a non-empty `domains` mapping")
        self.manifest: dict[str, Any] = m
        self.dtype = np.dtype(m["dtype"])
        self.eos_id = int(m["eos_id"])
        self.vocab_size = int(m["vocab_size"])
        self.domains: list[str] = sorted(m["domains"])
        self._streams = {d: self._open(d) for d in self.domains}

    def _open(self, domain: str) -> DomainStream:
        entry = self.manifest["domains"][domain].get(self.split) or {"tokens": 0, "docs": 0, "shards": []}
        shards: list[Shard] = []
        for stem in entry.get("shards", []):
            try:
                shard = open_shard(self.dir / domain / stem)
            except ShardFormatError as e:
                raise ShardFormatError(f"{e} [domain {domain!r}, split {self.split}; re-run `smelt pack`]") from None
            if shard.tokens.dtype.itemsize != self.dtype.itemsize:
                raise ShardFormatError(f"{shard.path}.bin: {shard.tokens.dtype.itemsize * 8}-bit tokens, "
                                       f"manifest says {self.dtype}")
            # Cheap check of the EOS convention: the last token of the shard closes a document.
            if shard.n_tokens and int(shard.tokens[-1]) != self.eos_id:
                raise ShardFormatError(f"{shard.path}.bin: does not end with EOS ({self.eos_id}); "
                                       "documents must be EOS-terminated")
            shards.append(shard)
        offsets = np.zeros(len(shards) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([s.n_tokens for s in shards])
        n_docs = sum(s.n_docs for s in shards)
        if int(offsets[-1]) != int(entry.get("tokens", 0)) or n_docs != int(entry.get("docs", 0)):
            raise TokenStoreError(f"{self.dir / domain}: {self.split} shards hold {int(offsets[-1])} tokens in "
                                  f"{n_docs} documents, manifest says {entry.get('tokens')} in {entry.get('docs')} "
                                  "(stale manifest or replaced shards; re-run `smelt pack`)")
        return DomainStream(domain, shards, offsets, n_docs)

    def __getitem__(self, domain: str) -> DomainStream:
        try:
            return self._streams[domain]
        except KeyError:
            raise KeyError(f"unknown domain {domain!r}; tokens/ has {self.domains}") from None

    def tokens(self, domain: str) -> int:
        return len(self[domain])

    def docs(self, domain: str) -> int:
        return self[domain].n_docs


# --------------------------------------------------------------------------------------------
# keyed permutation of [0, n)


def _mix64(x: int) -> int:
    """splitmix64's output function (Steele, Lea & Flood 2014): a 64-bit bijective hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A pseudo-random permutation of ``range(n)`` in O(1) memory.

    A balanced Feistel network on the smallest even number of bits covering n is a bijection of
    ``[0, 2^bits)``; cycle walking (re-encrypt until the value is below n) restricts it to a
    bijection of ``[0, n)`` (Black & Rogaway 2002), at most 4 steps expected.
    """

    def __init__(self, n: int, keys: tuple[int, ...]) -> None:
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.n = n
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = keys

    def _encrypt(self, x: int) -> int:
        left, right, half, mask = x >> self.half, x & self.mask, self.half, self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside [0, {self.n})")
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x


# --------------------------------------------------------------------------------------------
# mixture schedule


@dataclass
class Segment:
    """A stretch of samples ``[start, end)`` with constant domain probabilities ``probs``."""

    index: int
    start: int
    end: int
    stage: int
    probs: np.ndarray  # (D,) float64, sums to 1
    base: np.ndarray  # (D,) int64: windows drawn from each domain before `start`
    epochs: np.ndarray  # (D,) int64: complete passes over each domain before `start`
    block: int
    cum: np.ndarray = field(repr=False)  # (D + 1,) cumulative probabilities, last exactly 1.0

    def alloc(self, n: int) -> np.ndarray:
        """Samples of each domain among the segment's first n (exact at multiples of `block`)."""
        return np.diff(np.floor(n * self.cum + 0.5).astype(np.int64))


class MixtureSchedule:
    """Segments of constant mixture (see the module docstring) and sample -> (domain, rank)."""

    def __init__(self, windows: np.ndarray, stages: list[tuple[int | None, np.ndarray]], max_epochs: float,
                 seed: int, reuse_decay: float = DEFAULT_REUSE_DECAY, block: int = DEFAULT_BLOCK) -> None:
        if not 0.0 < reuse_decay <= 1.0:
            raise ValueError(f"reuse_decay must be in (0, 1], got {reuse_decay}")
        self.windows = np.asarray(windows, dtype=np.int64)
        self.caps = np.floor(max_epochs * self.windows + 1e-9).astype(np.int64)
        self.seed = seed
        self.decay = reuse_decay
        self.min_block = block
        self.segments: list[Segment] = []
        self.total = 0  # samples available before every weighted domain reaches its cap
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._build(stages)
        self._starts = [s.start for s in self.segments]

    # -- construction
    def _build(self, stages: list[tuple[int | None, np.ndarray]]) -> None:
        d_count = len(self.windows)
        count = np.zeros(d_count, dtype=np.int64)
        k = 0
        for si, (end, weights) in enumerate(stages):
            while end is None or k < end:
                active = (weights > 0) & (count < self.caps)
                if not active.any():
                    self.total = k
                    return
                epochs = count // np.maximum(self.windows, 1)
                probs = np.where(active, weights * self.decay ** epochs.astype(np.float64), 0.0)
                probs /= probs.sum()
                seg = self._segment(len(self.segments), k, si, probs, count, epochs)
                # The next event: an active domain completes its current epoch or reaches its cap.
                need = np.minimum((epochs + 1) * self.windows, self.caps) - count
                n_event = min(self._first_reach(seg, int(d), int(need[d])) for d in np.flatnonzero(active))
                seg.end = k + n_event if end is None else min(end, k + n_event)
                self.segments.append(seg)
                count = count + self._counts(seg, seg.end - k)
                k = seg.end
        raise AssertionError("unreachable: the last stage runs until every domain is capped")  # pragma: no cover

    def _segment(self, index: int, start: int, stage: int, probs: np.ndarray, base: np.ndarray,
                 epochs: np.ndarray) -> Segment:
        p_min = float(probs[probs > 0].min())
        block = max(self.min_block, math.ceil(2.0 / p_min))
        if block > MAX_BLOCK:
            raise ValueError(f"a domain probability of {p_min:.2e} is too small to schedule exactly "
                             f"(needs blocks of {block} > {MAX_BLOCK} samples); raise its weight or drop it")
        cum = np.concatenate(([0.0], np.cumsum(probs)))
        cum[-1] = 1.0
        cum = np.minimum(cum, 1.0)
        return Segment(index, start, start, stage, probs, base.copy(), epochs.copy(), block, cum)

    def _block(self, seg: Segment, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels (B,), rank of each sample among its domain's in the block, counts before it)."""
        key = (seg.index, b)
        hit = self._blocks.get(key)
        if hit is not None:
            self._blocks.move_to_end(key)
            return hit
        before = seg.alloc(b * seg.block)
        counts = seg.alloc((b + 1) * seg.block) - before
        labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        np.random.default_rng([self.seed, _TAG_MIX, seg.index, b]).shuffle(labels)
        order = np.argsort(labels, kind="stable")
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        ranks = np.empty(len(labels), dtype=np.int64)
        ranks[order] = np.arange(len(labels)) - first[labels[order]]
        hit = (labels, ranks, seg.base + before)
        self._blocks[key] = hit
        if len(self._blocks) > 64:
            self._blocks.popitem(last=False)
        return hit

    def _first_reach(self, seg: Segment, d: int, q: int) -> int:
        """Smallest n >= 1 such that the segment's first n samples hold q samples of domain d."""
        B = seg.block

        def upto(b: int) -> int:  # samples of d in the first b blocks
            return int(seg.alloc(b * B)[d])

        hi = max(1, math.ceil(q / (B * seg.probs[d]))) + 1
        while upto(hi) < q:
            hi *= 2
        lo = 1  # smallest b in [1, hi] with upto(b) >= q; the crossing is in block b - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if upto(mid) >= q:
                hi = mid
            else:
                lo = mid + 1
        b = lo - 1
        labels, _, _ = self._block(seg, b)
        pos = np.flatnonzero(labels == d)[q - upto(b) - 1]
        return b * B + int(pos) + 1

    def _counts(self, seg: Segment, n: int) -> np.ndarray:
        b, r = divmod(n, seg.block)
        counts = seg.alloc(b * seg.block)
        if r:
            labels, _, _ = self._block(seg, b)
            counts = counts + np.bincount(labels[:r], minlength=len(counts))
        return counts

    # -- lookup
    def locate(self, k: int) -> tuple[int, int]:
        """(domain index, how many samples of that domain precede sample k)."""
        if k < 0:
            raise IndexError(f"sample index {k} < 0")
        if k >= self.total:
            raise DataExhausted(f"sample {k} is past the end of the data: {self.total} samples exist before every "
                                "weighted domain reaches loader.max_epochs (raise it, or add data)")
        seg = self.segments[bisect.bisect_right(self._starts, k) - 1]
        b, r = divmod(k - seg.start, seg.block)
        labels, ranks, before = self._block(seg, b)
        d = int(labels[r])
        return d, int(before[d] + ranks[r])


# --------------------------------------------------------------------------------------------
# the loader


def _u64(x: int) -> int:
    return x & _M64


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


class MixtureLoader:
    """Deterministic, resumable mixture of domains over ``tokens/`` (see the module docstring).

    ``seed``: the recipe seed, used when ``cfg.seed`` is None. ``reuse_decay`` and
    ``ul2_mode_tokens`` override the recipe's values when given. ``global_batch``, ``rank``,
    ``world``: defaults of `next_batch` and `__iter__`.
    """

    def __init__(self, tokens_dir: str | Path, cfg: LoaderConfig, seed: int, split: Split = "train", *,
                 reuse_decay: float | None = None, block_size: int = DEFAULT_BLOCK,
                 special: SpecialIds | None = None, ul2_mode_tokens: bool | None = None,
                 global_batch: int = 1, rank: int = 0, world: int = 1) -> None:
        if reuse_decay is None:
            reuse_decay = cfg.reuse_decay
        if ul2_mode_tokens is None:
            ul2_mode_tokens = cfg.objective.ul2_mode_tokens
        self.tokens_dir = Path(tokens_dir)
        self.cfg = cfg
        self.split: Split = split
        self.seed = _u64(cfg.seed if cfg.seed is not None else seed)
        self.seq_len = cfg.seq_len
        self.window = cfg.seq_len + 1
        self.store = TokenStore(self.tokens_dir, split)
        self._val_store: TokenStore | None = self.store if split == "val" else None
        self.domains: list[str] = list(self.store.domains)
        self.tokens_per_domain: dict[str, int] = {d: self.store.tokens(d) for d in self.domains}
        self.special = special or SpecialIds.from_manifest(self.store.manifest)
        self.objective = build_objective(cfg.objective, self.special, ul2_mode_tokens=ul2_mode_tokens)
        self.reuse_decay = reuse_decay
        windows = np.array([self.tokens_per_domain[d] // self.window for d in self.domains], dtype=np.int64)
        self.windows_per_domain = dict(zip(self.domains, windows.tolist()))
        self.schedule = MixtureSchedule(windows, self._stages(windows), cfg.max_epochs, self.seed,
                                        reuse_decay=reuse_decay, block=block_size)
        self._keys = [_name_key(d) for d in self.domains]
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}
        self._fp_parts = self._fingerprint_parts(block_size)
        self.fingerprint = hashlib.sha256(json.dumps(self._fp_parts, sort_keys=True).encode()).hexdigest()[:16]
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self._check_batch(global_batch, rank, world)
        self.position = 0  # the next global sample index: the whole state
        log.info("loader: %d domains, seq_len %d, %d samples available (%s)", len(self.domains), self.seq_len,
                 self.total_samples, ", ".join(f"{d}: {w} windows" for d, w in self.windows_per_domain.items()))

    # -- recipe -> stages
    def _weights(self, weights: dict[str, float] | None, key: str, windows: np.ndarray) -> np.ndarray:
        if weights is None:  # proportional to token counts
            vec = np.array([float(self.tokens_per_domain[d]) for d in self.domains])
            vec[windows == 0] = 0.0
            if vec.sum() <= 0:
                raise ValueError(f"no domain has a full sequence of {self.window} tokens in split {self.split!r}")
            return vec / vec.sum()
        unknown = sorted(set(weights) - set(self.domains))
        if unknown:
            raise ValueError(f"{key}: unknown domains {unknown}; tokens/ has {self.domains}")
        vec = np.array([float(weights.get(d, 0.0)) for d in self.domains])
        if (vec < 0).any() or not np.isfinite(vec).all() or vec.sum() <= 0:
            raise ValueError(f"{key}: weights must be finite, >= 0, with a positive sum; got {weights}")
        for d, w, n in zip(self.domains, vec, windows):
            if w > 0 and n == 0:
                raise ValueError(f"{key}: domain {d!r} has {self.tokens_per_domain[d]} {self.split} tokens, fewer "
                                 f"than one sequence of seq_len + 1 = {self.window}")
        return vec / vec.sum()

    def _stages(self, windows: np.ndarray) -> list[tuple[int | None, np.ndarray]]:
        cur = self.cfg.curriculum
        if not cur:
            return [(None, self._weights(self.cfg.weights, "loader.weights", windows))]
        if self.cfg.weights is not None:
            log.info("loader.curriculum is set: loader.weights is not used")
        stages: list[tuple[int | None, np.ndarray]] = []
        prev = 0
        for i, st in enumerate(cur):
            if st.until_tokens <= prev:
                raise ValueError(f"loader.curriculum.{i}.until_tokens must increase ({st.until_tokens} <= {prev})")
            prev = st.until_tokens
            # Stage i covers samples k with k * seq_len < until_tokens.
            stages.append((-(-st.until_tokens // self.seq_len),
                           self._weights(st.weights, f"loader.curriculum.{i}.weights", windows)))
        stages.append((None, stages[-1][1]))  # the last stage's weights persist
        return stages

    def _fingerprint_parts(self, block_size: int) -> dict[str, Any]:
        m = self.store.manifest
        data = {d: {k: m["domains"][d].get(self.split, {}).get(k) for k in ("tokens", "docs", "shards")}
                for d in self.domains}
        def digest(obj: Any) -> str:  # short, so that trainer_state.json stays small
            return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]

        return {
            "sampler": SAMPLER_VERSION,
            "loader": digest(self.cfg.model_dump(mode="json", exclude={"seed"})),
            "seed": self.seed,
            "split": self.split,
            "reuse_decay": self.reuse_decay,
            "block": block_size,
            "tokens": digest({"tokenizer_sha256": m.get("tokenizer_sha256"), "dtype": m["dtype"], "domains": data}),
        }

    # -- properties
    @property
    def total_samples(self) -> int:
        """Samples available before every weighted domain reaches its epoch cap."""
        return self.schedule.total

    def describe(self) -> list[dict[str, Any]]:
        """The schedule, one row per segment of constant mixture (for logs and the report)."""
        return [{"start": s.start, "end": s.end, "stage": s.stage,
                 "probs": {d: round(float(p), 6) for d, p in zip(self.domains, s.probs) if p > 0},
                 "epochs": {d: int(e) for d, e, p in zip(self.domains, s.epochs, s.probs) if p > 0}}
                for s in self.schedule.segments]

    # -- single samples
    def _perm(self, d: int, epoch: int) -> FeistelPermutation:
        perm = self._perms.get((d, epoch))
        if perm is None:
            ss = np.random.SeedSequence([self.seed, _TAG_PERM, self._keys[d], epoch])
            keys = tuple(int(x) for x in ss.generate_state(_FEISTEL_ROUNDS, dtype=np.uint64))
            perm = self._perms[(d, epoch)] = FeistelPermutation(int(self.schedule.windows[d]), keys)
        return perm

    def locate(self, k: int) -> dict[str, int]:
        """Where sample k comes from: domain index, draw number within the domain, epoch, window
        index and first token offset in the domain's stream."""
        d, i = self.schedule.locate(k)
        n = int(self.schedule.windows[d])
        epoch, j = divmod(i, n)
        w = self._perm(d, epoch)(j)
        return {"domain": d, "draw": i, "epoch": epoch, "window": w, "offset": w * self.window}

    def example(self, k: int) -> tuple[int, Example]:
        """(domain index, objective output) of sample k."""
        loc = self.locate(k)
        d, offset = loc["domain"], loc["offset"]
        stream = self.store[self.domains[d]]
        window = stream.read(offset, self.window)
        seg = stream.segment_ids(offset, self.window)
        rng = np.random.default_rng([self.seed, _TAG_OBJECTIVE, k]) if self.objective.uses_rng else None
        return d, self.objective(window, seg, rng)

    # -- batches
    @staticmethod
    def _check_batch(global_batch: int, rank: int, world: int) -> None:
        if global_batch < 1 or world < 1:
            raise ValueError(f"need global_batch >= 1 and world >= 1, got {global_batch}, {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size {world}: "
                             "every rank must get the same number of samples")

    def batch(self, start: int, global_batch: int, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
        """Rank `rank`'s contiguous slice of the global batch [start, start + global_batch).

        Keys: input_ids, targets (IGNORE_INDEX where no loss), position_ids, segment_ids (B, T)
        int64; domain, prefix_len (B,) int64.
        """
        self._check_batch(global_batch, rank, world)
        per = global_batch // world
        first = start + rank * per
        if first + per > self.total_samples:
            raise DataExhausted(f"samples [{first}, {first + per}) reach past the end of the data "
                                f"({self.total_samples} samples under loader.max_epochs={self.cfg.max_epochs})")
        T = self.seq_len
        inputs = np.empty((per, T), dtype=np.int64)
        targets = np.empty((per, T), dtype=np.int64)
        segs = np.empty((per, T), dtype=np.int64)
        domain = np.empty(per, dtype=np.int64)
        prefix = np.empty(per, dtype=np.int64)
        for i in range(per):
            domain[i], ex = self.example(first + i)
            inputs[i], targets[i], segs[i] = ex.arrays()
            prefix[i] = ex.prefix_len
        return self._finish(inputs, targets, segs, domain, prefix)

    def _finish(self, inputs: np.ndarray, targets: np.ndarray, segs: np.ndarray, domain: np.ndarray,
                prefix: np.ndarray) -> dict[str, np.ndarray]:
        B, T = inputs.shape
        if self.cfg.document_mask:
            segs = segs - segs[:, :1]
            idx = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
            starts = np.zeros((B, T), dtype=np.int64)
            new = segs[:, 1:] != segs[:, :-1]
            starts[:, 1:] = np.where(new, idx[:, 1:], 0)
            positions = idx - np.maximum.accumulate(starts, axis=1)
        else:
            segs = np.zeros((B, T), dtype=np.int64)
            positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
        return {"input_ids": inputs, "targets": targets, "position_ids": positions, "segment_ids": segs,
                "domain": domain, "prefix_len": prefix}

    def next_batch(self, global_batch: int | None = None, rank: int | None = None,
                   world: int | None = None) -> dict[str, np.ndarray]:
        """`batch` at the current position, then advance it by the global batch size."""
        g = self.global_batch if global_batch is None else global_batch
        out = self.batch(self.position, g, self.rank if rank is None else rank, self.world if world is None else world)
        self.position += g
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the constructor's (global_batch, rank, world) from the current position
        until the data runs out (a last incomplete global batch is dropped)."""
        while self.position + self.global_batch <= self.total_samples:
            yield self.next_batch()

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "next_sample": int(self.position), "fingerprint": self.fingerprint,
                "fingerprint_parts": self._fp_parts}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore the position. With ``strict``, a state saved under another loader config, seed,
        split or set of token shards raises `LoaderStateError` naming what differs."""
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state.get('version')!r}, this smelt reads {STATE_VERSION}")
        pos = state.get("next_sample")
        if not isinstance(pos, int) or pos < 0:
            raise LoaderStateError(f"loader state has no valid next_sample: {pos!r}")
        if state.get("fingerprint") != self.fingerprint:
            old = state.get("fingerprint_parts") or {}
            diff = sorted(k for k in set(old) | set(self._fp_parts) if old.get(k) != self._fp_parts.get(k))
            msg = (f"loader state fingerprint {state.get('fingerprint')} != {self.fingerprint}: it was saved with a "
                   f"different {', '.join(diff) or 'configuration'}; the sample stream would not continue")
            if strict:
                raise LoaderStateError(msg + " (load_state_dict(strict=False) to resume anyway)")
            log.warning("%s; resuming at sample %d anyway", msg, pos)
        self.position = pos

    # -- validation
    def val_batches(self, domain: str, batch_size: int,
                    max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the domain's held-out tokens in order, causal LM.

        Windows start every ``seq_len`` tokens (consecutive windows share one token), so every
        validation token but the first is a target exactly once; the last window is padded
        (targets IGNORE_INDEX). Same keys as `batch`.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self._val_store is None:
            self._val_store = TokenStore(self.tokens_dir, "val")
        if domain not in self.domains:
            raise KeyError(f"unknown domain {domain!r}; tokens/ has {self.domains}")
        stream = self._val_store[domain]
        T, n = self.seq_len, len(stream)
        n_windows = -(-(n - 1) // T) if n > 1 else 0
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)
        d = self.domains.index(domain)
        for b0 in range(0, n_windows, batch_size):
            rows = min(batch_size, n_windows - b0)
            inputs = np.full((rows, T), self.special.pad, dtype=np.int64)
            targets = np.full((rows, T), IGNORE_INDEX, dtype=np.int64)
            segs = np.zeros((rows, T), dtype=np.int64)
            for i in range(rows):
                start = (b0 + i) * T
                m = min(T + 1, n - start)
                toks = stream.read(start, m)
                seg = stream.segment_ids(start, m)
                inputs[i, : m - 1] = toks[:-1]
                targets[i, : m - 1] = toks[1:]
                segs[i, : m - 1] = seg[:-1]
                segs[i, m - 1:] = seg[-1] + 1  # padding is a segment of its own
            yield self._finish(inputs, targets, segs, np.full(rows, d, dtype=np.int64), np.zeros(rows, dtype=np.int64))
