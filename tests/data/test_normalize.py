from __future__ import annotations

import json
import pickle

import pytest

from smelt.config import NormalizeConfig
from smelt.data.document import Document
from smelt.data.steps.normalize import Normalizer


def run(text: str, **cfg) -> tuple[str, str | None, dict]:
    step = Normalizer(NormalizeConfig(**cfg))
    doc = Document("d", text)
    reason = step(doc)
    return doc.text, reason, dict(step.stats.total().counters)


def test_control_and_invisible_characters_removed():
    text, reason, counts = run("a\x00b\x07c\u200bd\ufeffe\u00adf\x7fg\x9fh\u202ei")
    assert (text, reason) == ("abcdefghi", None)
    assert counts["control_chars_removed"] == 8
    assert counts["chars_removed"] == 8
    assert counts["docs_changed"] == 1


def test_tabs_zwj_zwnj_are_kept():
    # ZWJ glues emoji sequences, ZWNJ is spelling in Persian: both must survive.
    s = "col1\tcol2\n\U0001F469\u200d\U0001F4BB \u0645\u06CC\u200c\u062E\u0648\u0627\u0647\u0645"
    text, reason, counts = run(s)
    assert text == s
    assert reason is None
    assert "docs_changed" not in counts


def test_line_breaks_unified():
    text, _, counts = run("a\r\nb\rc\u2028d\x0be\x0cf\x85g")
    assert text == "a\nb\nc\nd\ne\nf\ng"
    assert counts["control_chars_removed"] == 1  # \r\n -> \n is one character fewer


def test_lone_surrogates_removed():
    doc_text = json.loads('"ok\\ud800x"')  # JSON escapes can produce unencodable strings
    text, _, counts = run(doc_text)
    assert text == "okx"
    text.encode("utf-8")  # writable again


def test_whitespace_cleanup_keeps_indentation():
    src = "def f():   \n    return  1\t \n\n\n\n\n\nx =   2\n\n"
    text, _, counts = run(src)
    assert text == "def f():\n    return 1\n\n\nx = 2"
    assert counts["whitespace_chars_removed"] == len(src) - len(text)


def test_two_blank_lines_are_kept_three_are_not():
    assert run("a\n\n\nb")[0] == "a\n\n\nb"
    assert run("a\n\n\n\nb")[0] == "a\n\n\nb"
    assert run("\n\n  \nstart")[0] == "start"


def test_unicode_spaces_and_fullwidth_indentation():
    # Ideographic-space indentation is dropped; interior U+3000 / NBSP become one ASCII space.
    src = "\u3000\u3000第一段。\n\u3000\u3000北京\u3000上海\u00a0\u00a0广州"
    for form in ("NFC", "NFKC"):
        text, _, _ = run(src, form=form)
        assert text == "第一段。\n北京 上海 广州", form


def test_whitespace_off_leaves_spaces():
    text, _, _ = run("a  b  \n\n\n\n\nc", whitespace=False)
    assert text == "a  b  \n\n\n\n\nc"


def test_nfc_and_nfkc():
    assert run("e\u0301cole")[0] == "\u00e9cole"
    text, _, counts = run("ＡＢＣ１２３\ufb01", form="NFC")
    assert text == "ＡＢＣ１２３\ufb01"
    text, _, counts = run("ＡＢＣ１２３\ufb01", form="NFKC")
    assert text == "ABC123fi"
    assert counts["unicode_changed"] == 1
    assert run("e\u0301", form="none")[0] == "e\u0301"


def test_empty_after_normalize_rejected():
    step = Normalizer(NormalizeConfig())
    doc = Document("d", "\u200b \n\t\ufeff\n")
    assert step(doc) == "empty_after_normalize"
    assert doc.text == ""
    assert step.stats.total().dropped == {"empty_after_normalize": 1}


def test_t2s_conversion_and_counts():
    text, _, counts = run("今天天氣很好，我們去公園散步。", zh_convert="t2s")
    assert text == "今天天气很好，我们去公园散步。"
    assert counts["t2s_docs"] == 1
    assert counts["t2s_chars"] == 3


def test_t2s_phrase_rules_fire():
    # 覆/沈 are unchanged as single characters; only the phrase rules rewrite them.
    text, _, _ = run("他反覆思量，最後選擇沈默。", zh_convert="t2s")
    assert text == "他反复思量，最后选择沉默。"


def test_t2s_skips_text_without_traditional_characters():
    step = Normalizer(NormalizeConfig(zh_convert="t2s"))
    step(Document("a", "體"))  # loads the converter

    class Exploding:
        def convert(self, text: str) -> str:
            raise AssertionError(f"converter called on {text!r}")

    step._t2s = Exploding()
    doc = Document("b", "今天天气很好，我们去公园散步。Plain English too.")
    assert step(doc) is None
    assert doc.text == "今天天气很好，我们去公园散步。Plain English too."


def test_t2s_precheck_is_exact_on_real_text(shared_data):
    import opencc

    ref = opencc.OpenCC("t2s")
    step = Normalizer(NormalizeConfig(zh_convert="t2s", whitespace=False, strip_control=False, form="none"))
    texts = []
    for name in ("cmrc2018/cmrc2018_trial.json", "drcd/DRCD_dev.json"):
        data = json.loads((shared_data / name).read_text(encoding="utf-8"))
        texts += [p["context"] for a in data["data"] for p in a["paragraphs"]][:150]
    skipped = 0
    for t in texts:
        out, _ = step.normalize(t)
        assert out == ref.convert(t)
        skipped += not step._t2s_trigger(t)
    assert skipped > 0  # the Simplified CMRC passages take the fast path


def test_t2s_supplementary_plane_characters():
    # 𠁞 (CJK Extension B) has a t2s rule; text with other astral characters (emoji) does not.
    step = Normalizer(NormalizeConfig(zh_convert="t2s"))
    step(Document("a", "體"))
    assert step._t2s_trigger("x\U0002005ey") and not step._t2s_trigger("ok \U0001F600")


def test_domains_and_pickle():
    step = Normalizer(NormalizeConfig(zh_convert="t2s", skip_domains=["code"]))
    code = Document("c", "x  =  1   \n\n\n\n\ny", domain="code")
    assert step(code) is None
    assert code.text == "x  =  1   \n\n\n\n\ny"
    step(Document("z", "體育"))
    assert step._t2s is not None
    clone = pickle.loads(pickle.dumps(step))
    assert clone._t2s is None  # the converter is rebuilt in the worker, not shipped
    doc = Document("z", "體育")
    assert clone(doc) is None and doc.text == "体育"


@pytest.mark.parametrize("form", ["NFC", "NFKC"])
def test_idempotent(form):
    src = "\u3000\u3000Ａ  b\u00a0\u00a0c \r\n\n\n\n\n\u200bd\ufeff  "
    once, _, _ = run(src, form=form)
    assert run(once, form=form)[0] == once
