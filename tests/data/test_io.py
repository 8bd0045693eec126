"""Readers (`smelt.data.readers`), shards (`smelt.data.shards`) and input resolution
(`smelt.data.inputs`), including every kind of bad input."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from smelt.config import InputSource
from smelt.data.document import Document
from smelt.data.errors import DataInputError
from smelt.data.inputs import is_ignored_name, resolve_files
from smelt.data.readers import detect_format, read_documents
from smelt.data.shards import ShardWriter, read_shard, shard_suffix


def src(path: Path | str, **kw) -> InputSource:
    return InputSource(path=str(path), domain=kw.pop("domain", "web"), **kw)


def read_all(path: Path | str, **kw) -> list[Document]:
    s = src(path, **kw)
    return [d for f in resolve_files(s) for d in read_documents(f, s)]


def jsonl_bytes(records: list) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


RECORDS = [
    {"id": "a", "text": "Hello world.", "url": "http://x/1"},
    {"id": 7, "text": "第二篇文档。", "metadata": {"lang": "zh", "score": 0.5}},
    {"text": "no id here", "source": "common-crawl"},
]


def sample_docs() -> list[Document]:
    return [
        Document("d1", "Plain English text.\nSecond line.", "web", {"url": "http://e.com", "n": 3}),
        Document("d2", "中文文本，带标点。😀 and emoji", "zh-wiki", {"nested": {"a": [1, 2.5, None]}}),
        Document("d3", "", "code", {}),
        Document("d4", "tab\tand \"quotes\" and \\ backslash", "books",
                 {"rejected_by": "gopher_quality", "reason": "gopher_short_doc"}),
    ]


# --------------------------------------------------------------------------------------------
# writers


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_shard_round_trip(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"part-0{shard_suffix(fmt)}"
    with ShardWriter(path, fmt) as w:
        for d in sample_docs():
            w.write(d)
    assert w.count == 4
    assert list(read_shard(path)) == sample_docs()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_shard_bytes_are_deterministic(tmp_path: Path, fmt: str) -> None:
    docs = sample_docs() * 50
    paths = [tmp_path / f"{i}{shard_suffix(fmt)}" for i in range(2)]
    for p in paths:
        with ShardWriter(p, fmt) as w:
            for d in docs:
                w.write(Document(d.id, d.text, d.domain, dict(d.meta)))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_shard_formats_on_disk(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "a.jsonl.zst", "jsonl.zst") as w:
        w.write(Document("x", "中文", "zh", {"k": 1}))
    raw = zstandard.ZstdDecompressor().decompress(
        (tmp_path / "a.jsonl.zst").read_bytes(), max_output_size=1 << 20)
    # ensure_ascii=False, compact separators, one object per line
    assert raw == '{"id":"x","text":"中文","domain":"zh","meta":{"k":1}}\n'.encode()
    with ShardWriter(tmp_path / "a.parquet", "parquet") as w:
        w.write(Document("x", "中文", "zh", {"k": 1}))
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.names == ["id", "text", "domain", "meta"]
    assert all(t == pa.string() for t in table.schema.types)
    assert table.to_pylist() == [{"id": "x", "text": "中文", "domain": "zh", "meta": '{"k":1}'}]


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_shard_writer_is_atomic(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "out" / f"part{shard_suffix(fmt)}"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path, fmt) as w:
            w.write(sample_docs()[0])
            assert not path.exists()  # only the hidden temp file exists while writing
            assert [p.name.startswith(".") for p in path.parent.iterdir()] == [True]
            raise RuntimeError("boom")
    assert list(path.parent.iterdir()) == []
    # an earlier complete shard at `path` survives a failed rewrite untouched
    with ShardWriter(path, fmt) as w:
        w.write(sample_docs()[1])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with ShardWriter(path, fmt) as w:
            w.write(sample_docs()[0])
            raise RuntimeError("again")
    assert path.read_bytes() == before


def test_shard_writer_survives_odd_meta_and_surrogates(tmp_path: Path) -> None:
    import datetime

    doc = Document("s", "lone \ud800 surrogate", "web",
                   {"when": datetime.date(2024, 1, 2), "tags": {"b"}, "blob": b"\x00\x01"})
    with ShardWriter(tmp_path / "a.jsonl.zst", "jsonl.zst") as w:
        w.write(doc)
    back = next(read_shard(tmp_path / "a.jsonl.zst"))
    assert back.text == "lone \ud800 surrogate"  # escaped on disk, identical after reading
    assert back.meta == {"when": "2024-01-02", "tags": ["b"], "blob": "<2 bytes>"}
    with ShardWriter(tmp_path / "a.parquet", "parquet") as w:
        w.write(doc)
    assert next(read_shard(tmp_path / "a.parquet")).text == "lone \ufffd surrogate"


def test_shard_writer_rejects_unknown_format_and_closed_writes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shard format"):
        ShardWriter(tmp_path / "x", "csv")  # type: ignore[arg-type]
    w = ShardWriter(tmp_path / "a.jsonl.zst", "jsonl.zst")
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write(sample_docs()[0])
    assert list(read_shard(tmp_path / "a.jsonl.zst")) == []


def test_read_shard_raises_on_damage(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.zst"
    with ShardWriter(path, "jsonl.zst") as w:
        for i in range(2000):
            w.write(Document(f"d{i}", f"text {i} " * 20, "web", {}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged shard"):
        list(read_shard(path))


# --------------------------------------------------------------------------------------------
# JSON lines


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl", lambda b: b),
    (".jsonl.gz", gzip.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    (".ndjson", lambda b: b),
])
def test_read_jsonl_variants(tmp_path: Path, suffix: str, compress) -> None:
    path = tmp_path / f"part{suffix}"
    path.write_bytes(compress(jsonl_bytes(RECORDS)))
    docs = read_all(path, domain="web")
    assert [d.id for d in docs] == ["a", "7", f"part/part{suffix}:3"]
    assert [d.text for d in docs] == ["Hello world.", "第二篇文档。", "no id here"]
    assert {d.domain for d in docs} == {"web"}
    assert docs[0].meta == {"url": "http://x/1", "source": f"part{suffix}:1"}
    # nested "metadata" (datatrove/dolma) is flattened into meta
    assert docs[1].meta == {"lang": "zh", "score": 0.5, "source": f"part{suffix}:2"}
    # a record's own "source" does not clobber ours
    assert docs[2].meta == {"orig_source": "common-crawl", "source": f"part{suffix}:3"}


def test_jsonl_field_mapping_content_and_name(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(jsonl_bytes([
        {"doc_id": "k1", "content": "from content", "lang": "en"},
        {"body": "from body", "content": "ignored", "doc_id": None},
    ]))
    docs = read_all(path, id_field="doc_id", name="crawl")
    assert [d.id for d in docs] == ["k1", "crawl/x.jsonl:2"]
    assert docs[0].text == "from content"
    assert docs[0].meta == {"lang": "en", "source": "x.jsonl:1"}
    docs = read_all(path, id_field="doc_id", text_field="body")
    assert docs[0].text == "from content"  # no `body`: falls back to `content`
    assert docs[1].text == "from body"
    assert docs[1].meta == {"content": "ignored", "source": "x.jsonl:2"}


def test_jsonl_bulky_fields_are_not_copied_to_meta(tmp_path: Path, caplog) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(jsonl_bytes([{"text": "t", "html": "<p>" * 5000, "title": "T"}]))
    with caplog.at_level(logging.INFO, logger="smelt.data.readers"):
        (doc,) = read_all(path)
    assert doc.meta == {"title": "T", "source": "x.jsonl:1"}
    assert "'html': 1" in caplog.text


def test_jsonl_reads_our_own_shards_as_input(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "kept" / "part-0.jsonl.zst", "jsonl.zst") as w:
        for d in sample_docs():
            w.write(d)
    docs = read_all(tmp_path / "kept", domain="again")
    assert [d.id for d in docs] == ["d1", "d2", "d3", "d4"]
    assert [d.text for d in docs] == [d.text for d in sample_docs()]
    assert docs[0].meta == {"url": "http://e.com", "n": 3, "domain": "web", "source": "part-0.jsonl.zst:1"}


def test_limit_per_file(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_bytes(jsonl_bytes([{"text": f"t{i}"} for i in range(10)]))
    docs = read_all(tmp_path, limit=3)
    assert [d.id for d in docs] == [f"{s}/{s}.jsonl:{i}" for s in "ab" for i in (1, 2, 3)]


# --------------------------------------------------------------------------------------------
# bad records: each becomes a read_error document, logged with file and line


def test_bad_jsonl_records(tmp_path: Path, caplog) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "good one"}',
        b'{"text": "bad \xff\xfe utf8"}',
        b'{"text": "broken json"',
        b'[1, 2, 3]',
        b'{"title": "no text field"}',
        b'{"text": 42}',
        b'{"text": null, "id": "n1"}',
        b'   ',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "good two"}',
    ]) + b"\n")
    skipped: Counter = Counter()
    s = src(path)
    with caplog.at_level(logging.WARNING, logger="smelt.data.readers"):
        docs = list(read_documents(str(path), s, skipped=skipped))
    reasons = [d.meta.get("read_error") for d in docs]
    assert reasons == [None, "invalid_utf8", "invalid_json", "not_an_object", "missing_text",
                       "non_string_text", "missing_text", "invalid_unicode", None]
    assert skipped == Counter({"blank_line": 1})
    by_reason = {d.meta.get("read_error"): d for d in docs}
    assert by_reason["invalid_utf8"].text == '{"text": "bad \ufffd\ufffd utf8"}'
    assert by_reason["invalid_json"].text == '{"text": "broken json"'
    assert by_reason["invalid_json"].meta["source"] == "bad.jsonl:3"
    assert by_reason["invalid_json"].id == "bad/bad.jsonl:3"
    assert by_reason["not_an_object"].text == "[1, 2, 3]"
    assert by_reason["non_string_text"].meta["error"] == "field 'text' holds int, not a string"
    assert by_reason["invalid_unicode"].text == "lone \ufffd surrogate"
    assert docs[6].id == "n1"  # a parsed record keeps its id even when rejected
    assert docs[-1].text == "good two" and docs[-1].meta == {"source": "bad.jsonl:10"}
    assert f"{path}:3: invalid_json" in caplog.text
    assert f"{path}:2: invalid_utf8" in caplog.text


def test_fifty_megabyte_single_line_document(tmp_path: Path) -> None:
    text = "一二三 four five six. " * 2_600_000  # 52 M characters, ~70 MB of UTF-8
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"id": "big", "text": ')
        f.write(json.dumps(text, ensure_ascii=False).encode())
        f.write(b'}\n{"id": "after", "text": "small"}\n')
    docs = read_all(path)
    assert [d.id for d in docs] == ["big", "after"]
    assert len(docs[0].text) == len(text) and docs[0].text[:20] == text[:20]
    assert "read_error" not in docs[0].meta


def _lines(n: int) -> bytes:
    return jsonl_bytes([{"id": f"r{i}", "text": f"record number {i} " * 8} for i in range(n)])


def _assert_prefix_then_corrupt(docs: list[Document], total: int) -> None:
    assert docs[-1].meta["read_error"] == "corrupt_file"
    assert docs[-1].text == ""
    good = docs[:-1]
    assert 0 < len(good) < total
    assert [d.id for d in good] == [f"r{i}" for i in range(len(good))]
    assert all("read_error" not in d.meta for d in good)


def test_truncated_zst_yields_prefix_then_corrupt_file(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(_lines(20_000))
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    docs = read_all(path)
    _assert_prefix_then_corrupt(docs, 20_000)
    assert docs[-1].meta["source"] == f"t.jsonl.zst:{len(docs)}"
    assert "truncated" in docs[-1].meta["error"]


def test_corrupt_zst_yields_prefix_then_corrupt_file(tmp_path: Path) -> None:
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(_lines(20_000)))
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xA5
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(bytes(data))
    docs = read_all(path)
    assert docs[-1].meta["read_error"] == "corrupt_file"
    assert sum(d.meta.get("read_error") == "corrupt_file" for d in docs) == 1
    assert [d.id for d in docs[:100]] == [f"r{i}" for i in range(100)]
    # garbage after a valid frame (not another frame) is damage too
    path.write_bytes(zstandard.ZstdCompressor().compress(_lines(5)) + b"garbage!" * 4)
    docs = read_all(path)
    assert [d.meta.get("read_error") for d in docs] == [None] * 5 + ["corrupt_file"]


def test_concatenated_zst_frames_read_fully(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor()
    path = tmp_path / "cat.jsonl.zst"
    path.write_bytes(c.compress(_lines(3)) + c.compress(_lines(2)))
    assert [d.id for d in read_all(path)] == ["r0", "r1", "r2", "r0", "r1"]


@pytest.mark.parametrize("name", ["t.jsonl.gz", "dolma.json.gz"])
def test_truncated_gz_yields_prefix_then_corrupt_file(tmp_path: Path, name: str) -> None:
    data = gzip.compress(_lines(20_000))
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    docs = read_all(path)  # .json.gz is sniffed at resolve time: damage must not fail the run
    _assert_prefix_then_corrupt(docs, 20_000)
    path.write_bytes(data[:15])  # not even one block readable
    assert [d.meta["read_error"] for d in read_all(path)] == ["corrupt_file"]


# --------------------------------------------------------------------------------------------
# Parquet, plain text, SQuAD, HTML, WARC


def test_read_parquet_with_mapping(tmp_path: Path) -> None:
    table = pa.table({
        "uid": ["p1", None, "p3"],
        "content": ["first", "second", None],
        "lang": ["en", "zh", "en"],
        "image": pa.array([b"\x89PNG", b"", b"x"], pa.binary()),
        "meta": ['{"a": 1}', None, None],
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=2)
    docs = read_all(path, id_field="uid")
    assert [d.id for d in docs] == ["p1", "t/t.parquet:2", "p3"]
    assert [d.text for d in docs[:2]] == ["first", "second"]
    assert docs[0].meta == {"a": 1, "lang": "en", "source": "t.parquet:1"}  # no binary column
    assert docs[1].meta == {"lang": "zh", "meta": None, "source": "t.parquet:2"}
    assert docs[2].meta["read_error"] == "missing_text"
    assert json.loads(docs[2].text)["uid"] == "p3"


def test_read_our_parquet_shard_as_input(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "s.parquet", "parquet") as w:
        for d in sample_docs():
            w.write(d)
    docs = read_all(tmp_path / "s.parquet", domain="re")
    assert [d.text for d in docs] == [d.text for d in sample_docs()]
    assert docs[1].meta == {"nested": {"a": [1, 2.5, None]}, "domain": "zh-wiki", "source": "s.parquet:2"}


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    (doc,) = read_all(path)
    assert doc.meta["read_error"] == "corrupt_file" and doc.id == "bad/bad.parquet:1"


def test_txt_file_and_paragraph_modes(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes("\ufeffFirst para line 1\nline 2\n\n\n  \nSecond para\n\nThird\n".encode())
    (doc,) = read_all(path, domain="books")
    assert doc.id == "book/book.txt:1" and doc.domain == "books"
    assert doc.text == "First para line 1\nline 2\n\n\n  \nSecond para\n\nThird\n"  # BOM dropped
    docs = read_all(path, txt_split="paragraph", name="bk")
    assert [d.text for d in docs] == ["First para line 1\nline 2", "Second para", "Third"]
    assert [d.id for d in docs] == ["bk/book.txt:1", "bk/book.txt:6", "bk/book.txt:8"]
    assert [d.meta["source"] for d in docs] == ["book.txt:1", "book.txt:6", "book.txt:8"]


def test_txt_invalid_utf8_and_compressed(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_bytes(b"ok\n\nbad \xc3\x28 here\n")
    docs = read_all(tmp_path / "a.md", txt_split="paragraph")
    assert [d.meta.get("read_error") for d in docs] == [None, "invalid_utf8"]
    assert docs[1].text == "bad \ufffd( here"
    (doc,) = read_all(tmp_path / "a.md")
    assert doc.meta["read_error"] == "invalid_utf8" and "line 3" in doc.meta["error"]
    (tmp_path / "z.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("你好\n\n世界".encode()))
    assert [d.text for d in read_all(tmp_path / "z.txt.zst", txt_split="paragraph")] == ["你好", "世界"]


SQUAD = {"version": "v1", "data": [
    {"title": "T1", "paragraphs": [
        {"id": "P1", "context": "第一段。", "qas": [{"question": "q?", "answers": []}]},
        {"context": "第二段。", "qas": []},
    ]},
    {"title": "T2", "paragraphs": [{"id": "P3", "context": ["not", "a", "string"]}]},
]}


def test_squad_json(tmp_path: Path) -> None:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD, ensure_ascii=False, indent=2), encoding="utf-8")
    assert detect_format(str(path)) == "json-squad"
    docs = read_all(path, domain="zh")
    assert [d.id for d in docs] == ["P1", "squad/squad.json:2", "P3"]
    assert [d.text for d in docs[:2]] == ["第一段。", "第二段。"]
    assert docs[0].meta == {"title": "T1", "source": "squad.json:1"}  # qas are not carried
    assert docs[2].meta["read_error"] == "non_string_text"
    # the same layout on a single line is recognized too
    path.write_text(json.dumps(SQUAD, ensure_ascii=False), encoding="utf-8")
    assert detect_format(str(path)) == "json-squad"


def test_squad_cmrc2018_contexts(shared_data: Path) -> None:
    d = shared_data / "cmrc2018"
    expected = 0
    for f in sorted(d.glob("*.json")):
        obj = json.loads(f.read_text(encoding="utf-8"))
        expected += sum(len(a["paragraphs"]) for a in obj["data"])
    docs = read_all(d, glob="*.json", domain="zh-wiki")
    assert len(docs) == expected > 1000
    assert all("read_error" not in doc.meta for doc in docs)
    assert docs[0].id == "DEV_0" and docs[0].text.startswith("《战国无双3》")
    with pytest.raises(DataInputError, match="LICENCE.upstream"):
        resolve_files(src(d))  # the licence file has no known extension


def test_json_detection(tmp_path: Path) -> None:
    (tmp_path / "lines.json").write_bytes(jsonl_bytes(RECORDS))
    (tmp_path / "dolma.json.gz").write_bytes(gzip.compress(jsonl_bytes(RECORDS)))
    (tmp_path / "array.json").write_text('[{"text": "x"}]')
    (tmp_path / "config.json").write_text('{\n  "a": 1\n}')
    assert detect_format(str(tmp_path / "lines.json")) == "jsonl"
    assert detect_format(str(tmp_path / "dolma.json.gz")) == "jsonl"
    for bad in ("array.json", "config.json"):
        with pytest.raises(DataInputError, match="SQuAD-style"):
            detect_format(str(tmp_path / bad))
    assert detect_format("a/b.warc.gz") == "warc"
    assert detect_format("x.warc.wet.gz") == "warc"
    assert detect_format("x.HTM") == "html"
    assert detect_format("x.parquet") == "parquet"
    for bad in ("x.csv", "x.parquet.gz", "x.warc.zst", "README"):
        with pytest.raises(DataInputError, match="unknown file type"):
            detect_format(bad)


ARTICLE = ("The European lobster lives on the continental shelf at depths of up to 150 metres. "
           "It is usually blue above and yellow below, and can reach a length of 60 centimetres. ")
PAGE = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Lobster facts</title></head><body>
<nav><ul><li><a href="/">Homepage</a></li><li><a href="/shop">Shopcart</a></li>
<li><a href="/login">Loginlink</a></li></ul></nav>
<article><h1>The European lobster</h1>
<p>{ARTICLE}</p><p>{ARTICLE.replace("lobster", "crustacean")}</p>
<p>Females carry eggs for up to a year before they hatch into planktonic larvae.</p></article>
<footer>Copyright 2024 Footernote Inc. All rights reserved.</footer></body></html>"""


