"""Tokenizer evaluation: figures recomputed independently, languages, vocabulary use, round-trip
failures of a lossy tokenizer, side-by-side comparison, and real Chinese/English text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, normalizers

from smelt.config import InputSource, TokenizerConfig
from smelt.data.document import Document
from smelt.data.io import ShardWriter, read_documents, read_shard
from smelt.tokenizer.evaluate import MAX_MISMATCHES, evaluate_tokenizer, format_eval_table
from smelt.tokenizer.train import load_tokenizer, train_tokenizer

EN = ["The River Thames flows through London.", "Results were published in 2019 by the team.",
      "A quick brown fox jumps over the lazy dog.", "she said it's fine, really", "no capitals here at all."]
ZH = ["长江是中国第一长河。", "北京是中华人民共和国的首都，", "研究人员连续观察了三个星期。",
      "人工智能正在改变生活方式！"]


def _write(path: Path, docs: list[Document]) -> Path:
    with ShardWriter(path, "jsonl.zst") as w:
        for d in docs:
            w.write(d)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    en = [Document(f"en-{i}", " ".join(rng.choice(EN) for _ in range(rng.randint(1, 6))), "en", {"language": "en"})
          for i in range(30)]
    # No language in meta: the evaluator falls back to the CJK share.
    zh = [Document(f"zh-{i}", "".join(rng.choice(ZH) for _ in range(rng.randint(1, 6))), "zh") for i in range(30)]
    mixed = [Document("m-0", "def f():\n    return '北京'  # 😀 <|eos|>", "mixed"),
             Document("m-1", "Tabs\tand\r\nCRLF and 12345", "mixed")]
    return {"en": [_write(root / "en/a.jsonl.zst", en[:20]), _write(root / "en/b.jsonl.zst", en[20:])],
            "zh": [_write(root / "zh/a.jsonl.zst", zh)],
            "mixed": [_write(root / "mixed/a.jsonl.zst", mixed)]}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, list[Path]]) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TokenizerConfig(vocab_size=600, sample_chars_per_domain=10_000), corpus, out, seed=0)
    return out


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """The same tokenizer behind a lowercasing normalizer: every capital letter is lost."""
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.normalizer = normalizers.Lowercase()
    path = tmp_path_factory.mktemp("lossy") / "tokenizer.json"
    tok.save(str(path))
    return path


def _first_docs(files: list[Path], n: int) -> list[Document]:
    return [d for p in files for d in read_shard(p)][:n]


def test_figures_match_an_independent_count(tok_dir: Path, corpus: dict[str, list[Path]]) -> None:
    n = 25  # more than the first en shard holds: the evaluator must continue into the second
    r = evaluate_tokenizer(tok_dir, corpus, n)
    main = r["tokenizer"]
    tok = load_tokenizer(tok_dir, encode_special_tokens=True)
    all_ids: set[int] = set()
    totals = {"docs": 0, "bytes": 0, "chars": 0, "tokens": 0}
    for domain, files in corpus.items():
        docs = _first_docs(files, n)
        ids = [tok.encode(d.text, add_special_tokens=False).ids for d in docs]
        for x in ids:
            all_ids.update(x)
        want = {"docs": len(docs), "bytes": sum(len(d.text.encode()) for d in docs),
                "chars": sum(len(d.text) for d in docs), "tokens": sum(map(len, ids))}
        got = main["domains"][domain]
        assert {k: got[k] for k in want} == want
        assert got["bytes_per_token"] == pytest.approx(want["bytes"] / want["tokens"])
        assert got["chars_per_token"] == pytest.approx(want["chars"] / want["tokens"])
        assert got["roundtrip_failures"] == 0
        for k in totals:
            totals[k] += want[k]
    assert {k: main["overall"][k] for k in totals} == totals
    assert main["domains"]["en"]["docs"] == 25 and main["domains"]["mixed"]["docs"] == 2
    assert main["vocab_used"] == len(all_ids)
    assert main["vocab_used_share"] == pytest.approx(len(all_ids) / tok.get_vocab_size(with_added_tokens=True))
    assert main["roundtrip"] == {"checked": totals["docs"], "failures": 0, "mismatches": []}
    assert r["compare"] is None and r["docs"] == totals["docs"]
    json.dumps(r)  # the CLI writes it as eval.json


def test_special_strings_in_documents_count_as_text(tok_dir: Path, corpus: dict[str, list[Path]]) -> None:
    r = evaluate_tokenizer(tok_dir, {"mixed": corpus["mixed"]}, 10)
    tok = load_tokenizer(tok_dir, encode_special_tokens=True)
    text = _first_docs(corpus["mixed"], 1)[0].text
    assert "<|eos|>" in text
    assert r["tokenizer"]["roundtrip"]["failures"] == 0
    assert 2 not in tok.encode(text, add_special_tokens=False).ids


def test_languages_from_meta_or_cjk_share(tok_dir: Path, corpus: dict[str, list[Path]]) -> None:
    langs = evaluate_tokenizer(tok_dir, corpus, 100)["tokenizer"]["languages"]
    assert set(langs) == {"en", "cjk", "other"}
    assert langs["en"]["docs"] == 30 and langs["cjk"]["docs"] == 30 and langs["other"]["docs"] == 2


def test_lossy_tokenizer_is_reported(lossy: Path, tok_dir: Path, corpus: dict[str, list[Path]]) -> None:
    r = evaluate_tokenizer(lossy, corpus, 100, compare=tok_dir)
    docs = [d for files in (corpus[k] for k in sorted(corpus)) for d in _first_docs(files, 100)]
    bad = [d for d in docs if d.text != d.text.lower()]
    rt = r["tokenizer"]["roundtrip"]
    assert rt["checked"] == len(docs) and rt["failures"] == len(bad) > MAX_MISMATCHES
    assert len(rt["mismatches"]) == MAX_MISMATCHES
    first = rt["mismatches"][0]
    doc = next(d for d in bad if d.id == first["id"])
    i = first["offset"]
    assert doc.text[i] != doc.text[i].lower() and doc.text[:i] == doc.text[:i].lower()
    assert first["got"].startswith(doc.text[i].lower()) or doc.text[i].lower() in first["got"]
    assert r["tokenizer"]["domains"]["zh"]["roundtrip_failures"] == 0
    # The comparison ran on the same documents and is exact.
    cmp_ = r["compare"]
    assert cmp_["roundtrip"]["failures"] == 0 and cmp_["overall"]["docs"] == len(docs)
    assert cmp_["overall"]["bytes"] == r["tokenizer"]["overall"]["bytes"]

    table = format_eval_table(r)
    assert "cmp chars/tok" in table and f"round trip {len(docs) - len(bad)}/{len(docs)} exact" in table
    assert f"mismatch {first['domain']}/{first['id']} at char {i}" in table
    assert "domain:zh" in table and "language:cjk" in table and "\nall " in table


def test_table_without_comparison(tok_dir: Path, corpus: dict[str, list[Path]]) -> None:
    r = evaluate_tokenizer(tok_dir, corpus, 5)
    table = format_eval_table(r)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["group", "docs", "MB"] and "cmp" not in lines[0]
    row = next(ln for ln in lines if ln.startswith("domain:en")).split()
    en = r["tokenizer"]["domains"]["en"]
    assert row[1] == "5" and row[4] == f"{en['tokens']:,}" and row[6] == f"{en['chars_per_token']:.3f}"


def test_lone_surrogates_are_a_failure_not_a_crash(tmp_path: Path, tok_dir: Path) -> None:
    files = {"x": [_write(tmp_path / "x.jsonl.zst", [Document("bad", "ok \udc80 text", "x"),
                                                     Document("good", "fine text", "x")])]}
    rt = evaluate_tokenizer(tok_dir, files, 10)["tokenizer"]["roundtrip"]
    assert rt["checked"] == 2 and rt["failures"] == 1 and rt["mismatches"][0]["id"] == "bad"


def test_bad_arguments(tmp_path: Path, tok_dir: Path, corpus: dict[str, list[Path]]) -> None:
    with pytest.raises(ValueError, match="docs_per_domain"):
        evaluate_tokenizer(tok_dir, corpus, 0)
    empty = {"e": [_write(tmp_path / "e.jsonl.zst", [])]}
    with pytest.raises(ValueError, match="no documents"):
        evaluate_tokenizer(tok_dir, empty, 10)
    with pytest.raises(FileNotFoundError):
        evaluate_tokenizer(tmp_path / "nope", corpus, 10)


def test_real_chinese_and_english(shared_data: Path, tmp_path: Path) -> None:
    """Small BPE (8k) on CMRC 2018 passages + WikiText-2 paragraphs, measured on held-out documents."""
    sources = {
        "zh": [InputSource(path=str(shared_data / "cmrc2018" / f), domain="zh", format="json-squad")
               for f in ("cmrc2018_dev.json", "cmrc2018_trial.json")],
        "en": [InputSource(path=str(shared_data / "wikitext2" / "valid.txt"), domain="en", txt_split="paragraph")],
    }
    train, held = {}, {}
    for domain, srcs in sources.items():
        docs = [d for s in srcs for d in read_documents(s.path, s) if len(d.text) >= 200]
        assert len(docs) > 400
        train[domain] = [_write(tmp_path / "train" / domain / "part-00000.jsonl.zst", docs[:-150])]
        held[domain] = [_write(tmp_path / "held" / domain / "part-00000.jsonl.zst", docs[-150:])]
    cfg = TokenizerConfig(vocab_size=8192, sample_chars_per_domain=250_000)
    stats = train_tokenizer(cfg, train, tmp_path / "tok", seed=0)
    assert stats["vocab_size"] == 8192
    r = evaluate_tokenizer(tmp_path / "tok", held, 150)["tokenizer"]
    assert r["roundtrip"]["failures"] == 0
    zh, en = r["domains"]["zh"]["chars_per_token"], r["domains"]["en"]["chars_per_token"]
    # Byte-level BPE at 8k on 0.25M characters each: Chinese ~1.2 characters per token (the rule
    # of thumb is ~1.5 at 32k-64k), English (WikiText's spaced-out punctuation) ~3.2.
    assert 1.0 < zh < 1.6, zh
    assert 2.8 < en < 4.0, en
