"""`smelt.quality.toxicity`: the flagged-word ratio (exact numbers on hand-written English and
Chinese text), the shipped lists against their provenance record, the classifier (skipped without
the ``smelt[toxicity]`` extra), a real curation run, and recipe errors before any work."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from importlib import resources
from pathlib import Path

import pytest

from smelt.config import RecipeError, parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.document import Document
from smelt.data.shards import read_shard
from smelt.data.steps.registry import StepContext, check_steps
from smelt.quality.toxicity import (
    FlaggedWords,
    FlaggedWordsOptions,
    ToxicityOptions,
    build,
    builtin_words,
    load_flagged_words,
    words,
)

HAS_CLASSIFIER = importlib.util.find_spec("profanity_check") is not None and importlib.util.find_spec("sklearn")
needs_classifier = pytest.mark.skipif(not HAS_CLASSIFIER, reason="needs the smelt[toxicity] extra "
                                      "(alt-profanity-check, scikit-learn)")
WORDS_ONLY = {"classifier": None}

# --------------------------------------------------------------------------------------------
# flagged-word ratio


def test_english_words_are_tokens_stripped_of_edge_punctuation() -> None:
    assert words("(Ass!) , don't -- G-spot 2g1c ...") == ["ass", "don't", "g-spot", "2g1c"]
    assert words(" ... -- ") == []


def test_english_ratio_counts_whole_words_case_insensitively() -> None:
    fw = FlaggedWords(en=["ass", "Ball Gag"], zh=[])
    # 9 words, one flagged; "classic", "Scunthorpe", "bass", "assistant" hold "ass" but are other words
    assert fw.en_ratio("You stupid ASS, this is a classic from Scunthorpe.") == 1 / 9
    assert fw.en_ratio("A classic bass, an assistant and Scunthorpe's passage") == 0.0
    assert fw.en_ratio("ass , ASS .") == 1.0  # punctuation-only tokens are not words
    assert math.isnan(fw.en_ratio(" -- ... "))  # no words: no score


def test_english_multiword_entries_cover_all_their_words_longest_first() -> None:
    fw = FlaggedWords(en=["ball", "ball gag", "gag order"], zh=[])
    assert fw.en_ratio("He wore a BALL GAG.") == 2 / 5
    assert fw.en_ratio("ball gag order") == 2 / 3  # "ball gag" wins at position 0; no overlap with "gag order"
    assert fw.en_ratio("a ball, a ball gag") == 3 / 5
    assert fw.en_ratio("a ball-gag") == 0.0  # one word, "ball-gag", is no entry


def test_chinese_ratio_is_flagged_characters_over_han_characters() -> None:
    fw = FlaggedWords(en=[], zh=["他妈", "他妈的", "傻逼", "卖B"])
    # 14 Han characters; 他妈的 (the longest entry at that position) and 傻逼 cover 5
    assert fw.zh_ratio("你他妈的是个傻逼。今天天气很好") == 5 / 14
    assert fw.zh_ratio("他在卖b") == 1 / 3  # case-insensitive; only the Han character of 卖B counts
    assert fw.zh_ratio("今天天气很好") == 0.0
    assert math.isnan(fw.zh_ratio("no Chinese here"))


def test_builtin_lists_match_their_provenance_and_skip_single_characters() -> None:
    root = resources.files("smelt").joinpath("resources/flagged_words")
    record = root.joinpath("PROVENANCE.md").read_text(encoding="utf-8")
    for name in ("en.json", "zh.json", "LICENSE"):
        digest = hashlib.sha256(root.joinpath(name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}`.*sha256 `{digest}`", record), f"{name} differs from PROVENANCE.md"
    assert len(builtin_words("en")) == 403 and len(builtin_words("zh")) == 319
    fw = load_flagged_words(FlaggedWordsOptions())
    assert fw.en_ratio("what a classic ass") == 1 / 4
    assert fw.en_ratio("She wore a ball gag") == 2 / 5  # a phrase of the LDNOOBW list
    assert fw.zh_ratio("女性喝牛奶") == 0.0  # 性 and 奶 are single-character entries: skipped by default
    assert load_flagged_words(FlaggedWordsOptions(zh_min_chars=1)).zh_ratio("女性喝牛奶") == 2 / 5
    assert fw.zh_ratio("你他妈的是个傻逼") == 5 / 8


def test_extra_word_files_join_the_list_of_their_script(tmp_path: Path) -> None:
    f = tmp_path / "words.txt"
    f.write_text("# our own list\nfoobar\nBaz Qux\n\n坏词\n", encoding="utf-8")
    fw = load_flagged_words(FlaggedWordsOptions(builtin=False, files=[f]))
    assert fw.en_ratio("Foobar and baz qux") == 3 / 4
    assert fw.zh_ratio("这是坏词") == 2 / 4
    assert fw.en_ratio("what a classic ass") == 0.0  # builtin: false


# --------------------------------------------------------------------------------------------
# the step's scores and languages


def _scores(options: dict, docs: list[Document]) -> list[dict]:
    step = build(ToxicityOptions.model_validate(options), StepContext(data=None, work_dir=None))  # type: ignore[arg-type]
    step.batch(docs)
    return [d.meta["toxicity"] for d in docs]


def test_languages_decide_what_is_scored() -> None:
    def ratios(options: dict) -> list[float | None]:
        docs = [Document(id="en", text="what a classic ass", meta={"language": "en"}),
                Document(id="zh", text="你他妈的是个傻逼", meta={"language": "zh"}),
                Document(id="fr", text="quel ass", meta={"language": "fr"}),
                Document(id="none", text="what a classic ass")]
        return [m["flagged_ratio"] for m in _scores({**WORDS_ONLY, **options}, docs)]

    assert ratios({}) == [0.25, 0.625, None, None]
    assert ratios({"flagged_words": {"languages": ["zh"]}}) == [None, 0.625, None, None]
    assert ratios({"assume_language": "en"}) == [0.25, 0.625, None, 0.25]  # only where meta.language is unset


@needs_classifier
def test_classifier_scores_toxic_high_and_neutral_low() -> None:
    toxic = ["You are a fucking idiot and I hate you.", "Shut up, you stupid bitch.",
             "Go to hell, you worthless piece of shit."]
    neutral = ["The committee approved the budget for the new library on Tuesday.",
               "Lobsters are blue in life and turn red when cooked.",
               "Add the flour and stir until the dough is smooth."]
    docs = [Document(id=str(i), text=t, meta={"language": "en"}) for i, t in enumerate(toxic + neutral)]
    docs.append(Document(id="zh", text="你他妈的是个傻逼", meta={"language": "zh"}))
    got = [m["score"] for m in _scores({"flagged_words": None}, docs)]
    assert all(s > 0.99 for s in got[:3]), got
    assert all(s < 0.3 for s in got[3:6]), got
    assert got[6] is None  # English only
    assert all("flagged_ratio" not in m for m in (d.meta["toxicity"] for d in docs))


# --------------------------------------------------------------------------------------------
# a real curation run

DOCS = [
    ("clean-1", "The committee approved the budget for the new library on Tuesday after a long debate."),
    ("clean-2", "Lobsters are blue in life and turn red when cooked; they are caught in pots around the coast."),
    ("insult", "You are a fucking idiot and I hate you. Shut up, you stupid bitch."),
    ("anatomy", "The anatomy lecture covered the anus, the rectum and the colon."),  # 2 flagged words of 11
    ("zh-clean", "今天天气很好，我们去公园散步吧。公园里有很多人在跑步和下棋。"),
    ("zh-toxic", "你他妈的是个傻逼，滚开，别再来烦我了。"),
    ("fr", "Le comité a approuvé le budget de la nouvelle bibliothèque mardi dernier après un long débat."),
]


def _recipe(root: Path, options: dict):
    inp = root / "in"
    inp.mkdir(exist_ok=True)
    with open(inp / "part-0.jsonl", "w", encoding="utf-8") as fh:
        for i, t in DOCS:
            fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    off = {"enabled": False}
    return parse_recipe({"name": "tox", "runs_dir": str(root / "runs"), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": 1,
        "language": {"allowed": []}, "pii": off,
        "heuristics": {"gopher_quality": off, "gopher_repetition": off, "c4": off, "fineweb": off},
        "dedup": {"exact": off, "minhash": off, "lines": off},
        "steps": [{"name": "toxicity", "options": options}]}})


def _run(root: Path, options: dict) -> tuple[dict[str, dict], dict]:
    r = _recipe(root, options)
    run_data_stage(r.data, r.run_dir)
    data = r.run_dir / "data"
    docs = {d.id: d.to_record() for sub in ("clean", "rejects") for f in sorted((data / sub).rglob("*.jsonl*"))
            for d in read_shard(f)}
    return docs, json.loads((data / "stats.json").read_text())


def _step(stats: dict) -> dict:
    return next(s for s in stats["steps"] if s["name"] == "toxicity")


@needs_classifier
def test_curation_run_writes_scores_reasons_and_counts(tmp_path: Path) -> None:
    docs, stats = _run(tmp_path, {})
    assert set(docs) == {i for i, _ in DOCS}
    for d in docs.values():  # every document carries both scores, kept or rejected
        assert set(d["meta"]["toxicity"]) == {"score", "flagged_ratio"}
    reasons = {i: d["meta"].get("reason") for i, d in docs.items()}
    assert reasons == {"clean-1": None, "clean-2": None, "insult": "toxic_classifier",
                       "anatomy": "toxic_flagged_words", "zh-clean": None, "zh-toxic": "toxic_flagged_words",
                       "fr": None}
    assert docs["insult"]["meta"]["rejected_by"] == "toxicity"
    assert docs["anatomy"]["meta"]["toxicity"]["flagged_ratio"] == round(2 / 11, 4)
    assert docs["anatomy"]["meta"]["toxicity"]["score"] < 0.9
    assert docs["zh-toxic"]["meta"]["toxicity"]["score"] is None
    assert docs["fr"]["meta"]["toxicity"] == {"score": None, "flagged_ratio": None}
    total = _step(stats)["total"]
    assert total["seen"] == 7 and total["kept"] == 4
    assert total["dropped"] == {"toxic_classifier": 1, "toxic_flagged_words": 2}
    assert total["counters"] == {"unscored:toxicity.score": 3, "unscored:toxicity.flagged_ratio": 1}
    assert stats["rejects_by_reason"] == {"toxicity/toxic_classifier": 1, "toxicity/toxic_flagged_words": 2}
    info = {s["key"]: s for s in _step(stats)["info"]["scores"]}
    assert info["toxicity.score"]["cutoffs"] == {"*": {"threshold": 0.9}}
    assert info["toxicity.flagged_ratio"]["cutoffs"] == {"*": {"threshold": 0.045}}
    assert not info["toxicity.score"]["higher_is_better"]
    assert "alt-profanity-check" in info["toxicity.score"]["label"]


def test_ratio_only_run_needs_no_classifier(tmp_path: Path) -> None:
    docs, stats = _run(tmp_path, {**WORDS_ONLY, "flagged_words": {"keep": {"threshold": 0.05}}})
    assert all(set(d["meta"]["toxicity"]) == {"flagged_ratio"} for d in docs.values())
    rejected = {i for i, d in docs.items() if d["meta"].get("reason")}
    assert rejected == {"insult", "anatomy", "zh-toxic"}  # "fucking" and "bitch": 2 words of 14
    assert _step(stats)["total"]["dropped"] == {"toxic_flagged_words": 3}


@needs_classifier
def test_classifier_only_run(tmp_path: Path) -> None:
    docs, stats = _run(tmp_path, {"flagged_words": None})
    assert all(set(d["meta"]["toxicity"]) == {"score"} for d in docs.values())
    assert {i for i, d in docs.items() if d["meta"].get("reason")} == {"insult"}
    assert _step(stats)["total"]["dropped"] == {"toxic_classifier": 1}


# --------------------------------------------------------------------------------------------
# recipe errors, before any work


@pytest.mark.parametrize("options, message", [
    ({**WORDS_ONLY, "flagged_words": {"files": ["/nonexistent/words.txt"]}},
     r"data\.steps\.0\.options\.flagged_words\.files: .*flagged-word file not found: /nonexistent/words\.txt"),
    ({"classifier": None, "flagged_words": None}, "both null"),
    ({**WORDS_ONLY, "flagged_words": {"builtin": False}}, "no flagged words"),
    ({**WORDS_ONLY, "flagged_words": {"keep": {"pareto_alpha": 9}}}, "lower-is-better"),
    ({**WORDS_ONLY, "flagged_words": {"languages": ["fr"]}}, "flagged_words.languages"),
])
def test_bad_options_fail_before_any_work(tmp_path: Path, options: dict, message: str) -> None:
    r = _recipe(tmp_path, options)
    with pytest.raises(RecipeError, match=message):
        check_steps(r.data)
    with pytest.raises(RecipeError, match=message):
        run_data_stage(r.data, r.run_dir)
    assert not (r.run_dir / "data" / "clean").exists()


def test_missing_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "profanity_check" else real(name, *a))
    r = _recipe(tmp_path, {})
    with pytest.raises(RecipeError, match=r"smelt\[toxicity\].*classifier: null"):
        check_steps(r.data)


def test_interrupted_stage_resumes_to_identical_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while scoring its second input file, the stage resumes to the bytes of a straight run."""
    from smelt.quality.scored import ScoredFilter

    def two_files(root: Path):
        root.mkdir()
        r = _recipe(root, WORDS_ONLY)
        src = root / "in" / "part-0.jsonl"
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        src.write_text("".join(lines[:4]), encoding="utf-8")
        (root / "in" / "part-1.jsonl").write_text("".join(lines[4:]), encoding="utf-8")
        return r

    r = two_files(tmp_path / "a")
    real = ScoredFilter.process_batch

    def dies_on_second_file(self, docs):
        if any(d.id in ("zh-toxic", "fr") for d in docs):
            raise KeyboardInterrupt("killed")
        return real(self, docs)

    monkeypatch.setattr(ScoredFilter, "process_batch", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        run_data_stage(r.data, r.run_dir)
    assert [p.name for p in (r.run_dir / "data" / "_work" / "filter.done").iterdir()] == ["00000.json"]
    monkeypatch.setattr(ScoredFilter, "process_batch", real)
    resumed = run_data_stage(r.data, r.run_dir)
    s = two_files(tmp_path / "b")
    assert resumed == run_data_stage(s.data, s.run_dir)

    def digest(d: Path) -> dict[str, str]:
        return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(d.rglob("*")) if f.is_file() and f.name != "manifest.json"}

    a, b = digest(r.run_dir / "data"), digest(s.run_dir / "data")
    assert a == b and any(k.startswith("rejects") for k in a)
