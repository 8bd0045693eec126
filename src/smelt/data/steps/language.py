"""Language identification with py3langid (the langid.py model, shipped inside the wheel).

`LanguageFilter` classifies the first ``max_chars`` characters of a document, writes
``meta["language"]`` (ISO 639-1, Chinese varieties folded into ``zh``) and
``meta["language_score"]`` (normalized probability, rounded to 4 digits), then:

- rejects ``lang_low_score`` when the score is below ``threshold`` (this includes text without
  a single letter, e.g. only digits and punctuation, labelled ``und`` with score 0);
- rejects ``lang_<code>`` when the language is not in ``allowed`` (an empty ``allowed`` list
  keeps every language: the step then only labels documents).

Chinese varieties: the model has separate classes for Mandarin (``zh``), Wu (``wuu``) and
Cantonese (``yue``). All are written in Han characters and belong in a Chinese corpus, so their
probabilities are summed into ``zh``.

``candidates`` restricts the model to those classes (exactly as given). On the zh/en samples of
../shared/data restricting to ``[en, zh]`` fixes the short English lines (song credits,
"U.S. Highways") that the full 140-class model labels Nigerian Pidgin, Latin or Zulu: WikiText-2
lines go from 95.9% to 100% correct.

Probabilities are py3langid's ``norm_probs`` softmax, which divides scores by sqrt(bytes) to keep
them calibrated across lengths (py3langid 0.4); the 0.5 default threshold is the recipe default
(``LanguageConfig.threshold``), not a published constant.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from smelt.config import LanguageConfig
from smelt.data.document import Document
from smelt.data.pipeline import Filter

log = logging.getLogger(__name__)

# Codes that denote Chinese (varieties, scripts, locales); all map to "zh". Only zh/wuu/yue exist
# in the py3langid model, the rest make `allowed: [zh-Hant]` or `[cmn]` mean the obvious thing.
ZH_VARIANTS = frozenset({"zh", "wuu", "yue", "cmn", "lzh", "gan", "hak", "nan", "hsn", "cjy",
                         "zh-hans", "zh-hant", "zh-cn", "zh-tw", "zh-hk", "zh_cn", "zh_tw"})
UNDETERMINED = "und"
_LETTER_RE = re.compile(r"[^\W\d_]")


def canonical_language(code: str) -> str:
    """Map a language code to the label this step reports ('zh' for every Chinese variety)."""
    c = code.strip().lower()
    return "zh" if c in ZH_VARIANTS else c


@functools.lru_cache(maxsize=8)
def load_identifier(candidates: tuple[str, ...] | None = None) -> Any:
    """A py3langid `LanguageIdentifier` (normalized probabilities), one per process and candidate set.

    Loading decompresses the model (~0.5 s), so it is cached; `candidates` must be codes of the
    model (``identifier.labels``), otherwise ValueError names the unknown ones.
    """
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    # py3langid 0.4 loads an .npz model (`from_model_file`); older releases a pickled one.
    load = getattr(LanguageIdentifier, "from_model_file", None) or LanguageIdentifier.from_pickled_model
    ident = load(MODEL_FILE, norm_probs=True)
    if candidates:
        labels = list(dict.fromkeys(ident.nb_classes))
        unknown = sorted(set(candidates) - set(labels))
        if unknown:
            raise ValueError(f"language.candidates: unknown code(s) {unknown}; py3langid knows: {', '.join(labels)}")
        ident.set_languages(list(candidates))
    return ident


def classify(ident: Any, text: str) -> tuple[str, float]:
    """(canonical language, probability) of `text`, Chinese varieties summed into 'zh'."""
    if not _LETTER_RE.search(text):
        # No letters (empty, digits, punctuation, emoji): py3langid would return a near-uniform
        # distribution in which the three Chinese classes, summed, happen to come out on top.
        return UNDETERMINED, 0.0
    ranked = ident.rank(text)
    scores = dict(ranked)
    zh = 0.0
    for code in [c for c in scores if c in ZH_VARIANTS]:
        zh += scores.pop(code)
    if zh:
        scores["zh"] = zh
    best = max(scores, key=scores.__getitem__)
    return best, scores[best]


class LanguageFilter(Filter):
    """Label each document with its language and keep only confident, allowed ones."""

    name = "language"

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.allowed = frozenset(canonical_language(c) for c in cfg.allowed)
        self.candidates = tuple(dict.fromkeys(c.strip().lower() for c in cfg.candidates)) if cfg.candidates else None
        if not self.allowed:
            log.info("language.allowed is empty: documents are labelled, not filtered by language")
        # Load now so that an unknown candidate code fails before any work starts.
        self._ident: Any = load_identifier(self.candidates)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ident"] = None  # ~30 MB of model arrays: reload (cached) in the worker
        return state

    def reject_reason(self, doc: Document) -> str | None:
        if not self.cfg.applies_to(doc.domain):
            return None
        if self._ident is None:
            self._ident = load_identifier(self.candidates)
        lang, score = classify(self._ident, doc.text[: self.cfg.max_chars])
        doc.meta["language"] = lang
        doc.meta["language_score"] = round(score, 4)
        if score < self.cfg.threshold:
            return "lang_low_score"
        if self.allowed and lang not in self.allowed:
            return f"lang_{lang}"
        return None
