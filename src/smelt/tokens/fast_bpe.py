"""An exact `tiktoken` fast path for Hugging Face byte-level BPE tokenizers.

HF `tokenizers` and `tiktoken` run the same algorithm on different bookkeeping: split the text
into pre-tokens with a regex, then inside each pre-token start from its UTF-8 bytes and keep
merging the adjacent pair of highest priority. tiktoken's Rust core does this about 2.5x faster
per core than HF on our corpora (DESIGN.md, facts). This module builds a `tiktoken.Encoding` that
returns the SAME ids as ``tokenizer.encode(text, add_special_tokens=False)`` with
``encode_special_tokens=True`` (special-token strings in the text are text), and says per
document when it cannot vouch for that, so the caller falls back to HF for that document.

What differs, and how it is handled
-----------------------------------
HF  (per pre-token): if ``ignore_merges`` and the pre-token is in the vocabulary, emit it whole;
    else repeatedly merge the adjacent pair ``(x, y)`` listed in ``merges`` with the lowest
    merge index (leftmost on ties), until no adjacent pair is listed.
tiktoken: if the pre-token is in ``mergeable_ranks``, emit it whole (always, as if
    ``ignore_merges``); else repeatedly merge the adjacent pair whose CONCATENATED BYTES have the
    lowest rank in ``mergeable_ranks`` (leftmost on ties).

So tiktoken keys a merge by its result, HF by the pair; and tiktoken's ranks are also its output
ids. We build ``mergeable_ranks`` as follows:

* the 256 single bytes, plus every REACHABLE token: a token ``t`` whose own bytes, run alone
  through HF's merge loop (``ignore_merges`` off), end as the single symbol ``t``. This is
  checked with HF's own `models.BPE`, one call per vocabulary entry (0.1 s for 32k tokens).
  Special tokens, added tokens and any multi-byte entry that no merge sequence produces are
  unreachable and left out;
* ``rank(t)`` = the merge index of the LAST merge of that run (``t``'s merge; when several
  merges produce the same string, the one HF actually uses, found by simulating the run);
* if the HF ids of reachable tokens increase with that merge index (true for every vocabulary
  HF's trainer writes: learned ids are assigned in merge order) the ranks ARE the HF ids;
  otherwise ranks are ``256 + merge index`` and a lookup table maps them to HF ids.

Claim: with these ranks the two loops perform the same merges on every pre-token p, except when
``ignore_merges`` is on and p itself is an unreachable vocabulary entry.

Proof sketch. (1) Locality: take a span of p covered exactly by current symbols, none crossing
its edges. Pairs inside the span change only through merges inside it, and each step merges the
globally smallest (index, position) pair, so the merges done so far inside the span are a prefix
of the merges HF does on the span's bytes alone. (2) Suppose at some state adjacent symbols
``x, y`` have ``x + y = t`` in the vocabulary. By (1) HF's run on t alone passes through
``[x, y]``; from there its only possible step is merging ``(x, y)``. Hence: if ``(x, y)`` is a
listed merge, t is reachable and ``(x, y)`` is its last merge, so HF's priority for the pair
equals ``rank(t)``; if t is reachable, its run ended by merging ``(x, y)``, so ``(x, y)`` is
listed with index ``rank(t)``; if t is unreachable the pair is not listed, and t is not in
``mergeable_ranks`` either. (3) So at every state both loops see the same candidate pairs with
the same priorities and the same leftmost tie rule: by induction they merge identically. The
whole-pre-token shortcut agrees too: HF without ``ignore_merges`` turns a reachable p into
``[p]`` by definition; with ``ignore_merges`` HF emits any vocabulary entry whole, which for an
unreachable entry tiktoken cannot reproduce. The fuzz test in tests/tokens/test_fast_bpe.py
checks the claim exhaustively on small random merge tables built to contain every kind of
conflict (unreachable tokens, several merges producing one string), where a naive
"rank = token id" table differs from HF.

Per-document fallback (`FastBPE.encode_flat` hands these documents to HF, and counts them;
checks 1 and 2 scan each joined call's text once and confirm the hits document by document):

1. the text contains a string HF treats specially even with ``encode_special_tokens``:
   the content of a NON-special added token (split out before pre-tokenization), or, with
   ``ignore_merges``, the text of an unreachable vocabulary entry (e.g. ``<|eos|>``, which HF's
   BPE model holds in its vocabulary). Conservative: a substring match is enough;
2. the text contains a code point unassigned in Python's Unicode database (14.0 on Python 3.11):
   ``\\p{L}``/``\\p{N}``/``\\s`` come from Oniguruma's tables in HF and from Rust regex's in
   tiktoken; where their Unicode versions differ, only newly assigned characters can be split
   differently (both agreed on every one of the 1,112,064 code points with tokenizers 0.23.3 and
   tiktoken 0.14.0, probed in three contexts each);
3. tiktoken's pieces do not cover the text: tiktoken silently drops text no regex alternative
   matches, HF's ``Split(..., "isolated")`` keeps it as a pre-token. Detected exactly by
   comparing the bytes of the produced tokens with the text's UTF-8 length.

Tokenizers the fast path does not take (`analyze` raises `FastPathUnsupported` with the reason):
non-BPE models, ``byte_fallback``/``dropout``/subword prefixes, a vocabulary missing any of the
256 byte symbols, and pre-tokenizers other than ``ByteLevel`` (with ``add_prefix_space=False``)
or ``Split(Regex, "isolated") -> ByteLevel(use_regex=False)`` (the smelt layout). A normalizer
is applied with HF's own ``normalize_str`` before tiktoken.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import re
import threading
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models

log = logging.getLogger(__name__)

__all__ = ["FastBPE", "FastBPESpec", "FastPathUnsupported", "analyze", "bytes_to_unicode", "cached_analyze",
           "load_spec", "save_spec", "spec_cache_key", "token_bytes", "translate_pre_tokenizer"]

# HF `pre_tokenizers.ByteLevel(use_regex=True)`: GPT-2's split (tokenizers/src/pre_tokenizers/byte_level.rs).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF `ByteLevel(use_regex=False)` alone: the whole text is one pre-token.
WHOLE_TEXT_PATTERN = r"[\s\S]+"


# tiktoken's one special token: the document separator of `FastBPE.encode_flat`'s joined calls
# (allowed there, and only there). A document that contains its core is encoded on its own,
# where the string is plain text: the core holds no NUL and no prefix of it is also a suffix, so
# any occurrence of the separator in the joined text other than the real ones would put a whole
# core inside one document.
_SEP_CORE = "<|smelt:no-special-token|>"
_NEVER_SPECIAL = f"\x00{_SEP_CORE}\x00"
_SEP_ALLOWED = frozenset([_NEVER_SPECIAL])
_EMPTY = np.zeros(0, dtype=np.uint32)
# Characters per joined tiktoken call in `encode_flat`: bounds the joined string and the token
# buffer (~4 bytes/char + ~1 token/3 chars), while one call releases the GIL for ~0.2 s of work.
JOIN_CHARS = 4 << 20
# Version of the analysis and of its file format (`save_spec`): part of the cache key.
SPEC_FORMAT = 1


class FastPathUnsupported(ValueError):
    """The tokenizer cannot be reproduced exactly by tiktoken; the message says why."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (HF's byte-level alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def _to_latin1() -> dict[int, str]:
    # alphabet character -> the character whose Latin-1 encoding is the byte (str.translate
    # table); Latin-1 characters outside the alphabet -> one Latin-1 cannot encode.
    table = {c: "\uffff" for c in range(256)}
    table.update({ord(c): chr(b) for b, c in bytes_to_unicode().items()})
    return table


