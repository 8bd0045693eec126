from __future__ import annotations

import random
import re

import pytest

from smelt.config import BlocklistConfig
from smelt.data.document import Document
from smelt.data.steps.blocklist import MAX_REPORTED, BlocklistFilter, read_terms, trie_regex


def check(text: str, words: list[str], **cfg) -> tuple[str | None, dict]:
    f = BlocklistFilter(BlocklistConfig(words=words, **cfg))
    doc = Document("d", text)
    return f(doc), doc.meta


def test_latin_whole_word_case_insensitive():
    assert check("This class is about mass transit.", ["ass"]) == (None, {})
    assert check("You ASS!", ["ass"]) == ("blocklist", {"blocklist_hits": ["ass"]})
    assert check("ass", ["ass"])[0] == "blocklist"  # start and end of text are boundaries
    assert check("the asses", ["ass"])[0] is None  # whole word only: list inflections explicitly


def test_cjk_substring():
    assert check("这是一个网上赌博网站。", ["赌博"]) == ("blocklist", {"blocklist_hits": ["赌博"]})
    assert check("这是一个网上博物馆网站。", ["赌博"]) == (None, {})


def test_latin_term_inside_chinese_text():
    # Han characters are word characters for `\b`, but they are a boundary for Latin terms.
    assert check("在线看porn视频", ["porn"])[0] == "blocklist"
    assert check("pornography", ["porn"])[0] is None


def test_phrase_matches_any_whitespace():
    reason, meta = check("see Two\n  Girls  One cup", ["two girls one cup"])
    assert reason == "blocklist"
    assert meta["blocklist_hits"] == ["two girls one cup"]


def test_longest_term_wins():
    f = BlocklistFilter(BlocklistConfig(words=["法轮", "法轮功", "ab", "abc"]))
    assert f.find("法轮功 abc") == ["abc", "法轮功"]


def test_thai_and_korean_are_substring_terms():
    assert check("เว็บพนันออนไลน์", ["พนัน"])[0] == "blocklist"
    assert check("도박사이트", ["도박"])[0] == "blocklist"


def test_supplementary_plane_terms():
    f = BlocklistFilter(BlocklistConfig(words=["\U0002005e\u4e00", "赌博"]))  # CJK Ext. B first char
    assert f.find("x\U0002005e\u4e00y 赌博 \U0001F600") == ["\U0002005e\u4e00", "赌博"]


def test_min_hits_and_meta():
    words = ["casino", "poker", "赌场"]
    reason, meta = check("casino night", words, min_hits=2)
    assert reason is None
    assert meta == {"blocklist_hits": ["casino"]}
    reason, meta = check("Casino and poker at the 赌场, casino again", words, min_hits=2)
    assert reason == "blocklist"
    assert meta["blocklist_hits"] == ["casino", "poker", "赌场"]


def test_meta_is_capped_and_sorted():
    words = [f"w{i}" for i in range(20)]
    reason, meta = check(" ".join(reversed(words)), words)
    assert reason == "blocklist"
    assert len(meta["blocklist_hits"]) == MAX_REPORTED
    assert meta["blocklist_hits"] == sorted(meta["blocklist_hits"])


def test_files(tmp_path):
    p = tmp_path / "block.txt"
    p.write_text("\ufeff# comment line\n\nbadword\n  赌博  \n   # indented comment\nTwo  Words\n", encoding="utf-8")
    assert read_terms(p) == ["badword", "赌博", "Two  Words"]
    f = BlocklistFilter(BlocklistConfig(files=[str(p)], words=["extra"]))
    assert f.terms == ["badword", "extra", "two words", "赌博"]
    assert f(Document("a", "two words here")) == "blocklist"
    assert f(Document("b", "a clean sentence")) is None


def test_missing_file_fails_at_construction(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="blocklist file not found: .*nope.txt"):
        BlocklistFilter(BlocklistConfig(files=[str(missing)]))


def test_non_utf8_file_names_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"ok\nfine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.txt:3: blocklist file is not valid UTF-8"):
        BlocklistFilter(BlocklistConfig(files=[str(p)]))


def test_no_terms_keeps_everything():
    f = BlocklistFilter(BlocklistConfig())
    assert f(Document("a", "anything at all")) is None


def test_domains():
    f = BlocklistFilter(BlocklistConfig(words=["secret"], domains=["web"]))
    assert f(Document("a", "secret", domain="books")) is None
    assert f(Document("b", "secret", domain="web")) == "blocklist"


def test_trie_regex_shape():
    assert trie_regex(["abc", "abd", "ab"]) == "ab(?:[cd])?"
    assert re.fullmatch(trie_regex(["a b"]), "a \n b")


def _reference(text: str, spaced: list[str], unspaced: list[str]) -> list[str]:
    """Plain alternation, longest first: the semantics the trie and dispatch must reproduce."""
    low = text.lower()
    w = r"[^\W\u3400-\u4dbf\u4e00-\u9fff]"
    alt = "|".join(re.escape(t) for t in sorted(spaced, key=len, reverse=True))
    hits = [m.group() for m in re.finditer(f"(?<!{w})(?:{alt})(?!{w})", low)] if spaced else []
    alt = "|".join(re.escape(t) for t in sorted(unspaced, key=len, reverse=True))
    return hits + ([m.group() for m in re.finditer(alt, low)] if unspaced else [])


def test_large_lists_match_reference():
    rng = random.Random(0)
    latin = sorted({"".join(rng.choice("abcde") for _ in range(rng.randint(2, 5))) for _ in range(300)})
    han = "赌博色情毒品枪支诈骗"
    cjk = sorted({"".join(rng.choice(han) for _ in range(rng.randint(1, 4))) for _ in range(300)})
    f = BlocklistFilter(BlocklistConfig(words=latin + cjk))
    found = set()
    for _ in range(200):
        parts = [rng.choice(latin + cjk + ["xyz", "Ab", "，", " ", "的"]) for _ in range(rng.randint(1, 30))]
        text = "".join(p if rng.random() < 0.5 else p + " " for p in parts)
        hits = f.find(text)
        assert hits == _reference(text, latin, cjk), text
        found.update(hits)
    assert len(found) > 200  # both kinds of term were exercised, not just misses
