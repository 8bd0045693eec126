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
    # fix_encoding off: with it, the lone C1 control \x9f would be read as Windows-1252 "Ÿ".
    text, reason, counts = run("a\x00b\x07c\u200bd\ufeffe\u00adf\x7fg\x9fh\u202ei", fix_encoding=False)
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
    # fix_encoding off: with it, a lone NEL (\x85) is read as Windows-1252 "…" (see below).
    text, _, counts = run("a\r\nb\rc\u2028d\x0be\x0cf\x85g", fix_encoding=False)
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


# ---------------------------------------------------------------------------------------------
# Mojibake (fix_encoding)

def _cp1252_mojibake(s: str) -> str:
    return s.encode("utf-8").decode("windows-1252", errors="strict")


@pytest.mark.parametrize("original, garbled", [
    # UTF-8 read as Latin-1: curly quotes become "â" + two C1 controls (what synth.py plants)
    ("the “café” and the year’s end", "the “café” and the year’s end".encode().decode("latin-1")),
    # ... and as Windows-1252, the classic web mojibake
    ("the “café” and the year’s end", "the â€œcafÃ©â€\x9d and the yearâ€™s end"),
    ("naïve résumé, Zürich, Ærøskøbing", _cp1252_mojibake("naïve résumé, Zürich, Ærøskøbing")),
    ("今天天气很好，我们去公园散步。", "今天天气很好，我们去公园散步。".encode().decode("latin-1")),
    ("中文的文字", "ä¸\xadæ\x96\x87ç\x9a\x84æ\x96\x87å\xad\x97"),
    # double-encoded: UTF-8 -> cp1252 -> UTF-8 -> cp1252
    ("The Mona Lisa doesn’t have eyebrows.",
     _cp1252_mojibake(_cp1252_mojibake("The Mona Lisa doesn’t have eyebrows."))),
    ("emoji 😀 here", _cp1252_mojibake("emoji 😀 here")),
    ("voilà le travail", "voilÃ le travail"),  # the NBSP byte became a space (restore_byte_a0)
    ("“quoted”", "\x93quoted\x94"),  # Windows-1252 read as Latin-1: C1 controls
])
def test_fix_encoding_repairs_mojibake(original, garbled):
    from smelt.data.steps.normalize import fix_mojibake, has_mojibake

    assert garbled != original
    assert has_mojibake(garbled)
    assert fix_mojibake(garbled) == original
    text, reason, counts = run(garbled)
    assert (text, reason) == (original, None)
    assert counts["fixed_encoding"] == 1 and counts["docs_changed"] == 1


@pytest.mark.parametrize("clean", [
    "Plain ASCII English. Nothing to see here!",
    "今天天气很好，我们去公园散步。他说：“好的——我们走吧……”《红楼梦》（第一回）",
    "def f(x):\n    return {'a': x ** 2}  # comment with “quotes” and é\n",
    "emoji 😀👩\u200d💻 and a flag 🇫🇷",
    "SÃO PAULO, MÃE, CORAÇÃO, São Paulo",  # Portuguese capitals: Ã followed by O/E is not mojibake
    "Ça va? À bientôt, café” à la crème brûlée, naïve, Æsop, «guillemets»",
    "Größe 5×3 ±2°, £5, ©2023, ¿Qué? ¡Olé!, 10 µm, ½ cup",
    "Привет, мир! Γειά σου κόσμε. Cześć, świecie. Dobrý den.",
    "├──┤ box ┌─┐ ═══ ▀▄█ │x│",
    "ÉTIENNE Ã the end",
])
def test_fix_encoding_leaves_correct_text_alone(clean):
    from smelt.data.steps.normalize import fix_mojibake, has_mojibake

    assert fix_mojibake(clean) == clean
    assert not has_mojibake(clean)
    text, _, counts = run(clean, whitespace=False)
    assert text == clean
    assert "fixed_encoding" not in counts


def test_fix_encoding_runs_before_control_stripping():
    # Latin-1 mojibake of ’ is "â\x80\x99": strip_control would delete the two C1 controls and
    # leave an unrepairable "â"; the repair must come first.
    garbled = "the year’s end".encode().decode("latin-1")
    assert run(garbled)[0] == "the year’s end"
    text, _, counts = run(garbled, fix_encoding=False)
    assert text == "the yearâs end" and "fixed_encoding" not in counts
    assert counts["control_chars_removed"] == 2


