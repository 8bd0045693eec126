"""Tokenizer training: round trip on any text, the fixed special-token layout, vocabulary rounding,
digit splitting, pre-tokenization for Chinese and code, sampling budgets, Unigram/WordPiece, and
loading through transformers."""

from __future__ import annotations

import inspect
import json
import json.decoder
import json.encoder
import os
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from smelt.config import TokenizerConfig
from smelt.data.document import Document
from smelt.data.io import ShardWriter
from smelt.tokenizer.train import (
    BASE_SPECIALS,
    check_special_ids,
    is_up_to_date,
    load_tokenizer,
    pretokenize_pattern,
    select_training_docs,
    special_ids,
    tokenizer_sha256,
    train_tokenizer,
)

EN = [
    "The committee published its annual report on Tuesday, citing strong growth in exports.",
    "She walked along the river at dawn, watching the fog lift from the water.",
    "Researchers measured the temperature every hour for three consecutive weeks.",
    "It's not clear whether the new policy will reduce costs or simply shift them elsewhere.",
    "The library's collection includes manuscripts from the fourteenth century.",
    "They'll announce the results after the final votes have been counted.",
    "In 1969, astronauts landed on the Moon and returned safely to Earth.",
    "A small bakery on the corner sells bread, pastries and strong coffee.",
    "The engine failed twice during testing, so the launch was postponed.",
    "Children learn languages quickly when they hear them spoken at home.",
    "The population grew from 12345 in 1990 to 23456 in 2020, and 34512 by 2023.",
    "Invoice 1234-5678 was paid on 2021-12-31 for 12,345.67 dollars.",
]
ZH = [
    "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。",
    "长江是中国第一长河，全长约六千三百公里，流经十一个省级行政区。",
    "研究人员在实验室里连续观察了三个星期，并记录了每小时的温度变化。",
    "这家小面包店位于街角，出售新鲜的面包、点心和咖啡。",
    "孩子们在家里经常听到的语言，往往学得最快。",
    "委员会于星期二发布了年度报告，指出出口增长强劲。",
    "唐诗是中国古典文学的重要组成部分，李白和杜甫是最著名的诗人。",
    "人工智能技术的发展正在改变人们的工作和生活方式。",
    "图书馆的藏书包括十四世纪的手稿和大量的地方志。",
    "由于发动机在测试中两次出现故障，发射被推迟了。",
]
CODE = [inspect.getsource(json.encoder), inspect.getsource(json.decoder)]

# Strings every byte-level tokenizer must give back exactly.
ROUND_TRIP = {
    "chinese": "北京是中华人民共和国的首都，也是全国的政治中心。「你好」——《红楼梦》第1回",
    "english": "Hello, world! It's 3:45 p.m. — isn't it? \"Quotes\" and (parens) [brackets] {braces}.",
    "code": "def f(x):\n    if x:\n\t\treturn x  # tab+spaces\n        \n    return None\r\n",
    "indent_runs": "                                                                x = 1\n\n\n\n",
    "emoji": "👍🏽 👨‍👩‍👧‍👦 🇨🇳🇺🇸 😀😃 ❤️ 🏳️‍🌈",
    "combining": "e\u0301 a\u0300\u0316 Z\u0351\u036b\u0343\u036a\u0302 \u0915\u094d\u0937 \u0e01\u0e34\u0e4a",
    "odd_unicode": "\ufeff\u200b\u200d\u202e\u2066\ufffd\uffff\U0010ffff\ue000\U000e0001 \u00a0\u3000",
    "control": "".join(chr(c) for c in range(32)) + "\x7f\x85\u2028\u2029",
    "crlf_tabs": "a\r\nb\rc\n\r\n\t\t x\t",
    "special_strings": "<|eos|> <|bos|><|pad|> <|fim_prefix|>x<|fim_middle|> <|sentinel_0|> <|reserved_0|>",
    "byte_alphabet": "ĠĊĉ âĢĶ Ã© Ã¤",  # the characters byte-level BPE uses internally, and mojibake
    "byte_pieces": "<0x41> <0xFF> <0x00>",
    "mixed_scripts": "Привет мир مرحبا بالعالم שלום नमस्ते こんにちは 안녕하세요 Γειά σου ქართული",
    "digits": "0123456789 ٠١٢٣ ½ ² Ⅻ 3.14159 1,000,000 0x7FFF",
    "empty": "",
    "spaces": "   ",
}