def token_bytes(token: str) -> bytes | None:
    """Bytes of a byte-level vocabulary entry, or None if it holds characters outside the alphabet."""
    try:
        return token.translate(_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        return None


def translate_pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """The tiktoken ``pat_str`` that splits text exactly like the HF pre-tokenizer (JSON form)."""
    if pre is None:
        raise FastPathUnsupported("no pre-tokenizer (not a byte-level BPE tokenizer)")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    *splits, last = steps
    if last.get("type") != "ByteLevel":
        raise FastPathUnsupported(f"last pre-tokenizer is {last.get('type')}, not ByteLevel")
    if last.get("add_prefix_space"):
        raise FastPathUnsupported("ByteLevel(add_prefix_space=True) is not translated")
    if not splits:
        return GPT2_PATTERN if last.get("use_regex", True) else WHOLE_TEXT_PATTERN
    if len(splits) > 1 or last.get("use_regex", True):
        # Two regex splits in a row are a composition, not one leftmost-first regex.
        names = ", ".join(s.get("type", "?") for s in steps)
        raise FastPathUnsupported(f"more than one splitting pre-tokenizer: {names}")
    s = splits[0]
    if s.get("type") != "Split":
        raise FastPathUnsupported(f"pre-tokenizer {s.get('type')} is not translated")
    if s.get("behavior") != "Isolated" or s.get("invert"):
        raise FastPathUnsupported(f"Split(behavior={s.get('behavior')}, invert={s.get('invert')}) is not translated")
    pattern = s.get("pattern", {})
    if "Regex" not in pattern:
        raise FastPathUnsupported("Split with a literal string pattern is not translated")
    # The same source text works in both engines for the syntax HF patterns use (\p{..}, \x{..},
    # (?i:..), class intersection &&, possessive/atomic). Text between matches: see fallback 3.
    return str(pattern["Regex"])


@lru_cache(maxsize=1)
def unassigned_ranges() -> tuple[tuple[int, int], ...]:
    """Inclusive code point ranges unassigned (category Cn) in this Python's Unicode database."""
    # Planes 4-13 (U+40000..U+DFFFF) hold no character in any Unicode version through 16.0
    # (the Unicode roadmap): not scanning them makes this 3x faster (~0.04 s).
    skip = int(unicodedata.unidata_version.split(".")[0]) <= 16
    found: list[tuple[int, int]] = [(0x40000, 0xDFFFF)] if skip else []
    start = None
    for c in chain(range(0x40000), range(0xE0000, 0x110000)) if skip else range(0x110000):
        un = unicodedata.category(chr(c)) == "Cn" and not 0xD800 <= c <= 0xDFFF
        if un and start is None:
            start = c
        elif start is not None and (not un or c == 0xE0000):  # close runs at the jump; merged below
            found.append((start, c - 1))
            start = c if un else None
    if start is not None:
        found.append((start, 0x10FFFF))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(found):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return tuple(merged)


@dataclass(frozen=True)
class FastBPESpec:
    """Everything a worker needs to build the fast encoder (picklable, computed once)."""

    pat_str: str
    mergeable_ranks: dict[bytes, int]
    rank_to_id: np.ndarray | None  # None: ranks are the HF ids
    token_nbytes: np.ndarray  # HF id -> byte length of the token (0 for tokens tiktoken never emits)
    fallback_strings: tuple[str, ...]  # documents containing one of these go to HF
    normalize: bool  # apply the HF normalizer before tiktoken
    unassigned: tuple[tuple[int, int], ...]
    stats: dict[str, Any] = field(default_factory=dict)


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _simulate(symbols: list[str], pair_rank: dict[tuple[str, str], int]) -> tuple[list[str], int | None]:
    """HF's merge loop in Python (lowest merge index, leftmost on ties); returns (symbols, last index)."""
    last = None
    while len(symbols) > 1:
        best, at = None, -1
        for i in range(len(symbols) - 1):
            r = pair_rank.get((symbols[i], symbols[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        symbols[at: at + 2] = [symbols[at] + symbols[at + 1]]
        last = best
    return symbols, last


def analyze(tokenizer: Tokenizer) -> FastBPESpec:
    """Check that `tokenizer` can be reproduced by tiktoken and build the tables (see module doc)."""
    d = json.loads(tokenizer.to_str())
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise FastPathUnsupported(f"model is {model.get('type')}, not BPE")
    for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise FastPathUnsupported(f"BPE {key}={model.get(key)!r} is not reproduced by tiktoken")
    if model.get("dropout") not in (None, 0, 0.0):
        raise FastPathUnsupported("BPE dropout is random; tiktoken is deterministic")
    pat_str = translate_pre_tokenizer(d.get("pre_tokenizer"))
    vocab: dict[str, int] = model["vocab"]
    merges = _merges(model)
    ignore_merges = bool(model.get("ignore_merges", False))
    b2u = bytes_to_unicode()
    missing = [b for b in range(256) if b2u[b] not in vocab]
    if missing:
        raise FastPathUnsupported(f"{len(missing)} of the 256 byte symbols are not in the vocabulary "
                                  f"(e.g. byte {missing[0]})")

    # HF's pair -> merge index map keeps the last index of a pair listed twice (HashMap collect).
    pair_rank: dict[tuple[str, str], int] = {}
    for k, pair in enumerate(merges):
        pair_rank[pair] = k
    producers = Counter(a + b for a, b in merges)
    producer: dict[str, tuple[str, str]] = {}
    for a, b in merges:
        producer.setdefault(a + b, (a, b))

    # Reachability with HF's own BPE model, ignore_merges off: does t alone come out as [t]?
    # (One `tokenize` call per entry: ~1.5 us each, faster than a batched `encode`.)
    bare = models.BPE(vocab=vocab, merges=merges, ignore_merges=False)
    added = tokenizer.get_added_tokens_decoder()
    ranked: list[tuple[int, int, bytes]] = []  # (merge index, HF id, bytes)
    unreachable: list[str] = []
    for tok, i in vocab.items():
        if len(tok) < 2:
            continue
        bts = token_bytes(tok)
        run = bare.tokenize(tok) if bts is not None else []
        if len(run) != 1 or run[0].id != i:
            unreachable.append(tok)
            continue
        if producers[tok] == 1:
            k = pair_rank[producer[tok]]
        else:  # several merges spell t: the one HF's run on t ends with decides its priority
            syms, k = _simulate(list(tok), pair_rank)
            if syms != [tok] or k is None:  # pragma: no cover - contradicts HF's own answer
                raise FastPathUnsupported(f"simulated merges disagree with HF on token {tok!r}")
        ranked.append((k, i, bts))

    ranked.sort()
    ids_in_merge_order = [i for _, i, _ in ranked]
    identity = all(a < b for a, b in zip(ids_in_merge_order, ids_in_merge_order[1:], strict=False))
    ranks: dict[bytes, int] = {}
    n_vocab = max(max(vocab.values(), default=0), max(added, default=0)) + 1
    nbytes = np.zeros(n_vocab, dtype=np.int64)
    if identity:
        lut = None
        for b in range(256):
            ranks[bytes([b])] = vocab[b2u[b]]
        for _, i, bts in ranked:
            ranks[bts] = i
    else:
        lut = np.full(256 + len(merges), -1, dtype=np.int64)
        for b in range(256):
            ranks[bytes([b])] = b
            lut[b] = vocab[b2u[b]]
        for k, i, bts in ranked:
            ranks[bts] = 256 + k
            lut[256 + k] = i
    for bts, r in ranks.items():
        nbytes[int(lut[r]) if lut is not None else r] = len(bts)

    fallback: set[str] = set()
    normalizer = d.get("normalizer")
    for tok in added.values():
        if not tok.special:  # HF splits these out of the text even with encode_special_tokens
            if normalizer is not None and tok.normalized:
                raise FastPathUnsupported("non-special added tokens matched on normalized text are not reproduced")
            fallback.add(tok.content)
    if ignore_merges:
        for tok in unreachable:
            bts = token_bytes(tok)
            if bts is None:
                continue  # no text maps to it
            try:
                fallback.add(bts.decode("utf-8"))
            except UnicodeDecodeError:
                continue  # not valid UTF-8 on its own: never equals a whole pre-token
    fallback.discard("")
    stats = {
        "vocab": len(vocab), "merges": len(merges), "ignore_merges": ignore_merges,
        "reachable": len(ranked), "unreachable": len(unreachable),
        "unreachable_examples": sorted(unreachable, key=lambda t: (len(t), t))[:8],
        "multi_merge_tokens": sum(1 for n in producers.values() if n > 1),
        "ranks_are_ids": identity, "fallback_strings": len(fallback), "pattern": pat_str,
    }
    log.debug("fast_bpe: %s", stats)
    return FastBPESpec(pat_str=pat_str, mergeable_ranks=ranks, rank_to_id=lut, token_nbytes=nbytes,
                       fallback_strings=tuple(sorted(fallback)), normalize=normalizer is not None,
                       unassigned=unassigned_ranges(), stats=stats)


# --------------------------------------------------------------------------------------------
# the analysis on disk: computed once per tokenizer (~0.3 s for 32k tokens), then loaded (~10 ms)


def spec_cache_key(tokenizer_sha256: str) -> str:
    """What an analysis depends on: the tokenizer file, HF's BPE (reachability is HF's own answer),
    Python's Unicode database (the unassigned ranges) and this module's format."""
    import tokenizers

    blob = json.dumps({"tokenizer_sha256": tokenizer_sha256, "tokenizers": tokenizers.__version__,
                       "unicode": unicodedata.unidata_version, "format": SPEC_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _spec_arrays(spec: FastBPESpec, key: str) -> dict[str, np.ndarray]:
    items = sorted(spec.mergeable_ranks.items(), key=lambda kv: kv[1])
    lengths = np.fromiter((len(b) for b, _ in items), dtype=np.int64, count=len(items))
    meta = {"format": SPEC_FORMAT, "key": key, "pat_str": spec.pat_str,
            "fallback_strings": list(spec.fallback_strings), "normalize": spec.normalize, "stats": spec.stats}
    return {
        "meta": np.frombuffer(json.dumps(meta, ensure_ascii=True).encode(), dtype=np.uint8),
        "rank_bytes": np.frombuffer(b"".join(b for b, _ in items), dtype=np.uint8),
        "rank_offsets": np.concatenate([[0], np.cumsum(lengths)]),
        "rank_values": np.fromiter((r for _, r in items), dtype=np.int64, count=len(items)),
        "rank_to_id": spec.rank_to_id if spec.rank_to_id is not None else np.zeros(0, dtype=np.int64),
        "token_nbytes": spec.token_nbytes,
        "unassigned": np.asarray(spec.unassigned, dtype=np.int64).reshape(-1, 2),
    }


def save_spec(spec: FastBPESpec, path: Path, key: str) -> None:
    """Write `spec` as an ``.npz`` of plain arrays (no pickle: loading it runs no code), atomically."""
    from smelt.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **_spec_arrays(spec, key))
    atomic_write_bytes(path, buf.getvalue())


def load_spec(path: Path, key: str) -> FastBPESpec | None:
    """The spec saved at `path` under `key`; None when absent, written under another key, or
    unreadable (a damaged cache is recomputed, never trusted)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("format") != SPEC_FORMAT or meta.get("key") != key:
                return None
            blob, offsets, values = z["rank_bytes"].tobytes(), z["rank_offsets"], z["rank_values"]
            lut, nbytes, unassigned = z["rank_to_id"], z["token_nbytes"], z["unassigned"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:  # damaged file
        log.warning("fast_bpe: ignoring unreadable analysis cache %s (%s: %s)", path, type(e).__name__, e)
        return None
    if len(offsets) != len(values) + 1 or (len(offsets) and int(offsets[-1]) != len(blob)):
        log.warning("fast_bpe: ignoring inconsistent analysis cache %s", path)
        return None
    bounds = offsets.tolist()
    ranks = {blob[a:b]: r for a, b, r in zip(bounds[:-1], bounds[1:], values.tolist(), strict=True)}
    return FastBPESpec(pat_str=meta["pat_str"], mergeable_ranks=ranks, rank_to_id=lut if len(lut) else None,
                       token_nbytes=nbytes, fallback_strings=tuple(meta["fallback_strings"]),
                       normalize=bool(meta["normalize"]),
                       unassigned=tuple((int(a), int(b)) for a, b in unassigned.tolist()), stats=meta["stats"])


def cached_analyze(tokenizer: Tokenizer, tokenizer_file: Path, tokenizer_sha256: str | None = None
                   ) -> tuple[FastBPESpec, bool]:
    """`analyze(tokenizer)`, cached beside `tokenizer_file` (``.smelt-fast-bpe-<key>.npz``).

    Returns (spec, whether it came from the cache). `tokenizer` must be the one loaded from
    `tokenizer_file` (its sha256 keys the cache). A directory that cannot be written only costs
    the analysis on every call; `FastPathUnsupported` is never cached (it is raised early).
    """
    tokenizer_file = Path(tokenizer_file)
    if tokenizer_sha256 is None:
        tokenizer_sha256 = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    key = spec_cache_key(tokenizer_sha256)
    path = tokenizer_file.parent / f".smelt-fast-bpe-{key[:16]}.npz"
    spec = load_spec(path, key)
    if spec is not None:
        return spec, True
    spec = analyze(tokenizer)
    try:
        save_spec(spec, path, key)
    except OSError as e:  # read-only tokenizer directory: fine, just slower next time
        log.info("fast_bpe: cannot cache the analysis beside %s (%s)", tokenizer_file, e)
    return spec, False


def _groups(n_chars: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive ``[a, b)`` runs of documents, each closed by the first document that brings it
    to `limit` characters (the last run may be shorter)."""
    n = len(n_chars)
    cs = np.cumsum(n_chars)
    out: list[tuple[int, int]] = []
    a = 0
    while a < n:
        base = int(cs[a - 1]) if a else 0
        b = min(n, int(np.searchsorted(cs, base + limit, side="left")) + 1)
        out.append((a, b))
        a = b
    return out


class FastBPE:
    """tiktoken-driven encoder with HF's ids; documents it cannot vouch for go to HF.

    ``tokenizer`` is the HF tokenizer used for the fallback (``encode_special_tokens`` is set
    on it). Thread-safe: tiktoken and HF encode without shared mutable state and release the GIL
    while they work; the fallback counters are per call (``counts``) or merged under a lock.
    """

    def __init__(self, spec: FastBPESpec, tokenizer: Tokenizer) -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise FastPathUnsupported("tiktoken is not installed") from e

        self.spec = spec
        self.hf = tokenizer
        self.hf.encode_special_tokens = True
        # One special token, the document separator of joined calls (`encode_flat`). It also
        # keeps tiktoken off its empty special-token regex, which matches at every position and
        # costs 25% when there is no special token at all.
        self._sep_rank = max(spec.mergeable_ranks.values()) + 1
        try:
            self._enc = tiktoken.Encoding("smelt-fast-bpe", pat_str=spec.pat_str,
                                          mergeable_ranks=spec.mergeable_ranks,
                                          special_tokens={_NEVER_SPECIAL: self._sep_rank})
        except Exception as e:  # fancy-regex rejects the pattern, ...
            raise FastPathUnsupported(f"tiktoken cannot build the encoding: {e}") from e
        # encode_to_numpy (tiktoken >= 0.7) returns a uint32 buffer: no Python int per token.
        if hasattr(self._enc, "encode_to_numpy"):
            self._encode = functools.partial(self._enc.encode_to_numpy, allowed_special=frozenset(),
                                             disallowed_special=())
            self._encode_joined = functools.partial(self._enc.encode_to_numpy, allowed_special=_SEP_ALLOWED,
                                                    disallowed_special=())
        else:  # pragma: no cover - old tiktoken
            self._encode = lambda t: np.asarray(self._enc.encode_ordinary(t), dtype=np.uint32)
            self._encode_joined = lambda t: np.asarray(
                self._enc.encode(t, allowed_special=_SEP_ALLOWED, disallowed_special=()), dtype=np.uint32)
        self._lock = threading.Lock()
        self._normalizer = tokenizer.normalizer if spec.normalize else None
        self._strings_rx = (re.compile("|".join(map(re.escape, sorted(spec.fallback_strings, key=len, reverse=True))))
                            if spec.fallback_strings else None)
        # Unassigned BMP code points in one character class (a C-level table lookup per
        # character), astral characters confirmed with a numpy table lookup.
        bmp = "".join(f"\\u{a:04x}-\\u{min(b, 0xFFFF):04x}" for a, b in spec.unassigned if a <= 0xFFFF)
        self._unassigned_rx = re.compile(f"[{bmp}\\U00010000-\\U0010ffff]")
        self._unassigned = np.zeros(0x110000, dtype=bool)
        for a, b in spec.unassigned:
            self._unassigned[a: b + 1] = True
        self.fallback_counts: Counter[str] = Counter()
        # `encode_flat` runs the fallback checks once over each joined call's text instead of
        # once per document; a match cannot cross a separator when no fallback string holds
        # NUL (the separator's first and last character). Otherwise: per document.
        self._joined_checks = not any("\x00" in f for f in spec.fallback_strings)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> FastBPE:
        return cls(analyze(tokenizer), tokenizer)

    def fallback_reason(self, text: str) -> str | None:
        """Why `text` (already normalized) must be encoded by HF, or None."""
        if self._strings_rx is not None and self._strings_rx.search(text):
            return "special_string"
        if not text.isascii():
            m = self._unassigned_rx.search(text)
            if m is not None:
                if ord(m.group()) <= 0xFFFF:
                    return "unassigned_codepoint"
                cps = np.frombuffer(text[m.start():].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
                if self._unassigned[cps].any():
                    return "unassigned_codepoint"
        return None

    def _suspects(self, text: str, doc_chars: np.ndarray) -> list[int]:
        """Documents of a joined call (`text`, documents of `doc_chars` characters joined by the
        separator) in which a fallback pattern matches, in order."""
        hits: list[int] = []
        if self._strings_rx is not None:
            hits += [m.start() for m in self._strings_rx.finditer(text)]
        if not text.isascii():
            hits += [m.start() for m in self._unassigned_rx.finditer(text)]
        if not hits:
            return []
        starts = np.cumsum(doc_chars + len(_NEVER_SPECIAL)) - doc_chars - len(_NEVER_SPECIAL)
        # a match inside a separator maps to the document before it: checked, harmlessly
        return np.unique(np.searchsorted(starts, np.asarray(hits), side="right") - 1).tolist()

    def _hf_ids(self, texts: Sequence[str]) -> list[list[int]]:
        fn = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def _count(self, found: Counter[str], counts: Counter[str] | None) -> None:
        if counts is not None:
            counts.update(found)
        elif found:
            with self._lock:
                self.fallback_counts.update(found)

    def encode_flat(self, texts: Sequence[str], counts: Counter[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents; returns (all ids back to back as uint32, per-document lengths).

        Documents go to tiktoken joined by the separator special token, ~`JOIN_CHARS` characters
        per call (one GIL release per call, not per document); tiktoken splits its input at
        special tokens and runs the regex on each piece alone, so every document is pre-tokenized
        exactly as if it were encoded by itself (tests/tokens/test_fast_bpe.py checks this).
        Fallback documents are counted by reason into `counts` (None: ``self.fallback_counts``).
        """
        n = len(texts)
        found: Counter[str] = Counter()
        if not n:
            return _EMPTY, np.zeros(0, dtype=np.int64)
        lens = np.zeros(n, dtype=np.int64)
        nbytes = np.zeros(n, dtype=np.int64)
        own: dict[int, np.ndarray] = {}  # documents encoded on their own (they contain the separator)
        slow: list[int] = []
        pieces: list[np.ndarray] = []
        lens_at: list[np.ndarray] = []

        def flush(text: str, n_docs: int) -> None:
            buf = self._encode_joined(text)
            sep = buf == self._sep_rank
            pos = np.flatnonzero(sep)
            if len(pos) != n_docs - 1:  # pragma: no cover - would mean tiktoken split differently
                raise RuntimeError(f"fast_bpe: {len(pos)} separators for {n_docs} documents")
            lens_at.append(np.diff(pos, prepend=-1, append=len(buf)) - 1)
            pieces.append(buf[~sep] if len(pos) else buf)

        norm = [self._normalizer.normalize_str(t) for t in texts] if self._normalizer is not None else list(texts)
        # UTF-8 bytes per document (strict: a lone surrogate raises here, and the caller names it)
        nbytes[:] = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in norm),
                                dtype=np.int64, count=n)
        n_chars = np.fromiter(map(len, norm), dtype=np.int64, count=n)
        for a, b in _groups(n_chars, JOIN_CHARS):
            group = norm[a:b]
            big = _NEVER_SPECIAL.join(group)
            # Which documents may need HF: every one without joined checks, else those where a
            # fallback pattern matches (a superset of the documents where `fallback_reason`
            # is not None: each match lies inside one document, see __init__), confirmed one by
            # one. Clean text (nearly all of it) costs two C-level scans per call, no Python
            # per document.
            suspects = range(b - a) if not self._joined_checks else self._suspects(big, n_chars[a:b])
            changed = False
            for k in suspects:
                why = self.fallback_reason(group[k])
                if why is not None:
                    found[why] += 1
                    slow.append(a + k)
                    group[k] = ""  # stays in the joined call as an empty document: 0 tokens, 0 bytes expected
                    nbytes[a + k] = 0
                    changed = True
            if big.count(_SEP_CORE) != b - a - 1:  # the separator's core inside a document (rare)
                for k, t in enumerate(group):
                    if _SEP_CORE in t:
                        own[a + k] = self._encode(t)  # the separator is plain text here
                        group[k] = ""
                        changed = True
            flush(_NEVER_SPECIAL.join(group) if changed else big, b - a)
        lens[:] = np.concatenate(lens_at)
        flat = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        if own:  # rare: splice the separately encoded documents in
            parts = np.split(flat, np.cumsum(lens)[:-1])
            for i, ids in own.items():
                parts[i], lens[i] = ids, len(ids)
            flat = np.concatenate(parts)
        if self.spec.rank_to_id is not None:
            flat = self.spec.rank_to_id[flat].astype(np.uint32)
        # Fallback 3: tokens must spell every byte of the text (tiktoken drops unmatched text).
        cs = np.zeros(len(flat) + 1, dtype=np.int64)
        np.cumsum(self.spec.token_nbytes[flat], out=cs[1:])
        ends = np.cumsum(lens)
        covered = cs[ends] - cs[ends - lens]
        gaps = np.nonzero(covered != nbytes)[0].tolist()  # fallback docs: 0 bytes, 0 tokens
        if gaps:
            found["uncovered_text"] += len(gaps)
        self._count(found, counts)
        slow += gaps
        if not slow:
            return flat, lens
        slow.sort()
        parts = np.split(flat, ends[:-1])
        for i, ids in zip(slow, self._hf_ids([texts[i] for i in slow]), strict=True):
            parts[i] = np.asarray(ids, dtype=np.uint32)
            lens[i] = len(ids)
        return np.concatenate(parts), lens

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like HF ``[e.ids for e in encode_batch(texts, add_special_tokens=False)]``."""
        flat, lens = self.encode_flat(texts)
        return [a.tolist() for a in np.split(flat, np.cumsum(lens)[:-1])] if len(texts) else []

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def mismatches(self, texts: Sequence[str]) -> list[int]:
        """Indices of `texts` where this encoder and HF disagree (verification; not counted)."""
        flat, lens = self.encode_flat(texts, counts=Counter())  # a verification is not a use
        ours = [a.tolist() for a in np.split(flat, np.cumsum(lens)[:-1])] if len(texts) else []
        return [i for i, (a, b) in enumerate(zip(ours, self._hf_ids(texts), strict=True)) if a != b]