def _write_warc(path: Path) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record("t.warc.gz", {"software": "test"}))
        req = StatusAndHeaders("GET /lobster HTTP/1.1", [("Host", "example.org")], is_http_request=True)
        w.write_record(w.create_warc_record("https://example.org/lobster", "request", http_headers=req))
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        rec = w.create_warc_record("https://example.org/lobster", "response",
                                   payload=io.BytesIO(PAGE.encode()), http_headers=http)
        w.write_record(rec)
        img = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record("https://example.org/a.png", "response",
                                            payload=io.BytesIO(b"\x89PNG...."), http_headers=img))
        moved = StatusAndHeaders("301 Moved", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record("https://example.org/old", "response",
                                            payload=io.BytesIO(b"<a href=/new>moved</a>"), http_headers=moved))
    return rec.rec_headers.get_header("WARC-Record-ID"), rec.rec_headers.get_header("WARC-Date")


def test_warc_html_response_to_main_text(tmp_path: Path) -> None:
    path = tmp_path / "crawl.warc.gz"
    record_id, date = _write_warc(path)
    s = src(path)
    skipped: Counter = Counter()
    docs = list(read_documents(str(path), s, skipped=skipped))
    assert len(docs) == 1
    (doc,) = docs
    assert doc.id == record_id
    assert doc.meta == {"url": "https://example.org/lobster", "date": date, "source": "crawl.warc.gz:3"}
    assert "continental shelf at depths of up to 150 metres" in doc.text
    assert "planktonic larvae" in doc.text
    for boiler in ("Homepage", "Shopcart", "Loginlink", "Footernote"):
        assert boiler not in doc.text
    assert skipped == Counter({"warc_warcinfo": 1, "warc_request": 1, "warc_non_html": 1, "warc_non_2xx": 1})


