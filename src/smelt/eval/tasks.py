"""Multiple-choice benchmarks scored by log-likelihood, with lm-eval's ``acc`` and ``acc_norm``.

Each item is a context and N choices; the model's answer is the choice with the highest
log-likelihood ``ll_i = log P(delimiter + choice_i | context)`` (lm-eval ``output_type:
multiple_choice``; pairs encoded as lm-eval's ``_encode_pair``, `smelt.eval.perplexity.encode_pair`):

    acc       = mean[argmax_i ll_i == gold]
    acc_norm  = mean[argmax_i ll_i / len(choice_i) == gold]    len in characters, without the
                                                               delimiter (lm-eval ``process_results``)
    random    = mean[1 / N]                                    the random-choice baseline

n-shot: ``shots`` solved examples (``context + delimiter + gold choice``) joined by a blank line
(lm-eval's ``fewshot_delimiter``) precede the item. Examples come from the format's own few-shot
split when it exists beside the file (ARC: ``*-Train.jsonl``; C-Eval: ``dev/<subject>_dev.csv``,
the first ``shots`` rows as lm-eval's ``first_n`` sampler does), or from ``fewshot_path``, else
from the same file without the current item. Random draws use a generator seeded by (seed, task,
item index): the same prompts for any ``limit``, batch size or order.

Formats (`load_items`; prompts as in lm-eval's task YAMLs):

``hellaswag``  6 lines per item: ``activity_label: ctx`` / gold (0-3) / 4 endings (the klosax text
               export of the official validation split; ``.bz2`` read directly). Context and endings
               go through lm-eval's ``preprocess``. lm-eval builds its context from ``ctx_a`` and a
               capitalised ``ctx_b``; the 6-line format keeps only the joined ``ctx``, so the word
               after the context's last period may differ in case from lm-eval's prompt.
``piqa``       ``X.jsonl`` (goal, sol1, sol2) + ``X-labels.lst`` (0/1 per line).
               Context ``"Question: {goal}\\nAnswer:"``.
``arc``        official ARC jsonl (question.stem, question.choices[{text,label}], answerKey).
               Context ``"Question: {stem}\\nAnswer:"``.
``ceval``      C-Eval CSV (id, question, A, B, C, D, answer[, explanation]); ``path`` a CSV or a
               directory of them (all subjects pooled). Context
               ``"{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案："``, choices ``A``-``D``.
``jsonl``      ``{"context": str, "choices": [str, ...], "gold": int}`` per line (extra keys ignored).

A malformed file raises `BenchmarkFormatError` naming the file and line. An item that parses but
cannot be scored (a choice with no tokens, or longer than the window) is left out of the metrics
and counted (``skipped``, `score_items`); it never fails an evaluation.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from torch import nn

from smelt.eval.perplexity import Request, Unscorable, encode_pair, score_requests

log = logging.getLogger(__name__)

__all__ = ["MCItem", "BenchmarkFormatError", "load_items", "fewshot_pool", "build_context", "score_items",
           "evaluate_task", "FORMATS"]

FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter
_CEVAL_LETTERS = ("A", "B", "C", "D")
_MAX_LISTED = 20  # unscored items listed by name in results.json (all are counted)


class BenchmarkFormatError(ValueError):
    """A benchmark file that does not parse; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int
    source: str  # "file:line"
    group: str = ""  # C-Eval subject (few-shot examples come from the same subject)


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: benchmark file not found")
    try:
        with _open_text(path) as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise BenchmarkFormatError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:  # bz2/gzip corruption
        raise BenchmarkFormatError(f"{path}: unreadable ({e})") from None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def _need_str(obj: Any, key: str, where: str) -> str:
    v = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(v, str):
        raise BenchmarkFormatError(f"{where}: missing or non-string field {key!r}")
    return v


# --------------------------------------------------------------------------------------------
# loaders


