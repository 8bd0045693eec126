"""Train a tokenizer on the curated shards with Hugging Face `tokenizers`.

Output directory (``runs/<name>/tokenizer/``), every file written atomically:

``tokenizer.json``          the tokenizer (``tokenizers.Tokenizer.from_file``,
                            ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``)
``tokenizer_config.json``   + ``special_tokens_map.json``: so that
                            ``PreTrainedTokenizerFast.from_pretrained(dir)`` knows bos/eos/pad
``stats.json``              written last (the completion marker): vocabulary size, training text
                            per domain, timings, sha256 of tokenizer.json, input fingerprint

Vocabulary layout (fixed for the whole project; `special_ids` is the one way to look ids up)::

    0 <|pad|>  1 <|bos|>  2 <|eos|>  3 <|fim_prefix|>  4 <|fim_middle|>  5 <|fim_suffix|>
    6 <|fim_pad|>  7.. <|sentinel_0|>..<|sentinel_{N-1}|>  then the recipe's added_tokens
    [Unigram, WordPiece: <|unk|>]  [Unigram: the 256 byte pieces <0x00>..<0xFF>]
    learned tokens ...  <|reserved_0|>.. up to a multiple of `vocab_multiple`

Models
------
``bpe`` (default): byte-level BPE as in GPT-2/GPT-4/LLaMA-3. Text is split by one regex
(`pretokenize_pattern`), then mapped to the 256-symbol byte alphabet (``ByteLevel``,
``add_prefix_space=False``, ``use_regex=False``: the regex already split). Every byte is in the
vocabulary, so ``decode(encode(x)) == x`` for ANY Python string that is valid Unicode (lone
surrogates cannot be encoded to UTF-8 at all). No normalizer: normalization is the curation
stage's job, and a tokenizer that rewrites text cannot round-trip.

``unigram``: SentencePiece-style Unigram LM over the same regex pre-tokens (no byte mapping), with
``byte_fallback=True``: characters missing from the vocabulary become ``<0xXX>`` byte pieces and
the ``ByteFallback`` decoder puts them back together. Lossless for all valid Unicode except one
corner: text that literally contains a byte-piece string such as ``<0x41>`` decodes as the byte
itself if the lattice ever picks that piece (its score is set far below any learned piece so it
only wins when nothing else can cover the text). The library's Unigram trainer is slow on Chinese
(long unsegmented runs): ~10x the BPE time, about 35 s per million Chinese characters on 2 cores.

``wordpiece``: BERT-style WordPiece over the same pre-tokens (which carry their leading space, so
the decoder just concatenates). The library has no byte fallback for WordPiece: characters not
seen in training become ``<|unk|>`` (lossy), and a literal ``##`` at the start of a word-initial
piece is indistinguishable from the continuation prefix. Use it only when you need it.

Pre-tokenization (one regex, GPT-4 ``cl100k_base`` family, valid in both Oniguruma and Rust's
regex/fancy-regex, so the packer can drive the same split and merges through tiktoken; the tests
check that tiktoken reproduces the ids):

- English contractions ``'s 't 're 've 'm 'll 'd`` (case-insensitive), as cl100k.
- Runs of Han/kana characters are their own pre-tokens: merges can build multi-character Chinese
  words but never absorb the neighbouring punctuation or Latin letters (DeepSeek-LLM splits CJK
  runs the same way); Chinese needs no spaces.
- Other letters (plus combining marks, as in o200k, so decomposed accents and Indic vowel signs
  stay in their word) with at most one leading non-letter (the space of `` word``).
- Each digit alone when ``split_digits`` (LLaMA, DeepSeek, Qwen: better arithmetic), else up to
  three digits (cl100k). Inside the regex, this is what ``Digits(individual_digits=True)`` would
  do, without a second pre-tokenizer that tiktoken could not reproduce.
- Punctuation runs with an optional leading space and trailing newlines.
- Whitespace: newline runs, then runs of spaces/tabs that leave the last space to the next word
  (cl100k's ``\\s+(?!\\S)``), so code indentation becomes a few whitespace tokens.

Training text: each domain gets ``sample_chars_per_domain x domain_weights[d]`` characters so one
large domain cannot dominate the vocabulary. The selection is deterministic given the seed: shard
files are visited in a seeded order and scanned until ``_SCAN_FACTOR`` times the budget has been
seen (or the domain is exhausted); among the scanned documents, those with the smallest
``xxh3(seed, doc.id)`` are taken until the budget is met (the last one cut to fit). Documents are
cut at ``max_doc_chars``. This reads each scanned shard twice (first lengths, then the chosen
texts) and never holds more than one batch of text in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import xxhash
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, trainers
from tokenizers import pre_tokenizers as pre

from smelt.config import TokenizerConfig
from smelt.data.io import read_shard
from smelt.fsutil import atomic_write_json, atomic_write_text, locked

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1

# The fixed head of every smelt vocabulary, in id order (names without the <| |> brackets).
BASE_SPECIALS: tuple[str, ...] = ("pad", "bos", "eos", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad")
# Unigram and WordPiece only: WordPiece has no byte fallback, so unseen characters become <|unk|>;
# Unigram's lattice needs an unk id for them before byte fallback rewrites them into <0xXX> pieces.
UNK_NAME = "unk"
RESERVED_PREFIX = "reserved_"
SENTINEL_PREFIX = "sentinel_"

# Scan this many times a domain's budget before choosing documents: the choice is then a uniform
# sample of a seeded random subset of the shards instead of "the first shards", at the cost of
# reading 4x the budget once (lengths only kept) instead of the whole domain.
_SCAN_FACTOR = 4
_BATCH_DOCS = 512  # documents per batch handed to the Rust trainer (it parallelizes per batch)
# Unigram byte pieces: far below any learned log-probability (those are > -50 in practice), so
# the Viterbi lattice uses them only through byte fallback, never to cover literal "<0x41>" text.
_BYTE_PIECE_SCORE = -1.0e4
# WordPiece turns any pre-token longer than this into <|unk|>; the library default (100) would
# swallow long Chinese clauses and indentation runs whole.
_WORDPIECE_MAX_WORD_CHARS = 10_000

# Han (CJK Unified Ideographs, Ext A, compatibility, Ext B-F) and kana: the same ranges as
# smelt.data.text.CJK_CHARS so that "CJK text" means one thing across the project.
_CJK = r"\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{20000}-\x{2EBEF}\x{3040}-\x{30FF}"


def input_files(run_dir: Path, inputs: list[str] | None) -> dict[str, list[Path]]:
    """The training text of a run, as files per domain: ``inputs`` (files or directories; a
    file's domain is its directory's name) or, when none are given, the curated shards in
    ``<run_dir>/data/clean``. Missing inputs are a `RecipeError` naming the path."""
    from smelt.config import RecipeError
    from smelt.data.curate import clean_shard_files

    if not inputs:
        try:
            return clean_shard_files(run_dir / "data")
        except FileNotFoundError as e:
            raise RecipeError(str(e)) from None
    out: dict[str, list[Path]] = {}
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise RecipeError(f"tokenizer.inputs: {p} does not exist")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        for f in files:
            out.setdefault(f.parent.name, []).append(f)
    return out


def pretokenize_pattern(split_digits: bool = True) -> str:
    """The pre-tokenization regex (Oniguruma and Rust `regex`/fancy-regex syntax).

    Alternatives are tried in order at each position; every character belongs to some
    alternative, and `Split(..., "isolated")` keeps any unmatched text anyway, so the split is
    lossless by construction.
    """
    digits = r"\p{N}" if split_digits else r"\p{N}{1,3}"
    return "|".join([
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        rf"[{_CJK}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}&&[^{_CJK}]]+",
        digits,
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ])


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """`text` with lone surrogates (legal in a Python str, not in UTF-8) replaced by U+FFFD.

    The Rust tokenizer cannot accept them at all; curated JSONL can carry them escaped.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def special_token(name: str) -> str:
    """``"eos"`` -> ``"<|eos|>"``."""
    return f"<|{name}|>"


