"""The step registry (`smelt.data.steps.registry`): a step registered from outside smelt.data,
with its own options, runs in spawned curation workers and is counted like a built-in step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from smelt.config import RecipeError, config_hash, parse_recipe, recipe_to_dict
from smelt.data.curate import FORMAT_VERSION, pipeline_steps, plan_tasks, run_data_stage, stage_key
from smelt.data.document import Document
from smelt.data.pipeline import Filter
from smelt.data.steps.registry import StepContext, register_step, registered_steps, unregister_step


class MinWordsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_words: int


class MinWords(Filter):
    """Stands in for a model-based step: rejects documents with fewer than `min_words` words."""

    name = "toy_min_words"

    def __init__(self, opts: MinWordsOptions) -> None:
        super().__init__()
        self.min_words = opts.min_words

    def reject_reason(self, doc: Document) -> str | None:
        n = len(doc.text.split())
        self.count(doc, "words", n)
        return "too_few_words" if n < self.min_words else None


def build_min_words(options: MinWordsOptions, context: StepContext) -> MinWords:
    assert isinstance(options, MinWordsOptions) and context.work_dir is not None
    return MinWords(options)


@pytest.fixture
def toy_step():
    register_step("toy_min_words", build_min_words, options=MinWordsOptions)
    yield
    unregister_step("toy_min_words")


def write_inputs(root: Path) -> Path:
    inp = root / "in"
    inp.mkdir(parents=True)
    for f in range(2):
        with open(inp / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(6):
                words = " ".join(f"word{f}x{i}x{k}" for k in range(3 + 2 * i))  # 3, 5, ..., 13 words
                fh.write(json.dumps({"id": f"d{f}-{i}", "text": f"Line {f} {i}: {words}."}) + "\n")
    return inp


def recipe(root: Path, inp: Path, steps: list) -> object:
    off = {"enabled": False}
    return parse_recipe({"name": "steps", "runs_dir": str(root / "runs"), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": 2,
        "language": off, "pii": off,
        "heuristics": {"gopher_quality": off, "gopher_repetition": off, "c4": off, "fineweb": off},
        "dedup": {"exact": off, "minhash": off, "lines": off}, "steps": steps}})


def test_registered_step_runs_in_two_spawned_workers(tmp_path: Path, toy_step) -> None:
    r = recipe(tmp_path, write_inputs(tmp_path), [{"name": "toy_min_words", "options": {"min_words": 10}}])
    assert [n for n, _ in pipeline_steps(r.data)] == ["normalize", "toy_min_words"]
    stats = run_data_stage(r.data, r.run_dir)
    on_disk = json.loads((r.run_dir / "data" / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    # per file: texts of 6, 8, ..., 16 words (3 + 2i, after "Line f i:") -> 2 of 6 below 10
    assert stats["documents"] == {"input": 12, "kept": 8, "rejected": 4, "duplicates": 0}
    assert stats["rejects_by_reason"] == {"toy_min_words/too_few_words": 4}
    step = next(s for s in on_disk["steps"] if s["name"] == "toy_min_words")
    assert step["total"]["seen"] == 12 and step["total"]["dropped"] == {"too_few_words": 4}
    assert step["total"]["counters"]["words"] == 2 * sum(6 + 2 * i for i in range(6))
    assert [s["name"] for s in on_disk["steps"]] == ["read", "normalize", "toy_min_words"]


def test_registered_step_respects_domains(tmp_path: Path, toy_step) -> None:
    r = recipe(tmp_path, write_inputs(tmp_path),
               [{"name": "toy_min_words", "domains": ["books"], "options": {"min_words": 10}}])
    stats = run_data_stage(r.data, r.run_dir, workers=1)
    assert stats["documents"]["rejected"] == 0


def test_unknown_step_and_bad_options_fail_before_any_work(tmp_path: Path, toy_step) -> None:
    inp = write_inputs(tmp_path)
    with pytest.raises(RecipeError,
                       match=r"data\.steps\.0\.name: unknown step 'qualty'; registered steps: .*toy_min_words"):
        plan_tasks(recipe(tmp_path, inp, [{"name": "qualty"}]).data)
    with pytest.raises(RecipeError, match=r"data\.steps\.0\.options\.min_words: Input should be a valid integer"):
        plan_tasks(recipe(tmp_path, inp, [{"name": "toy_min_words", "options": {"min_words": "ten"}}]).data)
    with pytest.raises(RecipeError, match=r"data\.steps\.0\.options\.max_words: Extra inputs"):
        plan_tasks(recipe(tmp_path, inp, [{"name": "toy_min_words", "options": {"min_words": 1, "max_words": 2}}]).data)
    with pytest.raises(RecipeError,
                       match=r"data\.steps\.0\.name: 'c4' is a built-in step; configure it under data\.heuristics\.c4"):
        plan_tasks(recipe(tmp_path, inp, [{"name": "c4"}]).data)
    assert not (tmp_path / "runs").exists()


def test_registry_refuses_unimportable_factories_and_taken_names(toy_step) -> None:
    with pytest.raises(TypeError, match="not importable by a worker"):
        register_step("lam", lambda options, context: None)
    with pytest.raises(ValueError, match="already registered"):
        register_step("toy_min_words", "elsewhere:build")
    assert registered_steps()["toy_min_words"].factory == f"{__name__}:build_min_words"


def test_stage_key_without_registered_steps_is_unchanged(tmp_path: Path) -> None:
    """Adding `data.steps` (or `data.executor`) must not re-run the curation of existing runs."""
    r = recipe(tmp_path, write_inputs(tmp_path), [])
    plan = plan_tasks(r.data)
    conf = recipe_to_dict(r.data)
    del conf["steps"], conf["executor"], conf["max_task_mb"]
    files = [[f, Path(f).stat().st_size, int(Path(f).stat().st_mtime)] for _, f in plan.files]
    assert stage_key(r.data, plan) == config_hash({"config": conf, "version": FORMAT_VERSION, "files": files})


def test_data_layer_imports_no_model_or_trainer() -> None:
    code = ("import sys, smelt.data.curate, smelt.data.steps.registry, smelt.data.readers, smelt.data.io; "
            "bad = sorted(m for m in sys.modules if m.startswith(('smelt.model', 'smelt.train', 'torch'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
