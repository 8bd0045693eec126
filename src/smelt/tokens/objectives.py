"""Training objectives as transforms on one window of token ids.

The loader reads a window ``w`` of ``seq_len + 1`` tokens (documents back to back, each ending
with EOS) together with ``segment_ids`` (the index of the document each token belongs to inside
the window). An objective turns it into an `Example` of the same length::

    tokens       (N,)  int64  the sequence the model sees, N = seq_len + 1
    loss_mask    (N,)  bool   tokens[i] is a prediction target (from position i - 1)
    segment_ids  (N,)  int64  document index of every token (for document masking)
    prefix_len   int          leading input positions attended bidirectionally (prefix LM, UL2)

and `Example.arrays()` gives the model's view: ``input_ids = tokens[:-1]`` and
``targets = tokens[1:]`` with ``IGNORE_INDEX`` (-100, PyTorch's cross-entropy default) wherever
no loss is taken. The lengths never change, so every batch has the same shape.

Objectives (`build_objective` picks one from `ObjectiveConfig.kind`):

- `CausalLM`: next-token prediction on the window as is.
- `FillInTheMiddle`: Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
  Middle" (FIM). Each document of the window is, with probability ``fim_rate``, cut at two
  uniformly random token positions into prefix P, middle M and suffix S and rearranged as
  PSM ``<fim_prefix> P <fim_suffix> S <fim_middle> M`` or, with probability ``fim_spm_rate``,
  SPM ``<fim_prefix> <fim_suffix> S <fim_middle> P M``: the SPM variant of the paper's
  Appendix D that StarCoder uses (Li et al. 2023; bigcode Megatron-LM ``permute``), in which P
  and M stay contiguous so the middle is a plain continuation of the prefix. As in StarCoder's
  implementation the cuts are token positions (the paper cuts characters, before tokenizing);
  every transformed document grows by 3 tokens and the rearranged window is cut back to N
  tokens at its end, so it never needs padding. A leading BOS stays in front of the document
  and the closing EOS stays after it.
- `PrefixLM`: a prefix of uniformly random length in ``[prefix_min, prefix_max] * seq_len``
  input positions is attended bidirectionally (``prefix_len``); its tokens are not predicted
  (they are visible), the loss is on the rest (Raffel et al. 2020, T5 Section 3.2.1).
- `UL2`: mixture of denoisers for a decoder-only model (Tay et al. 2022, "UL2: Unifying
  Language Learning Paradigms"), see the class for the layout.

Every random choice comes from the ``rng`` the caller passes; the loader seeds it with
(seed, sample index), so a sample's transform is a pure function of the two.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from smelt.config import ObjectiveConfig

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

# The fixed special-token layout of smelt tokenizers (smelt.tokenizer.train): the ids below are
# used when neither the manifest nor the caller supplies the tokenizer's own `special_ids`.
CONVENTION_IDS = {"pad": 0, "bos": 1, "eos": 2, "fim_prefix": 3, "fim_middle": 4, "fim_suffix": 5, "fim_pad": 6}
FIRST_SENTINEL = 7
DEFAULT_NUM_SENTINELS = 32  # TokenizerConfig.num_sentinels' default


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens the objectives insert."""

    pad: int
    bos: int
    eos: int
    fim_prefix: int
    fim_middle: int
    fim_suffix: int
    fim_pad: int
    sentinels: tuple[int, ...]

    @classmethod
    def conventions(cls, num_sentinels: int = DEFAULT_NUM_SENTINELS) -> SpecialIds:
        """The convention's ids: pad=0 bos=1 eos=2 fim_prefix=3 fim_middle=4 fim_suffix=5
        fim_pad=6, sentinel_i = 7 + i."""
        return cls(**CONVENTION_IDS, sentinels=tuple(range(FIRST_SENTINEL, FIRST_SENTINEL + num_sentinels)))

    @classmethod
    def from_mapping(cls, ids: Mapping[str, int]) -> SpecialIds:
        """From `smelt.tokenizer.train.special_ids(tokenizer)` ({"eos": 2, "sentinel_0": 7, ...})."""
        missing = [k for k in CONVENTION_IDS if k not in ids]
        if missing:
            raise ValueError(f"special ids are missing {missing}; got {sorted(ids)}")
        sentinels = []
        while f"sentinel_{len(sentinels)}" in ids:
            sentinels.append(int(ids[f"sentinel_{len(sentinels)}"]))
        return cls(**{k: int(ids[k]) for k in CONVENTION_IDS}, sentinels=tuple(sentinels))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> SpecialIds:
        """From a tokens/manifest.json: its ``special_ids`` mapping when present, else the
        conventions (with ``num_sentinels`` when recorded), checked against its eos/bos/pad ids."""
        if isinstance(manifest.get("special_ids"), Mapping):
            ids = cls.from_mapping(manifest["special_ids"])
        else:
            ids = cls.conventions(int(manifest.get("num_sentinels", DEFAULT_NUM_SENTINELS)))
        for name in ("eos", "bos", "pad"):
            key = f"{name}_id"
            if key in manifest and int(manifest[key]) != getattr(ids, name):
                raise ValueError(f"manifest {key}={manifest[key]} disagrees with the special-token "
                                 f"conventions ({name}={getattr(ids, name)}); record `special_ids` in the manifest")
        vocab = manifest.get("vocab_size")
        if vocab is not None and ids.sentinels and max(ids.sentinels) >= int(vocab):
            raise ValueError(f"sentinel id {max(ids.sentinels)} is outside the vocabulary ({vocab} tokens)")
        return ids


