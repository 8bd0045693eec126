"""The tiktoken fast path must give HF's ids exactly, or hand the document to HF."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from smelt.config import TokenizerConfig
from smelt.data.document import Document
from smelt.data.io import ShardWriter
from smelt.tokenizer.train import load_tokenizer, train_tokenizer
from smelt.tokens.fast_bpe import (
    GPT2_PATTERN,
    WHOLE_TEXT_PATTERN,
    FastBPE,
    FastPathUnsupported,
    analyze,
    bytes_to_unicode,
    token_bytes,
    translate_pre_tokenizer,
)

tiktoken = pytest.importorskip("tiktoken")

EN = ("the model reads tokens and the loader packs documents into sequences of fixed length while "
      "the optimizer updates weights it's we'll they're I'M don't").split()
ZH = "我们使用分词器把中文文本切分成词元模型在训练时读取这些数据并学习语言的规律北京上海"
CODE = ["def f(x):\n    return x + 1\n", "for i in range(10):\n\tprint(i, end='')\n",
        "class A:\n        pass\n\n\n", "if (a && b) { x += 2; }  // done\r\n"]

# Everything the issue asks to round-trip, plus the places regex engines tend to disagree.
TRICKY = [
    "中文分词不依赖空格，例如：北京大学（Peking University）成立于1898年。",
    "繁體中文與日本語のかな、カタカナ。한국어 텍스트도 있습니다.",
    "English text, with punctuation... and CONTRACTIONS: I'LL, we're, it's, 'S 's.",
    "def main(argv):\n    if not argv:\n        return 0\n\t\treturn 1  \n\n\n",
    "emoji 😀😃 family 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 skin 👍🏽 keycap 1️⃣ ❤️",
    "digits 0123456789 3.14159 1,000,000 ١٢٣ ٤٥٦ ⅫⅣ ½ ² ①②",
    "whitespace   runs\t\t\tand\n\n\n\nnewlines \r\n\r\n   \n trailing   ",
    "unicode spaces:\u00a0nbsp\u3000ideographic\u2028line\u2029para\u0085nel\u200bzwsp\u2003em",
    "specials in text: <|eos|> <|bos|><|pad|> <|fim_prefix|>x<|fim_suffix|> <|sentinel_0|>",
    "case folding: 'ſ 'K (Kelvin) İstanbul ǅ ß ẞ ﬁ",
    "combining: e\u0301 a\u0308 \u0915\u093f\u0928\u094d\u0926\u0940 Ελληνικά العربية עברית",
    "astral: 𠀀𠀁 𝐀𝐁𝐂 𝟘𝟙 🜁 𓀀 and private use \ue000\U000f0000",
    "control \x00\x01\x07\x1b[31m\x7f and bom \ufeff",
    "   leading spaces and a very long word " + "x" * 3000,
    "",
    " ",
    "\n",
]


def mixed_docs(n: int, seed: int = 0) -> list[str]:
    """Deterministic documents mixing English, Chinese, code, numbers and whitespace."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 12)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(" ".join(rng.choice(EN) for _ in range(rng.randint(3, 15))) + ".")
            elif kind < 0.65:
                parts.append("".join(rng.choice(ZH) for _ in range(rng.randint(5, 30))) + "。")
            elif kind < 0.85:
                parts.append(rng.choice(CODE))
            else:
                parts.append(f"{rng.randint(0, 10**6)} items at {rng.random():.3f}%")
        out.append(rng.choice([" ", "\n", "\n\n", ""]).join(parts))
    return out


def write_docs(path: Path, texts: list[str], domain: str, prefix: str = "d") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(path, "jsonl.zst") as w:
        for i, t in enumerate(texts):
            w.write(Document(id=f"{prefix}{i}", text=t, domain=domain, meta={}))
    return path


@pytest.fixture(scope="module")
def smelt_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    files = {"mix": [write_docs(root / "clean" / "mix" / "part-00000.jsonl.zst", mixed_docs(400), "mix")]}
    cfg = TokenizerConfig(vocab_size=1200, num_sentinels=4, sample_chars_per_domain=1_000_000)
    train_tokenizer(cfg, files, root / "tokenizer", seed=1)
    return load_tokenizer(root / "tokenizer", encode_special_tokens=True)


