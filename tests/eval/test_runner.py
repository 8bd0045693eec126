"""`smelt eval` end to end on a tiny trained run: results.json schema, markdown, TensorBoard, the
probe history over checkpoints, bytes against the pack manifest, in-training evaluation, errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from smelt.cli import main
from smelt.config import load_recipe
from smelt.eval.runner import evaluate_in_training, run_eval
from smelt.fsutil import read_json
from smelt.interop.load import load_model

from .util import build_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = torch.get_num_threads()
    try:
        return build_run(tmp_path_factory.mktemp("evalrun"))
    finally:
        torch.set_num_threads(n)


def _task_file(root: Path) -> Path:
    p = root / "mine.jsonl"
    rows = [{"context": f"The capital of country {i} is", "choices": [" Paris", " London", " the cat"], "gold": i % 3}
            for i in range(5)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def test_cli_all_checkpoints_writes_results_history_and_tensorboard(run: Path, tmp_path: Path) -> None:
    task = _task_file(tmp_path)
    rc = main(["eval", str(run), "--all-checkpoints", "-q",
               "--set", f"eval.tasks=[{{name: mine, path: '{task}', format: jsonl, shots: 1}}]"])
    assert rc == 0
    run_dir = load_recipe(run).run_dir
    ev = run_dir / "eval"
    res = read_json(ev / "results.json")
    assert res["step"] == 4 and res["tokens_seen"] == 4 * 4 * 32
    assert res["checkpoint"].endswith("step-0000004")
    assert set(res["perplexity"]) == {"en", "zh"}
    for r in res["perplexity"].values():
        assert set(r) >= {"loss", "ppl", "bits_per_byte", "word_ppl", "tokens", "bytes", "docs"}
        assert r["docs"] == 4 and r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / r["bytes"] / math.log(2))
    assert res["perplexity"]["en"]["word_ppl"] is not None and res["perplexity"]["zh"]["word_ppl"] is None
    names = [p["name"] for p in res["probes"]]
    assert "capital_zh" in names and "capital_en" in names
    assert all({"name", "kind", "prompt", "logprob", "rank", "passed"} <= set(p) for p in res["probes"])
    t = res["tasks"]["mine"]
    assert t["n"] == 5 and t["shots"] == 1 and t["random"] == pytest.approx(1 / 3)
    assert 0.0 <= t["acc"] <= 1.0 and 0.0 <= t["acc_norm"] <= 1.0
    md = (ev / "results.md").read_text(encoding="utf-8")
    assert "| en |" in md and "| capital_zh |" in md and "| mine |" in md
    with open(ev / "probes.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["step"] for r in rows} == {"2", "4"} and len(rows) == 2 * len(names)
    assert {r["tokens_seen"] for r in rows} == {"256", "512"}
    assert (ev / "probes.png").read_bytes()[:4] == b"\x89PNG"
    assert list((ev / "tb").glob("events.out.tfevents.*"))
    # the probe numbers of step 4 in the table are those of results.json
    last = {r["probe"]: float(r["score"]) for r in rows if r["step"] == "4"}
    assert last["capital_zh"] == pytest.approx(next(p["score"] for p in res["probes"] if p["name"] == "capital_zh"),
                                               rel=1e-5)


def test_whole_split_bytes_match_the_pack_manifest(run: Path) -> None:
    recipe = load_recipe(run, ["eval.max_docs=null", "eval.max_tokens=null", "eval.run=[perplexity]",
                               "eval.tensorboard=false", "eval.stride=8"])
    res = run_eval(recipe, recipe.run_dir)
    manifest = read_json(recipe.run_dir / "tokens" / "manifest.json")
    for d, r in res["perplexity"].items():
        val = manifest["domains"][d]["val"]
        assert r["bytes"] == val["bytes"] and r["docs"] == val["docs"]
        assert r["tokens"] == val["tokens"] - val["docs"]  # EOS is not scored
    assert res["probes"] == [] and res["tasks"] == {}


def test_specific_checkpoint_and_in_training_eval(run: Path) -> None:
    recipe = load_recipe(run, ["eval.run=[perplexity, probes]", "eval.tensorboard=false"])
    ckpt = recipe.run_dir / "train" / "checkpoints" / "step-0000002"
    res = run_eval(recipe, recipe.run_dir, ckpt)
    assert res["step"] == 2
    lm = load_model(ckpt)
    lm.model.train()
    flat = evaluate_in_training(lm.model, lm.tokenizer, load_recipe(run, ["eval.in_training_docs=4"]), recipe.run_dir)
    assert lm.model.training  # mode restored
    assert all(p.grad is None for p in lm.model.parameters())
    assert flat["eval/ppl/en"] == pytest.approx(res["perplexity"]["en"]["ppl"], rel=1e-5)
    assert flat["eval/bpb/zh"] == pytest.approx(res["perplexity"]["zh"]["bits_per_byte"], rel=1e-5)
    assert flat["eval/probe/capital_zh"] == pytest.approx(
        next(p["score"] for p in res["probes"] if p["name"] == "capital_zh"), rel=1e-5)
    assert 0.0 <= flat["eval/probes_passed"] <= 1.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())


def test_cli_errors_name_the_problem(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "choices": ["a", "b"], "gold": 0}\n{"context": "c"}\n', encoding="utf-8")
    rc = main(["eval", str(run), "-q", "--set", "eval.run=[tasks]",
               "--set", f"eval.tasks=[{{name: bad, path: '{bad}', format: jsonl}}]"])
    assert rc == 2 and f"{bad}:2:" in capsys.readouterr().err
    rc = main(["eval", str(run), "-q", "--set", f"eval.probes=['{tmp_path / 'none.yaml'}']"])
    assert rc == 2 and "probe file not found" in capsys.readouterr().err
    rc = main(["eval", str(run), "-q", "--set", "name=missing"])
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = main(["eval", str(run), "-q", "--set", "eval.max_len=100000"])
    assert rc == 2 and "eval.max_len" in capsys.readouterr().err


def test_broken_checkpoint_is_skipped_by_all_checkpoints(run: Path, tmp_path: Path) -> None:
    src = load_recipe(run).run_dir
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(src, copy, symlinks=True)
    (copy / "train" / "checkpoints" / "step-0000002" / ".metadata").unlink()
    recipe = load_recipe(run, [f"runs_dir={tmp_path / 'runs'}", "eval.run=[probes]", "eval.tensorboard=false"])
    res = run_eval(recipe, copy, all_checkpoints=True)
    assert res["step"] == 4
    with open(copy / "eval" / "probes.csv", encoding="utf-8") as f:
        assert {r["step"] for r in csv.DictReader(f)} == {"4"}


def test_hf_export_as_checkpoint(run: Path, tmp_path: Path) -> None:
    """`smelt eval --checkpoint EXPORT` reads a Hugging Face directory through the loader the CLI
    passes (`smelt.interop.load.load_model`); `run_eval`'s default loader reads runs and
    checkpoints only, and says so."""
    from smelt.interop.hf import export_run
    from smelt.model.loaded import LoadError

    src = load_recipe(run).run_dir
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(src, copy, symlinks=True)
    sets = [f"runs_dir={tmp_path / 'runs'}", "eval.run=[perplexity]", "eval.tensorboard=false"]
    recipe = load_recipe(run, sets)
    export = export_run(recipe, copy, out_dir=tmp_path / "export")
    with pytest.raises(LoadError, match="a Hugging Face directory"):
        run_eval(recipe, copy, export)
    rc = main(["eval", str(run), "-q", "--checkpoint", str(export), *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    res = read_json(copy / "eval" / "results.json")
    assert res["checkpoint"] == str(export) and res["step"] == 4
    ours = run_eval(recipe, copy)["perplexity"]["en"]["ppl"]
    assert res["perplexity"]["en"]["ppl"] == pytest.approx(ours, rel=1e-4)


def test_fixed_texts_are_scored_beside_the_val_split(run: Path, tmp_path: Path) -> None:
    """`eval.texts`: the same held-out text for runs whose curation (and val split) differs."""
    text = tmp_path / "heldout.jsonl"
    rows = ["The river runs past the old mill.", "", "市政府宣布了新的计划。", "A third document, in English."]
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    recipe = load_recipe(run, ["eval.run=[perplexity]", "eval.tensorboard=false",
                               f"eval.texts=[{{path: '{text}', domain: fixed}}]"])
    res = run_eval(recipe, recipe.run_dir)
    r = res["perplexity"]["fixed"]
    kept = [t for t in rows if t]
    assert r["docs"] == 3 and r["bytes"] == sum(len(t.encode()) for t in kept)  # the empty one is skipped
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / r["bytes"] / math.log(2))
    assert {"en", "zh"} <= set(res["perplexity"])