def _token_name(content: str) -> str:
    return content[2:-2] if len(content) > 4 and content.startswith("<|") and content.endswith("|>") else content


def special_token_list(cfg: TokenizerConfig) -> list[str]:
    """The special tokens that open the vocabulary, in id order (reserved padding excluded)."""
    toks = [special_token(n) for n in BASE_SPECIALS]
    toks += [special_token(f"{SENTINEL_PREFIX}{i}") for i in range(cfg.num_sentinels)]
    seen = set(toks)
    for t in cfg.added_tokens:
        if not t:
            raise ValueError("tokenizer.added_tokens: empty token")
        if t in seen:
            raise ValueError(f"tokenizer.added_tokens: {t!r} is already a special token (or listed twice)")
        name = _token_name(t)
        if name == UNK_NAME or name.startswith(RESERVED_PREFIX):
            raise ValueError(f"tokenizer.added_tokens: {t!r} collides with smelt's own "
                             f"<|{UNK_NAME}|>/<|{RESERVED_PREFIX}K|> names")
        seen.add(t)
        toks.append(t)
    if cfg.kind != "bpe":
        toks.append(special_token(UNK_NAME))
    return toks


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Name (brackets stripped: ``"eos"``, ``"fim_prefix"``, ``"sentinel_0"``) -> id of every special token.

    User tokens that are not of the ``<|name|>`` form are keyed by their full content.
    """
    out: dict[str, int] = {}
    for i, added in sorted(tok.get_added_tokens_decoder().items()):
        if added.special:
            out[_token_name(added.content)] = i
    return out


def check_special_ids(tok: Tokenizer, num_sentinels: int | None = None) -> dict[str, int]:
    """`special_ids`, after checking the project's fixed layout (pad=0 ... fim_pad=6, sentinels next).

    Raises ValueError naming the first token out of place (e.g. a foreign tokenizer.json).
    """
    ids = special_ids(tok)
    expected = list(BASE_SPECIALS)
    if num_sentinels is None:
        num_sentinels = sum(1 for n in ids if n.startswith(SENTINEL_PREFIX))
    expected += [f"{SENTINEL_PREFIX}{i}" for i in range(num_sentinels)]
    for want_id, name in enumerate(expected):
        got = ids.get(name)
        if got != want_id:
            raise ValueError(f"special token <|{name}|> has id {got}, expected {want_id} (not a smelt tokenizer?)")
    return ids


def _tokenizer_file(path: Path) -> Path:
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def load_tokenizer(path: Path, *, encode_special_tokens: bool = False) -> Tokenizer:
    """Load ``tokenizer.json`` (the file, or the directory holding it).

    ``encode_special_tokens=True`` makes special-token strings inside the text ordinary text
    (what data encoding must use: a document that mentions ``<|eos|>`` must not end early).
    """
    f = _tokenizer_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer at {f}")
    tok = Tokenizer.from_file(str(f))
    tok.encode_special_tokens = encode_special_tokens
    return tok


def tokenizer_sha256(path: Path) -> str:
    """sha256 (hex) of ``tokenizer.json`` (the file, or the directory holding it)."""
    h = hashlib.sha256()
    with open(_tokenizer_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg: TokenizerConfig, shard_files: dict[str, list[Path]], seed: int) -> str:
    """Hash of what a training run depends on: config, seed, input files (path, size, mtime)."""
    def entry(p: Path) -> list:
        st = os.stat(p)
        return [str(p), st.st_size, st.st_mtime_ns]

    files = {d: [entry(p) for p in sorted(map(Path, fs))] for d, fs in sorted(shard_files.items())}
    blob = json.dumps({"config": cfg.model_dump(mode="json"), "seed": seed, "files": files,
                       "tokenizers": tokenizers.__version__, "stats_version": STATS_FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_up_to_date(out_dir: Path, cfg: TokenizerConfig, shard_files: dict[str, list[Path]], seed: int) -> bool:
    """True when `out_dir` holds a complete tokenizer trained from exactly these inputs/config."""
    out_dir = Path(out_dir)
    try:
        stats = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
        return (stats.get("fingerprint") == fingerprint(cfg, shard_files, seed)
                and stats.get("tokenizer_sha256") == tokenizer_sha256(out_dir)
                and (out_dir / "tokenizer_config.json").is_file())
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# training text selection


@dataclass
class DomainSample:
    """Which documents of one domain feed the trainer (the output of the scan pass)."""

    domain: str
    budget: int
    files: list[Path] = field(default_factory=list)  # scanned files, in visiting order
    chosen: dict[int, dict[int, int]] = field(default_factory=dict)  # file pos -> {doc index: chars}
    scanned_docs: int = 0
    scanned_chars: int = 0
    exhausted: bool = False  # every file of the domain was scanned
    docs: int = 0
    chars: int = 0


def _doc_key(seed: int, doc_id: str) -> int:
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed & 0xFFFFFFFFFFFFFFFF)


def _plan_domain(domain: str, files: Sequence[Path], budget: int, cfg: TokenizerConfig, seed: int) -> DomainSample:
    s = DomainSample(domain=domain, budget=budget)
    if budget <= 0 or not files:
        s.exhausted = True
        return s
    # Seeded file order, independent of how the caller listed them.
    dom_seed = xxhash.xxh3_64_intdigest(domain.encode(), seed=seed & 0xFFFFFFFFFFFFFFFF)
    ordered = sorted(map(Path, files))
    perm = np.random.default_rng(dom_seed).permutation(len(ordered))
    # Compact columns (32 bytes per scanned document) rather than Python tuples.
    keys, lens, fpos, dpos = array("Q"), array("q"), array("q"), array("q")
    for pos, fi in enumerate(perm):
        path = ordered[fi]
        s.files.append(path)
        for di, doc in enumerate(read_shard(path)):
            n = min(len(doc.text), cfg.max_doc_chars)
            if n == 0:
                continue
            keys.append(_doc_key(seed, doc.id))
            lens.append(n)
            fpos.append(pos)
            dpos.append(di)
            s.scanned_chars += n
        if s.scanned_chars >= _SCAN_FACTOR * budget:
            break
    s.exhausted = len(s.files) == len(ordered)
    s.scanned_docs = len(keys)
    if not keys:
        return s
    key_arr, len_arr = np.frombuffer(keys, dtype=np.uint64), np.frombuffer(lens, dtype=np.int64)
    f_arr, d_arr = np.frombuffer(fpos, dtype=np.int64), np.frombuffer(dpos, dtype=np.int64)
    # Smallest key first; (file, index) breaks the (astronomically rare) ties reproducibly.
    order = np.lexsort((d_arr, f_arr, key_arr))
    cum = np.cumsum(len_arr[order])
    take = min(int(np.searchsorted(cum, budget, side="left")) + 1, len(order))
    for rank in range(take):
        i = int(order[rank])
        n = int(len_arr[i])
        if rank == take - 1 and cum[rank] > budget:  # cut the last one to land on the budget
            n -= int(cum[rank] - budget)
        s.chosen.setdefault(int(f_arr[i]), {})[int(d_arr[i])] = n
        s.docs += 1
        s.chars += n
    return s


def _iter_training_text(samples: Sequence[DomainSample]) -> Iterator[list[str]]:
    """Batches of the chosen texts, re-read from the shards (second pass)."""
    batch: list[str] = []
    for s in samples:
        for pos, path in enumerate(s.files):
            want = s.chosen.get(pos)
            if not want:
                continue
            left = len(want)
            for di, doc in enumerate(read_shard(path)):
                n = want.get(di)
                if n is None:
                    continue
                batch.append(replace_surrogates(doc.text[:n]))
                if len(batch) >= _BATCH_DOCS:
                    yield batch
                    batch = []
                left -= 1
                if left == 0:
                    break
            if left:
                raise RuntimeError(f"{path} changed while training the tokenizer ({left} chosen documents missing)")
    if batch:
        yield batch


def select_training_docs(cfg: TokenizerConfig, shard_files: dict[str, list[Path]], seed: int) -> list[DomainSample]:
    """Per-domain plan of which documents (and how many characters of each) to train on."""
    weights = cfg.domain_weights or {}
    unknown = sorted(set(weights) - set(shard_files))
    if unknown:
        log.warning("tokenizer.domain_weights names domains without shards: %s", ", ".join(unknown))
    samples = []
    for domain in sorted(shard_files):
        w = float(weights.get(domain, 1.0))
        if w < 0:
            raise ValueError(f"tokenizer.domain_weights.{domain}: negative weight {w}")
        budget = int(round(cfg.sample_chars_per_domain * w))
        s = _plan_domain(domain, shard_files[domain], budget, cfg, seed)
        if budget > 0 and s.chars < budget:
            log.info("tokenizer: domain %s has only %s of its %s character budget",
                     domain, f"{s.chars:,}", f"{budget:,}")
        log.info("tokenizer: %s: %s docs, %s chars chosen from %s scanned docs in %d/%d files",
                 domain, f"{s.docs:,}", f"{s.chars:,}", f"{s.scanned_docs:,}", len(s.files), len(shard_files[domain]))
        samples.append(s)
    return samples


# --------------------------------------------------------------------------------------------
# model assembly


def _split(cfg: TokenizerConfig) -> pre.PreTokenizer:
    return pre.Split(Regex(pretokenize_pattern(cfg.split_digits)), behavior="isolated", invert=False)


def _build(cfg: TokenizerConfig, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer and its trainer for `cfg.kind`."""
    special_added = [AddedToken(t, special=True, normalized=False) for t in specials]
    if cfg.kind == "bpe":
        # ignore_merges: a pre-token that is itself in the vocabulary is emitted whole (LLaMA-3;
        # tiktoken's encoder does the same, which keeps an exact tiktoken fast path possible).
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre.Sequence([_split(cfg), pre.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        need = len(specials) + 256
        if cfg.vocab_size < need:
            raise ValueError(f"tokenizer.vocab_size={cfg.vocab_size} is below the {len(specials)} special tokens "
                             f"+ 256 byte symbols = {need}")
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=special_added,
            initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
    elif cfg.kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = _split(cfg)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        target = cfg.vocab_size - 256  # the byte pieces are added after training
        if target <= len(specials) + 1:
            raise ValueError(f"tokenizer.vocab_size={cfg.vocab_size} leaves no room for Unigram pieces after "
                             f"{len(specials)} special tokens and 256 byte pieces")
        trainer = trainers.UnigramTrainer(vocab_size=target, special_tokens=special_added,
                                          unk_token=special_token(UNK_NAME), show_progress=False)
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=special_token(UNK_NAME),
                                         max_input_chars_per_word=_WORDPIECE_MAX_WORD_CHARS))
        tok.pre_tokenizer = _split(cfg)
        # Pre-tokens keep their own spaces: strip the continuation prefix and concatenate.
        tok.decoder = decoders.Sequence([decoders.Replace(Regex("^##"), ""), decoders.Fuse()])
        if cfg.vocab_size <= len(specials):
            raise ValueError(f"tokenizer.vocab_size={cfg.vocab_size} is not above the {len(specials)} special tokens")
        # Every kept character costs two entries ("x" and "##x"); Chinese alone has thousands, which
        # would fill the whole vocabulary and leave no merges. Keep the most frequent characters up
        # to a quarter of the vocabulary (half of it with the ## twins); rarer ones become <|unk|>.
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=special_added,
            limit_alphabet=max(256, (cfg.vocab_size - len(specials)) // 4),
            continuing_subword_prefix="##", show_progress=False)
    else:  # pragma: no cover - the config's Literal rejects it first
        raise ValueError(f"tokenizer.kind: unknown {cfg.kind!r}")
    return tok, trainer


