"""The reader registry (`smelt.data.readers`): built-in formats, a format added from outside
(a test-local ``.csv`` reader) read by spawned curation workers, and the `smelt.data.io` facade."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from smelt.config import InputSource, parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.document import Document
from smelt.data.errors import DataInputError
from smelt.data.fs import CORRUPT_ERRORS, open_input
from smelt.data.inputs import resolve_files
from smelt.data.plugins import load
from smelt.data.readers import (
    detect_format,
    read_documents,
    register_reader,
    registered_readers,
    unregister_reader,
)
from smelt.data.readers.base import FileReader
from smelt.data.shards import read_shard


def read_csv(r: FileReader) -> Iterator[Document]:
    """A toy format: a header row, then one document per row; n is the file's line number."""
    n = 1
    with open_input(r.path) as stream:
        try:
            for n, row in enumerate(csv.DictReader(io.TextIOWrapper(stream, "utf-8", newline="")), 2):
                if None in row:  # more cells than the header has names
                    yield r.error_doc(n, "csv_extra_cells", f"{len(row[None])} cells beyond the header",
                                      ",".join(str(v) for v in row.values()), row.get("id"))
                    continue
                doc = r.from_record(row, n)
                yield r.error_doc(n, doc[0], doc[1], json.dumps(row), doc[2]) if isinstance(doc, tuple) else doc
        except CORRUPT_ERRORS as e:
            yield r.error_doc(n + 1, "corrupt_file", f"{type(e).__name__}: {e}")


@pytest.fixture
def csv_format():
    register_reader("csv", (".csv",), read_csv)
    yield
    unregister_reader("csv")


GOOD = ("The committee met on Tuesday to review the budget for the coming year, and after a long "
        "discussion it approved the plan with two small changes to the road maintenance line.")


def write_csv(path: Path, rows: list[list[str]], compress: bool = False) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "text", "lang"])
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def test_builtin_formats_resolve() -> None:
    """Every built-in entry names a function that a fresh worker can import."""
    entries = registered_readers()
    assert {"txt", "jsonl", "json-squad", "parquet", "warc", "html"} <= set(entries)
    for e in entries.values():
        assert callable(load(e.read))
        if e.detect:
            assert callable(load(e.detect))


def test_unknown_format_until_registered(tmp_path: Path, csv_format) -> None:
    f = tmp_path / "a.csv"
    write_csv(f, [["x1", GOOD, "en"]])
    assert detect_format(str(f)) == "csv"
    docs = list(read_documents(str(f), InputSource(path=str(f), domain="web")))
    assert [(d.id, d.text, d.meta) for d in docs] == [("x1", GOOD, {"lang": "en", "source": "a.csv:2"})]
    unregister_reader("csv")
    with pytest.raises(DataInputError, match=r"unknown file type.*a\.csv"):
        detect_format(str(f))


def test_registry_refuses_taken_names_and_unimportable_readers(csv_format) -> None:
    with pytest.raises(ValueError, match="suffix .json already belongs to format 'json-squad'"):
        register_reader("json2", (".json",), read_csv)
    with pytest.raises(ValueError, match="already registered"):
        register_reader("csv", (".csv",), "somewhere.else:read")
    with pytest.raises(TypeError, match="not importable by a worker"):
        register_reader("tsv", (".tsv",), lambda r: iter(()))


def test_registered_format_through_curation_with_spawned_workers(tmp_path: Path, csv_format, caplog) -> None:
    """A format registered in this process only is read by two spawned workers (the registry
    travels with the tasks), with the same accounting as a built-in format: bad rows are
    rejected at step read with their reason, named by file and line."""
    inp = tmp_path / "in"
    inp.mkdir()
    write_csv(inp / "a.csv", [["a1", GOOD, "en"], ["a2", "", "en"], ["a3", GOOD + " Second copy.", "en", "extra"]])
    write_csv(inp / "b.csv.gz", [["b1", GOOD.replace("Tuesday", "Friday"), "en"]], compress=True)
    assert [Path(f).name for f in resolve_files(InputSource(path=str(inp), domain="web"))] == ["a.csv", "b.csv.gz"]
    off = {"enabled": False}
    recipe = parse_recipe({"name": "csv", "runs_dir": str(tmp_path / "runs"), "data": {
        "inputs": [{"path": str(inp), "domain": "web"}], "workers": 2,
        "normalize": off, "language": off, "pii": off,
        "heuristics": {"gopher_quality": off, "gopher_repetition": off, "c4": off, "fineweb": off},
        "dedup": {"exact": off, "minhash": off, "lines": off}}})
    stats = run_data_stage(recipe.data, recipe.run_dir)
    data = recipe.run_dir / "data"
    assert stats["documents"] == {"input": 4, "kept": 2, "rejected": 2, "duplicates": 0}
    assert stats["rejects_by_reason"] == {"read/csv_extra_cells": 1, "read/empty": 1}
    kept = sorted(d.id for f in (data / "clean").rglob("*.zst") for d in read_shard(f))
    assert kept == ["a1", "b1"]
    rejects = {d.id: d.meta for f in (data / "rejects").rglob("*.zst") for d in read_shard(f)}
    assert rejects["a3"]["source"] == "a.csv:4" and rejects["a3"]["reason"] == "csv_extra_cells"
    assert {e["source"] for e in stats["read_errors"]} == {"a.csv:4"}