def hellaswag_preprocess(text: str) -> str:
    """lm-eval ``tasks/hellaswag/utils.py::preprocess`` (brackets are WikiHow artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[MCItem]:
    lines = _lines(path)
    if len(lines) % 6:
        raise BenchmarkFormatError(f"{path}:{len(lines)}: {len(lines)} lines is not a multiple of 6 "
                                   "(context, label, 4 endings per item); last item incomplete")
    items = []
    for k in range(0, len(lines), 6):
        label = lines[k + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise BenchmarkFormatError(f"{path}:{k + 2}: expected the gold label 0-3, got {label[:40]!r} "
                                       "(items are 6 lines: context, label, 4 endings)")
        if not lines[k].strip():
            raise BenchmarkFormatError(f"{path}:{k + 1}: empty context")
        items.append(MCItem(hellaswag_preprocess(lines[k]),
                            tuple(hellaswag_preprocess(e) for e in lines[k + 2: k + 6]), int(label),
                            f"{path}:{k + 1}"))
    return items


def load_piqa(path: Path) -> list[MCItem]:
    labels_path = path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")
    if not labels_path.is_file():
        raise BenchmarkFormatError(f"{path}: labels file {labels_path.name} not found beside it")
    labels = _lines(labels_path)
    items = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        goal, s1, s2 = (_need_str(obj, k, where) for k in ("goal", "sol1", "sol2"))
        if lineno > len(labels):
            raise BenchmarkFormatError(f"{labels_path}:{lineno}: missing (fewer labels than items in {path.name})")
        lab = labels[lineno - 1].strip()
        if lab not in ("0", "1"):
            raise BenchmarkFormatError(f"{labels_path}:{lineno}: expected 0 or 1, got {lab[:40]!r}")
        items.append(MCItem(f"Question: {goal}\nAnswer:", (s1, s2), int(lab), where))
    return items


def load_arc(path: Path) -> list[MCItem]:
    items = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        q = obj.get("question") if isinstance(obj, dict) else None
        stem = _need_str(q, "stem", where)
        choices = q.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise BenchmarkFormatError(f"{where}: question.choices must be a list of at least 2 choices")
        texts = [_need_str(c, "text", where) for c in choices]
        labels = [_need_str(c, "label", where) for c in choices]
        key = obj.get("answerKey")
        if key not in labels:
            raise BenchmarkFormatError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
        items.append(MCItem(f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key), where))
    return items


def _ceval_subject(path: Path) -> str:
    return re.sub(r"_(val|dev|test)$", "", path.stem)


def load_ceval(path: Path) -> list[MCItem]:
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise BenchmarkFormatError(f"{path}: no C-Eval *.csv files in this directory")
        return [it for f in files for it in load_ceval(f)]
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: benchmark file not found")
    subject = _ceval_subject(path)
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise BenchmarkFormatError(f"{path}:1: empty file, expected a header row") from None
        except csv.Error as e:
            raise BenchmarkFormatError(f"{path}:1: {e}") from None
        need = ["question", *_CEVAL_LETTERS, "answer"]
        missing = [c for c in need if c not in header]
        if missing:
            raise BenchmarkFormatError(f"{path}:1: header lacks column(s) {missing} (has {header})")
        col = {c: header.index(c) for c in need}
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise BenchmarkFormatError(f"{path}:{start}: {e}") from None
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(row):
                continue
            if len(row) < len(header):
                raise BenchmarkFormatError(f"{where}: {len(row)} fields, header has {len(header)}")
            ans = row[col["answer"]].strip()
            if ans not in _CEVAL_LETTERS:
                raise BenchmarkFormatError(f"{where}: answer must be one of A-D, got {ans[:40]!r}")
            q = row[col["question"]].strip()
            opts = [row[col[c]] for c in _CEVAL_LETTERS]
            ctx = f"{q}\n" + "".join(f"{c}. {o}\n" for c, o in zip(_CEVAL_LETTERS, opts)) + "答案："
            items.append(MCItem(ctx, _CEVAL_LETTERS, _CEVAL_LETTERS.index(ans), where, group=subject))
    return items


def load_jsonl(path: Path) -> list[MCItem]:
    items = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise BenchmarkFormatError(f"{where}: expected an object {{\"context\", \"choices\", \"gold\"}}")
        ctx = _need_str(obj, "context", where)
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise BenchmarkFormatError(f"{where}: 'choices' must be a list of at least 2 strings")
        gold = obj.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise BenchmarkFormatError(f"{where}: 'gold' must be an integer index into choices "
                                       f"(0..{len(choices) - 1}), got {gold!r}")
        items.append(MCItem(ctx, tuple(choices), gold, where))
    return items


FORMATS: dict[str, Callable[[Path], list[MCItem]]] = {
    "hellaswag": load_hellaswag, "piqa": load_piqa, "arc": load_arc, "ceval": load_ceval, "jsonl": load_jsonl,
}


def load_items(path: str | Path, fmt: str) -> list[MCItem]:
    """Items of a benchmark file (`FORMATS`); `BenchmarkFormatError` names file and line."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown benchmark format {fmt!r}; known: {sorted(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise BenchmarkFormatError(f"{path}: benchmark file not found")
    items = FORMATS[fmt](path)
    if not items:
        raise BenchmarkFormatError(f"{path}: no items")
    return items


