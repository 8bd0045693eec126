"""`smelt run` end to end on the tiny built-in demo: every stage, skip, --from, resume, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from smelt.cli import main
from smelt.config import RecipeError
from smelt.report import SECTIONS
from smelt.run import STAGES, load_run_recipe
from tests.demo.htmlcheck import check_html

TINY = ["--set", "run.demo=tiny", "-q"]


def _run(root: Path, *extra: str) -> dict:
    assert main(["run", "--set", f"runs_dir={root}", *TINY, *extra]) == 0
    return json.loads((root / "demo" / "run.json").read_text())


def _mtime(p: Path) -> int:
    return p.stat().st_mtime_ns


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    state = _run(root)
    return root / "demo", state


def _available(state: dict, stage: str) -> bool:
    return state["stages"][stage]["status"] != "unavailable"


def test_every_stage_completes_with_its_manifest(demo):
    run_dir, state = demo
    for name in STAGES:
        rec = state["stages"][name]
        assert rec["status"] in ("complete", "unavailable"), (name, rec)
        if rec["status"] == "complete":
            assert rec["action"] == "ran" and rec["duration_s"] >= 0 and rec["key"], name
    assert json.loads((run_dir / "data" / "manifest.json").read_text())["complete"]
    assert json.loads((run_dir / "tokenizer" / "stats.json").read_text())["vocab_size"] >= 256
    assert (run_dir / "tokenizer" / "eval.json").is_file()
    assert json.loads((run_dir / "tokens" / "manifest.json").read_text())["complete"]
    tm = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert tm["complete"] and tm["steps"] == 40
    if _available(state, "eval"):
        res = json.loads((run_dir / "eval" / "results.json").read_text())
        assert set(res["perplexity"]) == {"prose", "code", "web"}
        assert res["tasks"]["demo_mc"]["n"] == 16
    if _available(state, "export"):
        assert (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "corpus" / "manifest.json").is_file()
    assert "${run_dir}" not in (run_dir / "recipe.yaml").read_text()


def test_accounting_identity_and_planted_problems_caught(demo):
    run_dir, _ = demo
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    d = stats["documents"]
    assert d["input"] == d["kept"] + d["rejected"] + d["duplicates"]
    assert set(stats["by_domain"]) == {"prose", "code", "web"}
    planted = json.loads((run_dir / "data" / "planted.json").read_text())["labels"]
    for label in ("exact_dup", "near_dup", "pii", "boilerplate", "spam", "short", "contaminated", "mojibake"):
        assert planted[label]["caught"] == planted[label]["planted"] > 0, (label, planted[label])
    assert planted["clean"]["caught"] == planted["clean"]["planted"]  # no clean page lost
    assert any(r.startswith("decontam/") for r in stats["rejects_by_reason"])
    # the model-free toxicity signal (flagged words) runs on the web pages that reach it, no clean page lost
    tox = next(s for s in stats["steps"] if s["name"] == "toxicity")["total"]
    assert tox["seen"] > 0 and tox["seen"] < d["input"]


def test_loss_fell(demo):
    run_dir, _ = demo
    rows = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind", "train") == "train"]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


def test_report_has_every_section_and_parses(demo):
    run_dir, state = demo
    parsed = check_html((run_dir / "report.html").read_text(encoding="utf-8"))
    assert parsed.errors == []
    assert {sid for sid, _ in SECTIONS} <= parsed.ids
    text = "".join(parsed.text)
    assert "holds" in text and "Planted problems: caught?" in text
    for reason in ("decontam_demo_eval", "gopher_short_doc", "exact_duplicate", "near_duplicate"):
        assert reason in text, reason
    assert "bytes/token" in text and "training mixture" in text and "fell" in text
    if _available(state, "eval"):
        assert "bits/byte" in text and "random baseline" in text
    assert parsed.images >= 8
    assert "stage not run: train" not in text


def test_second_run_is_a_no_op_then_from_train_redoes_only_training(demo):
    run_dir, _ = demo
    root = run_dir.parent
    marks = {p: _mtime(run_dir / p) for p in ("data/manifest.json", "tokenizer/tokenizer.json",
                                               "tokens/manifest.json", "train/manifest.json", "report.html")}
    state = _run(root)
    assert state["last_invocation"]["ran"] == []
    assert all(r["action"] in ("up to date", "skipped") for r in state["stages"].values())
    assert {p: _mtime(run_dir / p) for p in marks} == marks

    state = _run(root, "--from", "train")
    ran = state["last_invocation"]["ran"]
    assert ran[0] == "train" and "report" in ran and not {"data", "tokenizer", "pack"} & set(ran)
    for p in ("data/manifest.json", "tokenizer/tokenizer.json", "tokens/manifest.json"):
        assert _mtime(run_dir / p) == marks[p], p
    assert _mtime(run_dir / "train" / "manifest.json") != marks["train/manifest.json"]
    tm = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert tm["complete"] and tm["resumed_from"] is None  # a fresh start, not a resume


def test_interrupted_training_resumes_from_its_checkpoint(demo):
    run_dir, _ = demo
    # what a kill after the step-20 checkpoint leaves: no final checkpoint, no manifest, "running"
    shutil.rmtree(run_dir / "train" / "checkpoints" / "step-0000040")
    (run_dir / "train" / "manifest.json").unlink()
    rj = json.loads((run_dir / "run.json").read_text())
    rj["stages"]["train"]["status"] = "running"
    (run_dir / "run.json").write_text(json.dumps(rj))
    state = _run(run_dir.parent)
    assert state["stages"]["train"]["action"] == "resumed"
    assert state["last_invocation"]["ran"][0] == "train"
    tm = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert tm["complete"] and tm["resumed_from"] == "step-0000020"


def test_bad_stage_names_and_overrides_fail_before_work(tmp_path):
    with pytest.raises(RecipeError, match="expected one of"):
        from smelt.run import run
        run(load_run_recipe(None, [f"runs_dir={tmp_path}", "run.demo=tiny"]), from_stage="trian")
    assert main(["run", "--set", "run.demo=huge", "--set", f"runs_dir={tmp_path}", "-q"]) == 2
    assert not (tmp_path / "demo").exists()


def test_run_dir_placeholder_and_tiny_overlay(tmp_path, monkeypatch):
    monkeypatch.delenv("SMELT_DEMO", raising=False)
    r = load_run_recipe(None, [f"runs_dir={tmp_path}", "run.demo=tiny", "train.max_steps=3"])
    assert r.data.inputs[0].path == f"{tmp_path}/demo/corpus/prose"
    assert r.train.max_steps == 3 and r.model.preset == "debug"  # user override beats the overlay
    full = load_run_recipe(None, [f"runs_dir={tmp_path}"])
    assert full.run.demo == "full" and full.model.preset == "cpu-1m"


@pytest.mark.parametrize("name", ["demo.yaml", "shared-data.yaml", "gpu-1b.yaml"])
def test_shipped_recipes_validate(name, monkeypatch):
    monkeypatch.delenv("SMELT_DEMO", raising=False)
    r = load_run_recipe(Path(__file__).parents[1] / "recipes" / name)
    assert r.data is not None and r.loader is not None and r.model is not None
    if name != "demo.yaml":
        w = r.loader.weights
        assert w is not None and {"zh", "en", "code"} <= set(w) <= {"zh", "en", "en-web", "code"}
        english = w["en"] + w.get("en-web", 0)  # web text is its own domain where C4's rules apply to it alone
        assert w["zh"] == pytest.approx(english) and english == pytest.approx(2 * w["code"])


def test_recipes_demo_is_a_copy_of_the_packaged_one():
    from smelt.run import demo_recipe_path

    copy = (Path(__file__).parents[1] / "recipes" / "demo.yaml").read_text(encoding="utf-8")
    assert copy.endswith(demo_recipe_path().read_text(encoding="utf-8"))


def test_every_shipped_recipe_loads(monkeypatch):
    """Every YAML file in recipes/ is a valid recipe (or, for the quality classifier, a valid
    training spec); the GPU scaling ladder plans without packed tokens."""
    import yaml

    from smelt.config import load_recipe
    from smelt.quality.train import QualityTrainSpec
    from smelt.scaling.sweep import plan_sweep

    monkeypatch.delenv("SMELT_DEMO", raising=False)
    files = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        tree = yaml.safe_load(f.read_text(encoding="utf-8"))
        if "positive" in tree:
            QualityTrainSpec.model_validate(tree)
            continue
        r = load_recipe(f)
        if f.name == "scaling-gpu.yaml":
            runs = plan_sweep(r, r.run_dir)
            flops = sum(x.trained_tokens * x.flops_per_token for x in runs)
            assert len(runs) == 18 and 1e18 < flops < 1e19
