"""`smelt.quality.train`: a tiny fastText classifier on synthetic prose vs spam, its report
(held-out AUC, indicative n-grams), its outputs, the spec file's errors, and the pieces checked
against fastText itself (feature hashing) or a brute-force reference (ROC-AUC)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fasttext
import numpy as np
import pytest
import yaml

from smelt.config import RecipeError
from smelt.data.document import Document
from smelt.data.shards import ShardWriter
from smelt.quality.classifier import fasttext_text, inspect_fasttext
from smelt.quality.train import (
    NEGATIVE_LABEL,
    POSITIVE_LABEL,
    QualityTrainSpec,
    binary_metrics,
    fasttext_feature_rows,
    load_train_spec,
    roc_auc,
    train_classifier,
)
from tests.quality._textgen import (
    ENDINGS,
    OBJECTS,
    SPAM,
    SUBJECTS,
    TINY_FASTTEXT,
    VERBS,
    prose,
    spam,
    write_classes,
    write_jsonl,
)


def _spec(root: Path, pos: Path, neg: Path, **over) -> QualityTrainSpec:
    tree = {"name": "toy", "out": str(root / "models" / "toy"), "positive": [{"path": str(pos)}],
            "negative": [{"path": str(neg)}], "fasttext": dict(TINY_FASTTEXT)}
    tree.update(over)
    return QualityTrainSpec.model_validate(tree)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtrain")
    pos, neg = write_classes(root, n=300)
    spec = _spec(root, pos, neg)
    return root, spec, train_classifier(spec)


def test_heldout_report_and_outputs(trained) -> None:
    root, spec, rep = trained
    out = Path(rep["out"])
    assert out == spec.out_dir and rep["moved_aside"] is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.bin", "report.json", "report.md"]
    h = rep["heldout"]
    assert h["roc_auc"] > 0.9 and h["f1"] > 0.9
    assert h["positive"] == rep["counts"]["heldout"]["positive"] > 0
    assert h["negative"] == rep["counts"]["heldout"]["negative"] > 0
    c = rep["counts"]
    assert c["read"] == {"positive": 300, "negative": 300}
    assert c["train"]["positive"] + c["heldout"]["positive"] == 300
    assert 0.03 < c["heldout"]["positive"] / 300 < 0.2  # heldout_fraction 0.1, by id hash
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_sha256"] == hashlib.sha256((out / "model.bin").read_bytes()).hexdigest()
    assert cfg["labels"] == {"positive": POSITIVE_LABEL, "negative": NEGATIVE_LABEL}
    assert cfg["fasttext"]["wordNgrams"] == 2 and cfg["fasttext"]["thread"] >= 11
    assert cfg["spec"]["name"] == "toy" and cfg["smelt_version"]
    assert json.loads((out / "report.json").read_text())["heldout"] == h
    md = (out / "report.md").read_text()
    assert "| ROC-AUC |" in md and "Most indicative n-grams" in md
    assert set(inspect_fasttext(out / "model.bin").labels) == {POSITIVE_LABEL, NEGATIVE_LABEL}


def test_indicative_ngrams_per_class(trained) -> None:
    _, _, rep = trained
    top = rep["top_ngrams"]
    assert set(top) == {POSITIVE_LABEL, NEGATIVE_LABEL}
    prose_words = {w.strip(".").lower() for part in SUBJECTS + VERBS + OBJECTS + ENDINGS for w in part.split()}
    spam_words = {w for s in SPAM for w in s.split()} - prose_words  # "of" and "on" are in both
    for rows in top.values():
        assert len(rows) == 20
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
        assert all(r["count"] >= 5 for r in rows)
    neg = [r["ngram"] for r in top[NEGATIVE_LABEL]]
    pos = [r["ngram"] for r in top[POSITIVE_LABEL]]
    assert sum(all(w in spam_words for w in g.split()) for g in neg) >= 15
    assert not any(any(w in spam_words for w in g.split()) for g in pos)
    assert any(" " in g for g in neg + pos)  # bigrams are listed too


def test_retraining_moves_the_old_model_aside(tmp_path: Path) -> None:
    pos, neg = write_classes(tmp_path, n=80)
    spec = _spec(tmp_path, pos, neg)
    first = train_classifier(spec)
    old = hashlib.sha256(Path(first["model"]).read_bytes()).hexdigest()
    second = train_classifier(spec)
    prev = spec.out_dir.with_name("toy.prev-1")
    assert second["moved_aside"] == str(prev)
    assert hashlib.sha256((prev / "model.bin").read_bytes()).hexdigest() == old
    assert (spec.out_dir / "model.bin").is_file()
    assert not [p for p in spec.out_dir.parent.iterdir() if ".tmp-" in p.name]


def test_max_docs_balance_and_shard_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pos, neg = write_classes(tmp_path, n=120)
    data = tmp_path / "runs" / "r" / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"stage": "data", "complete": True}))
    with ShardWriter(data / "clean" / "web" / "part-00000.jsonl.zst", "jsonl.zst") as w:
        for i in range(60):
            w.write(Document(id=f"c{i}", text=prose(rng), domain="web"))
    with ShardWriter(data / "rejects" / "part-00000.jsonl.zst", "jsonl.zst") as w:
        for i in range(90):
            w.write(Document(id=f"r{i}", text=spam(rng), domain="web",
                             meta={"rejected_by": "c4" if i % 3 else "gopher_quality", "reason": "x"}))
    spec = _spec(tmp_path, pos, neg, positive=[{"path": str(pos), "max_docs": 50},
                                               {"path": str(data / "clean" / "web"), "domains": ["web"]}],
                 negative=[{"path": str(neg)}, {"path": str(data / "rejects"), "rejected_by": ["c4"]}])
    rep = train_classifier(spec)
    c = rep["counts"]
    assert c["sources"] == {"positive": [50, 60], "negative": [120, 60]}
    assert c["read"] == {"positive": 110, "negative": 180}
    assert (c["train"]["positive"] + c["heldout"]["positive"]
            == c["train"]["negative"] + c["heldout"]["negative"] == 110)  # balanced by down-sampling
    again = train_classifier(spec.model_copy(update={"out": tmp_path / "again"}))
    assert again["counts"] == c  # samples and split depend on ids and the seed only
    unbalanced = train_classifier(spec.model_copy(update={"balance": False, "out": tmp_path / "u"}))
    assert unbalanced["counts"]["train"]["negative"] + unbalanced["counts"]["heldout"]["negative"] == 180


def test_a_class_without_documents_fails(tmp_path: Path) -> None:
    pos, _ = write_classes(tmp_path, n=20)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["   "], "e")
    with pytest.raises(RecipeError, match="no negative documents"):
        train_classifier(_spec(tmp_path, pos, empty))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_spec_file_errors_name_key_paths(tmp_path: Path) -> None:
    pos, neg = write_classes(tmp_path, n=10)

    def load(tree) -> QualityTrainSpec:
        f = tmp_path / "spec.yaml"
        f.write_text(yaml.safe_dump(tree))
        return load_train_spec(f)

    ok = {"name": "m", "positive": [{"path": str(pos)}], "negative": [{"path": str(neg)}]}
    spec = load(ok)
    assert spec.out_dir == Path("models/m") and spec.fasttext.word_ngrams == 2
    with pytest.raises(RecipeError, match=r"fasttext\.dimm: unknown key; allowed keys here: .*dim"):
        load({**ok, "fasttext": {"dimm": 3}})
    with pytest.raises(RecipeError, match=r"negative: required key is missing"):
        load({"name": "m", "positive": ok["positive"]})
    with pytest.raises(RecipeError, match=r"positive\.0\.path: .*nope"):
        load({**ok, "positive": [{"path": str(tmp_path / "nope")}]})
    with pytest.raises(RecipeError, match=r"negative\.0\.path: domains and rejected_by select curation shards"):
        load({**ok, "negative": [{"path": str(neg), "domains": ["web"]}]})
    with pytest.raises(RecipeError, match=r"heldout_fraction"):
        load({**ok, "heldout_fraction": 0})
    (tmp_path / "dup.yaml").write_text("name: a\nname: b\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_train_spec(tmp_path / "dup.yaml")


def test_roc_auc_against_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(200) < 0.4
        s = rng.integers(0, 10, 200).astype(float)  # many ties
        pos, neg = s[y], s[~y]
        ref = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
        assert roc_auc(y, s) == pytest.approx(ref, abs=1e-12)
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    m = binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["roc_auc"]) == (0.5, 0.5, 0.5, 0.5, 0.75)


def test_feature_rows_reproduce_fasttext_hashing(trained) -> None:
    _, spec, rep = trained
    model = fasttext.load_model(rep["model"])
    for text in ["The river described the history of the region", "click here buy now unseenword",
                 fasttext_text("Ünïcödé wörds 中文字符 and  tabs\there"), "x"]:
        rows = fasttext_feature_rows(model, text)
        mean = np.mean([model.get_input_vector(r) for r in rows], axis=0)
        np.testing.assert_allclose(mean, model.get_sentence_vector(text), atol=1e-6)


def test_fasttext_text_normalization() -> None:
    assert fasttext_text("  Hello\nworld\r\nagain\u2028end  ") == "Hello world again end"
    assert fasttext_text("数据abc清洗") == " 数  据 abc 清  洗 "
    assert fasttext_text("abcdef", max_chars=3) == "abc"
    assert fasttext_text("a\ud800b") == "a\ufffdb"
    assert "\n" not in fasttext_text("\n".join(["line"] * 5))


def test_cli_quality_train(tmp_path: Path, capsys) -> None:
    from smelt.cli import main

    pos, neg = write_classes(tmp_path, n=80)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "cli", "positive": [{"path": str(pos)}],
                                         "negative": [{"path": str(neg)}], "fasttext": dict(TINY_FASTTEXT)}))
    out = tmp_path / "m"
    assert main(["quality", "train", str(spec_file), "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"] == str(out / "model.bin") and rep["heldout"]["roc_auc"] > 0.9
    assert {p.name for p in out.iterdir()} == {"model.bin", "config.json", "report.json", "report.md"}
    # markdown by default; a wrong key is a clear error (exit 2), and --set is refused
    assert main(["quality", "train", str(spec_file), "--out", str(out)]) == 0
    assert "ROC-AUC" in capsys.readouterr().out and (tmp_path / "m.prev-1" / "model.bin").is_file()
    spec_file.write_text(yaml.safe_dump({"name": "cli", "positive": [{"path": str(pos)}],
                                         "negative": [{"path": str(neg)}], "epochs": 3}))
    assert main(["quality", "train", str(spec_file)]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["quality", "train", str(spec_file), "--set", "a=1"]) == 2


def test_text_sources_split_into_paragraphs(tmp_path: Path) -> None:
    """A .txt source is one document per file unless `txt_split: paragraph` asks for paragraphs."""
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    rng = np.random.default_rng(0)
    pos.write_text("\n\n".join(prose(rng) for _ in range(60)), encoding="utf-8")
    neg.write_text("\n\n".join(spam(rng) for _ in range(60)), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"documents in the (heldout|train) split"):  # one document per file
        train_classifier(_spec(tmp_path, pos, neg))
    spec = QualityTrainSpec.model_validate({
        "name": "txt", "out": str(tmp_path / "m"), "fasttext": dict(TINY_FASTTEXT),
        "positive": [{"path": str(pos), "txt_split": "paragraph"}],
        "negative": [{"path": str(neg), "txt_split": "paragraph"}]})
    rep = train_classifier(spec)
    assert rep["counts"]["read"] == {"positive": 60, "negative": 60}
    assert rep["heldout"]["roc_auc"] > 0.9
