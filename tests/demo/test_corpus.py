"""The built-in demo corpus: offline, deterministic, planted labels, and the outcome check."""

from __future__ import annotations

import json
from pathlib import Path

from smelt.data.document import Document
from smelt.data.io import ShardWriter
from smelt.demo.corpus import build_corpus, load_eval_items
from smelt.demo.outcomes import planted_outcomes


def _docs(d: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(d.glob("*.jsonl")) for line in f.read_text("utf-8").split("\n") if line]


def test_tiny_corpus_is_deterministic_and_complete(tmp_path):
    a = build_corpus(tmp_path / "a", "tiny", seed=3)
    b = build_corpus(tmp_path / "b", "tiny", seed=3)
    assert a["key"] == b["key"] and a["complete"]
    for dom in ("prose", "code", "web"):
        fa, fb = sorted((tmp_path / "a" / dom).iterdir()), sorted((tmp_path / "b" / dom).iterdir())
        assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb], dom
        assert a["domains"][dom]["documents"] > 5
    prose = _docs(tmp_path / "a" / "prose")
    assert {d["meta"]["origin"] for d in prose} == {"pydoc_topics", "stdlib_docstrings"}
    code = _docs(tmp_path / "a" / "code")
    assert all(d["text"].strip() and d["meta"]["origin"] == "stdlib_source" for d in code)
    # code and docstring sources are disjoint modules
    assert not {d["meta"]["file"] for d in code} & {d["meta"].get("file") for d in prose}
    assert (tmp_path / "a" / "eval" / "demo_eval.jsonl").is_file()


def test_web_domain_plants_every_problem_and_quotes_eval_items(tmp_path):
    m = build_corpus(tmp_path, "tiny", seed=0)
    assert set(m["planted"]) >= {"clean", "exact_dup", "near_dup", "pii", "boilerplate", "spam", "mojibake",
                                 "short", "contaminated"}
    quoted = {f"{it['context']}{it['choices'][it['gold']]}" for it in load_eval_items()}
    web = _docs(tmp_path / "web")
    cont = [d for d in web if d["meta"]["planted"] == "contaminated"]
    assert cont and all(any(q in d["text"] for q in quoted) for d in cont)
    assert all(d["meta"]["boilerplate_lines"] for d in web if d["meta"]["planted"] == "boilerplate")


def test_reuses_a_complete_corpus(tmp_path):
    build_corpus(tmp_path, "tiny")
    f = tmp_path / "web" / "part-00000.jsonl"
    before = f.stat().st_mtime_ns
    build_corpus(tmp_path, "tiny")
    assert f.stat().st_mtime_ns == before


def test_eval_items_are_well_formed():
    items = load_eval_items()
    assert len(items) >= 12
    for it in items:
        assert 0 <= it["gold"] < len(it["choices"]) and len(it["choices"]) == 4
    # gold positions vary: a model that always picks one position scores at most ~random
    assert len({it["gold"] for it in items}) == 4


def test_planted_outcomes_classify_each_fate(tmp_path):
    data = tmp_path / "data"
    (data).mkdir()
    (data / "manifest.json").write_text(json.dumps({"complete": True, "key": "k1"}))
    with ShardWriter(data / "clean" / "web" / "part-00000.jsonl.zst", "jsonl.zst") as w:
        w.write(Document("a", "fine text", "web", {"planted": "clean"}))
        w.write(Document("b", "a <EMAIL>", "web", {"planted": "pii", "pii": {"email": 1}}))
        w.write(Document("c", "body only", "web", {"planted": "boilerplate", "boilerplate_lines": ["Home | About"]}))
        w.write(Document("d", "body\nHome | About", "web",
                         {"planted": "boilerplate", "boilerplate_lines": ["Home | About"]}))
        w.write(Document("e", "cafÃ©", "web", {"planted": "mojibake"}))
        w.write(Document("e2", "the “café” end", "web", {"planted": "mojibake"}))  # repaired by normalize
        w.write(Document("e3", "the yearÃ¢s end, ä¸­æ", "web", {"planted": "mojibake"}))  # C1 stripped, still garbled
    with ShardWriter(data / "rejects" / "part-00000.jsonl.zst", "jsonl.zst") as w:
        w.write(Document("f", "buy", "web", {"planted": "spam", "rejected_by": "gopher_quality",
                                             "reason": "gopher_too_few_stop_words"}))
        w.write(Document("h", "ç", "web", {"planted": "mojibake", "rejected_by": "language",
                                           "reason": "lang_low_score"}))
    with ShardWriter(data / "duplicates" / "part-00000.jsonl.zst", "jsonl.zst") as w:
        w.write(Document("g", "fine text", "web", {"planted": "exact_dup", "duplicate_of": "a"}))
    out = planted_outcomes(data)
    assert out["clean"]["caught"] == 1
    assert out["pii"]["outcomes"] == {"kept, PII redacted": 1} and out["pii"]["caught"] == 1
    assert out["boilerplate"]["planted"] == 2 and out["boilerplate"]["caught"] == 1
    assert out["mojibake"]["outcomes"] == {"kept": 2, "kept, encoding fixed": 1, "language/lang_low_score": 1}
    assert out["mojibake"]["caught"] == 2 and out["mojibake"]["expected"] == "repaired or rejected"
    assert out["spam"]["outcomes"] == {"gopher_quality/gopher_too_few_stop_words": 1}
    assert out["exact_dup"]["caught"] == 1
    assert json.loads((data / "planted.json").read_text())["key"] == "k1"
    # A cache written by an older classification (no version) is recomputed, not trusted.
    (data / "planted.json").write_text(json.dumps({"key": "k1", "labels": {"mojibake": {"caught": 0}}}))
    assert planted_outcomes(data)["mojibake"]["caught"] == 2