def write_corpus(root: Path, seed: int = 0, n_docs: int = 60) -> dict[str, list[Path]]:
    """Three small domains (en, zh, code) as curated shards; two shards per prose domain."""
    rng = random.Random(seed)
    files: dict[str, list[Path]] = {}
    for domain, sents, lang in (("en", EN, "en"), ("zh", ZH, "zh")):
        for part in range(2):
            path = root / domain / f"part-{part:05d}.jsonl.zst"
            with ShardWriter(path, "jsonl.zst") as w:
                for i in range(n_docs // 2):
                    text = ("" if lang == "zh" else " ").join(rng.choice(sents) for _ in range(rng.randint(3, 8)))
                    w.write(Document(f"{domain}-{part}-{i}", text, domain, {"language": lang}))
            files.setdefault(domain, []).append(path)
    path = root / "code" / "part-00000.jsonl.zst"
    with ShardWriter(path, "jsonl.zst") as w:
        for i, src in enumerate(CODE):
            w.write(Document(f"code-{i}", src, "code", {"language": "python"}))
    files["code"] = [path]
    return files


def small_cfg(**kw: object) -> TokenizerConfig:
    base = {"vocab_size": 1000, "sample_chars_per_domain": 50_000, "num_sentinels": 4}
    return TokenizerConfig(**(base | kw))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, list[Path]]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bpe")
    stats = train_tokenizer(small_cfg(added_tokens=["<|im_start|>", "[MASK]"]), corpus, out, seed=7)
    return out, stats


def roundtrip(tok: Tokenizer, text: str) -> str:
    return tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_bpe_round_trip(bpe: tuple[Path, dict], name: str) -> None:
    tok = load_tokenizer(bpe[0], encode_special_tokens=True)
    text = ROUND_TRIP[name]
    assert roundtrip(tok, text) == text


