"""``smelt quality train SPEC.yaml``: train the fastText quality classifier that the ``quality``
step applies, from documents you call good (positive) and bad (negative).

The spec is its own small YAML file (a recipe forbids keys it does not know), validated by
`QualityTrainSpec` before any work; errors name the key path, as the recipe loader's do::

    name: wiki-vs-web                      # the model directory: models/wiki-vs-web
    positive:
      - {path: raw/wikipedia/, glob: "*.jsonl.zst", max_docs: 200000}
    negative:
      - {path: runs/base/data/clean/web, max_docs: 200000}      # a curation stage's kept shards
      - {path: runs/base/data/rejects, rejected_by: [gopher_quality, c4]}
    heldout_fraction: 0.1
    fasttext: {dim: 100, epoch: 5, word_ngrams: 2}

A source is a file, directory or glob of jsonl/jsonl.zst/parquet/txt files (read by
`smelt.data.readers`, as curation inputs are), or a directory of a curation stage's shards
(``data/clean/<domain>``, ``data/rejects``, read back by `smelt.data.shards`; recognised by the
``data/manifest.json`` above it, or ``format: shards``), which carry their domain and, for
rejects, the step that rejected them (``domains`` and ``rejected_by`` select by those).
Documents with a read error or no text are skipped.

**Sampling, all deterministic** (xxh3-64 of the seed and the document id, so a document's fate
does not depend on file order or on the other sources): ``max_docs`` keeps the documents of a
source with the smallest hashes (a uniform sample; the whole source is read); ``balance``
down-samples the larger class the same way to the size of the smaller; ``heldout_fraction`` of
the documents (by another hash of the id) are held out for the report and never trained on.
The training lines are shuffled with the seed.

**At least 11 training threads, always.** fastText fills its input matrix with random values in
ten blocks, one per training thread (``DenseMatrix::uniform``; fastText issue #1061), so with
fewer than ten threads most of the matrix is never written. It used to be zeros; since the
matrix became an uninitialized ``AlignedVector`` (fastText #1341, Jan 2024, the source of the
numpy-2 wheels) it is whatever memory the allocator hands back. With one thread 89% of the rows
stay unwritten (all zeros in a fresh process, where the pages come zeroed from the kernel); 22
of 30 identical one-thread trainings failed with ``Encountered NaN`` when this was written (a
later session, in fresh processes, saw 0 of 40 fail: it depends on what memory is reused); with 10
threads the last ``m*n % 10`` values can still be garbage (2 of 20 models had weights above 10);
with 11 or more every block is written. So fastText always runs at least 11
Hogwild threads (fastText's own default is 12), and two trainings on the same inputs give
slightly different models.

**Text and labels**: every document becomes one line ``__label__hq <text>`` (positive) or
``__label__lq <text>`` (negative), the text through `smelt.quality.classifier.fasttext_text`
(the first ``max_chars`` characters, newlines to spaces, CJK characters spaced), the function
the ``quality`` step applies before predicting.

**fastText settings**: DCLM's classifier (Li et al. 2024; ``baselines/train_fasttext_classifier.py``
defaults lr 0.1, dim 100, epoch 5, minCount 1, softmax loss) with word bigrams (``wordNgrams 2``:
the "bigram" of their released ``openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin``), and
fastText's default 2,000,000 hash buckets for the bigrams. ``model.bin`` takes
4 x dim x (words + bucket) bytes: 800 MB at these defaults; on a few thousand documents
``dim: 32, bucket: 200000`` (~26 MB) loses little.

**Output** in ``out/`` (default ``models/<name>``), written to a temporary sibling and renamed
into place; an earlier ``out/`` is moved aside to ``<out>.prev-N``, never deleted:

* ``model.bin``: the fastText model (the ``quality`` step's ``path``; its positive label is
  ``__label__hq``, the step's default).
* ``config.json`` (``format_version`` 1): the spec, the labels, document counts per source and
  split, the fastText arguments, the text settings, the smelt version, and the size and sha256
  of ``model.bin``.
* ``report.json`` and ``report.md``: on the held-out documents (and, to see over-fitting, the
  training documents) precision, recall and F1 of the positive class at P(hq) >= 0.5, accuracy
  and ROC-AUC (rank-based, ties counted half); and the 20 most indicative words and word
  bigrams of each class. The score of feature f for class c is ``output[c] . input[f]``, the
  feature's contribution to that class's logit before fastText averages the features of a
  text; with two classes and softmax loss the two output rows sum to zero, so a feature's
  scores for the classes are opposite. Bigrams are counted over up to 5,000 training documents
  and found in the model by fastText's own hashing (`fasttext_feature_rows`); a bucket that
  several bigrams share gives them one score. Features seen fewer than 5 times are left out.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xxhash
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from smelt.config import InputSource, RecipeError, format_validation_error, load_yaml
from smelt.data.document import Document
from smelt.fsutil import move_aside, read_json
from smelt.quality.classifier import DEFAULT_LABEL, MAX_CHARS, fasttext_probs, fasttext_text, inspect_fasttext

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "NEGATIVE_LABEL", "POSITIVE_LABEL", "FastTextParams", "QualityTrainSpec",
           "TrainSource", "binary_metrics", "fasttext_feature_rows", "load_train_spec", "roc_auc",
           "train_classifier"]

FORMAT_VERSION = 1
POSITIVE_LABEL = DEFAULT_LABEL  # "__label__hq", the quality step's default
NEGATIVE_LABEL = "__label__lq"
_TOP = 20                      # indicative n-grams listed per class
_TOP_MIN_COUNT = 5             # ... among those seen at least this often
_BIGRAM_DOCS = 5_000           # training documents over which bigrams are counted for the report
_SHARD_SUFFIXES = (".jsonl.zst", ".parquet", ".jsonl")
_MIN_THREADS = 11             # every block of fastText's random initialization written (module doc)
_FT_SPACE = re.compile(r"[ \t\n\v\f\r\0]+")  # fastText's readWord separators


class TrainSource(BaseModel):
    """Documents of one class: input files, or a curation stage's shard directory."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="File, directory or glob of jsonl/jsonl.zst/parquet/txt, or a curation "
                      "stage's shard directory (data/clean/<domain>, data/rejects).")
    format: Literal["auto", "shards", "txt", "jsonl", "parquet"] = Field(
        "auto", description="auto: shards under a curation stage's directory, else by file extension.")
    glob: str = Field("**/*", description="Pattern for files inside a directory path (input files).")
    text_field: str = Field("text", description="JSON/Parquet field holding the text (input files).")
    txt_split: Literal["file", "paragraph"] = Field(
        "file", description="Text files: one document per file, or one per paragraph (blank-line separated).")
    max_docs: int | None = Field(None, ge=1, description="Keep at most this many documents: those with the "
                                 "smallest id hash (a uniform sample).")
    domains: list[str] | None = Field(None, description="Shards only: keep documents of these domains.")
    rejected_by: list[str] | None = Field(None, description="Shards only: keep documents rejected by these steps "
                                          "(meta.rejected_by), e.g. [gopher_quality, c4].")