def hf_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_byte_alphabet_round_trip() -> None:
    b2u = bytes_to_unicode()
    assert sorted(b2u) == list(range(256)) and len(set(b2u.values())) == 256
    assert all(token_bytes(c) == bytes([b]) for b, c in b2u.items())
    assert token_bytes("Ġhello") == b" hello"
    assert token_bytes("a b") is None  # a plain space is not in the byte-level alphabet


def test_smelt_tokenizer_ids_identical_to_hf(smelt_tokenizer: Tokenizer) -> None:
    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    assert fast.spec.stats["ranks_are_ids"]  # HF's trainer assigns learned ids in merge order
    assert fast.spec.stats["unreachable"] >= 7 + 4  # the special tokens sit in the BPE vocabulary
    texts = TRICKY + mixed_docs(200, seed=7)
    assert fast.encode_batch(texts) == hf_ids(smelt_tokenizer, texts)
    # the bulk went through tiktoken: only the special-token and astral-unassigned texts fell back
    assert sum(fast.fallback_counts.values()) <= 3
    assert fast.fallback_counts["uncovered_text"] == 0


def test_special_token_strings_are_text(smelt_tokenizer: Tokenizer) -> None:
    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    eos = smelt_tokenizer.token_to_id("<|eos|>")
    ids = fast.encode("before <|eos|> after")
    assert eos not in ids
    assert ids == smelt_tokenizer.encode("before <|eos|> after", add_special_tokens=False).ids
    assert smelt_tokenizer.decode(ids, skip_special_tokens=False) == "before <|eos|> after"


def test_unicode_categories_agree_on_every_plane(smelt_tokenizer: Tokenizer) -> None:
    # Every 97th code point (covers each block's letters, marks, digits and spaces) in three contexts.
    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    fast._unassigned[:] = False  # compare the engines themselves, no fallback
    fast._unassigned_rx = __import__("re").compile(r"(?!)")
    cps = [c for c in range(0, 0x110000, 97) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"ab{chr(c)}cd {chr(c)}1{chr(c)} \t{chr(c)}\n'{chr(c)}" for c in cps]
    assert fast.encode_batch(texts) == hf_ids(smelt_tokenizer, texts)


def _merge_table(seed: int, n_merges: int = 14, alphabet: str = "abcd") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Random merges over a tiny alphabet, including every kind of conflict HF's trainer avoids:
    tokens no merge order reaches, and several merges spelling the same token."""
    rng = random.Random(seed)
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tokens = list(alphabet)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        x, y = rng.choice(tokens), rng.choice(tokens)
        long = [t for t in tokens if len(t) >= 3]
        if long and rng.random() < 0.3:  # another merge spelling an existing token
            t = rng.choice(long)
            j = rng.randrange(1, len(t))
            x, y = t[:j], t[j:]
            if x not in vocab or y not in vocab:
                continue
        if len(x + y) > 5 or (x, y) in merges:
            continue
        merges.append((x, y))
        if x + y not in vocab:
            vocab[x + y] = len(vocab)
            tokens.append(x + y)
    return vocab, merges


def _bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], ignore_merges: bool,
                   pre: pre_tokenizers.PreTokenizer | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre or pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.encode_special_tokens = True
    return tok


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_conflicting_merge_tables_exhaustive(ignore_merges: bool) -> None:
    """The construction in fast_bpe's docstring, checked on every string up to length 5."""
    strings = ["".join(p) for n in range(1, 6) for p in itertools.product("abcd", repeat=n)]
    naive_differs = 0
    kinds = {"unreachable": 0, "multi_merge_tokens": 0}
    for seed in range(40):
        vocab, merges = _merge_table(seed)
        tok = _bpe_tokenizer(vocab, merges, ignore_merges)
        fast = FastBPE.from_tokenizer(tok)
        want = hf_ids(tok, strings)
        assert fast.encode_batch(strings) == want, f"seed {seed}"
        if not ignore_merges:  # no fallback strings: equality comes from the ranks alone
            assert not fast.spec.fallback_strings
        kinds["unreachable"] += fast.spec.stats["unreachable"] > 0
        kinds["multi_merge_tokens"] += fast.spec.stats["multi_merge_tokens"] > 0
        # A naive table (every vocabulary entry ranked by its id) is wrong on these tables.
        naive = tiktoken.Encoding("naive", pat_str=WHOLE_TEXT_PATTERN, special_tokens={},
                                  mergeable_ranks={token_bytes(t): i for t, i in vocab.items()})
        naive_differs += sum(naive.encode_ordinary(s) != w for s, w in zip(strings, want, strict=True))
    assert naive_differs > 100  # the test has teeth
    assert kinds["unreachable"] > 5 and kinds["multi_merge_tokens"] > 5


