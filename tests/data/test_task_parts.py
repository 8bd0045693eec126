"""`data.max_task_mb`: a big JSON-lines or Parquet file is read as several tasks (line-aligned
byte ranges, runs of row groups) and written as one task's shards: the same output bytes (the
same documents, ids, decisions and order), and an interrupted stage resumes part by part."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smelt.config import parse_recipe
from smelt.data import curate
from smelt.data.curate import plan_tasks, run_data_stage
from smelt.data.shards import read_shard
from smelt.data.synth import generate


def _records() -> list[dict]:
    recs = []
    for i, d in enumerate(generate(400, seed=21)):
        rec = {"text": d.text, "kind": d.meta["planted"]}
        if i % 3:  # a third without ids: named by their line (row) number
            rec["id"] = d.id
        recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("in") / "big.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in _records()]
    lines.insert(150, "")  # a blank line
    lines.insert(300, '{"id": "broken", "text": ')  # a broken record far into the file
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, jsonl: Path) -> dict[str, Path]:
    """The same file as .jsonl.zst and .jsonl.gz, and a .jsonl.zst cut off two thirds in."""
    import gzip

    import zstandard

    root = tmp_path_factory.mktemp("z")
    raw = jsonl.read_bytes()
    out = {"zst": root / "big.jsonl.zst", "gz": root / "big.jsonl.gz", "cut": root / "cut" / "big.jsonl.zst"}
    out["zst"].write_bytes(zstandard.ZstdCompressor().compress(raw))
    out["gz"].write_bytes(gzip.compress(raw))
    out["cut"].parent.mkdir()
    z = out["zst"].read_bytes()
    out["cut"].write_bytes(z[: len(z) * 2 // 3])
    return out


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("in") / "big.parquet"
    recs = _records()
    table = pa.table({"id": [r.get("id", "") for r in recs], "text": [r["text"] for r in recs],
                      "kind": [r["kind"] for r in recs]})
    pq.write_table(table, f, row_group_size=40)
    return f


def _recipe(root: Path, path: Path, max_task_mb: float | None, workers: int = 2):
    return parse_recipe({"name": "p", "runs_dir": str(root), "data": {
        "inputs": [{"path": str(path), "domain": "web"}], "workers": workers, "max_task_mb": max_task_mb,
        "language": {"allowed": ["en", "zh"]},
        "dedup": {"minhash": {"enabled": True}, "lines": {"enabled": True}}}})


def _documents(data: Path) -> dict[str, list[tuple]]:
    """Every output document, in shard order, per kind of output."""
    out = {}
    for kind in ("clean", "rejects", "duplicates"):
        files = sorted(p for p in (data / kind).rglob("*") if p.is_file())
        out[kind] = [(d.id, d.text, json.dumps(d.meta, sort_keys=True)) for f in files for d in read_shard(f)]
    return out


def _files(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for kind in ("clean", "rejects", "duplicates")
            for p in sorted((data / kind).rglob("*")) if p.is_file()}


def _compare(whole: Path, parts: Path) -> None:
    a, b = _documents(whole / "p" / "data"), _documents(parts / "p" / "data")
    assert a == b and len(a["clean"]) > 100 and a["rejects"] and a["duplicates"]
    fa, fb = _files(whole / "p" / "data"), _files(parts / "p" / "data")
    assert sorted(fa) == sorted(fb) and fa == fb  # the same shards, byte for byte
    sa = json.loads((whole / "p" / "data" / "stats.json").read_text())
    sb = json.loads((parts / "p" / "data" / "stats.json").read_text())
    for k in ("documents", "bytes", "chars", "by_domain", "rejects_by_reason", "steps", "minhash_cluster_sizes",
              "read_errors"):
        assert sa.get(k) == sb.get(k), k
    assert "documents" in sa and "steps" in sa


def test_jsonl_parts_are_line_aligned_and_cover_the_file(tmp_path: Path, jsonl: Path) -> None:
    plan = plan_tasks(_recipe(tmp_path, jsonl, 0.05).data)
    parts = plan.parts()
    assert len(parts) == len(plan.tasks) >= 4
    raw = jsonl.read_bytes()
    assert parts[0][1] == 0 and parts[-1][2] == len(raw)
    for (_, a, b, before), (_, a2, _, _) in zip(parts, parts[1:]):
        assert b == a2 and raw[b - 1:b] == b"\n"  # contiguous, each cut right after a newline
        assert raw[:a].count(b"\n") == before
    assert plan_tasks(_recipe(tmp_path, jsonl, None).data).tasks == [[0]]
    assert plan_tasks(_recipe(tmp_path, jsonl, 64).data).tasks == [[0]]  # smaller than a part: whole


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_parts_give_the_same_bytes_as_one_task(tmp_path: Path, jsonl: Path, parquet: Path, fmt: str) -> None:
    path = jsonl if fmt == "jsonl" else parquet
    parted = _recipe(tmp_path / "parts", path, 0.05)
    assert len(plan_tasks(parted.data).tasks) >= 3
    run_data_stage(_recipe(tmp_path / "whole", path, None).data, tmp_path / "whole" / "p")
    run_data_stage(parted.data, parted.run_dir)
    _compare(tmp_path / "whole", tmp_path / "parts")
    if fmt == "jsonl":  # the broken record keeps its line number, read in a later part
        rejects = _documents(tmp_path / "parts" / "p" / "data")["rejects"]
        assert any(i.endswith("big.jsonl:301") and "invalid_json" in m for i, _, m in rejects)


def test_interrupted_parts_resume(tmp_path: Path, jsonl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = curate.filter_task

    def dies_at_part_2(ti: int, **kw):
        if ti == 2:
            raise KeyboardInterrupt("killed")
        return real(ti, **kw)

    r = _recipe(tmp_path / "parts", jsonl, 0.05, workers=1)
    monkeypatch.setattr(curate, "filter_task", dies_at_part_2)
    with pytest.raises(KeyboardInterrupt):
        run_data_stage(r.data, r.run_dir)
    done = r.run_dir / "data" / "_work" / "filter.done"
    assert sorted(p.name for p in done.iterdir()) == ["00000.json", "00001.json"]
    monkeypatch.setattr(curate, "filter_task", real)
    run_data_stage(r.data, r.run_dir)
    run_data_stage(_recipe(tmp_path / "whole", jsonl, None, workers=1).data, tmp_path / "whole" / "p")
    _compare(tmp_path / "whole", tmp_path / "parts")


@pytest.mark.parametrize("kind", ["zst", "gz", "cut"])
def test_compressed_parts_give_the_same_documents(tmp_path: Path, compressed: dict[str, Path], kind: str) -> None:
    """Compressed files are split by ranges of their decompressed bytes (each part decompresses from
    the start and keeps the lines that begin in its range): the same documents and line numbers; a
    cut-off file reports its damage once, from the part that reaches it."""
    path = compressed[kind]
    parted = _recipe(tmp_path / "parts", path, 0.02)
    plan = plan_tasks(parted.data)
    assert len(plan.tasks) >= 3 and all(p[3] == -1 for p in plan.parts()) and plan.parts()[-1][2] == -1
    run_data_stage(_recipe(tmp_path / "whole", path, None).data, tmp_path / "whole" / "p")
    run_data_stage(parted.data, parted.run_dir)
    _compare(tmp_path / "whole", tmp_path / "parts")
    rejects = _documents(tmp_path / "parts" / "p" / "data")["rejects"]
    assert sum('"read_error": "corrupt_file"' in m for _, _, m in rejects) == (kind == "cut")


@pytest.mark.parametrize("dedup", [True, False])
def test_a_split_file_among_grouped_files_keeps_the_groups_shards(tmp_path: Path, jsonl: Path, dedup: bool) -> None:
    """files_per_task: 2 with the big file second of three: the tasks of a group (a small file, then
    the big file's parts) write the group's shards, byte for byte as without parts; with and
    without dedup (without, the filter phase writes the final shards of groups that were not split)."""
    inp = tmp_path / "in"
    inp.mkdir()
    other = [{"id": d.id, "text": d.text} for d in generate(90, seed=5)]  # not in b.jsonl
    for name, rows in (("a", other[:30]), ("c", other[30:60]), ("d", other[60:])):
        (inp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (inp / "b.jsonl").write_bytes(jsonl.read_bytes())

    def recipe(root: Path, mb: float | None):
        d = {"enabled": dedup}
        return parse_recipe({"name": "p", "runs_dir": str(root), "data": {
            "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": 2, "max_task_mb": mb,
            "files_per_task": 2, "language": {"allowed": ["en", "zh"]},
            "dedup": {"exact": d, "minhash": d, "lines": d}}})

    parted = recipe(tmp_path / "parts", 0.05)
    plan = plan_tasks(parted.data)
    assert plan.split() and plan.groups[0] == 0 and plan.groups[-1] == 1 and len(plan.tasks) >= 4
    assert plan.tasks[0] == [0]  # a.jsonl alone, then b.jsonl's parts, all of group 0; then c + d
    run_data_stage(recipe(tmp_path / "whole", None).data, tmp_path / "whole" / "p")
    run_data_stage(parted.data, parted.run_dir)
    fa, fb = _files(tmp_path / "whole" / "p" / "data"), _files(tmp_path / "parts" / "p" / "data")
    assert sorted(fa) == sorted(fb) and fa == fb
    assert sorted(k for k in fa if k.startswith("clean/")) == ["clean/web/part-00000.jsonl.zst",
                                                              "clean/web/part-00001.jsonl.zst"]
    sa = json.loads((tmp_path / "whole" / "p" / "data" / "stats.json").read_text())
    sb = json.loads((tmp_path / "parts" / "p" / "data" / "stats.json").read_text())
    assert sa["documents"] == sb["documents"] and sa["steps"] == sb["steps"]
