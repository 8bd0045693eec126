"""The ``quality`` step: a fastText model trained by `train_classifier` in real curation runs
(scores on every document, threshold / Pareto / top-fraction rules, kill-and-resume identity),
bad model files refused before any work, and Hugging Face classifiers compared with the model
called directly."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from smelt.config import RecipeError, parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.document import Document
from smelt.data.shards import read_shard
from smelt.quality.classifier import (
    ModelSpec,
    QualityOptions,
    _HFScorer,
    fasttext_probs,
    fasttext_text,
    inspect_fasttext,
    load_fasttext,
)
from smelt.quality.scored import ScoredFilter, pareto_keep
from smelt.quality.train import QualityTrainSpec, train_classifier
from tests.quality._textgen import ENDINGS, OBJECTS, SPAM, SUBJECTS, TINY_FASTTEXT, VERBS, prose, spam, write_classes


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qmodel")
    pos, neg = write_classes(root, n=300)
    spec = QualityTrainSpec.model_validate({"name": "toy", "out": str(root / "toy"), "positive": [{"path": str(pos)}],
                                            "negative": [{"path": str(neg)}], "fasttext": TINY_FASTTEXT})
    return Path(train_classifier(spec)["model"])


def write_inputs(root: Path, n: int = 60) -> Path:
    """Two files of prose, spam and half-and-half documents; ids of the second file start with b."""
    inp = root / "in"
    inp.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for f, prefix in enumerate("ab"):
        with open(inp / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n):
                kind = i % 3
                text = prose(rng) if kind == 0 else spam(rng) if kind == 1 else prose(rng) + "\n" + spam(rng)
                fh.write(json.dumps({"id": f"{prefix}{i}", "text": text}) + "\n")
    return inp


def recipe(root: Path, inp: Path, models: list[dict], name: str = "q", workers: int = 1):
    off = {"enabled": False}
    return parse_recipe({"name": name, "runs_dir": str(root / "runs"), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": workers,
        "files_per_task": 1, "language": off, "pii": off,
        "heuristics": {"gopher_quality": off, "gopher_repetition": off, "c4": off, "fineweb": off},
        "dedup": {"exact": off, "minhash": off, "lines": off},
        "steps": [{"name": "quality", "options": {"models": models}}]}})


def all_docs(data: Path) -> list[dict]:
    return [d.to_record() for sub in ("clean", "rejects") for f in sorted((data / sub).rglob("*.jsonl*"))
            for d in read_shard(f)]


def test_threshold_scores_kept_and_rejected_documents(tmp_path: Path, model: Path) -> None:
    r = recipe(tmp_path, write_inputs(tmp_path), [{"name": "toy", "path": str(model), "keep": {"threshold": 0.5}}])
    stats = run_data_stage(r.data, r.run_dir)
    docs = all_docs(r.run_dir / "data")
    assert len(docs) == 120
    ft = load_fasttext(model)
    ref = fasttext_probs(ft, [fasttext_text(d["text"]) for d in docs], "__label__hq")
    for d, p in zip(docs, ref):
        s = d["meta"]["quality"]["toy"]
        assert s == round(float(p), 4)
        assert (d["meta"].get("reason") == "quality_low_toy") == (s < 0.5)
    by_kind = {k: [d["meta"]["quality"]["toy"] for d in docs if int(d["id"][1:]) % 3 == k] for k in range(3)}
    assert min(by_kind[0]) > 0.7 and max(by_kind[1]) < 0.3  # prose kept, spam rejected
    kept = stats["documents"]["kept"]
    assert 40 <= kept <= 80 and stats["rejects_by_reason"] == {"quality/quality_low_toy": 120 - kept}
    info = next(s for s in stats["steps"] if s["name"] == "quality")["info"]["scores"][0]
    assert info["key"] == "quality.toy" and info["label"] == "fastText classifier model.bin, P(__label__hq)"


def test_two_models_threshold_then_pareto(tmp_path: Path, model: Path) -> None:
    models = [{"name": "a", "path": str(model), "keep": {"threshold": 0.3}},
              {"name": "b", "path": str(model), "label": "hq", "keep": {"pareto_alpha": 9}}]
    r = recipe(tmp_path, write_inputs(tmp_path), models)
    run_data_stage(r.data, r.run_dir)
    reasons = set()
    for d in all_docs(r.run_dir / "data"):
        a, b = d["meta"]["quality"]["a"], d["meta"]["quality"]["b"]
        assert a == b
        want = "quality_low_a" if a < 0.3 else (None if pareto_keep(d["id"], b, 9.0) else "quality_low_b")
        assert d["meta"].get("reason") == want
        reasons.add(want)
    assert reasons == {None, "quality_low_a", "quality_low_b"}


def _digest(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file() and f.name != "manifest.json"}


def test_interrupted_stage_resumes_to_identical_output(tmp_path: Path, model: Path, monkeypatch) -> None:
    inp = write_inputs(tmp_path)
    models = [{"name": "toy", "path": str(model), "keep": {"top_fraction": 0.5}}]
    r = recipe(tmp_path, inp, models, name="resumed")
    real = ScoredFilter.process_batch

    def dies_on_second_file(self, docs):
        if any(d.id.startswith("b") for d in docs):
            raise KeyboardInterrupt("killed")
        return real(self, docs)

    monkeypatch.setattr(ScoredFilter, "process_batch", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        run_data_stage(r.data, r.run_dir)
    work = r.run_dir / "data" / "_work"
    assert not (r.run_dir / "data" / "manifest.json").exists()
    assert [p.name for p in (work / "filter.done").iterdir()] == ["00000.json"]
    cutoffs = json.loads((work / "quality.cutoffs.json").read_text())
    monkeypatch.setattr(ScoredFilter, "process_batch", real)
    resumed = run_data_stage(r.data, r.run_dir)
    s = recipe(tmp_path, inp, models, name="straight")
    straight = run_data_stage(s.data, s.run_dir)
    assert resumed == straight
    info = next(x for x in straight["steps"] if x["name"] == "quality")["info"]["scores"][0]
    assert info["cutoffs"] == cutoffs["cutoffs"]["quality.toy"]
    a, b = _digest(r.run_dir / "data"), _digest(s.run_dir / "data")
    assert a == b and len(a) >= 4


# --------------------------------------------------------------------------------------------
# bad model files: RecipeError naming the key, before any shard is written


def _truncated(model: Path, tmp: Path) -> Path:
    p = tmp / "truncated.bin"
    data = model.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def _random(model: Path, tmp: Path) -> Path:
    p = tmp / "random.bin"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    return p


def _empty(model: Path, tmp: Path) -> Path:
    p = tmp / "empty.bin"
    p.write_bytes(b"")
    return p


@pytest.mark.parametrize("make,key,msg", [
    (lambda m, t: t / "missing.bin", "path", "model file not found"),
    (_truncated, "path", "truncated fastText model"),
    (_random, "path", "not a fastText model"),
    (_empty, "path", "not a fastText model"),
    (lambda m, t: m, "label", "'__label__good' is not a label"),
    (lambda m, t: m.parent, "path", "not a file"),
])
def test_bad_model_files_fail_before_any_work(tmp_path: Path, model: Path, make, key, msg) -> None:
    path = make(model, tmp_path)
    spec = {"name": "toy", "path": str(path), "keep": {"threshold": 0.5}}
    if key == "label":
        spec["label"] = "__label__good"
    r = recipe(tmp_path, write_inputs(tmp_path), [spec])
    with pytest.raises(RecipeError, match=rf"data\.steps\.0\.options\.models\.0\.{key}: .*{msg}"):
        run_data_stage(r.data, r.run_dir)
    assert not (r.run_dir / "data").exists()


def test_fasttext_header_and_option_checks(model: Path) -> None:
    info = inspect_fasttext(model)
    assert info.supervised and info.word_ngrams == 2 and info.dim == 16 and not info.quantized
    assert info.size == model.stat().st_size and set(info.labels) == {"__label__hq", "__label__lq"}
    with pytest.raises(ValidationError, match="options of kind hf"):
        ModelSpec(name="x", path=model, keep={}, batch_size=8)
    with pytest.raises(ValidationError, match="given twice"):
        QualityOptions(models=[{"name": "x", "path": model, "keep": {}}] * 2)
    with pytest.raises(ValidationError, match="keep"):
        ModelSpec(name="x", path=model)  # a keep rule is required ({} scores only)
    assert ModelSpec(name="x", path=model, label="lq", keep={}).label == "__label__lq"


# --------------------------------------------------------------------------------------------
# Hugging Face sequence classifiers


def _hf_model(root: Path, num_labels: int) -> Path:
    """A tiny random BERT sequence classifier with a word-level tokenizer, saved to `root`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = sorted({w.strip(".!|%").lower() for part in SUBJECTS + VERBS + OBJECTS + ENDINGS + SPAM
                    for w in part.split()} - {""})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    labels = {0: "lq", 1: "hq"} if num_labels == 2 else {0: "LABEL_0"}
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels, id2label=labels,
                     label2id={v: k for k, v in labels.items()},
                     problem_type="regression" if num_labels == 1 else "single_label_classification")
    torch.manual_seed(0)
    m = BertForSequenceClassification(cfg)
    out = root / f"bert-{num_labels}"
    m.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"classifier": _hf_model(root, 2), "regressor": _hf_model(root, 1)}


