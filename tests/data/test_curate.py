"""End to end: `smelt data` on a synthetic messy corpus with every planted problem and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from smelt.cli import main
from smelt.config import parse_recipe
from smelt.data.curate import AccountingError, check_accounting, run_data_stage
from smelt.data.shards import read_shard
from smelt.data.synth import generate

EVAL_ITEM = ("A man is sitting on a roof and he is using a long strip of wrap to cover a pair of old "
             "skis before the storm arrives")


def write_corpus(root: Path, n: int = 240, files: int = 4, seed: int = 7) -> Path:
    """Synthetic web documents split over several JSONL files, plus bad records."""
    inp = root / "in"
    inp.mkdir(parents=True)
    docs = list(generate(n, seed=seed, eval_items=[EVAL_ITEM]))
    per = (len(docs) + files - 1) // files
    for f in range(files):
        with open(inp / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for d in docs[f * per:(f + 1) * per]:
                fh.write(json.dumps({"id": d.id, "text": d.text, "planted": d.meta["planted"],
                                     "copy_of": d.meta.get("copy_of")}, ensure_ascii=False) + "\n")
    with open(inp / "part-bad.jsonl", "wb") as fh:
        fh.write(b'{"id": "ok-1", "text": "fine"}\n')
        fh.write(b'{"id": "broken", "text": \n')  # broken JSON
        fh.write(b'{"id": "latin1", "text": "caf\xe9"}\n')  # invalid UTF-8
        fh.write(b'{"id": "empty", "text": ""}\n')
        fh.write(b'[1, 2, 3]\n')
    ev = root / "eval.jsonl"
    ev.write_text(json.dumps({"context": EVAL_ITEM, "choices": ["a", "b"], "gold": 0}) + "\n", encoding="utf-8")
    return inp


def recipe_tree(root: Path, inp: Path, **data_over) -> dict:
    data = {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}],
        "workers": 2,
        "decontam": {"sources": [{"name": "toyeval", "path": str(root / "eval.jsonl"), "format": "jsonl"}]},
        "dedup": {"minhash": {"verify_jaccard": 0.5}},
    }
    data.update(data_over)
    return {"name": "t", "runs_dir": str(root / "runs"), "data": data}


def read_all(d: Path) -> list:
    return [doc for f in sorted(d.rglob("*")) if f.is_file() for doc in read_shard(f)]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    inp = write_corpus(root)
    recipe = parse_recipe(recipe_tree(root, inp))
    stats = run_data_stage(recipe.data, recipe.run_dir)
    return root, recipe.run_dir / "data", stats


def test_accounting_identity_holds(curated):
    _, data, stats = curated
    d = stats["documents"]
    assert d["input"] == 240 + 5
    assert d["input"] == d["kept"] + d["rejected"] + d["duplicates"]
    for dom, row in stats["by_domain"].items():
        assert row["input"] == row["kept"] + row["rejected"] + row["duplicates"], dom
    assert len(read_all(data / "clean")) == d["kept"]
    assert len(read_all(data / "rejects")) == d["rejected"]
    assert len(read_all(data / "duplicates")) == d["duplicates"]
    assert not (data / "_work").exists()
    m = json.loads((data / "manifest.json").read_text())
    assert m["complete"] and m["documents"] == d


def test_bad_records_are_rejected_with_reason_not_lost(curated):
    _, data, stats = curated
    rej = {d.id: d for d in read_all(data / "rejects")}
    reasons = {i: rej[i].meta["reason"] for i in rej if rej[i].meta["rejected_by"] == "read"}
    assert reasons.get("empty") == "empty"
    bad = Counter(r for r in reasons.values())
    assert bad["invalid_json"] == 1 and bad["invalid_utf8"] == 1 and bad["not_an_object"] == 1
    assert {e["reason"] for e in stats["read_errors"]} >= {"invalid_json", "invalid_utf8", "not_an_object"}


def test_planted_problems_are_caught(curated):
    _, data, stats = curated
    kept = read_all(data / "clean")
    dups = read_all(data / "duplicates")
    rej = read_all(data / "rejects")
    planted_kept = Counter(d.meta.get("planted") for d in kept)
    # every exact copy is a duplicate of the document it copies (or of an earlier copy of it)
    exact = [d for d in dups if d.meta.get("planted") == "exact_dup"]
    assert exact and all(d.meta["duplicate_of"] for d in exact)
    assert planted_kept["exact_dup"] == 0
    assert planted_kept["near_dup"] == 0
    assert planted_kept["spam"] == 0
    assert planted_kept["short"] == 0
    assert planted_kept["contaminated"] == 0
    assert any(d.meta["reason"] == "decontam_toyeval" for d in rej)
    # PII is redacted in what is kept
    pii = [d for d in kept if d.meta.get("planted") == "pii"]
    assert pii and all("@" not in d.text for d in kept)
    assert all(d.meta["pii"]["email"] == 1 and d.meta["pii"]["phone"] == 1 for d in pii)
    step = next(s for s in stats["steps"] if s["name"] == "pii")["total"]["counters"]
    assert step["email"] >= len(pii) and step["ip"] >= len(pii)
    # the redacted PII paragraphs are identical across documents, so line dedup keeps one copy
    assert sum("<EMAIL>" in d.text for d in kept) >= 1
    # most clean prose survives
    n_clean = sum(1 for d in kept + rej + dups if d.meta.get("planted") == "clean")
    assert planted_kept["clean"] >= 0.9 * n_clean
    # repeated footer lines are removed by line dedup, except in the first document that has them
    assert sum("All rights reserved" in d.text for d in kept) == 1
    line = next(s for s in stats["steps"] if s["name"] == "line_dedup")
    assert line["total"]["counters"]["units_removed"] > 0


def test_duplicates_point_at_kept_documents(curated):
    _, data, _ = curated
    kept_ids = {d.id for d in read_all(data / "clean")}
    all_ids = kept_ids | {d.id for d in read_all(data / "rejects")}
    for d in read_all(data / "duplicates"):
        assert d.meta["duplicate_of"] in all_ids | kept_ids


def test_second_run_is_skipped(curated):
    root, data, stats = curated
    recipe = parse_recipe(recipe_tree(root, root / "in"))
    before = (data / "stats.json").stat().st_mtime_ns
    assert run_data_stage(recipe.data, recipe.run_dir) == stats
    assert (data / "stats.json").stat().st_mtime_ns == before


def test_accounting_mismatch_fails(curated, tmp_path):
    _, data, stats = curated
    broken = json.loads(json.dumps(stats))
    broken["documents"]["kept"] += 1
    broken["by_domain"]["web"]["kept"] += 1
    with pytest.raises(AccountingError, match="domain web"):
        check_accounting(broken, data, "jsonl.zst")


def _tree_digest(d: Path) -> dict[str, str]:
    out = {}
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != "manifest.json":
            out[str(f.relative_to(d))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_kill_9_and_rerun_gives_identical_bytes(tmp_path):
    inp = write_corpus(tmp_path, n=400, files=8)
    rfile = tmp_path / "r.yaml"
    tree = recipe_tree(tmp_path, inp, workers=1)
    tree["name"] = "killed"
    rfile.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "smelt", "data", str(rfile), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = tmp_path / "runs" / "killed" / "data" / "_work" / "filter.done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "killed" / "data" / "manifest.json").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    straight = dict(tree, name="straight")
    assert main(["data", str(_dump(tmp_path / "s.yaml", straight)), "--quiet"]) == 0
    a = _tree_digest(tmp_path / "runs" / "killed" / "data")
    b = _tree_digest(tmp_path / "runs" / "straight" / "data")
    assert a == b and len(a) > 5


def _dump(p: Path, tree: dict) -> Path:
    p.write_text(yaml.safe_dump(tree))
    return p


def test_cli_errors_before_work(tmp_path, capsys):
    r = _dump(tmp_path / "r.yaml", {"name": "x", "runs_dir": str(tmp_path / "runs"),
                                   "data": {"inputs": [{"path": str(tmp_path / "nope"), "domain": "web"}]}})
    assert main(["data", str(r), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err
    assert not (tmp_path / "runs" / "x" / "data").exists()
    (tmp_path / "f.xyz").write_text("hello")
    r = _dump(tmp_path / "r2.yaml", {"name": "x", "runs_dir": str(tmp_path / "runs"),
                                    "data": {"inputs": [{"path": str(tmp_path / "f.xyz"), "domain": "web"}]}})
    assert main(["data", str(r), "--quiet"]) == 2
    assert "f.xyz" in capsys.readouterr().err
    assert main(["data", str(r), "--quiet", "--set", "data.bogus=1"]) == 2
    assert "data.bogus" in capsys.readouterr().err


def test_cli_writes_resolved_recipe_and_parquet(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    with gzip.open(inp / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in generate(30, seed=3, mix={"clean": 1.0}):
            f.write(json.dumps({"id": d.id, "content": d.text}) + "\n")
    r = _dump(tmp_path / "r.yaml", {"name": "pq", "runs_dir": str(tmp_path / "runs"),
                                   "data": {"inputs": [{"path": str(inp), "domain": "web"}]}})
    assert main(["data", str(r), "--quiet", "--set", "data.output_format=parquet", "--set", "data.workers=1"]) == 0
    run = tmp_path / "runs" / "pq"
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["data"]["output_format"] == "parquet" and resolved["data"]["workers"] == 1
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["documents"]["input"] == 30
    assert list((run / "data" / "clean" / "web").glob("*.parquet"))


def test_gigantic_and_corrupt_inputs_are_counted_rejects(tmp_path):
    import zstandard

    inp = tmp_path / "in"
    inp.mkdir()
    good = [d for d in generate(20, seed=5, mix={"clean": 1.0})]
    big = "word " * 10_000_000  # one 50 MB single-line document
    with open(inp / "a.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "huge", "text": big}) + "\n")
        for d in good[:10]:
            f.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
    payload = "".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in good[10:]).encode()
    comp = zstandard.ZstdCompressor().compress(payload)
    (inp / "b.jsonl.zst").write_bytes(comp[: len(comp) // 2])  # truncated
    recipe = parse_recipe({"name": "bad", "runs_dir": str(tmp_path / "runs"),
                           "data": {"inputs": [{"path": str(inp), "domain": "web"}], "workers": 1}})
    stats = run_data_stage(recipe.data, recipe.run_dir)
    by_reason = stats["rejects_by_reason"]
    assert by_reason["read/too_long"] == 1
    assert by_reason["read/corrupt_file"] == 1
    assert any(e["reason"] == "corrupt_file" and e["file"].endswith("b.jsonl.zst") for e in stats["read_errors"])
    d = stats["documents"]
    assert d["input"] == d["kept"] + d["rejected"] + d["duplicates"]
    assert d["kept"] >= 10  # the good documents before the damage survive


def test_without_dedup_the_filter_phase_writes_final_shards(tmp_path):
    inp = write_corpus(tmp_path, n=60, files=2)
    off = {"enabled": False}
    tree = recipe_tree(tmp_path, inp, dedup={"exact": off, "minhash": off, "lines": off})
    recipe = parse_recipe(tree)
    stats = run_data_stage(recipe.data, recipe.run_dir)
    data = recipe.run_dir / "data"
    d = stats["documents"]
    assert d["duplicates"] == 0 and d["input"] == d["kept"] + d["rejected"]
    assert len(read_all(data / "clean")) == d["kept"] > 0
    assert not (data / "duplicates").exists()
    assert [s["name"] for s in stats["steps"]][-1] == "pii"  # no dedup steps reported
    # exact copies survive when exact dedup is off
    assert any(doc.meta.get("planted") == "exact_dup" for doc in read_all(data / "clean"))