# --------------------------------------------------------------------------------------------
# few-shot


@dataclass
class FewshotPool:
    """Where examples come from: a separate split (``items``, per C-Eval subject in ``by_group``),
    or the evaluated items themselves minus the current one (``items is None``)."""

    items: list[MCItem] | None = None
    by_group: dict[str, list[MCItem]] | None = None
    first_n: bool = False  # C-Eval: the first k dev rows, as lm-eval's first_n sampler


def fewshot_pool(path: str | Path, fmt: str, fewshot_path: str | Path | None = None) -> FewshotPool:
    path = Path(path)
    if fewshot_path is not None:
        return FewshotPool(items=load_items(fewshot_path, fmt))
    if fmt == "arc":
        train = path.with_name(re.sub(r"-(Test|Dev)\.jsonl$", "-Train.jsonl", path.name))
        if train != path and train.is_file():
            return FewshotPool(items=load_items(train, fmt))
    if fmt == "ceval":
        root = path if path.is_dir() else path.parent
        dev = root.parent / "dev"
        if root.name in ("val", "test") and dev.is_dir():
            groups: dict[str, list[MCItem]] = {}
            for f in sorted(dev.glob("*.csv")):
                groups[_ceval_subject(f)] = load_ceval(f)
            return FewshotPool(by_group=groups, first_n=True)
    return FewshotPool()


def build_context(items: Sequence[MCItem], index: int, shots: int, pool: FewshotPool, rng: random.Random,
                  delimiter: str = " ") -> str:
    """The prompt for ``items[index]``: ``shots`` solved examples, then the item's context."""
    item = items[index]
    if shots == 0:
        return item.context
    if pool.by_group is not None or pool.items is not None:
        cand = pool.by_group.get(item.group, []) if pool.by_group is not None else pool.items
        assert cand is not None
        examples = list(cand[:shots]) if pool.first_n else rng.sample(cand, min(shots, len(cand)))
    else:  # same split: sample k + 1 and drop the current item, as lm-eval's sampler does
        picks = rng.sample(range(len(items)), min(shots + 1, len(items)))
        examples = [items[i] for i in picks if i != index][:shots]
    if len(examples) < shots:
        log.debug("%s: only %d few-shot examples available (asked %d)", item.source, len(examples), shots)
    shots_text = FEWSHOT_DELIMITER.join(ex.context + delimiter + ex.choices[ex.gold] for ex in examples)
    return shots_text + FEWSHOT_DELIMITER + item.context if shots_text else item.context


# --------------------------------------------------------------------------------------------
# scoring