def _texts() -> list[str]:
    rng = np.random.default_rng(3)
    return [prose(rng) if i % 2 else spam(rng) for i in range(9)] + ["a few unknown zyzzyva words", "hq"]


def _reference(path: Path, texts: list[str], head) -> np.ndarray:
    """Each text alone through the model, no padding."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, truncation=True, max_length=64, return_tensors="pt")
            out.append(float(head(m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0])))
    return np.array(out)


def test_hf_classifier_scores_are_the_models_softmax(hf_dirs) -> None:
    path = hf_dirs["classifier"]
    texts = _texts()
    docs = [Document(id=str(i), text=t) for i, t in enumerate(texts)]
    spec = dict(name="bert", kind="hf", path=path, label="hq", keep={}, device="cpu", max_length=64)
    one = _HFScorer(ModelSpec(**spec, batch_size=1), threads=None)(docs)
    four = _HFScorer(ModelSpec(**spec, batch_size=4), threads=None)(docs)
    ref = _reference(path, texts, lambda logits: logits.softmax(-1)[1])
    np.testing.assert_allclose(one, ref, atol=1e-6)
    np.testing.assert_allclose(four, one, atol=1e-5)
    assert np.ptp(one) > 0  # the texts do not all score alike
    assert np.isnan(_HFScorer(ModelSpec(**spec), threads=None)([Document(id="e", text="  ")])[0])


def test_hf_regressor_scores_its_output(hf_dirs) -> None:
    path = hf_dirs["regressor"]
    texts = _texts()
    docs = [Document(id=str(i), text=t) for i, t in enumerate(texts)]
    spec = ModelSpec(name="edu", kind="hf", output="regressor", path=path, keep={"threshold": 0.0}, device="cpu",
                     max_length=64, batch_size=3)
    np.testing.assert_allclose(_HFScorer(spec, threads=None)(docs), _reference(path, texts, lambda lg: lg[0]),
                               atol=1e-5)


def test_hf_step_in_a_curation_run(tmp_path: Path, hf_dirs) -> None:
    m = {"name": "bert", "kind": "hf", "path": str(hf_dirs["classifier"]), "label": "hq", "device": "cpu",
         "batch_size": 8, "max_length": 128, "keep": {"top_fraction": 0.5}}
    r = recipe(tmp_path, write_inputs(tmp_path, n=20), [m])
    stats = run_data_stage(r.data, r.run_dir)
    docs = all_docs(r.run_dir / "data")
    assert len(docs) == 40 and all(0.0 <= d["meta"]["quality"]["bert"] <= 1.0 for d in docs)
    assert 12 <= stats["documents"]["kept"] <= 28


def test_hf_model_checks(tmp_path: Path, hf_dirs) -> None:
    clf, reg = hf_dirs["classifier"], hf_dirs["regressor"]

    def spec(**kw) -> ModelSpec:
        return ModelSpec(**{"name": "m", "kind": "hf", "keep": {}, "label": "hq", "path": clf, **kw})

    with pytest.raises(ValidationError, match="not a label"):
        spec(label="good")
    with pytest.raises(ValidationError, match="give the positive label, one of: lq, hq"):
        spec(label=None)
    with pytest.raises(ValidationError, match="one output"):
        spec(output="regressor", label=None)
    with pytest.raises(ValidationError, match="is a regressor"):
        spec(path=reg, label=None)
    with pytest.raises(ValidationError, match=r"max_length 512 is longer than .*max_position_embeddings \(128\)"):
        spec(max_length=512)
    with pytest.raises(ValidationError, match="pareto_alpha needs a probability"):
        spec(path=reg, output="regressor", label=None, keep={"pareto_alpha": 9})
    bad = tmp_path / "not-a-classifier"
    bad.mkdir()
    cfg = json.loads((clf / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    with pytest.raises(ValidationError, match="no ...ForSequenceClassification"):
        spec(path=bad)
    r = recipe(tmp_path, write_inputs(tmp_path, n=3), [{"name": "m", "kind": "hf", "path": str(tmp_path),
                                                        "label": "hq", "keep": {}}])
    with pytest.raises(RecipeError, match=r"data\.steps\.0\.options\.models\.0\.path: .*no config\.json"):
        run_data_stage(r.data, r.run_dir)
    assert not (r.run_dir / "data").exists() and os.path.isdir(clf)
