"""The report's "Model-based scores" section: from the scores the curation steps declared in
stats.json and wrote into the documents' meta (kept and rejected shards), histograms with the
cutoffs, a cutoff table and the documents nearest each domain's first cutoff; absent without scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import smelt.report as report
from smelt.data.document import Document
from smelt.data.shards import ShardWriter
from smelt.report import write_report
from tests.demo.htmlcheck import check_html
from tests.test_report import _stats

QUALITY = {"key": "quality.fasttext", "label": "quality classifier fasttext (P(hq))", "higher_is_better": True,
           "rule": "threshold", "cutoffs": {"web/en": {"threshold": 0.5}, "code": {"threshold": 0.3}}}
PPL = {"key": "perplexity.bpb", "label": "reference-model bits per byte", "higher_is_better": False,
       "rule": "buckets", "cutoffs": {"*": {"head": 1.2, "tail": 1.8}}}


def _doc(domain: str, i: int, q: float | None, lang: str = "en", **meta) -> Document:
    m: dict = {"language": lang, **meta}
    if q is not None:
        m["quality"] = {"fasttext": q}
        m["perplexity"] = {"bpb": round(2.0 - q, 4), "bucket": "head" if q > 0.8 else "middle"}
    return Document(id=f"{domain}-{lang}-{i:03d}", text=f"doc {i} <b>&amp; 'x' " + "word " * 80, domain=domain,
                    meta=m)


def make_data(run: Path, *, info: bool = True) -> None:
    """data/ of a run whose `quality` step kept web/en documents scoring at least 0.5 and code
    documents at least 0.3; clean/web in jsonl.zst, clean/code in Parquet, rejects mixed."""
    data = run / "data"
    stats = _stats()
    if info:
        seen = {"seen": 52, "kept": 30, "dropped": {"low_quality": 22}, "dropped_total": 22, "counters": {}}
        stats["steps"].insert(2, {"name": "quality", "total": seen, "by_domain": {"web": seen},
                                  "info": {"scores": [QUALITY, PPL]}})
    data.mkdir(parents=True)
    (data / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    web = [_doc("web", i, i / 40) for i in range(40)]  # 0.0, 0.025, ..., 0.975
    web += [_doc("web", 1, 0.49, "zh"), _doc("web", 2, 0.51, "zh")]  # another language's group: not examples
    code = [_doc("code", i, i / 10) for i in range(10)]
    kept = lambda d, cut: d.meta["quality"]["fasttext"] >= cut  # noqa: E731
    with ShardWriter(data / "clean" / "web" / "part-00000.jsonl.zst", "jsonl.zst") as w:
        for d in web:
            if kept(d, 0.5) or d.meta["language"] == "zh":
                w.write(d)
    with ShardWriter(data / "clean" / "code" / "part-00000.parquet", "parquet") as w:
        for d in code:
            if kept(d, 0.3):
                w.write(d)
    with ShardWriter(data / "rejects" / "filter-00000.jsonl.zst", "jsonl.zst") as w:
        w.write(_doc("web", 99, None, rejected_by="gopher_quality", reason="gopher_short_doc"))  # never scored
        for d in web + code:
            if d.meta["language"] == "en" and not kept(d, 0.5 if d.domain == "web" else 0.3):
                w.write(Document(d.id, d.text, d.domain, {**d.meta, "rejected_by": "quality",
                                                          "reason": "low_quality"}))


def _section(page: str) -> str:
    start = page.index('<section id="scores">')
    return page[start:page.index("</section>", start)]


def test_scores_section_histograms_cutoffs_and_nearest_documents(tmp_path: Path) -> None:
    make_data(tmp_path)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    parsed = check_html(page)
    assert parsed.errors == [] and "scores" in parsed.ids
    assert page.index('id="pii"') < page.index('id="scores"') < page.index('id="tokenizer"')
    assert '<a href="#scores">Model-based scores</a>' in page
    sec = _section(page)
    part = check_html(sec + "</section>")
    text = " ".join(part.text)
    assert part.images == 2  # one figure per score key
    assert "quality classifier fasttext (P(hq))" in text and "reference-model bits per byte" in text
    assert "<td>web/en</td><td>threshold</td><td>0.5</td>" in sec and "<td>*</td><td>tail</td><td>1.8</td>" in sec
    # web: 20 kept en + 2 zh documents, 20 rejected en ones; the one rejected before scoring is not counted
    assert "<td>web</td><td>22</td><td>20</td>" in sec and "<td>code</td><td>7</td><td>3</td>" in sec
    # the three just above and just below web/en's threshold, nearest first; zh documents are another group
    web = sec[sec.index("web: the documents nearest the cutoff 0.5, language en"):]
    web = web[:web.index("</table>")]
    ids = [f"web-en-{i:03d}" for i in (20, 21, 22, 19, 18, 17)]
    assert [web.index(i) for i in ids] == sorted(web.index(i) for i in ids)
    assert "web-zh" not in web and "web-en-023" not in web and "web-en-016" not in web
    assert "rejected: quality/low_quality" in web and "<td>kept</td>" in web
    assert "doc 20 &lt;b&gt;&amp;amp; &#x27;x&#x27; word" in web  # the text escaped once, cut to 200 characters
    assert "word " * 40 not in web and "…" in web
    # code's only cutoff groups are `code` and `*`: its first is code's threshold
    assert "code: the documents nearest the cutoff 0.3</h4>" in sec
    # bits per byte: lower is better, the `*` cutoffs cover every domain
    assert "lower is better" in text and "<h4>web: the documents nearest the cutoff 1.2</h4>" in sec


def test_scores_section_absent_without_scores(tmp_path: Path) -> None:
    make_data(tmp_path, info=False)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    parsed = check_html(page)
    assert parsed.errors == [] and "scores" not in parsed.ids and "Model-based scores" not in page


def test_documents_read_are_bounded_and_a_damaged_shard_is_named(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_data(tmp_path)
    monkeypatch.setattr(report, "SCORE_DOCS", 5)
    (tmp_path / "data" / "rejects" / "lines-00000.jsonl.zst").write_bytes(b"not zstd")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    sec = _section(page)
    assert "<td>web</td><td>5</td><td>5</td>" in sec and "<td>code</td><td>5</td><td>3</td>" in sec
    assert "the limit was reached for kept and rejected documents" in sec
    assert "lines-00000.jsonl.zst: unreadable" in sec
    # the first documents in shard order: web's kept ones from 0.5 up, so its examples above start there
    assert "web-en-020" in sec and "web-en-025" not in sec