def score_items(model: nn.Module, tokenizer: Any, items: Sequence[MCItem], contexts: Sequence[str], *,
                prefix_id: int, max_len: int, batch_size: int = 8, pad_id: int = 0, delimiter: str = " ",
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """acc, acc_norm and the random baseline over ``items`` (one batched pass over all choices).

    An item with a choice that cannot be scored (`Unscorable`: no tokens, or longer than the
    window) is left out of the metrics and counted: ``n`` items scored, ``skipped`` left out,
    ``unscored`` the first `_MAX_LISTED` of them as ``{"item": "file:line", "reason"}``.
    ``alone``: choices encoded on their own because they merged into the context (`encode_pair`).
    """
    requests: list[Request] = []
    spans: list[tuple[MCItem, int, int]] = []
    unscored: list[dict[str, str]] = []
    for item, ctx in zip(items, contexts):
        try:
            reqs = [encode_pair(tokenizer, ctx, delimiter + c, prefix_id, max_len=max_len) for c in item.choices]
        except Unscorable as e:
            unscored.append({"item": item.source, "reason": str(e)})
            continue
        spans.append((item, len(requests), len(requests) + len(reqs)))
        requests.extend(reqs)
    if unscored:
        log.warning("%d of %d items not scored, first: %s: %s", len(unscored), len(items), unscored[0]["item"],
                    unscored[0]["reason"])
    scores = score_requests(model, requests, batch_size=batch_size, max_len=max_len, pad_id=pad_id,
                            progress=progress)
    n = len(spans)
    correct = np.zeros(n)
    correct_norm = np.zeros(n)
    chance = np.zeros(n)
    for k, (item, a, b) in enumerate(spans):
        lls = np.array([s.logprob for s in scores[a:b]])
        # lm-eval: completion_len = len(choice) in characters (the delimiter is not counted)
        lens = np.array([max(1, len(c)) for c in item.choices], dtype=np.float64)
        correct[k] = float(np.argmax(lls) == item.gold)
        correct_norm[k] = float(np.argmax(lls / lens) == item.gold)
        chance[k] = 1.0 / len(item.choices)
    return {"acc": float(correct.mean()) if n else None, "acc_norm": float(correct_norm.mean()) if n else None,
            "random": float(chance.mean()) if n else None, "n": n,
            "acc_stderr": _stderr(correct), "acc_norm_stderr": _stderr(correct_norm),
            "skipped": len(unscored), "unscored": unscored[:_MAX_LISTED],
            "alone": sum(r.alone for r in requests)}


def _stderr(x: np.ndarray) -> float | None:
    """Standard error of the mean (lm-eval ``mean_stderr``: sample std / sqrt(n))."""
    n = len(x)
    return float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else None


def evaluate_task(model: nn.Module, tokenizer: Any, task: Any, *, seed: int, prefix_id: int, max_len: int,
                  batch_size: int = 8, pad_id: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One `EvalConfig.Task`: load, build n-shot prompts, score. Result keys: acc, acc_norm, random,
    n, shots (+ stderrs, format, path)."""
    items = load_items(task.path, task.format)
    if task.limit is not None:
        items = items[: task.limit]
    pool = fewshot_pool(task.path, task.format, task.fewshot_path) if task.shots else FewshotPool()
    contexts = [build_context(items, i, task.shots, pool, random.Random(f"{seed}:{task.name}:{i}"), task.delimiter)
                for i in range(len(items))]
    res = score_items(model, tokenizer, items, contexts, prefix_id=prefix_id, max_len=max_len,
                      batch_size=batch_size, pad_id=pad_id, delimiter=task.delimiter, progress=progress)
    res.update({"shots": task.shots, "format": task.format, "path": str(task.path)})
    if res["n"]:
        log.info("task %s (%d-shot, n=%d): acc %.4f  acc_norm %.4f  (random %.4f)", task.name, task.shots, res["n"],
                 res["acc"], res["acc_norm"], res["random"])
    else:
        log.warning("task %s: none of its %d items could be scored", task.name, len(items))
    return res