def test_ranks_remapped_when_ids_are_not_in_merge_order() -> None:
    vocab, merges = _merge_table(3)
    learned = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 256]
    shuffled = dict(vocab)
    for t, new_id in zip(learned, reversed(range(256, 256 + len(learned))), strict=True):
        shuffled[t] = new_id
    tok = _bpe_tokenizer(shuffled, merges, ignore_merges=False)
    fast = FastBPE.from_tokenizer(tok)
    assert not fast.spec.stats["ranks_are_ids"] and fast.spec.rank_to_id is not None
    strings = ["".join(p) for n in range(1, 6) for p in itertools.product("abcd", repeat=n)]
    assert fast.encode_batch(strings) == hf_ids(tok, strings)


def _trained(pre: pre_tokenizers.PreTokenizer, texts: list[str], normalizer: normalizers.Normalizer | None = None,
             vocab_size: int = 600) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def test_gpt2_style_byte_level_regex() -> None:
    tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), mixed_docs(200))
    fast = FastBPE.from_tokenizer(tok)
    assert fast.spec.pat_str == GPT2_PATTERN
    texts = TRICKY + mixed_docs(50, seed=3)
    assert fast.encode_batch(texts) == hf_ids(tok, texts)


def test_normalizer_applied_before_tiktoken() -> None:
    tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), mixed_docs(200),
                   normalizer=normalizers.NFKC())
    fast = FastBPE.from_tokenizer(tok)
    texts = ["ｆｕｌｌ－ｗｉｄｔｈ ①②③ ﬁne ㎏ Ⅻ", *TRICKY]
    assert fast.encode_batch(texts) == hf_ids(tok, texts)


def test_uncovered_text_is_detected_and_sent_to_hf() -> None:
    # A split regex that matches only letters and spaces: HF keeps digits/punctuation as their own
    # pre-tokens, tiktoken would silently drop them.
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r" ?\p{L}+|\s+"), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _trained(pre, mixed_docs(200))
    fast = FastBPE.from_tokenizer(tok)
    texts = ["only letters here", "digits 123 and, punctuation!", "中文，标点。"]
    assert fast.encode_batch(texts) == hf_ids(tok, texts)
    assert fast.fallback_counts["uncovered_text"] == 2


def test_non_special_added_tokens_fall_back() -> None:
    tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), mixed_docs(200))
    tok.add_tokens([AddedToken("model reads", special=False, normalized=False)])
    fast = FastBPE.from_tokenizer(tok)
    texts = ["the model reads tokens", "the loader packs"]
    assert fast.encode_batch(texts) == hf_ids(tok, texts)
    assert fast.fallback_counts["special_string"] == 1


def test_unassigned_code_points_fall_back(smelt_tokenizer: Tokenizer) -> None:
    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    texts = ["Greek gap \u0378 here", "astral gap \U0001fb00\U0003ffff", "assigned \U0001f600 only"]
    assert fast.encode_batch(texts) == hf_ids(smelt_tokenizer, texts)
    assert fast.fallback_counts["unassigned_codepoint"] == 2


@pytest.mark.parametrize("pre, reason", [
    (pre_tokenizers.ByteLevel(add_prefix_space=True), "add_prefix_space"),
    (pre_tokenizers.Metaspace(), "not ByteLevel"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "behavior"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), "more than one"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "literal"),
])
def test_untranslatable_pre_tokenizers_are_refused(pre: pre_tokenizers.PreTokenizer, reason: str) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    with pytest.raises(FastPathUnsupported, match=reason):
        translate_pre_tokenizer(json.loads(tok.to_str())["pre_tokenizer"])