class FastTextParams(BaseModel):
    """``fasttext.train_supervised`` arguments (DCLM's, module doc)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.1, gt=0.0, description="Learning rate (DCLM: 0.1).")
    dim: int = Field(100, ge=1, description="Size of the word vectors (DCLM: 100).")
    epoch: int = Field(5, ge=1, description="Passes over the training documents (DCLM: 5).")
    word_ngrams: int = Field(2, ge=1, description="Longest word n-gram used as a feature (DCLM: 2).")
    min_count: int = Field(1, ge=1, description="Words seen fewer times are dropped from the vocabulary (DCLM: 1).")
    bucket: int = Field(2_000_000, ge=1, description="Hash buckets for word n-grams (fastText's default).")
    minn: int = Field(0, ge=0, description="Shortest character n-gram (0: none; CJK is spaced instead).")
    maxn: int = Field(0, ge=0, description="Longest character n-gram (0: none).")
    threads: int = Field(0, ge=0, description="Training threads; 0: all cores; at least 11 run (module doc).")

    def train_args(self, seed: int) -> dict[str, Any]:
        """The keyword arguments of ``fasttext.train_supervised`` (without the input file)."""
        threads = self.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else (os.cpu_count() or 1))
        threads = max(threads, _MIN_THREADS)
        return {"lr": self.lr, "dim": self.dim, "epoch": self.epoch, "wordNgrams": self.word_ngrams,
                "minCount": self.min_count, "bucket": self.bucket, "minn": self.minn, "maxn": self.maxn,
                "loss": "softmax", "thread": threads, "seed": seed, "verbose": 0}


class QualityTrainSpec(BaseModel):
    """A ``smelt quality train`` spec file (module doc)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Model name; the default output is models/<name>.")
    out: Path | None = Field(None, description="Model directory; default models/<name>.")
    positive: list[TrainSource] = Field(min_length=1, description="Sources of good documents (label hq).")
    negative: list[TrainSource] = Field(min_length=1, description="Sources of bad documents (label lq).")
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of documents held out for the report "
                                    "(by id hash).")
    seed: int = Field(0, ge=0, description="Seeds the samples, the held-out split, the shuffle and fastText.")
    balance: bool = Field(True, description="Down-sample the larger class to the size of the smaller.")
    max_chars: int | None = Field(MAX_CHARS, ge=1, description="Characters of each document trained on (the "
                                  "first ones; the quality step's max_chars should match); null: all.")
    fasttext: FastTextParams = Field(default_factory=FastTextParams)

    @model_validator(mode="after")
    def _ngrams(self) -> QualityTrainSpec:
        if self.fasttext.maxn < self.fasttext.minn:
            raise ValueError("fasttext.maxn must be at least fasttext.minn")
        return self

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("models") / self.name