def _add_byte_fallback(tok: Tokenizer, n_specials: int) -> Tokenizer:
    """Unigram: put <0x00>..<0xFF> right after the special tokens and turn byte fallback on."""
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    present = set(byte_pieces)
    learned = [v for v in vocab[n_specials:] if v[0] not in present]
    d["model"]["vocab"] = vocab[:n_specials] + [[p, _BYTE_PIECE_SCORE] for p in byte_pieces] + learned
    d["model"]["byte_fallback"] = True  # unk_id (inside the specials) keeps its id
    return Tokenizer.from_str(json.dumps(d, ensure_ascii=False))


def _pad_vocab(tok: Tokenizer, multiple: int) -> int:
    """Append <|reserved_K|> special tokens up to a multiple of `multiple`; returns how many."""
    n = tok.get_vocab_size(with_added_tokens=True)
    n_pad = -n % multiple
    if n_pad:
        tok.add_special_tokens([AddedToken(special_token(f"{RESERVED_PREFIX}{k}"), special=True, normalized=False)
                                for k in range(n_pad)])
    return n_pad


def _hf_files(cfg: TokenizerConfig, specials: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for transformers' PreTrainedTokenizerFast."""
    named = {"bos_token": special_token("bos"), "eos_token": special_token("eos"), "pad_token": special_token("pad")}
    if cfg.kind != "bpe":
        named["unk_token"] = special_token(UNK_NAME)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": [t for t in specials if t not in named.values()],
        # Documents are framed by the packer (EOS after each, BOS only if pack.add_bos), so the
        # tokenizer itself adds nothing; and it must not "clean up" spaces when decoding.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "right",
    }
    smap = {**named, "additional_special_tokens": config["additional_special_tokens"]}
    return config, smap