def test_bpe_round_trip_random_unicode(bpe: tuple[Path, dict]) -> None:
    tok = load_tokenizer(bpe[0], encode_special_tokens=True)
    rng = random.Random(1)
    # Code points from every plane, surrogates excluded (a Python str may hold them, UTF-8 cannot).
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    texts = ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    decoded = tok.decode_batch([e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
                               skip_special_tokens=False)
    assert decoded == texts


def test_special_strings_in_text_are_text(bpe: tuple[Path, dict]) -> None:
    out, _ = bpe
    data = load_tokenizer(out, encode_special_tokens=True)
    ids = special_ids(data)
    text = "end of story <|eos|> and <|bos|><|fim_prefix|> <|sentinel_0|><|im_start|>"
    enc = data.encode(text, add_special_tokens=False).ids
    reserved = set(ids.values())
    assert not reserved & set(enc), "a special-token string in a document must not become the special id"
    assert data.decode(enc, skip_special_tokens=True) == text  # nothing to skip: all ordinary tokens
    # The default (chat/inference) mode does recognize them: that is why data encoding must not use it.
    plain = load_tokenizer(out)
    assert ids["eos"] in plain.encode(text, add_special_tokens=False).ids


def test_no_bos_eos_added_by_encode(bpe: tuple[Path, dict]) -> None:
    tok = load_tokenizer(bpe[0], encode_special_tokens=True)
    ids = tok.encode("hello", add_special_tokens=True).ids
    assert 1 not in ids and 2 not in ids  # documents are framed by the packer, not the tokenizer


# ---------------------------------------------------------------------------------- layout


def test_special_ids_follow_the_convention(bpe: tuple[Path, dict]) -> None:
    out, stats = bpe
    tok = load_tokenizer(out)
    ids = special_ids(tok)
    expected = {n: i for i, n in enumerate(BASE_SPECIALS)}
    expected |= {f"sentinel_{k}": 7 + k for k in range(4)}
    expected |= {"im_start": 11, "[MASK]": 12}
    assert {k: v for k, v in ids.items() if not k.startswith("reserved_")} == expected
    assert stats["special_ids"] == expected
    assert check_special_ids(tok, 4) == ids
    assert tok.token_to_id("<|eos|>") == 2 and tok.id_to_token(0) == "<|pad|>"


def test_vocab_is_padded_to_the_multiple(bpe: tuple[Path, dict]) -> None:
    out, stats = bpe
    tok = load_tokenizer(out)
    n = tok.get_vocab_size(with_added_tokens=True)
    assert n % 128 == 0 and n == stats["vocab_size"]
    reserved = sorted(i for k, i in special_ids(tok).items() if k.startswith("reserved_"))
    assert len(reserved) == stats["reserved_tokens"] < 128
    # Reserved tokens are the tail of the vocabulary, after every learned token.
    assert reserved == list(range(n - len(reserved), n))
    assert n - len(reserved) == stats["special_tokens"] + stats["learned_tokens"]


def test_vocab_multiple_other_value(tmp_path: Path, corpus: dict[str, list[Path]]) -> None:
    stats = train_tokenizer(small_cfg(vocab_size=700, vocab_multiple=96), corpus, tmp_path, seed=0)
    assert stats["vocab_size"] % 96 == 0 and stats["vocab_size"] >= 700 - 96


# ---------------------------------------------------------------------------------- pre-tokenization


def test_digits_are_split(bpe: tuple[Path, dict]) -> None:
    tok = load_tokenizer(bpe[0], encode_special_tokens=True)
    enc = tok.encode("12345", add_special_tokens=False)
    assert len(enc.ids) == 5
    assert [tok.decode([i]) for i in enc.ids] == list("12345")
    assert len(tok.encode("In 1969 there were 100000", add_special_tokens=False).ids) >= 4 + 6


def test_numbers_merge_without_split_digits(tmp_path: Path, corpus: dict[str, list[Path]]) -> None:
    # The control for test_digits_are_split: the corpus is full of digit pairs worth merging.
    train_tokenizer(small_cfg(split_digits=False), corpus, tmp_path, seed=7)
    tok = load_tokenizer(tmp_path, encode_special_tokens=True)
    assert len(tok.encode("12345", add_special_tokens=False).ids) < 5


def _pieces(pattern: str, text: str) -> list[str]:
    from tokenizers import Regex
    from tokenizers.pre_tokenizers import Split

    return [p for p, _ in Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)]


def test_pretokenizer_chinese_runs_do_not_absorb_punctuation_or_latin() -> None:
    p = _pieces(pretokenize_pattern(), "北京是首都，使用Python和中文。再见！")
    assert p == ["北京是首都", "，", "使用", "Python", "和中文", "。", "再见", "！"]


def test_pretokenizer_code_keeps_indentation_runs() -> None:
    p = _pieces(pretokenize_pattern(), "def f(x):\n        return x")
    # cl100k-style: the indentation minus one space is one piece; the last space joins the word.
    assert p == ["def", " f", "(x", "):\n", "       ", " return", " x"]


def test_pretokenizer_digit_groups_without_split_digits() -> None:
    assert _pieces(pretokenize_pattern(split_digits=False), "12345") == ["123", "45"]
    assert _pieces(pretokenize_pattern(split_digits=True), "12345") == list("12345")


def test_pretokenizer_keeps_combining_marks_in_the_word() -> None:
    assert _pieces(pretokenize_pattern(), "cafe\u0301 \u0928\u092e\u0938\u094d\u0924\u0947") == [
        "cafe\u0301", " \u0928\u092e\u0938\u094d\u0924\u0947"]


def test_bpe_learns_multi_character_chinese_words(bpe: tuple[Path, dict]) -> None:
    tok = load_tokenizer(bpe[0], encode_special_tokens=True)
    text = "北京是中华人民共和国的首都"
    assert len(tok.encode(text, add_special_tokens=False).ids) < len(text)


# ---------------------------------------------------------------------------------- outputs


