"""The ``toxicity`` curation step: a toxicity classifier's probability and a flagged-word ratio.

Two signals, each a `ScoreSpec` of one `ScoredFilter`, each usable alone (set the other to
``null``). Both scores go to ``meta["toxicity"]`` on kept and rejected documents; a document is
rejected at the first signal whose keep rule it fails (classifier first)::

    data:
      steps:
        - name: toxicity
          options:
            classifier: {keep: {threshold: 0.9}}           # null: off
            flagged_words: {languages: [en, zh], files: [my_words.txt], keep: {threshold: 0.045}}

**Classifier** (``toxicity.score``, reason ``toxic_classifier``): P(offensive) of the linear SVM
(TF-IDF features, sigmoid-calibrated) of the ``alt-profanity-check`` package, trained on ~200k
human-labelled texts (the t-davidson hate-speech-and-offensive-language tweets and the Jigsaw
Toxic Comment Classification comments). Its model files ship inside that package; smelt loads
them only through the package's own import (never a pickle path from a recipe), in each worker
on its first batch. It needs scikit-learn, so it is the optional extra ``smelt[toxicity]``.
English only: a document whose language (``meta.language``, set by the language step) is not
``en`` gets no score (``null`` in meta, kept, counted as ``unscored:toxicity.score``). The
score is for the whole document: the TF-IDF vector is L2-normalized, so a long document with one
rude sentence scores low, like a low flagged-word ratio. Default keep rule ``threshold: 0.9``:
on the 1,841 WikiText-2 validation paragraphs (clean English) 5 score above 0.4 (Dolma's cutoff
for its Jigsaw fastText taggers, a different model), among them a sentence about lobster claws
(0.44), and 1 above 0.9 (a quoted "fun shit"); clearly toxic sentences score above 0.99.

**Flagged-word ratio** (``toxicity.flagged_ratio``, reason ``toxic_flagged_words``), as in
BigScience ROOTS and data-juicer's ``flagged_words_filter``, with the LDNOOBW lists (CC BY 4.0,
``smelt/resources/flagged_words/PROVENANCE.md``) plus the words of ``files``:

* ``en`` documents: the ratio of *words* covered by flagged entries to all words. A word is a
  whitespace-separated token of the lower-cased text with its leading and trailing characters
  that are not letters or digits removed (``"(Ass!"`` -> ``ass``); tokens without a letter or
  digit are not words. Entries are split into words the same way, and an entry of several
  words (``ball gag``) matches that sequence of words and covers all of them; at each position
  the longest entry wins and matches do not overlap. Whole words only: ``classic`` and
  ``Scunthorpe`` contain no flagged word.
* ``zh`` documents: the ratio of Han/kana characters inside flagged matches to all Han/kana
  characters of the document. Entries are matched as case-insensitive substrings, leftmost
  longest first, without overlap (the ``blocklist`` step's matcher). Entries of the built-in
  Chinese list without a Han or kana character (``13.``) are skipped, and so, by default
  (``zh_min_chars: 2``), are its single characters (性, 奶, 乳, 卵, ...): as substrings they
  fire inside ordinary words (女性, 牛奶, 乳制品); on the 848 CMRC 2018 passages (Chinese
  Wikipedia) they put 265 passages above zero where the two-character entries put 29.
* other languages, or no word / no Han or kana character: no score (kept, counted as unscored).

Words of ``files`` (UTF-8, one per line, ``#`` comment lines) that contain a Han or kana
character join the Chinese list, the others the English list. Default keep rule ``threshold:
0.045``: data-juicer's default ``max_ratio`` for ``flagged_words_filter``, whose ratio is this
word ratio (BigScience used 0.01 for English and 0.001 for tokenized Chinese with its own
lists). On the WikiText-2 validation paragraphs it drops none of 1,841 (0.01 would drop 15, 0.75%:
articles on sexuality and lyrics), and none of the 848 CMRC passages (0.01: 4).

A document's language is ``meta.language``; ``assume_language`` names the language of documents
without one (a recipe without the language step), otherwise they are unscored.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from smelt.config import BlocklistConfig, RecipeError
from smelt.data.document import Document
from smelt.data.steps.blocklist import BlocklistFilter, read_terms
from smelt.data.steps.registry import StepContext
from smelt.data.text import CJK_RE, cjk_count
from smelt.quality.scored import KeepRule, ScoredFilter, ScoreSpec, lazy, load_cutoffs, prepare_cutoffs

log = logging.getLogger(__name__)

__all__ = ["ClassifierOptions", "FlaggedWords", "FlaggedWordsOptions", "ToxicityOptions", "build", "builtin_words",
           "load_flagged_words", "prepare", "words"]

STEP = "toxicity"
EXTRA = "pip install 'smelt[toxicity]'"
_LISTS = ("smelt", "resources/flagged_words")
# A word: from the first to the last letter/digit of a whitespace-separated token.
_WORD_RE = re.compile(r"[^\W_](?:\S*[^\W_])?")


def _missing_classifier() -> str | None:
    """Why the classifier cannot load (None when it can), without importing it."""
    missing = [m for m, pkg in (("sklearn", "scikit-learn"), ("profanity_check", "alt-profanity-check"))
               if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"the toxicity classifier needs the optional extra: {EXTRA} (missing: {', '.join(missing)}); "
            "or set classifier: null to use the flagged-word ratio alone")


def _no_pareto(rule: KeepRule) -> KeepRule:
    if rule.pareto_alpha is not None:  # GPT-3's sampling favours high scores; these are lower-is-better
        raise ValueError("pareto_alpha favours high scores and toxicity scores are lower-is-better; use "
                         "threshold, top_fraction or buckets")
    return rule


class ClassifierOptions(BaseModel):
    """The English toxicity classifier (alt-profanity-check), needs ``smelt[toxicity]``."""

    model_config = ConfigDict(extra="forbid")

    keep: KeepRule = Field(default_factory=lambda: KeepRule(threshold=0.9),
                           description="Keep rule on P(offensive), lower is better (default: keep at most 0.9).")

    @field_validator("keep")
    @classmethod
    def _rule(cls, v: KeepRule) -> KeepRule:
        return _no_pareto(v)

    @model_validator(mode="after")
    def _installed(self) -> ClassifierOptions:
        why = _missing_classifier()
        if why:
            raise ValueError(why)
        return self


class FlaggedWordsOptions(BaseModel):
    """The flagged-word ratio (module doc): built-in LDNOOBW lists and/or words from files."""

    model_config = ConfigDict(extra="forbid")

    languages: list[Literal["en", "zh"]] = Field(default_factory=lambda: ["en", "zh"],
                                                 description="Languages scored; documents in others are unscored.")
    builtin: bool = Field(True, description="Use the LDNOOBW en/zh lists shipped with smelt.")
    files: list[Path] = Field(default_factory=list, description="Extra word files (UTF-8, one word or phrase per "
                              "line, # comments); a missing file fails the recipe before any work.")
    zh_min_chars: int = Field(2, ge=1, description="Skip entries of the built-in Chinese list shorter than this "
                              "many characters (single characters fire inside ordinary words).")
    keep: KeepRule = Field(default_factory=lambda: KeepRule(threshold=0.045),
                           description="Keep rule on the ratio, lower is better (data-juicer: at most 0.045).")

    @field_validator("keep")
    @classmethod
    def _rule(cls, v: KeepRule) -> KeepRule:
        return _no_pareto(v)

    @field_validator("languages")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one of en, zh")
        return v

    @field_validator("files")
    @classmethod
    def _readable(cls, v: list[Path]) -> list[Path]:
        for p in v:
            if not p.is_file():
                raise ValueError(f"flagged-word file not found: {p}")
            read_terms(p)  # not UTF-8: ValueError with file and line
        return v

    @model_validator(mode="after")
    def _has_words(self) -> FlaggedWordsOptions:
        if not self.builtin and not self.files:
            raise ValueError("no flagged words: builtin is false and no files are given")
        return self


class ToxicityOptions(BaseModel):
    """Options of the ``toxicity`` step: at least one of the two signals."""

    model_config = ConfigDict(extra="forbid")

    classifier: ClassifierOptions | None = Field(default_factory=ClassifierOptions,
                                                 description="The classifier signal; null: off.")
    flagged_words: FlaggedWordsOptions | None = Field(default_factory=FlaggedWordsOptions,
                                                      description="The flagged-word signal; null: off.")
    assume_language: Literal["en", "zh"] | None = Field(
        None, description="Language of documents without meta.language (no language step); null: unscored.")

    @model_validator(mode="after")
    def _one_signal(self) -> ToxicityOptions:
        if self.classifier is None and self.flagged_words is None:
            raise ValueError("classifier and flagged_words are both null: give at least one")
        return self


# --------------------------------------------------------------------------------------------
# flagged words


def builtin_words(lang: Literal["en", "zh"]) -> list[str]:
    """The shipped LDNOOBW list of `lang`, as in the file."""
    res = resources.files(_LISTS[0]).joinpath(_LISTS[1], f"{lang}.json")
    return json.loads(res.read_text(encoding="utf-8"))


def words(text: str) -> list[str]:
    """The words of `text` for the English ratio (module doc), lower-cased."""
    return _WORD_RE.findall(text.lower())


class FlaggedWords:
    """Flagged-word ratios of English and Chinese text (see the module doc for the definitions)."""

    def __init__(self, en: list[str], zh: list[str]) -> None:
        self.single: set[str] = set()
        self.multi: dict[str, list[tuple[str, ...]]] = {}  # first word -> entries, longest first
        for entry in en:
            ws = tuple(words(entry))
            if len(ws) == 1:
                self.single.add(ws[0])
            elif ws:
                self.multi.setdefault(ws[0], []).append(ws)
        for entries in self.multi.values():
            entries.sort(key=len, reverse=True)
        zh_terms = [t for t in zh if CJK_RE.search(t)]
        self.zh = BlocklistFilter(BlocklistConfig(words=zh_terms)) if zh_terms else None

    def en_ratio(self, text: str) -> float:
        """Words covered by flagged entries / words; NaN without words."""
        ws = words(text)
        if not ws:
            return float("nan")
        if self.single.isdisjoint(ws) and self.multi.keys().isdisjoint(ws):
            return 0.0
        covered = i = 0
        while i < len(ws):
            k = next((len(e) for e in self.multi.get(ws[i], ()) if tuple(ws[i:i + len(e)]) == e), 0)
            if not k and ws[i] in self.single:
                k = 1
            covered += k
            i += k or 1
        return covered / len(ws)

    def zh_ratio(self, text: str) -> float:
        """Han/kana characters inside flagged matches / Han/kana characters; NaN without any."""
        n = cjk_count(text)
        if n == 0:
            return float("nan")
        if self.zh is None:
            return 0.0
        return sum(cjk_count(hit) for hit in self.zh.find(text)) / n


def load_flagged_words(options: FlaggedWordsOptions) -> FlaggedWords:
    """The English and Chinese entries of `options`: built-in lists, then its files."""
    en: list[str] = []
    zh: list[str] = []
    if options.builtin:
        en += builtin_words("en")
        zh += [t for t in builtin_words("zh") if len(t) >= options.zh_min_chars]
    for path in options.files:
        for term in read_terms(path):
            (zh if CJK_RE.search(term) else en).append(term)
    fw = FlaggedWords(en, zh)
    log.info("toxicity: %d English flagged words, %d phrases; %d Chinese", len(fw.single),
             sum(map(len, fw.multi.values())), len(fw.zh.terms) if fw.zh else 0)
    return fw


# --------------------------------------------------------------------------------------------
# score functions and the step


def _language(doc: Document, assume: str | None) -> str | None:
    return doc.meta.get("language") or assume


def _flagged_scorer(options: FlaggedWordsOptions, assume: str | None) -> Callable[[list[Document]], np.ndarray]:
    fw = load_flagged_words(options)
    ratio = {"en": fw.en_ratio, "zh": fw.zh_ratio}
    langs = set(options.languages)

    def score(docs: list[Document]) -> np.ndarray:
        out = np.full(len(docs), np.nan)
        for i, d in enumerate(docs):
            lang = _language(d, assume)
            if lang in langs:
                out[i] = ratio[lang](d.text)
        return out
    return score


def _classifier_scorer(assume: str | None) -> Callable[[list[Document]], np.ndarray]:
    try:
        from profanity_check import predict_prob  # loads the package's own model files
    except ImportError as e:
        raise RecipeError(f"{_missing_classifier() or 'the toxicity classifier cannot load'} ({e})") from None

    def score(docs: list[Document]) -> np.ndarray:
        out = np.full(len(docs), np.nan)
        idx = [i for i, d in enumerate(docs) if _language(d, assume) == "en"]
        if idx:  # scikit-learn refuses an empty batch
            out[idx] = predict_prob([docs[i].text for i in idx])
        return out
    return score


def _classifier_version() -> str:
    try:
        return metadata.version("alt-profanity-check")
    except metadata.PackageNotFoundError:
        return "not installed"


def _specs(options: ToxicityOptions) -> list[ScoreSpec]:
    specs = []
    assume = options.assume_language
    if options.classifier is not None:
        specs.append(ScoreSpec(
            key="toxicity.score", label=f"alt-profanity-check {_classifier_version()} P(offensive), English",
            higher_is_better=False, reason="toxic_classifier", rule=options.classifier.keep,
            score=lazy(lambda: _classifier_scorer(assume))))
    fw = options.flagged_words
    if fw is not None:
        specs.append(ScoreSpec(
            key="toxicity.flagged_ratio",
            label=f"flagged-word ratio ({'/'.join(fw.languages)}; "
                  f"{' + '.join((['LDNOOBW lists'] if fw.builtin else []) + [p.name for p in fw.files])})",
            higher_is_better=False, reason="toxic_flagged_words", rule=fw.keep,
            score=lazy(lambda: _flagged_scorer(fw, assume))))
    return specs


def build(options: ToxicityOptions, context: StepContext) -> ScoredFilter:
    return ScoredFilter(STEP, _specs(options), load_cutoffs(STEP, context))


def prepare(options: ToxicityOptions, context: StepContext) -> None:
    prepare_cutoffs(STEP, _specs(options), context)
