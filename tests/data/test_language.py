from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from smelt.config import LanguageConfig
from smelt.data.document import Document
from smelt.data.steps.language import LanguageFilter, canonical_language, classify

EN = "The committee published its annual report on Tuesday, describing how the new policy changed local schools."
ZH_HANS = "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。"
ZH_HANT = "臺北市是中華民國的首都，也是臺灣的政治、經濟與文化中心。"
FR = "Le chat est assis sur le tapis et regarde les oiseaux dans le jardin."


def check(text: str, **cfg) -> tuple[str | None, dict]:
    f = LanguageFilter(LanguageConfig(**cfg))
    doc = Document("d", text)
    return f(doc), doc.meta


def test_english_and_chinese_kept():
    for text, lang in ((EN, "en"), (ZH_HANS, "zh"), (ZH_HANT, "zh")):
        reason, meta = check(text)
        assert reason is None, text
        assert meta["language"] == lang
        assert meta["language_score"] > 0.9


def test_other_language_rejected_with_code():
    reason, meta = check(FR)
    assert reason == "lang_fr"
    assert meta["language"] == "fr"


def test_cantonese_counts_as_chinese():
    reason, meta = check("佢哋喺度做緊嘢，我哋聽日再傾啦，你食咗飯未呀？")
    assert (reason, meta["language"]) == (None, "zh")


def test_no_letters_is_undetermined():
    for text in ("", "12345 67890 !!! ---", "😀😀 ..."):
        reason, meta = check(text)
        assert reason == "lang_low_score"
        assert meta == {"language": "und", "language_score": 0.0}


def test_threshold():
    reason, meta = check("Hello")  # five letters carry little evidence
    assert reason == "lang_low_score"
    assert meta["language_score"] < 0.5
    reason, _ = check(EN, threshold=1.0)
    assert reason == "lang_low_score"


def test_empty_allowed_only_labels():
    reason, meta = check(FR, allowed=[])
    assert reason is None
    assert meta["language"] == "fr"


def test_allowed_accepts_variant_codes():
    assert check(ZH_HANT, allowed=["zh-Hant"])[0] is None
    assert check(EN, allowed=["zh-Hant"])[0] == "lang_en"


def test_candidates_restrict_the_model():
    reason, meta = check(FR, candidates=["en", "zh"])
    assert meta["language"] in ("en", "zh")  # French is not an option any more
    with pytest.raises(ValueError, match=r"unknown code\(s\) \['xx'\]"):
        LanguageFilter(LanguageConfig(candidates=["en", "xx"]))


def test_max_chars_prefix():
    text = EN * 3 + ZH_HANS * 40
    assert check(text, max_chars=300)[1]["language"] == "en"
    assert check(text, max_chars=5000)[1]["language"] == "zh"


def test_variants_are_summed():
    class FakeIdentifier:
        def rank(self, text):
            return [("en", 0.4), ("yue", 0.35), ("zh", 0.2), ("wuu", 0.05)]

    lang, score = classify(FakeIdentifier(), "whatever")
    assert lang == "zh"
    assert score == pytest.approx(0.6)
    assert canonical_language("ZH-TW") == "zh" and canonical_language("en") == "en"


def test_domains_stats_and_pickle():
    f = LanguageFilter(LanguageConfig(skip_domains=["code"]))
    code = Document("c", "def f(x): return x", domain="code")
    assert f(code) is None and "language" not in code.meta
    f(Document("a", FR, domain="web"))
    assert f.stats.domain("web").dropped == {"lang_fr": 1}
    clone = pickle.loads(pickle.dumps(f))
    assert clone._ident is None
    doc = Document("b", EN)
    assert clone(doc) is None and doc.meta["language"] == "en"


# ---------------------------------------------------------------------------------------------
# accuracy on real zh/en text from ../shared/data


def _every(items: list[str], k: int) -> list[str]:
    step = max(1, len(items) // k)
    return items[::step][:k]


def language_samples(root: Path, per_source: int = 250) -> dict[str, tuple[str, list[str]]]:
    """Expected language and texts per source (deterministic subsample)."""
    def squad(*names: str) -> list[str]:
        out = []
        for n in names:
            data = json.loads((root / n).read_text(encoding="utf-8"))
            out += [p["context"] for a in data["data"] for p in a["paragraphs"]]
        return out

    poems = []
    for f in sorted((root / "chinese_poetry").glob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        for rec in data if isinstance(data, list) else []:
            lines = rec.get("paragraphs") or rec.get("content")
            if isinstance(lines, list) and lines and all(isinstance(x, str) for x in lines):
                poems.append("\n".join(lines))
    # WikiText paragraphs: non-heading lines of at least 100 characters (shorter lines are
    # list items and credits such as "Angela Becker – Management", not paragraphs).
    wiki = [ln.strip() for ln in (root / "wikitext2/valid.txt").read_text(encoding="utf-8").splitlines()
            if len(ln.strip()) >= 100 and not ln.strip().startswith("=")]
    web = [json.loads(ln)["text"] for f in sorted((root / "web_cc_dolma_sample").glob("cc_en_*.jsonl"))
           for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    lambada = [json.loads(ln)["text"]
               for ln in (root / "lambada/lambada_test.jsonl").read_text(encoding="utf-8").splitlines()]
    sources = {
        "cmrc2018": ("zh", squad("cmrc2018/cmrc2018_dev.json", "cmrc2018/cmrc2018_trial.json")),
        "drcd": ("zh", squad("drcd/DRCD_dev.json")),
        "chinese_poetry": ("zh", poems),
        "wikitext2": ("en", wiki),
        "web_cc_dolma_sample": ("en", web),
        "lambada": ("en", lambada),
    }
    return {k: (lang, _every(texts, per_source)) for k, (lang, texts) in sources.items()}


@pytest.mark.parametrize("candidates", [None, ["en", "zh"]])
def test_accuracy_on_shared_data(shared_data, candidates):
    f = LanguageFilter(LanguageConfig(candidates=candidates))
    samples = language_samples(shared_data)
    total = correct = kept = 0
    for name, (lang, texts) in samples.items():
        assert len(texts) >= 20, name
        ok = 0
        for i, t in enumerate(texts):
            doc = Document(f"{name}/{i}", t)
            reason = f(doc)
            ok += doc.meta["language"] == lang
            kept += doc.meta["language"] == lang and reason is None
        assert ok / len(texts) >= 0.98, (name, ok, len(texts))
        total += len(texts)
        correct += ok
    assert correct / total >= 0.98
    assert kept / total >= 0.98  # and confident enough to pass the default threshold