def test_output_files_and_stats(bpe: tuple[Path, dict], corpus: dict[str, list[Path]]) -> None:
    out, stats = bpe
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert stats["tokenizer_sha256"] == tokenizer_sha256(out) == tokenizer_sha256(out / "tokenizer.json")
    assert stats["train_chars"] == sum(d["chars"] for d in stats["domains"].values())
    assert set(stats["domains"]) == {"en", "zh", "code"}
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == stats["vocab_size"]
    hf = json.loads((out / "tokenizer_config.json").read_text())
    assert (hf["bos_token"], hf["eos_token"], hf["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf["clean_up_tokenization_spaces"] is False
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_up_to_date_tracks_config_and_inputs(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c", n_docs=10)
    cfg = small_cfg(vocab_size=400)
    out = tmp_path / "tok"
    assert not is_up_to_date(out, cfg, files, 0)
    train_tokenizer(cfg, files, out, seed=0)
    assert is_up_to_date(out, cfg, files, 0)
    assert not is_up_to_date(out, small_cfg(vocab_size=512), files, 0)
    assert not is_up_to_date(out, cfg, files, 1)
    st = files["en"][0].stat()
    os.utime(files["en"][0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not is_up_to_date(out, cfg, files, 0)


def test_training_is_deterministic(tmp_path: Path, corpus: dict[str, list[Path]]) -> None:
    cfg = small_cfg(vocab_size=600, sample_chars_per_domain=5_000)
    a = train_tokenizer(cfg, corpus, tmp_path / "a", seed=3)
    # Same seed, files listed in another order: the same documents, the same tokenizer.
    b = train_tokenizer(cfg, {d: list(reversed(f)) for d, f in reversed(corpus.items())}, tmp_path / "b", seed=3)
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]
    assert a["domains"] == b["domains"]


# ---------------------------------------------------------------------------------- sampling


def _chosen(samples: list) -> dict[str, set[tuple[str, int]]]:
    return {s.domain: {(s.files[f].name, i) for f, docs in s.chosen.items() for i in docs} for s in samples}


def test_budget_per_domain_and_weights(corpus: dict[str, list[Path]]) -> None:
    cfg = small_cfg(sample_chars_per_domain=1_000, domain_weights={"zh": 2.0, "code": 0.0}, max_doc_chars=300)
    samples = {s.domain: s for s in select_training_docs(cfg, corpus, seed=0)}
    assert samples["en"].chars == 1_000 and samples["zh"].chars == 2_000  # cut to land exactly on it
    assert samples["code"].docs == 0 and samples["code"].chars == 0
    for s in samples.values():
        assert all(n <= 300 for docs in s.chosen.values() for n in docs.values())
        assert sum(n for docs in s.chosen.values() for n in docs.values()) == s.chars


def test_small_domain_is_used_whole(corpus: dict[str, list[Path]]) -> None:
    cfg = small_cfg(sample_chars_per_domain=10_000_000, max_doc_chars=100_000)
    samples = {s.domain: s for s in select_training_docs(cfg, corpus, seed=0)}
    code = samples["code"]
    assert code.exhausted and code.docs == 2 and code.chars == sum(len(c) for c in CODE)


def test_selection_depends_on_seed_only(corpus: dict[str, list[Path]]) -> None:
    cfg = small_cfg(sample_chars_per_domain=2_000)
    a = _chosen(select_training_docs(cfg, corpus, seed=0))
    assert a == _chosen(select_training_docs(cfg, corpus, seed=0))
    b = _chosen(select_training_docs(cfg, corpus, seed=1))
    assert a["en"] != b["en"] and a["zh"] != b["zh"]


# ---------------------------------------------------------------------------------- errors


def test_bad_configs_fail_before_reading(tmp_path: Path, corpus: dict[str, list[Path]]) -> None:
    with pytest.raises(ValueError, match="already a special token"):
        train_tokenizer(small_cfg(added_tokens=["<|eos|>"]), corpus, tmp_path, seed=0)
    with pytest.raises(ValueError, match="collides"):
        train_tokenizer(small_cfg(added_tokens=["<|reserved_3|>"]), corpus, tmp_path, seed=0)
    with pytest.raises(ValueError, match="256 byte symbols"):
        train_tokenizer(small_cfg(vocab_size=260), corpus, tmp_path, seed=0)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(small_cfg(domain_weights={"en": 0, "zh": 0, "code": 0}), corpus, tmp_path, seed=0)
    assert not (tmp_path / "stats.json").exists()


def test_foreign_tokenizer_fails_the_layout_check(tmp_path: Path) -> None:
    from tokenizers import models

    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|eos|>", "<|pad|>"])
    with pytest.raises(ValueError, match="<\\|pad\\|> has id 1, expected 0"):
        check_special_ids(tok)


# ---------------------------------------------------------------------------------- other models


def test_unigram_trains_and_falls_back_to_bytes(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c", n_docs=16)
    stats = train_tokenizer(small_cfg(kind="unigram", vocab_size=900, sample_chars_per_domain=4_000), files,
                            tmp_path / "tok", seed=0)
    tok = load_tokenizer(tmp_path / "tok", encode_special_tokens=True)
    ids = special_ids(tok)
    assert [ids[n] for n in BASE_SPECIALS] == list(range(7)) and ids["unk"] == 11
    assert tok.token_to_id("<0x00>") == 12 and tok.token_to_id("<0xFF>") == 12 + 255
    assert stats["vocab_size"] % 128 == 0
    for name, text in ROUND_TRIP.items():  # byte_pieces included: literal "<0x41>" text stays text
        enc = tok.encode(text, add_special_tokens=False)
        assert ids["unk"] not in enc.ids
        assert roundtrip(tok, text) == text, name
    assert "<0xF0>" in tok.encode("🦀", add_special_tokens=False).tokens  # unseen: bytes, not <|unk|>


def test_wordpiece_trains_and_loads_with_documented_losses(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c", n_docs=16)
    train_tokenizer(small_cfg(kind="wordpiece", vocab_size=900, sample_chars_per_domain=4_000), files,
                    tmp_path / "tok", seed=0)
    tok = load_tokenizer(tmp_path / "tok", encode_special_tokens=True)
    ids = special_ids(tok)
    assert [ids[n] for n in BASE_SPECIALS] == list(range(7)) and ids["unk"] == 11
    for text in (EN[0], ZH[0], "    return x\n"):  # seen characters: exact
        assert roundtrip(tok, text) == text
    assert ids["unk"] in tok.encode("🦀", add_special_tokens=False).ids  # no byte fallback in WordPiece


# ---------------------------------------------------------------------------------- transformers


def test_transformers_loads_it(bpe: tuple[Path, dict]) -> None:
    transformers = pytest.importorskip("transformers")
    out, _ = bpe
    text = "Hello , world . 北京 <|eos|>\n    x = 1  # 😀"
    direct = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json"), bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    loaded = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    ref = load_tokenizer(out)  # inference mode: "<|eos|>" in text is the special token, as in HF
    for t in (direct, loaded):
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 2, 0)
        assert len(t) == ref.get_vocab_size(with_added_tokens=True)
        ids = t(text)["input_ids"]
        assert ids == ref.encode(text).ids
        assert t.decode(ids) == text  # no clean-up of " ," / " ."
    assert loaded.convert_ids_to_tokens(3) == "<|fim_prefix|>"
    assert 3 in loaded.all_special_ids and 7 in loaded.all_special_ids



def test_pattern_and_merges_reproduce_in_tiktoken(bpe: tuple[Path, dict]) -> None:
    """The same regex + the merges as tiktoken ranks give the same ids (the packer's fast path)."""
    tiktoken = pytest.importorskip("tiktoken")
    out, _ = bpe
    model = json.loads((out / "tokenizer.json").read_text())
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    decoder = {chr(b): b for b in bs} | {chr(256 + k): b for k, b in enumerate(extra)}
    specials = {t["content"] for t in model["added_tokens"]}
    ranks = {bytes(decoder[c] for c in piece): i
             for piece, i in model["model"]["vocab"].items() if piece not in specials}
    enc = tiktoken.Encoding("smelt-test", pat_str=pretokenize_pattern(), mergeable_ranks=ranks, special_tokens={})
    tok = load_tokenizer(out, encode_special_tokens=True)
    rng = random.Random(2)
    ranges = [(0x20, 0x7E), (0x4E00, 0x9FFF), (0, 0xD7FF), (0xE000, 0x10FFFF)]
    texts = [*ROUND_TRIP.values(), *EN, *ZH, *CODE]
    texts += ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(30)) for _ in range(200)]
    hf = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert hf == enc.encode_ordinary_batch(texts)