# --------------------------------------------------------------------------------------------
# the spec file


def load_train_spec(path: str | Path) -> QualityTrainSpec:
    """Read and validate a spec file; `RecipeError` naming the file and key path if it is wrong,
    or if a source has no files."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"quality training spec not found: {p}")
    try:
        tree = load_yaml(p.read_text(encoding="utf-8"), str(p))
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not UTF-8 text") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{p}: the top level must be a mapping (name, positive, negative, ...)")
    try:
        spec = QualityTrainSpec.model_validate(tree)
    except ValidationError as e:
        lines = format_validation_error(e, QualityTrainSpec).split("\n", 1)[1]
        raise RecipeError(f"invalid quality training spec {p}:\n{lines}") from None
    problems = []
    for cls in ("positive", "negative"):
        for i, src in enumerate(getattr(spec, cls)):
            try:
                _source_files(src)
            except (ValueError, OSError) as e:
                problems.append(f"  {cls}.{i}.path: {e}")
    if problems:
        raise RecipeError(f"invalid quality training spec {p}:\n" + "\n".join(problems))
    return spec


# --------------------------------------------------------------------------------------------
# reading sources


def _is_shards(src: TrainSource) -> bool:
    """A curation stage's output: ``<run>/data/manifest.json`` sits at most two levels above."""
    if src.format != "auto":
        return src.format == "shards"
    p = Path(src.path)
    for d in (p, p.parent, p.parent.parent):
        m = d / "manifest.json"
        if m.is_file():
            try:
                return read_json(m).get("stage") == "data"
            except (ValueError, OSError):
                return False
    return False


def _input_source(src: TrainSource) -> InputSource:
    return InputSource(path=src.path, domain="train", format=src.format, glob=src.glob, text_field=src.text_field,
                       txt_split=src.txt_split)


def _source_files(src: TrainSource) -> list[str]:
    """The files of a source, sorted; ValueError when it has none."""
    from smelt.data.errors import DataInputError
    from smelt.data.inputs import is_ignored_name, resolve_files

    if _is_shards(src):
        p = Path(src.path)
        if p.is_file():
            return [str(p)]
        if not p.is_dir():
            raise ValueError(f"not found: {p}")
        files = [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.name.endswith(_SHARD_SUFFIXES)
                 and not is_ignored_name(f.name) and "_work" not in f.relative_to(p).parts]
        if not files:
            raise ValueError(f"{p}: no shard files ({', '.join(_SHARD_SUFFIXES)})")
        return files
    if src.domains is not None or src.rejected_by is not None:
        raise ValueError("domains and rejected_by select curation shards (data/clean/<domain>, data/rejects); "
                         f"{src.path} is not under a curation stage's directory (set format: shards if it is)")
    try:
        files = resolve_files(_input_source(src))
    except DataInputError as e:
        raise ValueError(str(e)) from None
    if not files:
        raise ValueError(f"no files match {src.path} (glob {src.glob!r})")
    return files