def test_unsupported_models_are_refused() -> None:
    wp = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(FastPathUnsupported, match="not BPE"):
        analyze(wp)
    partial = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    partial.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(FastPathUnsupported, match="byte symbols"):
        analyze(partial)
    fallback = Tokenizer(models.BPE(vocab={"a": 0}, merges=[], byte_fallback=True))
    with pytest.raises(FastPathUnsupported, match="byte_fallback"):
        analyze(fallback)


def test_real_text_from_shared_data(shared_data: Path, smelt_tokenizer: Tokenizer) -> None:
    texts = []
    for art in json.loads((shared_data / "cmrc2018" / "cmrc2018_dev.json").read_text(encoding="utf-8"))["data"][:40]:
        texts += [p["context"] for p in art["paragraphs"]]
    lines = (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    texts += ["\n".join(lines[i: i + 40]) for i in range(0, 2000, 40)]
    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    assert fast.encode_batch(texts) == hf_ids(smelt_tokenizer, texts)


def test_joined_calls_equal_one_call_per_document(smelt_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # encode_flat joins documents with its separator special token. Each document must still be
    # pre-tokenized alone: whitespace at the edges (`\s+(?!\S)` looks ahead), empty documents,
    # and documents that spell the separator, or half of it next to the real one, as text.
    from smelt.tokens import fast_bpe

    sep = fast_bpe._NEVER_SPECIAL
    edge = ["  trailing  ", "\n\n", "", "x", "  ", "leading", " \t", "中文 ", "end\r\n"]
    spelled = [f"a{sep}b", sep, f"tail \x00{fast_bpe._SEP_CORE}", f"{fast_bpe._SEP_CORE}\x00 head",
               f"\x00{fast_bpe._SEP_CORE}", "\x00"]
    texts = edge + spelled + TRICKY + mixed_docs(60, seed=3) + edge
    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    want = hf_ids(smelt_tokenizer, texts)
    alone = [fast._encode(t).tolist() for t in texts]  # one tiktoken call per document
    monkeypatch.setattr(fast_bpe, "JOIN_CHARS", 200)  # many joined calls, cut at varying places
    got = fast.encode_batch(texts)
    assert got == want
    # documents that fell back to HF aside, tiktoken's joined ids are its own per-document ids
    plain = [i for i, t in enumerate(texts) if fast.fallback_reason(t) is None]
    assert len(plain) > len(texts) - 5 and all(got[i] == alone[i] for i in plain)
    assert fast.fallback_counts["uncovered_text"] == 0  # spelled separators were caught before the join


@pytest.mark.parametrize("join_chars", [50, 1 << 22])
def test_joined_fallback_checks_equal_per_document_checks(smelt_tokenizer: Tokenizer,
                                                          monkeypatch: pytest.MonkeyPatch, join_chars: int) -> None:
    # encode_flat scans each joined call's text for fallback patterns and confirms the hits per
    # document; the documents sent to HF must be exactly those `fallback_reason` names.
    from smelt.tokens import fast_bpe

    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    special = sorted(fast.spec.fallback_strings, key=len)[-1]  # e.g. "<|eos|>" (ignore_merges)
    half = len(special) // 2
    texts = [f"a {special} b", special, special[:half], special[half:], "x" + special[:half],  # halves at edges
             "Greek gap \u0378 here", "astral gap \U0001fb00", "assigned \U0001f600 only", "\U0001f600",
             f"{fast_bpe._SEP_CORE} and {special}", "", *mixed_docs(40, seed=5), "中文 \u0378", "end"]
    want = [i for i, t in enumerate(texts) if fast.fallback_reason(t) is not None]
    assert len(want) >= 5

    def sent_to_hf(fast: FastBPE) -> tuple[list[str], list[list[int]]]:
        sent: list[str] = []
        real = fast._hf_ids
        monkeypatch.setattr(fast, "_hf_ids", lambda ts: sent.extend(ts) or real(ts))
        ids = fast.encode_batch(texts)
        monkeypatch.undo()
        return sent, ids

    monkeypatch.setattr(fast_bpe, "JOIN_CHARS", join_chars)
    sent, ids = sent_to_hf(fast)
    monkeypatch.setattr(fast_bpe, "JOIN_CHARS", join_chars)
    assert sent == [texts[i] for i in want] and ids == hf_ids(smelt_tokenizer, texts)
    per_doc = FastBPE(fast.spec, smelt_tokenizer)
    per_doc._joined_checks = False  # what a fallback string holding NUL forces
    sent2, ids2 = sent_to_hf(per_doc)
    assert sent2 == sent and ids2 == ids and per_doc.fallback_counts == fast.fallback_counts


def test_fallback_counts_per_call_and_threads(smelt_tokenizer: Tokenizer) -> None:
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    fast = FastBPE.from_tokenizer(smelt_tokenizer)
    batches = [TRICKY + mixed_docs(40, seed=s) for s in range(8)]
    want = [hf_ids(smelt_tokenizer, b) for b in batches]
    counts = [Counter() for _ in batches]
    with ThreadPoolExecutor(4) as ex:  # one encoder shared by threads, each call with its counter
        flats = list(ex.map(lambda j: fast.encode_flat(batches[j], counts[j]), range(len(batches))))
    for (flat, lens), w in zip(flats, want, strict=True):
        assert [a.tolist() for a in np.split(flat, np.cumsum(lens)[:-1])] == w
    assert not fast.fallback_counts  # per-call counters: the shared one is untouched
    assert all(c == counts[0] and c["special_string"] >= 1 for c in counts)
    assert fast.mismatches(batches[0]) == [] and not fast.fallback_counts  # verification is not counted
    fast.encode_flat(batches[0])
    assert fast.fallback_counts == counts[0]


def test_analysis_cache(smelt_tokenizer: Tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from smelt.tokens.fast_bpe import cached_analyze, load_spec, spec_cache_key

    path = tmp_path / "tokenizer.json"
    smelt_tokenizer.save(str(path))
    spec, hit = cached_analyze(smelt_tokenizer, path)
    assert not hit
    (cache,) = tmp_path.glob(".smelt-fast-bpe-*.npz")
    again, hit = cached_analyze(smelt_tokenizer, path)
    assert hit
    ref = analyze(smelt_tokenizer)
    for name in ("pat_str", "mergeable_ranks", "fallback_strings", "normalize", "unassigned", "stats"):
        assert getattr(again, name) == getattr(ref, name) == getattr(spec, name), name
    assert np.array_equal(again.token_nbytes, ref.token_nbytes) and again.rank_to_id is ref.rank_to_id is None
    texts = TRICKY + mixed_docs(30, seed=9)
    assert FastBPE(again, smelt_tokenizer).encode_batch(texts) == hf_ids(smelt_tokenizer, texts)
    # another tokenizer file (another sha256) never reads this entry
    assert load_spec(cache, spec_cache_key("0" * 64)) is None
    # a damaged cache is ignored (with a warning) and rewritten
    cache.write_bytes(cache.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        _, hit = cached_analyze(smelt_tokenizer, path)
    assert not hit and "unreadable" in caplog.text
    assert cached_analyze(smelt_tokenizer, path)[1]


def test_analysis_cache_keeps_a_rank_to_id_table(tmp_path: Path) -> None:
    from smelt.tokens.fast_bpe import load_spec, save_spec

    vocab, merges = _merge_table(3)
    learned = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 256]
    shuffled = dict(vocab)
    for t, new_id in zip(learned, reversed(range(256, 256 + len(learned))), strict=True):
        shuffled[t] = new_id  # ids not in merge order: ranks need the table
    tok = _bpe_tokenizer(shuffled, merges, ignore_merges=False)
    spec = analyze(tok)
    assert spec.rank_to_id is not None
    save_spec(spec, tmp_path / "s.npz", "k")
    back = load_spec(tmp_path / "s.npz", "k")
    assert back is not None and np.array_equal(back.rank_to_id, spec.rank_to_id)
    assert back.mergeable_ranks == spec.mergeable_ranks
    texts = ["".join(p) for n in range(1, 5) for p in itertools.product("abcd", repeat=n)]
    assert FastBPE(back, tok).encode_batch(texts) == hf_ids(tok, texts)