def test_fix_encoding_repairs_only_the_garbled_lines():
    # A page stitched from a correct part and a mis-decoded part: only the latter changes.
    good = "Crème brûlée at the café, 5 €."
    bad = "Crème brûlée at the café, 5 €.".encode().decode("windows-1252")
    text, _, counts = run(f"{good}\n{bad}\n{good}")
    assert text == f"{good}\n{good}\n{good}"
    assert counts["fixed_encoding"] == 1


def test_fix_encoding_counts_documents_per_domain():
    step = Normalizer(NormalizeConfig())
    docs = [Document("a", "cafÃ©", "web"), Document("b", "café", "web"), Document("c", "ä¸\xadæ\x96\x87", "zh"),
            Document("d", "plain", "web")]
    for d in docs:
        assert step(d) is None
    assert [d.text for d in docs] == ["café", "café", "中文", "plain"]
    assert step.stats.domain("web").counters["fixed_encoding"] == 1
    assert step.stats.domain("zh").counters["fixed_encoding"] == 1
    assert step.stats.total().counters["fixed_encoding"] == 2


def test_fix_encoding_config_key_validated():
    from smelt.config import RecipeError, parse_recipe

    base = {"name": "t", "data": {"inputs": [{"path": "x.jsonl", "domain": "web"}]}}
    assert parse_recipe(base).data.normalize.fix_encoding is True  # on by default, as FineWeb
    assert parse_recipe(base, ["data.normalize.fix_encoding=false"]).data.normalize.fix_encoding is False
    with pytest.raises(RecipeError, match=r"data\.normalize\.fix_encoding"):
        parse_recipe(base, ["data.normalize.fix_encoding=sometimes"])
    with pytest.raises(RecipeError, match=r"data\.normalize\.fix_encodings"):
        parse_recipe(base, ["data.normalize.fix_encodings=true"])


def test_fix_encoding_synth_mojibake_restores_the_original():
    # synth.py's planted mojibake (UTF-8 read as Latin-1), English and Chinese, comes back exactly.
    import random

    from smelt.data.synth import _mojibake, prose

    rng = random.Random(0)
    for lang in ("en", "zh") * 10:
        original = prose(rng, lang)
        if lang == "en":
            original = original.replace("the ", "the “café” ", 3).replace(". ", "’s. ", 3)
        text, _, counts = run(_mojibake(original), whitespace=False, form="none")
        assert text == original
        assert counts["fixed_encoding"] == 1


def test_mojibake_trigger_never_misses_what_ftfy_would_fix():
    # The pre-check must be a necessary condition: wherever it says "no", ftfy must leave the
    # text unchanged. Random strings over an alphabet dense in the characters that matter
    # (every lead/continuation character of ftfy's single-byte encodings, C1 controls, spaces,
    # "?", CJK, emoji), plus real mojibake spliced into clean text.
    import random

    import ftfy

    from smelt.data.steps.normalize import _ftfy_config, _mojibake_trigger

    trigger = _mojibake_trigger()
    alphabet = sorted(set(trigger._follow) | set().union(*(t for _, t, _ in trigger._leads)))
    alphabet += list("  ??abcXYZ.,\n") + ["中", "文", "。", "，", "😀", "\x85", "\x9d", "\ufffd", "\x1a"]
    sources = ["the “café” end", "中文的文字", "naïve Zürich", "😀 ok", "à la", "—…", "“hi” à", "hi”"]
    encodings = ["latin-1", "windows-1252", "windows-1251", "windows-1250", "iso-8859-2", "mac-roman", "cp437"]
    rng = random.Random(1234)
    checked = triggered = garbled_seen = repaired = 0
    for i in range(6000):
        if i % 3 == 0:  # spliced mojibake, also ftfy's relaxed forms (NBSP byte -> space, lost byte -> "?")
            src = rng.choice(sources)
            bad = src.encode("utf-8").decode(rng.choice(encodings), errors="replace")
            bad = rng.choice([bad, bad.replace("\xa0", " "), bad.replace("\ufffd", "?")])
            context = rng.choice(["", "He said ", "x", "".join(rng.choices(alphabet, k=rng.randint(1, 4)))])
            text = context + bad + rng.choice(["", " ok", "?"])
            garbled_seen += 1
            if trigger(text):
                repaired += ftfy.fix_text(text, _ftfy_config()) != text
            else:
                assert ftfy.fix_text(text, _ftfy_config()) == text, repr(text)
            continue
        text = "".join(rng.choices(alphabet, k=rng.randint(1, 8)))
        if trigger(text):
            triggered += 1
            continue
        checked += 1
        assert ftfy.fix_text(text, _ftfy_config()) == text, repr(text)
    assert checked > 1000 and triggered > 100 and garbled_seen > 1000 and repaired > 500
