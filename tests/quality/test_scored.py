"""`smelt.quality.scored`: batched scores in meta, the four keep rules, cutoffs from a sample
(shared by every worker, reused on resume) and the rules in stats.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from smelt.config import parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.document import Document
from smelt.data.shards import read_shard
from smelt.data.steps.registry import StepContext, register_step, unregister_step
from smelt.quality.scored import KeepRule, ScoredFilter, ScoreSpec, load_cutoffs, pareto_keep, prepare_cutoffs


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: KeepRule = KeepRule()


def _score(docs: list[Document]) -> np.ndarray:
    """Stands in for a model: the share of the letter 'a' among letters (a probability)."""
    out = []
    for d in docs:
        letters = [c for c in d.text.lower() if c.isalpha()]
        out.append(letters.count("a") / len(letters) if letters else float("nan"))
    return np.array(out)


def _specs(options: ToyOptions) -> list[ScoreSpec]:
    return [ScoreSpec(key="quality.toy", label="share of a", higher_is_better=True, reason="quality_low_toy",
                      rule=options.keep, score=_score, bucket_key="quality.toy_bucket")]


def build(options: ToyOptions, context: StepContext) -> ScoredFilter:
    return ScoredFilter("toy_quality", _specs(options), load_cutoffs("toy_quality", context))


def prepare(options: ToyOptions, context: StepContext) -> None:
    prepare_cutoffs("toy_quality", _specs(options), context)


@pytest.fixture
def toy_step():
    register_step("toy_quality", build, options=ToyOptions, prepare=prepare)
    yield
    unregister_step("toy_quality")


def write_inputs(root: Path, n: int = 300) -> Path:
    inp = root / "in"
    inp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in range(2):
        with open(inp / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n // 2):
                k = int(rng.integers(0, 20))
                text = "a" * k + "b" * (20 - k) + f" doc {f} {i}"
                fh.write(json.dumps({"id": f"d{f}-{i}", "text": text}) + "\n")
    return inp


def recipe(root: Path, inp: Path, keep: dict, workers: int = 0):
    off = {"enabled": False}
    return parse_recipe({"name": "q", "runs_dir": str(root / "runs"), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": workers,
        "files_per_task": 1, "language": off, "pii": off,
        "heuristics": {"gopher_quality": off, "gopher_repetition": off, "c4": off, "fineweb": off},
        "dedup": {"exact": off, "minhash": off, "lines": off},
        "steps": [{"name": "toy_quality", "options": {"keep": keep}}]}})


def all_docs(data: Path) -> list[dict]:
    return [d.to_record() for sub in ("clean", "rejects") for f in sorted((data / sub).rglob("*.jsonl*"))
            for d in read_shard(f)]


def test_threshold_scores_every_document_and_records_the_rule(tmp_path: Path, toy_step) -> None:
    r = recipe(tmp_path, write_inputs(tmp_path), {"threshold": 0.3})
    stats = run_data_stage(r.data, r.run_dir)
    docs = all_docs(r.run_dir / "data")
    assert len(docs) == 300
    for d in docs:
        s = d["meta"]["quality"]["toy"]
        assert s == pytest.approx(_score([Document(id="x", text=d["text"])])[0], abs=1e-4)
        assert (d["meta"].get("reason") == "quality_low_toy") == (s < 0.3)
    step = next(s for s in stats["steps"] if s["name"] == "toy_quality")
    assert step["info"]["scores"][0]["cutoffs"] == {"*": {"threshold": 0.3}}
    assert step["info"]["scores"][0]["rule"] == "threshold"


def test_top_fraction_cutoff_from_sample_is_shared_and_reused(tmp_path: Path, toy_step) -> None:
    r = recipe(tmp_path, write_inputs(tmp_path), {"top_fraction": 0.4, "sample_docs": 300}, workers=2)
    stats = run_data_stage(r.data, r.run_dir)
    kept = stats["documents"]["kept"]
    assert 0.3 * 300 <= kept <= 0.5 * 300  # ties at the quantile: scores take 21 values
    step = next(s for s in stats["steps"] if s["name"] == "toy_quality")
    thr = step["info"]["scores"][0]["cutoffs"]["web"]["threshold"]
    for d in all_docs(r.run_dir / "data"):
        assert (d["meta"].get("reason") is None) == (d["meta"]["quality"]["toy"] >= round(thr, 4) - 1e-4)


def test_buckets_record_head_middle_tail(tmp_path: Path, toy_step) -> None:
    r = recipe(tmp_path, write_inputs(tmp_path), {"buckets": [33.3, 66.7], "keep_buckets": ["head"]})
    run_data_stage(r.data, r.run_dir)
    by = {}
    for d in all_docs(r.run_dir / "data"):
        b = d["meta"]["quality"]["toy_bucket"]
        by.setdefault(b, []).append(d["meta"]["quality"]["toy"])
        assert (d["meta"].get("reason") is None) == (b == "head")
    assert set(by) == {"head", "middle", "tail"}
    assert min(by["head"]) >= max(by["middle"]) and min(by["middle"]) >= max(by["tail"])


def test_pareto_is_seeded_by_document_id() -> None:
    assert [pareto_keep("doc-1", 0.2, 9.0) for _ in range(3)] == [pareto_keep("doc-1", 0.2, 9.0)] * 3
    keeps = [pareto_keep(f"d{i}", 0.1, 9.0) for i in range(2000)]
    p = np.mean(keeps)  # P(pareto(9) > 0.9) = (1.9)^-9 ~ 0.0031 for numpy's Lomax draw
    assert p < 0.02
    assert np.mean([pareto_keep(f"d{i}", 0.95, 9.0) for i in range(2000)]) > 0.5


def test_batch_and_single_scoring_agree(tmp_path: Path) -> None:
    spec = _specs(ToyOptions(keep=KeepRule(threshold=0.5)))
    a = ScoredFilter("toy_quality", spec)
    b = ScoredFilter("toy_quality", spec)
    docs = [Document(id=str(i), text="a" * i + "b" * (10 - i)) for i in range(11)]
    copies = [Document(id=d.id, text=d.text) for d in docs]
    assert a.batch(docs) == [b(d) for d in copies]
    assert [d.meta for d in docs] == [d.meta for d in copies]


def test_rules_are_exclusive_and_cutoffs_required() -> None:
    with pytest.raises(ValueError, match="one of"):
        KeepRule(threshold=0.5, top_fraction=0.3)
    with pytest.raises(ValueError, match="increasing"):
        KeepRule(buckets=[70, 30])
    with pytest.raises(ValueError, match="no cutoffs"):
        ScoredFilter("toy_quality", _specs(ToyOptions(keep=KeepRule(top_fraction=0.5))))


def test_resume_reuses_cutoffs_file(tmp_path: Path, toy_step) -> None:
    r = recipe(tmp_path, write_inputs(tmp_path), {"top_fraction": 0.5})
    ctx = StepContext(data=r.data, work_dir=tmp_path / "work")
    ctx.work_dir.mkdir()
    prepare_cutoffs("toy_quality", _specs(ToyOptions(keep=KeepRule(top_fraction=0.5))), ctx)
    path = ctx.work_dir / "toy_quality.cutoffs.json"
    first = json.loads(path.read_text())
    first["cutoffs"]["quality.toy"]["web"]["threshold"] = 0.123  # a resumed stage must use what it wrote
    path.write_text(json.dumps(first))
    prepare_cutoffs("toy_quality", _specs(ToyOptions(keep=KeepRule(top_fraction=0.5))), ctx)
    assert load_cutoffs("toy_quality", ctx)["quality.toy"]["web"]["threshold"] == 0.123