@dataclass
class Example:
    """One transformed window (see the module docstring)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    prefix_len: int = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids (T,), targets (T,) with IGNORE_INDEX where no loss, segment_ids (T,))."""
        targets = np.where(self.loss_mask[1:], self.tokens[1:], IGNORE_INDEX)
        return self.tokens[:-1], targets, self.segment_ids[:-1]


class Objective(ABC):
    """A transform of one window; ``uses_rng`` False lets the loader skip seeding a generator."""

    name: str = "objective"
    uses_rng: bool = True

    @abstractmethod
    def __call__(self, window: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator | None) -> Example:
        """`window` (N,) int64 and `segment_ids` (N,) int64 -> an Example of length N."""


class CausalLM(Objective):
    """Identity: inputs ``w[:-1]``, targets ``w[1:]``, loss on every position."""

    name = "causal"
    uses_rng = False

    def __call__(self, window: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator | None = None) -> Example:
        return Example(window, np.ones(len(window), dtype=bool), segment_ids)


def _document_spans(segment_ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of equal segment ids."""
    cuts = np.flatnonzero(segment_ids[1:] != segment_ids[:-1]) + 1
    bounds = np.concatenate(([0], cuts, [len(segment_ids)]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class FillInTheMiddle(Objective):
    """FIM per document with PSM / SPM ordering (Bavarian et al. 2022; see module docstring)."""

    name = "fim"

    def __init__(self, special: SpecialIds, fim_rate: float = 0.5, spm_rate: float = 0.5) -> None:
        if not (0.0 <= fim_rate <= 1.0 and 0.0 <= spm_rate <= 1.0):
            raise ValueError(f"fim_rate and fim_spm_rate must be in [0, 1], got {fim_rate}, {spm_rate}")
        self.special = special
        self.rate = fim_rate
        self.spm_rate = spm_rate

    def __call__(self, window: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator | None) -> Example:
        assert rng is not None
        n = len(window)
        sp = self.special
        pieces: list[np.ndarray] = []
        segs: list[np.ndarray] = []
        changed = False
        pre, suf, mid = (np.array([t], dtype=np.int64) for t in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle))
        for a, b in _document_spans(segment_ids):
            doc = window[a:b]
            # One draw per document whether or not it is transformed, as in StarCoder's `permute`.
            if rng.random() >= self.rate:
                pieces.append(doc)
                segs.append(segment_ids[a:b])
                continue
            lo = 1 if doc[0] == sp.bos else 0           # keep a leading BOS in front
            hi = len(doc) - 1 if doc[-1] == sp.eos else len(doc)  # and the closing EOS after
            body = doc[lo:hi]
            i, j = np.sort(rng.integers(0, len(body) + 1, size=2))
            p, m, s = body[:i], body[i:j], body[j:]
            if rng.random() < self.spm_rate:  # SPM, variant 2 of Bavarian et al. 2022 Appendix D
                out = [doc[:lo], pre, suf, s, mid, p, m, doc[hi:]]
            else:                             # PSM
                out = [doc[:lo], pre, p, suf, s, mid, m, doc[hi:]]
            new = np.concatenate(out)
            pieces.append(new)
            segs.append(np.full(len(new), segment_ids[a], dtype=np.int64))
            changed = True
        if not changed:
            return Example(window, np.ones(n, dtype=bool), segment_ids)
        # Every transform adds 3 tokens, so the result is at least n long: cut at the end
        # (StarCoder truncates the joined sample the same way).
        tokens = np.concatenate(pieces)[:n]
        seg = np.concatenate(segs)[:n]
        return Example(tokens, np.ones(n, dtype=bool), seg)


def _prefix_bounds(seq_len: int, prefix_min: float, prefix_max: float) -> tuple[int, int]:
    if not (0.0 < prefix_min <= prefix_max < 1.0):
        raise ValueError(f"need 0 < prefix_min <= prefix_max < 1, got {prefix_min}, {prefix_max}")
    lo = max(1, math.ceil(prefix_min * seq_len))
    hi = min(seq_len - 1, math.floor(prefix_max * seq_len))
    return lo, max(lo, hi)


class PrefixLM(Objective):
    """Bidirectional prefix of random length; loss only after it (T5's prefix LM objective).

    With ``prefix_len = p`` input positions ``[0, p)`` form the prefix. The targets of positions
    ``0 .. p-2`` are tokens inside the prefix, which the model already sees, so they are masked;
    position ``p-1`` predicts the first token after the prefix and keeps its loss.
    """

    name = "prefix_lm"

    def __init__(self, prefix_min: float = 0.1, prefix_max: float = 0.9) -> None:
        _prefix_bounds(16, prefix_min, prefix_max)  # validates the fractions
        self.prefix_min = prefix_min
        self.prefix_max = prefix_max

    def __call__(self, window: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator | None) -> Example:
        assert rng is not None
        lo, hi = _prefix_bounds(len(window) - 1, self.prefix_min, self.prefix_max)
        p = int(rng.integers(lo, hi + 1))
        mask = np.ones(len(window), dtype=bool)
        mask[:p] = False
        return Example(window, mask, segment_ids, prefix_len=p)


# UL2 denoisers as (mean span length mu, corruption rate r). Tay et al. 2022, Section 3.1.2:
# R = regular span corruption (T5: mu=3, r=15%); X = extreme: long spans (mu >= 12) or heavy
# corruption (r >= 30%), here one of each, drawn with equal probability. The paper's final
# 7-denoiser mixture (Section 3.1.4) adds (8, 0.15) to R and (8, 0.5), (64, 0.15), (64, 0.5) to
# X; these tables are where to add them.
UL2_DENOISERS: dict[str, tuple[tuple[float, float], ...]] = {
    "R": ((3.0, 0.15),),
    "X": ((32.0, 0.15), (3.0, 0.5)),
}


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``n_items`` into ``n_segments`` non-empty parts
    (T5's ``_random_segmentation``)."""
    if n_segments == 1:
        return np.array([n_items], dtype=np.int64)
    cuts = np.sort(rng.choice(n_items - 1, size=n_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate(([0], cuts, [n_items]))).astype(np.int64)


@functools.lru_cache(maxsize=256)
def ul2_span_plan(n_out: int, mean_span: float, rate: float, extra: int) -> tuple[int, int, int]:
    """Largest source length L whose denoising example fits ``n_out`` tokens.

    The example is ``extra + L + 2 * spans`` long: the L - noise kept tokens plus one sentinel per
    span in the inputs, one sentinel per span plus the noise tokens in the targets, and
    ``extra`` (mode token, closing EOS). Returns (L, noise tokens, spans), computed like T5's
    ``random_spans_noise_mask``: noise = round(L * r), spans = round(noise / mu).
    """

    def plan(length: int) -> tuple[int, int]:
        noise = min(max(round(length * rate), 1), length - 1)
        spans = min(max(round(noise / mean_span), 1), noise, length - noise)
        return noise, spans

    lo, hi = 2, n_out  # f(L) = L + 2 * spans(L) is non-decreasing in L: binary search
    if extra + lo + 2 * plan(lo)[1] > n_out:
        raise ValueError(f"sequence of {n_out} tokens is too short for UL2 denoising")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if extra + mid + 2 * plan(mid)[1] <= n_out:
            lo = mid
        else:
            hi = mid - 1
    return (lo, *plan(lo))


class UL2(Objective):
    """UL2 mixture of denoisers for a decoder-only model (Tay et al. 2022).

    Per sample a denoiser is drawn from ``mix`` ({"R", "S", "X"} -> weight). Layout of the N
    output tokens::

        R / X:  [mode] x_0 <s_0> x_1 <s_1> ... x_n | <s_0> y_0 <s_1> y_1 ... <eos> [pad ...]
        S:      [mode] p_0 ... p_k | c_0 c_1 ... (to N tokens)

    ``x_i`` are kept source tokens, ``y_i`` the corrupted spans, ``<s_i>`` sentinels; the part
    before ``|`` is the input (``prefix_len``: attended bidirectionally when the model supports
    it, as UL2 trains its decoder-only models as prefix LMs), loss only after it. The targets
    are T5's span-corruption targets (Raffel et al. 2020, Section 3.1.4) moved behind the inputs,
    the usual decoder-only form (UL2 Section 3.1; also T5's "prefix LM" baseline), closed by EOS
    so generation knows where to stop. Spans follow T5's ``random_spans_noise_mask``: noise =
    round(L * r) tokens in round(noise / mu) spans, span and gap lengths random compositions,
    the source starting with a kept token. The source length L is the largest that fits
    (`ul2_span_plan`); the window's tokens after L are not used for this sample and the
    remainder of the N tokens is padding without loss. S (sequential, prefix LM) keeps the
    window in order with a prefix of ``[prefix_min, prefix_max]`` of it.

    Mode tokens (UL2 Section 3.2, paradigm shifting: [NLU] for R, [NLG] for X, [S2S] for S) are
    the last three sentinels of the vocabulary, so no extra vocabulary is needed; the spans use
    the others. With more spans than sentinels the sentinel ids cycle: spans appear in the same
    order in inputs and targets, so the pairing stays unambiguous (T5 runs into the same limit
    at 100 sentinels). The whole example is one segment (UL2 treats the window as one text, as
    T5 packs C4); padding is a segment of its own.
    """

    name = "ul2"
    MODES = ("R", "S", "X")

    def __init__(self, special: SpecialIds, mix: Mapping[str, float], prefix_min: float = 0.1,
                 prefix_max: float = 0.9, mode_tokens: bool = True) -> None:
        bad = sorted(set(mix) - set(self.MODES))
        if bad:
            raise ValueError(f"ul2_mix has unknown denoisers {bad}; allowed: R, S, X")
        weights = np.array([float(mix.get(m, 0.0)) for m in self.MODES])
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"ul2_mix weights must be >= 0 with a positive sum, got {dict(mix)}")
        self.cum = np.cumsum(weights / weights.sum())
        self.cum[-1] = 1.0
        _prefix_bounds(16, prefix_min, prefix_max)
        self.prefix_min, self.prefix_max = prefix_min, prefix_max
        self.special = special
        sentinels = list(special.sentinels)
        self.mode_ids: dict[str, int] = {}
        if mode_tokens:
            if len(sentinels) < 4:
                raise ValueError(f"UL2 mode tokens need at least 4 sentinel tokens, the tokenizer has {len(sentinels)}")
            self.mode_ids = {"R": sentinels[-1], "X": sentinels[-2], "S": sentinels[-3]}
            sentinels = sentinels[:-3]
        if not sentinels and (weights[0] > 0 or weights[2] > 0):
            raise ValueError("UL2 R/X denoisers need sentinel tokens; the tokenizer has none")
        self.span_sentinels = np.array(sentinels, dtype=np.int64)

    def pick_mode(self, rng: np.random.Generator) -> str:
        return self.MODES[int(np.searchsorted(self.cum, rng.random(), side="right"))]

    def __call__(self, window: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator | None) -> Example:
        assert rng is not None
        mode = self.pick_mode(rng)
        head = np.array([self.mode_ids[mode]], dtype=np.int64) if self.mode_ids else np.zeros(0, dtype=np.int64)
        n = len(window)
        if mode == "S":
            lo, hi = _prefix_bounds(n - 1 - len(head), self.prefix_min, self.prefix_max)
            p = len(head) + int(rng.integers(lo, hi + 1))
            tokens = np.concatenate((head, window[: n - len(head)]))
            mask = np.ones(n, dtype=bool)
            mask[:p] = False
            return Example(tokens, mask, np.zeros(n, dtype=np.int64), prefix_len=p)
        configs = UL2_DENOISERS[mode]
        mu, r = configs[int(rng.integers(len(configs)))] if len(configs) > 1 else configs[0]
        inputs, targets = self.corrupt(window, mu, r, extra=len(head) + 1, rng=rng)
        eos = np.array([self.special.eos], dtype=np.int64)
        used = len(head) + len(inputs) + len(targets) + 1
        tokens = np.concatenate((head, inputs, targets, eos,
                                 np.full(n - used, self.special.pad, dtype=np.int64)))
        p = len(head) + len(inputs)
        mask = np.zeros(n, dtype=bool)
        mask[p:used] = True
        seg = np.zeros(n, dtype=np.int64)
        seg[used:] = 1
        return Example(tokens, mask, seg, prefix_len=p)

    def corrupt(self, window: np.ndarray, mean_span: float, rate: float, extra: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Span-corrupt the longest prefix of `window` that fits: (inputs, targets) with sentinels."""
        length, noise, spans = ul2_span_plan(len(window), mean_span, rate, extra)
        src = window[:length]
        noise_lens = random_segmentation(noise, spans, rng)
        keep_lens = random_segmentation(length - noise, spans, rng)
        # Runs keep_0 noise_0 keep_1 noise_1 ... (the source starts with kept tokens).
        is_noise = np.repeat(np.tile(np.array([False, True]), spans),
                             np.stack((keep_lens, noise_lens), axis=1).ravel())
        sent = self.span_sentinels[np.arange(spans) % len(self.span_sentinels)]
        # Sentinel i goes after keep spans 0..i in the inputs and before noise span i in the targets.
        inputs = np.insert(src[~is_noise], np.cumsum(keep_lens), sent)
        targets = np.insert(src[is_noise], np.concatenate(([0], np.cumsum(noise_lens)[:-1])), sent)
        return inputs, targets


def build_objective(cfg: ObjectiveConfig, special: SpecialIds, *, ul2_mode_tokens: bool = True) -> Objective:
    """The objective named by ``cfg.kind`` with its parameters."""
    if cfg.kind == "causal":
        return CausalLM()
    if cfg.kind == "fim":
        return FillInTheMiddle(special, cfg.fim_rate, cfg.fim_spm_rate)
    if cfg.kind == "prefix_lm":
        return PrefixLM(cfg.prefix_min, cfg.prefix_max)
    if cfg.kind == "ul2":
        return UL2(special, cfg.ul2_mix, cfg.prefix_min, cfg.prefix_max, mode_tokens=ul2_mode_tokens)
    raise ValueError(f"unknown objective {cfg.kind!r}")  # pragma: no cover - the config rejects it