def test_truncated_warc_gz(tmp_path: Path) -> None:
    path = tmp_path / "crawl.warc.gz"
    _write_warc(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # cut inside the last record
    docs = read_all(path)
    assert [d.meta.get("read_error") for d in docs] == [None, "corrupt_file"]
    # uncompressed: cut inside the last record's body, and inside its header block
    raw = gzip.decompress(data)
    plain = tmp_path / "crawl.warc"
    for cut in (60, 300):
        plain.write_bytes(raw[: len(raw) - cut])
        docs = read_all(plain)
        assert [d.meta.get("read_error") for d in docs] == [None, "corrupt_file"], cut


def test_html_file(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text(PAGE, encoding="utf-8")
    (tmp_path / "empty.htm").write_text("<html><body><script>var a = 1;</script></body></html>")
    docs = read_all(tmp_path, domain="web")
    assert [d.id for d in docs] == ["empty/empty.htm:1", "page/page.html:1"]
    assert docs[0].meta["read_error"] == "html_no_text"
    assert "<script>" in docs[0].text  # the raw record goes to rejects for inspection
    assert "planktonic larvae" in docs[1].text and "Shopcart" not in docs[1].text


# --------------------------------------------------------------------------------------------
# resolving inputs


def test_resolve_directory_skips_hidden_and_markers(tmp_path: Path) -> None:
    for rel in ("b.jsonl", "a/c.jsonl.zst", "a/deep/d.txt", ".hidden.jsonl", ".git/x.jsonl",
                "_SUCCESS", "manifest.json", "stats.json", "part-0.done", ".part-1.jsonl.zst.tmp-12"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    files = resolve_files(src(tmp_path))
    assert files == [str(tmp_path / r) for r in ("a/c.jsonl.zst", "a/deep/d.txt", "b.jsonl")]
    assert resolve_files(src(tmp_path, glob="*.jsonl")) == [str(tmp_path / "b.jsonl")]
    assert resolve_files(src(tmp_path, glob="**/*.txt")) == [str(tmp_path / "a/deep/d.txt")]
    assert resolve_files(src(f"{tmp_path}/**/*.jsonl*")) == [
        str(tmp_path / "a/c.jsonl.zst"), str(tmp_path / "b.jsonl")]
    assert is_ignored_name("_metadata") and not is_ignored_name("data.json")


def test_ids_use_path_relative_to_source_root(tmp_path: Path) -> None:
    for lang in ("en", "zh"):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "000.jsonl").write_bytes(jsonl_bytes([{"text": lang}]))
    docs = read_all(tmp_path, name="web")
    assert [d.id for d in docs] == ["web/en/000.jsonl:1", "web/zh/000.jsonl:1"]
    assert [d.meta["source"] for d in docs] == ["en/000.jsonl:1", "zh/000.jsonl:1"]


def test_resolve_errors_before_work(tmp_path: Path) -> None:
    with pytest.raises(DataInputError, match="does not exist: .*nope"):
        resolve_files(src(tmp_path / "nope"))
    with pytest.raises(DataInputError, match="matches no files"):
        resolve_files(src(tmp_path / "*.jsonl"))
    with pytest.raises(DataInputError, match="no files matching"):
        resolve_files(src(tmp_path))  # empty directory
    (tmp_path / "ok.jsonl").write_bytes(b"")
    (tmp_path / "data.csv").write_bytes(b"a,b\n")
    with pytest.raises(DataInputError, match=r"(?s)data\.csv.*supported extensions: \.txt"):
        resolve_files(src(tmp_path))
    # an explicit format reads any extension
    assert resolve_files(src(tmp_path, format="txt")) == [str(tmp_path / "data.csv"), str(tmp_path / "ok.jsonl")]
    with pytest.raises(DataInputError, match="fsspec package"):
        resolve_files(src("nosuchproto://bucket/x.jsonl"))


def test_unreadable_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_bytes(b"")
    real = os.scandir

    def scandir(path):  # running as root: permissions can't be relied on to fail
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataInputError, match="cannot list input directory .*sub: Permission denied"):
        resolve_files(src(tmp_path))


def test_memory_fsspec_url() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/smelt-test/in/a.jsonl", jsonl_bytes(RECORDS))
    fs.pipe("/smelt-test/in/sub/b.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl_bytes(RECORDS[:1])))
    fs.pipe("/smelt-test/in/_SUCCESS", b"")
    try:
        s = src("memory://smelt-test/in", domain="web")
        files = resolve_files(s)
        assert files == ["memory:///smelt-test/in/a.jsonl", "memory:///smelt-test/in/sub/b.jsonl.zst"]
        docs = [d for f in files for d in read_documents(f, s)]
        assert [d.id for d in docs] == ["a", "7", "a/a.jsonl:3", "a"]
        assert docs[3].meta["source"] == "sub/b.jsonl.zst:1"
        assert resolve_files(src("memory://smelt-test/in/*.jsonl")) == ["memory:///smelt-test/in/a.jsonl"]
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": ["from parquet"]}), buf)
        fs.pipe("/smelt-test/p/x.parquet", buf.getvalue())
        (doc,) = read_all("memory://smelt-test/p/x.parquet")
        assert (doc.id, doc.text, doc.meta) == ("x/x.parquet:1", "from parquet", {"source": "x.parquet:1"})
        with pytest.raises(DataInputError, match="does not exist"):
            resolve_files(src("memory://smelt-test/missing"))
    finally:
        fs.rm("/smelt-test", recursive=True)


class _ConnectError(Exception):
    """Stands for a network library's own error type (httpx, botocore): not an OSError."""


def _unreachable_fs(*, listing: bool) -> None:
    """Register ``unreachable://``, a protocol whose server cannot be reached: listing fails, or
    (``listing=False``) only opening a file does."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Unreachable(MemoryFileSystem):
        protocol = "unreachable"
        cachable = False

        def info(self, path: str, **kw: object) -> dict:
            if listing:
                raise _ConnectError("[Errno -2] Name or service not known\nretry 1 of 5 ...\n" + "frame\n" * 80)
            return {"name": path, "size": 10, "type": "file"}

        def _open(self, path: str, *a: object, **kw: object) -> object:
            raise _ConnectError("[Errno -2] Name or service not known")

    fsspec.register_implementation("unreachable", Unreachable, clobber=True)


def test_unreachable_url_is_one_input_error() -> None:
    _unreachable_fs(listing=True)
    with pytest.raises(DataInputError) as e:
        resolve_files(src("unreachable://host/data/x.jsonl"))
    assert str(e.value) == ("cannot reach input unreachable://host/data/x.jsonl: "
                            "_ConnectError: [Errno -2] Name or service not known")
    # listing works but opening does not: the reader raises the same input error
    _unreachable_fs(listing=False)
    with pytest.raises(DataInputError,
                       match=r"^cannot reach input unreachable://host/x\.jsonl: _ConnectError: \[Errno"):
        list(read_documents("unreachable://host/x.jsonl", src("unreachable://host/x.jsonl")))
    with pytest.raises(DataInputError, match=r"^cannot reach input unreachable://host/x\.json: _ConnectError"):
        detect_format("unreachable://host/x.json")  # .json is sniffed: opened before any work