def _documents(src: TrainSource) -> Iterator[Document]:
    from smelt.data.readers import read_documents
    from smelt.data.shards import read_shard

    shards = _is_shards(src)
    for path in _source_files(src):
        for doc in (read_shard(path) if shards else read_documents(path, _input_source(src))):
            if doc.meta.get("read_error") or not doc.text.strip():
                continue
            if src.domains is not None and doc.domain not in src.domains:
                continue
            if src.rejected_by is not None and doc.meta.get("rejected_by") not in src.rejected_by:
                continue
            yield doc


def _hash(seed: int, what: str, doc_id: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{seed}:{what}:{doc_id}".encode("utf-8", "surrogatepass"))


def _read_class(sources: list[TrainSource], spec: QualityTrainSpec) -> tuple[list[tuple[str, str]], list[int]]:
    """(id, fastText text) of each kept document of one class, and the count per source."""
    docs: list[tuple[str, str]] = []
    counts = []
    for src in sources:
        if src.max_docs is None:
            got = [(d.id, fasttext_text(d.text, spec.max_chars)) for d in _documents(src)]
        else:  # bottom-k by hash: a max-heap of the k smallest, memory bounded by max_docs
            heap: list[tuple[int, int, str, str]] = []
            for n, d in enumerate(_documents(src)):
                item = (-_hash(spec.seed, "sample", d.id), -n, d.id, d.text)
                if len(heap) < src.max_docs:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
            got = [(i, fasttext_text(t, spec.max_chars)) for _, _, i, t in sorted(heap, key=lambda x: x[1],
                                                                                  reverse=True)]
        got = [(i, t) for i, t in got if t]
        log.info("quality train: %d documents from %s", len(got), src.path)
        counts.append(len(got))
        docs += got
    return docs, counts


# --------------------------------------------------------------------------------------------
# metrics and features


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counted half (Mann-Whitney U from average ranks). NaN without both classes."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    r = avg_rank[inv]
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Precision, recall and F1 of the positive class at ``p >= threshold``, accuracy, ROC-AUC."""
    y = np.asarray(y, dtype=bool)
    pred = np.asarray(p) >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"documents": int(y.size), "positive": int(y.sum()), "negative": int((~y).sum()),
            "threshold": threshold, "precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
            "accuracy": round(float((pred == y).mean()), 4) if y.size else float("nan"),
            "roc_auc": round(roc_auc(y, p), 4)}


def _ft_hash(token: str) -> int:
    """fastText's ``Dictionary::hash``: 32-bit FNV-1a over the UTF-8 bytes, each byte taken as a
    signed char (bytes >= 0x80 are sign-extended before the xor)."""
    h = 2166136261
    for b in token.encode("utf-8"):
        h = ((h ^ (b if b < 0x80 else b | 0xFFFFFF00)) * 16777619) & 0xFFFFFFFF
    return h


def _bigram_row(a: int, b: int, nwords: int, bucket: int) -> int:
    """Input-matrix row of the word bigram with hashes `a`, `b` (``Dictionary::addWordNgrams``: the
    int32 hashes are sign-extended to uint64, h = h * 116049371 + next, row = nwords + h % bucket)."""
    m = (1 << 64) - 1
    sa = a - (1 << 32) if a >= 1 << 31 else a
    sb = b - (1 << 32) if b >= 1 << 31 else b
    h = ((sa & m) * 116049371 + (sb & m)) & m
    return nwords + h % bucket


def fasttext_feature_rows(model: Any, text: str) -> list[int]:
    """The input-matrix rows fastText averages for `text` (one line): its in-vocabulary words and
    ``</s>``, then the word bigrams of all tokens (``Dictionary::getLine``, supervised models
    without character n-grams and with ``wordNgrams`` <= 2)."""
    args = model.f.getArgs()
    if args.maxn > 0 or args.wordNgrams > 2:
        raise ValueError("fasttext_feature_rows handles word bigrams without character n-grams only")
    tokens = [t for t in _FT_SPACE.split(text) if t] + ["</s>"]
    rows = [w for w in (model.get_word_id(t) for t in tokens) if w >= 0]
    if args.wordNgrams == 2:
        nwords = len(model.get_words())
        hashes = [_ft_hash(t) for t in tokens]
        rows += [_bigram_row(a, b, nwords, args.bucket) for a, b in zip(hashes, hashes[1:])]
    return rows


def _top_ngrams(model: Any, texts: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The `_TOP` words and bigrams with the highest score for each class (module doc)."""
    args = model.f.getArgs()
    labels = list(model.labels)
    out = model.get_output_matrix()                                   # (labels, dim)
    words, freqs = model.get_words(include_freq=True)
    feats: list[tuple[str, int, int]] = [(w, i, int(c)) for i, (w, c) in enumerate(zip(words, freqs))
                                         if c >= _TOP_MIN_COUNT and w != "</s>"]
    if args.wordNgrams >= 2 and args.maxn == 0:
        pairs: Counter = Counter()
        for t in texts[:_BIGRAM_DOCS]:
            toks = [w for w in _FT_SPACE.split(t) if w]
            pairs.update(zip(toks, toks[1:]))
        hashes: dict[str, int] = {}
        for (a, b), c in pairs.items():
            if c >= _TOP_MIN_COUNT:
                ha = hashes.setdefault(a, _ft_hash(a))
                hb = hashes.setdefault(b, _ft_hash(b))
                feats.append((f"{a} {b}", _bigram_row(ha, hb, len(words), args.bucket), c))
    if not feats:
        return {lab: [] for lab in labels}
    vecs = np.stack([model.get_input_vector(row) for _, row, _ in feats])   # (features, dim)
    scores = vecs @ out.T                                                    # (features, labels)
    res = {}
    for c, lab in enumerate(labels):
        order = np.argsort(-scores[:, c], kind="stable")[:_TOP]
        res[lab] = [{"ngram": feats[i][0], "score": round(float(scores[i, c]), 4), "count": feats[i][2]}
                    for i in order]
    return res


# --------------------------------------------------------------------------------------------
# training


def _staging_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling of `out_dir` to write into (`_install` renames it into place)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a dead process with our PID
    tmp.mkdir()
    return tmp


def _install(tmp: Path, out_dir: Path) -> Path | None:
    """Rename `tmp` to `out_dir`, moving an earlier `out_dir` aside first; returns where it went."""
    moved = move_aside(out_dir, "quality train")
    os.replace(tmp, out_dir)
    return moved


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _predict(model: Any, texts: list[str]) -> np.ndarray:
    return np.concatenate([fasttext_probs(model, texts[i:i + 4096], POSITIVE_LABEL)
                           for i in range(0, len(texts), 4096)]) if texts else np.zeros(0)


def report_markdown(spec: QualityTrainSpec, report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [f"# Quality classifier `{spec.name}`", "",
             f"fastText, trained on {c['train']['positive']:,} positive (`{POSITIVE_LABEL}`) and "
             f"{c['train']['negative']:,} negative (`{NEGATIVE_LABEL}`) documents; "
             f"{c['heldout']['positive']:,} + {c['heldout']['negative']:,} held out.", "",
             "| metric | held-out | train |", "| --- | --- | --- |"]
    for k, shown in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("accuracy", "accuracy"),
                     ("roc_auc", "ROC-AUC")):
        lines.append(f"| {shown} | {report['heldout'][k]} | {report['train'][k]} |")
    lines += ["", "Precision, recall and F1 of the positive class at P(hq) >= 0.5.", "",
              "## Most indicative n-grams", ""]
    for lab, rows in report["top_ngrams"].items():
        lines += [f"### `{lab}`", "", "| n-gram | score | count |", "| --- | --- | --- |"]
        lines += [f"| `{r['ngram']}` | {r['score']} | {r['count']} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def train_classifier(spec: QualityTrainSpec, out_dir: Path | None = None) -> dict[str, Any]:
    """Train the classifier of `spec` into `out_dir` (default ``spec.out_dir``); returns the report
    (``report.json``) plus ``out``, ``model`` and ``moved_aside`` (the earlier directory, or None).

    Raises `RecipeError` when a class has no documents, or too few to hold some out."""
    import fasttext

    from smelt import __version__

    t0 = time.time()
    out_dir = Path(out_dir) if out_dir is not None else spec.out_dir
    pos, pos_counts = _read_class(spec.positive, spec)
    neg, neg_counts = _read_class(spec.negative, spec)
    for cls, docs in (("positive", pos), ("negative", neg)):
        if not docs:
            raise RecipeError(f"quality train {spec.name}: no {cls} documents in {cls}.*.path")
    read = {"positive": len(pos), "negative": len(neg)}
    if spec.balance:
        n = min(len(pos), len(neg))
        pos, neg = ([d for _, d in sorted(((_hash(spec.seed, "balance", d[0]), d) for d in docs),
                                          key=lambda t: t[0])[:n]] for docs in (pos, neg))
    split: dict[str, dict[str, list[str]]] = {"train": {"positive": [], "negative": []},
                                              "heldout": {"positive": [], "negative": []}}
    for cls, docs in (("positive", pos), ("negative", neg)):
        for doc_id, text in docs:
            held = _hash(spec.seed, "heldout", doc_id) / 2.0 ** 64 < spec.heldout_fraction
            split["heldout" if held else "train"][cls].append(text)
    counts = {"read": read, "sources": {"positive": pos_counts, "negative": neg_counts},
              **{k: {c: len(v) for c, v in s.items()} for k, s in split.items()}}
    for k in ("train", "heldout"):
        for cls in ("positive", "negative"):
            if not split[k][cls]:
                raise RecipeError(f"quality train {spec.name}: no {cls} documents in the {k} split "
                                  f"({read[cls]} read; heldout_fraction {spec.heldout_fraction})")
    train = ([(POSITIVE_LABEL, t) for t in split["train"]["positive"]]
             + [(NEGATIVE_LABEL, t) for t in split["train"]["negative"]])
    order = np.random.default_rng(spec.seed).permutation(len(train))
    ft_args = spec.fasttext.train_args(spec.seed)
    tmp = _staging_dir(out_dir)
    try:
        train_file = tmp / "_train.txt"
        with open(train_file, "w", encoding="utf-8") as fh:
            for i in order:
                fh.write(f"{train[i][0]} {train[i][1]}\n")
        log.info("quality train: fastText on %d documents (%s)", len(train), ft_args)
        model = fasttext.train_supervised(input=str(train_file), **ft_args)
        train_file.unlink()
        model_path = tmp / "model.bin"
        model.save_model(str(model_path))
        inspect_fasttext(model_path)  # the check the quality step makes before loading it
        report: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": spec.name, "counts": counts}
        for k in ("heldout", "train"):
            texts = split[k]["positive"] + split[k]["negative"]
            y = np.r_[np.ones(len(split[k]["positive"]), bool), np.zeros(len(split[k]["negative"]), bool)]
            report[k] = binary_metrics(y, _predict(model, texts))
        report["top_ngrams"] = _top_ngrams(model, [train[i][1] for i in order])
        report["seconds"] = round(time.time() - t0, 2)
        config = {"format_version": FORMAT_VERSION, "name": spec.name, "smelt_version": __version__,
                  "spec": spec.model_dump(mode="json"),
                  "labels": {"positive": POSITIVE_LABEL, "negative": NEGATIVE_LABEL},
                  "counts": counts, "fasttext": ft_args,
                  "text": {"max_chars": spec.max_chars, "normalize": "smelt.quality.classifier.fasttext_text"},
                  "model_file": "model.bin", "model_bytes": model_path.stat().st_size,
                  "model_sha256": _sha256(model_path)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(report_markdown(spec, report) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved = _install(tmp, out_dir)
    log.info("quality train %s: held-out ROC-AUC %s, F1 %s -> %s", spec.name, report["heldout"]["roc_auc"],
             report["heldout"]["f1"], out_dir / "model.bin")
    return {**report, "out": str(out_dir), "model": str(out_dir / "model.bin"),
            "moved_aside": str(moved) if moved else None}