@locked("smelt tokenizer", lambda a: Path(a["out_dir"]).parent)
def train_tokenizer(cfg: TokenizerConfig, shard_files: dict[str, list[Path]], out_dir: Path, seed: int) -> dict:
    """Train `cfg.kind` on a per-domain budget of the curated shards; write `out_dir`; return stats."""
    out_dir = Path(out_dir)
    specials = special_token_list(cfg)
    tok, trainer = _build(cfg, specials)  # validates sizes before any reading
    # A stale stats.json would mark a half-rewritten directory complete: drop it first.
    (out_dir / "stats.json").unlink(missing_ok=True)

    t0 = time.perf_counter()
    samples = select_training_docs(cfg, shard_files, seed)
    total_docs = sum(s.docs for s in samples)
    total_chars = sum(s.chars for s in samples)
    if total_docs == 0:
        raise ValueError("tokenizer: no training text (all domains empty or zero-weighted)")
    t_scan = time.perf_counter() - t0
    log.info("tokenizer: training %s on %s docs / %s chars", cfg.kind, f"{total_docs:,}", f"{total_chars:,}")

    t1 = time.perf_counter()
    tok.train_from_iterator(_iter_training_text(samples), trainer=trainer)
    t_train = time.perf_counter() - t1

    if cfg.kind == "unigram":
        tok = _add_byte_fallback(tok, len(specials))
    learned = tok.get_vocab_size(with_added_tokens=True) - len(specials)
    if len(specials) + learned > cfg.vocab_size:
        log.warning("tokenizer: %s vocabulary came out at %d, above the %d target (its alphabet alone is that large)",
                    cfg.kind, len(specials) + learned, cfg.vocab_size)
    n_reserved = _pad_vocab(tok, cfg.vocab_multiple)
    ids = check_special_ids(tok, cfg.num_sentinels)
    for i, t in enumerate(specials):  # added tokens and <|unk|> follow the sentinels in order
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tok.to_str(pretty=True))
    hf_config, smap = _hf_files(cfg, specials)
    atomic_write_json(out_dir / "tokenizer_config.json", hf_config)
    atomic_write_json(out_dir / "special_tokens_map.json", smap)

    stats: dict[str, Any] = {
        "format_version": STATS_FORMAT_VERSION,
        "kind": cfg.kind,
        "vocab_size": vocab_size,
        "vocab_size_target": cfg.vocab_size,
        "special_tokens": len(specials),
        "learned_tokens": learned,  # Unigram: includes the 256 byte pieces
        "reserved_tokens": n_reserved,
        "special_ids": {n: i for n, i in ids.items() if not n.startswith(RESERVED_PREFIX)},
        "train_docs": total_docs,
        "train_chars": total_chars,
        "domains": {s.domain: {"budget_chars": s.budget, "chars": s.chars, "docs": s.docs,
                               "scanned_docs": s.scanned_docs, "scanned_chars": s.scanned_chars,
                               "files_scanned": len(s.files), "files": len(shard_files[s.domain]),
                               "exhausted": s.exhausted} for s in samples},
        "scan_seconds": round(t_scan, 3),  # first pass: lengths and keys, choice of documents
        "train_seconds": round(t_train, 3),  # second pass (reading the chosen texts) + training
        "tokenizer_sha256": tokenizer_sha256(out_dir),
        "pretokenize_pattern": pretokenize_pattern(cfg.split_digits),
        "tokenizers_version": tokenizers.__version__,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "fingerprint": fingerprint(cfg, shard_files, seed),
    }
    atomic_write_json(out_dir / "stats.json", stats)
    log.info("tokenizer: vocabulary %d (%d learned, %d reserved) in %.1fs -> %s",
             vocab_size, learned, n_reserved, t_train, out_dir / "tokenizer.json")
    return stats
