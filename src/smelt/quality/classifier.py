"""The ``quality`` curation step: one or more quality classifiers score every document.

Each model of ``options.models`` is a `ScoreSpec` of one `ScoredFilter`: its score goes to
``meta["quality"][<name>]`` on kept and rejected documents, higher is better, and a document is
rejected at the first model whose keep rule it fails, with reason ``quality_low_<name>``::

    data:
      steps:
        - name: quality
          options:
            models:
              - {name: dclm, path: models/dclm/model.bin, keep: {top_fraction: 0.1}}
              - {name: edu, kind: hf, path: models/fineweb-edu-classifier, output: regressor,
                 keep: {threshold: 3.0}}

Two kinds of model:

* ``fasttext``: a supervised fastText model (``smelt quality train`` writes one; DCLM's released
  ``openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin`` is another). The score is
  P(`label`) from ``predict(texts, k=-1)`` over the batch at once; `label` defaults to
  ``__label__hq``, which both write for the positive class.
* ``hf``: a local Hugging Face directory loaded with ``AutoTokenizer`` and
  ``AutoModelForSequenceClassification`` (``local_files_only``: never a download), run in
  batches with padding under ``torch.inference_mode``, on the GPU when there is one
  (``device: auto``). ``output: classifier`` scores softmax P(`label`), `label` being one of the
  config's ``id2label`` names; ``output: regressor`` scores the single output as it is
  (FineWeb-Edu's classifier, Penedo et al. 2024: an educational score from 0 to 5, kept at 3).

**Text seen by fastText** (`fasttext_text`, shared with the trainer in `smelt.quality.train` so
that a model sees at scoring time what it saw in training): the first `max_chars` characters,
stripped, lines joined with one space as DCLM does before predicting
(``" ".join(text.strip().splitlines())``, DCLM ``quality_prediction_enrichers_calc_fasttext.py``):
fastText reads ``\\n`` as the end of an example, and its Python ``predict`` refuses text with
one. No lowercasing: DCLM does not lowercase, and its released model expects cased text. One
space is put on each side of every Han and kana character, so that fastText, which splits
words on ASCII whitespace only, sees Chinese and Japanese as one-character words and its word
bigrams (``wordNgrams: 2``) as character bigrams, the usual features for classifying Chinese
text. Character n-grams (``minn``/``maxn``) were the other way; they would apply to every
English word as well, enlarge the model and slow training, and a Chinese sentence without
spaces would be one "word" whose n-grams span its whole length. English text is unchanged, so
a model trained without this spacing (DCLM's) scores English text as it was trained to.

**Bad model files fail the recipe before any work** (`QualityOptions`, run when the stage is
planned): a fastText path must be a complete supervised fastText model: its header (magic
793712314, version 11 or 12), dictionary and matrices are walked (`inspect_fasttext`) and the
file must end where they do, because fastText's own loader accepts a truncated file silently
(it fills the missing weights with garbage) or dies in ``std::bad_alloc``; it is then loaded once
and `label` must be one of its labels. An ``hf`` path must be a directory whose ``config.json``
names a ``...ForSequenceClassification`` architecture, with weights and a tokenizer beside it.
The errors name ``data.steps.N.options.models.M.path`` (or ``.label``).

A process loads a fastText file once (`load_fasttext` caches by path, size and modification
time), so the plan-time check and the worker's scoring share one load; each worker loads its
models on its first batch (`smelt.quality.scored.lazy`).
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from smelt.data.document import Document
from smelt.data.steps.registry import StepContext
from smelt.data.text import CJK_CHARS
from smelt.quality.scored import KeepRule, ScoredFilter, ScoreSpec, lazy, load_cutoffs, prepare_cutoffs

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_LABEL", "MAX_CHARS", "FastTextFile", "ModelSpec", "QualityOptions", "build", "fasttext_text",
           "inspect_fasttext", "load_fasttext", "prepare"]

STEP = "quality"
DEFAULT_LABEL = "__label__hq"   # the positive class of `smelt quality train` and of DCLM's classifier
# The first 10,000 characters (~1,700 English words) in training and scoring alike: long
# documents cost no more than that, and the start of a page says most about its quality.
MAX_CHARS = 10_000

_CJK_SPLIT = re.compile(f"([{CJK_CHARS}])")
_SURROGATE = re.compile("[\ud800-\udfff]")
_HF_ONLY = ("batch_size", "device", "dtype", "max_length")


def fasttext_text(text: str, max_chars: int | None = MAX_CHARS) -> str:
    """`text` as fastText reads it (module doc): truncated, one line, CJK characters spaced."""
    if max_chars is not None:
        text = text[:max_chars]
    text = " ".join(text.strip().splitlines())
    text = _CJK_SPLIT.sub(r" \1 ", text)
    return _SURROGATE.sub("\ufffd", text)  # a lone surrogate cannot be encoded for fastText


# --------------------------------------------------------------------------------------------
# fastText model files


_FT_MAGIC = 793712314          # FASTTEXT_FILEFORMAT_MAGIC_INT32 (fastText src/fasttext.h)
_FT_VERSIONS = (11, 12)        # 12 since fastText 0.2 (2018); 11: older supervised models
_FT_SUPERVISED = 3             # model_name::sup
_PQ_KSUB = 256                 # ProductQuantizer: 8-bit codes, 256 centroids per sub-quantizer


@dataclass(frozen=True)
class FastTextFile:
    """What a fastText ``.bin``/``.ftz`` header says (`inspect_fasttext`)."""

    version: int
    dim: int
    word_ngrams: int
    bucket: int
    minn: int
    maxn: int
    supervised: bool
    nwords: int
    labels: tuple[str, ...]
    quantized: bool
    size: int


def inspect_fasttext(path: str | Path) -> FastTextFile:
    """Walk a fastText model file as fastText's ``loadModel`` reads it, without loading it.

    Raises ``ValueError`` naming what is wrong: no file, not fastText (magic number), an
    unknown version, or a size that does not match the header, dictionary and matrices
    (truncated, or trailing bytes). Cached by path, size and modification time. The layout
    (little-endian; fastText ``FastText::saveModel``): magic int32, version int32; arguments: 12
    int32 (dim, ws, epoch, minCount, neg, wordNgrams, loss, model, bucket, minn, maxn,
    lrUpdateRate) and a float64; dictionary: size, nwords, nlabels int32, ntokens,
    pruneidx_size int64, then per entry a NUL-terminated string, an int64 count and an int8
    type (0 word, 1 label), then pruneidx_size int32 pairs; a bool (quantized) and the input
    matrix; a bool (quantized output) and the output matrix. A dense matrix is int64 rows,
    int64 columns and rows x columns float32; a quantized one is bool qnorm, int64 rows, int64
    columns, int32 codesize, codesize bytes, a product quantizer (4 int32: dim, nsubq, dsub,
    lastdsub; then dim x 256 float32) and, with qnorm, rows bytes and a second quantizer.
    """
    return _inspect(*_file_key(path))


def _file_key(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size, modification time): the caches' key, so a rewritten file is re-read."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model file not found: {p}" if not p.exists() else f"not a file: {p}")
    st = p.stat()
    return str(p.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _inspect(path: str, size: int, mtime_ns: int) -> FastTextFile:
    if size < 8:
        raise ValueError(f"{path}: not a fastText model ({size} bytes, no header)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _walk_fasttext(path, mm, size)


def _walk_fasttext(p: str, mm: mmap.mmap, size: int) -> FastTextFile:
    off = 0

    def take(fmt: str, what: str) -> tuple[Any, ...]:
        nonlocal off
        n = struct.calcsize(fmt)
        if off + n > size:
            raise ValueError(f"{p}: truncated fastText model: {size} bytes, ends inside the {what}")
        vals = struct.unpack_from(fmt, mm, off)
        off += n
        return vals

    def skip(n: int, what: str) -> None:
        nonlocal off
        if n < 0 or off + n > size:
            raise ValueError(f"{p}: truncated fastText model: {size} bytes, ends inside the {what}")
        off += n

    def matrix(quantized: bool, what: str) -> int:  # returns the rows
        if not quantized:
            rows, cols = take("<qq", what)
            if cols != dim or rows < 0:
                raise ValueError(f"{p}: damaged fastText model: {what} is {rows} x {cols}, dim {dim}")
            skip(rows * cols * 4, what)
            return rows
        qnorm, rows, _cols, codesize = take("<?qqi", what)
        skip(codesize, what)
        skip(take("<4i", what)[0] * _PQ_KSUB * 4, what)
        if qnorm:
            skip(rows, what)
            skip(take("<4i", what)[0] * _PQ_KSUB * 4, what)
        return rows

    magic, version = take("<ii", "header")
    if magic != _FT_MAGIC:
        raise ValueError(f"{p}: not a fastText model (the file does not start with fastText's magic number)")
    if version not in _FT_VERSIONS:
        raise ValueError(f"{p}: fastText model version {version}, expected one of {_FT_VERSIONS}")
    (dim, _ws, _epoch, _min_count, _neg, word_ngrams, _loss, model, bucket, minn, maxn, _lr_rate,
     _t) = take("<12id", "arguments")
    n_entries, nwords, nlabels, _ntokens, prune = take("<iiiqq", "dictionary header")
    if not (nwords >= 0 and nlabels >= 0 and n_entries == nwords + nlabels and dim > 0):
        raise ValueError(f"{p}: damaged fastText model (dictionary of {n_entries} entries, {nwords} words, "
                         f"{nlabels} labels, dim {dim})")
    labels: list[str] = []
    for _ in range(n_entries):
        end = mm.find(b"\0", off)
        if end < 0 or end + 10 > size:
            raise ValueError(f"{p}: truncated fastText model: {size} bytes, ends inside the dictionary")
        if mm[end + 9] == 1:
            labels.append(mm[off:end].decode("utf-8", "replace"))
        off = end + 10  # NUL, int64 count, int8 type
    if prune > 0:
        skip(8 * prune, "pruned-word index")
    quant_in = take("<?", "matrix flag")[0]
    matrix(quant_in, "input matrix")
    quant_out = take("<?", "matrix flag")[0]
    out_rows = matrix(quant_in and quant_out, "output matrix")
    if off != size:
        raise ValueError(f"{p}: damaged fastText model: {size - off} bytes after the output matrix")
    supervised = model == _FT_SUPERVISED
    if supervised and out_rows != nlabels:
        raise ValueError(f"{p}: damaged fastText model: {out_rows} output rows for {nlabels} labels")
    return FastTextFile(version=version, dim=dim, word_ngrams=word_ngrams, bucket=bucket, minn=minn, maxn=maxn,
                        supervised=supervised, nwords=nwords, labels=tuple(labels), quantized=bool(quant_in),
                        size=size)


@functools.lru_cache(maxsize=8)
def _load_fasttext(path: str, size: int, mtime_ns: int) -> Any:
    import fasttext

    info = _inspect(path, size, mtime_ns)  # fastText's loader must never see a damaged file
    if not info.supervised:
        raise ValueError(f"{path}: a fastText word-vector model, not a supervised classifier")
    try:
        model = fasttext.load_model(path)
    except (ValueError, MemoryError, RuntimeError) as e:
        raise ValueError(f"{path}: fastText cannot load it: {e}") from None
    log.info("quality: loaded fastText model %s (%d words, labels %s)", path, info.nwords, ", ".join(info.labels))
    return model


def load_fasttext(path: str | Path) -> Any:
    """The fastText model at `path`, checked (`inspect_fasttext`) and loaded once per process."""
    return _load_fasttext(*_file_key(path))


def fasttext_probs(model: Any, texts: list[str], label: str) -> np.ndarray:
    """P(`label`) for each of `texts` (already `fasttext_text`), one ``predict`` call; NaN for
    an empty text (no words to classify)."""
    out = np.full(len(texts), np.nan)
    idx = [i for i, t in enumerate(texts) if t]
    if idx:
        labs, probs = model.predict([texts[i] for i in idx], k=-1, threshold=0.0)
        for i, ls, ps in zip(idx, labs, probs):
            out[i] = next((float(pr) for lab, pr in zip(ls, ps) if lab == label), 0.0)
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face sequence classifiers


def _hf_config(path: Path) -> dict[str, Any]:
    """The checked ``config.json`` of a local sequence-classification model directory."""
    if not path.is_dir():
        raise ValueError(f"model directory not found: {path}" if not path.exists()
                         else f"{path}: an hf model is a directory (save_pretrained), not a file")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json (not a save_pretrained directory)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON: {e}") from None
    archs = (cfg.get("architectures") or []) if isinstance(cfg, dict) else []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{path}: config.json architectures {archs} has no ...ForSequenceClassification model")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / w).is_file() for w in weights):
        raise ValueError(f"{path}: no weights ({', '.join(weights)})")
    if not any((path / t).is_file() for t in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ValueError(f"{path}: no tokenizer (tokenizer.json or tokenizer_config.json)")
    return cfg


def _hf_labels(cfg: dict[str, Any]) -> list[str]:
    """Label names by id (transformers' default for a config without id2label: LABEL_0, LABEL_1)."""
    id2label = cfg.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    return [f"LABEL_{i}" for i in range(int(cfg.get("num_labels", 2)))]


def _resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class _HFScorer:
    """A sequence classifier scoring batches: softmax P(label), or a regressor's output."""

    def __init__(self, spec: ModelSpec, threads: int | None) -> None:
        import inspect

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.spec = spec
        self.device = _resolve_device(spec.device)
        dtype = spec.dtype if spec.dtype != "auto" else ("bf16" if self.device == "cuda" else "fp32")
        if self.device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(spec.path), local_files_only=True,
            dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
        self.model.to(self.device).eval()
        if self.tok.pad_token is None:  # Llama-style tokenizers: pad with EOS (the mask hides it)
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        if getattr(self.model.config, "pad_token_id", None) is None:  # ...ForSequenceClassification needs it
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.inputs = set(inspect.signature(self.model.forward).parameters)
        labels = _hf_labels(self.model.config.to_dict())
        self.index = None if spec.output == "regressor" else labels.index(spec.label or "")
        log.info("quality: loaded %s (%s) on %s in %s", spec.path, type(self.model).__name__, self.device, dtype)

    def __call__(self, docs: list[Document]) -> np.ndarray:
        torch, spec = self.torch, self.spec
        texts = [d.text[:spec.max_chars] if spec.max_chars else d.text for d in docs]
        out = np.full(len(docs), np.nan)
        todo = sorted((i for i, t in enumerate(texts) if t.strip()), key=lambda i: len(texts[i]))  # less padding
        for b in range(0, len(todo), spec.batch_size):
            idx = todo[b:b + spec.batch_size]
            enc = self.tok([texts[i] for i in idx], padding=True, truncation=True, max_length=spec.max_length,
                           return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in self.inputs}
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()       # (B, num_labels)
            if self.index is None:
                s = logits[:, 0]
            else:
                s = torch.softmax(logits, dim=-1)[:, self.index]
            out[idx] = s.cpu().numpy()
        return out


# --------------------------------------------------------------------------------------------
# options


class ModelSpec(BaseModel):
    """One classifier of the ``quality`` step; its score goes to ``meta.quality.<name>``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Key in meta.quality and suffix of the reject "
                      "reason quality_low_<name>.")
    kind: Literal["fasttext", "hf"] = Field("fasttext", description="fastText .bin, or a local Hugging Face "
                                            "sequence-classification directory.")
    output: Literal["classifier", "regressor"] = Field(
        "classifier", description="hf: softmax P(label), or the single output as it is (FineWeb-Edu: 0-5).")
    path: Path = Field(description="The model file (fasttext) or directory (hf); checked before any work.")
    label: str | None = Field(None, validate_default=True, description="The positive class: fastText "
                              "__label__hq by default; hf classifier: one of config.json's id2label names.")
    keep: KeepRule = Field(description="Keep rule on the score, higher is better ({} scores only; DCLM kept its "
                           "top 10%: top_fraction: 0.1).")
    max_chars: int | None = Field(MAX_CHARS, ge=1, description="Characters of each document the model sees "
                                  "(the first ones); null: all.")
    batch_size: int = Field(32, ge=1, description="hf: documents per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="hf: auto = cuda when available, else cpu.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="hf: weights and activations; "
                                                           "auto = bf16 on cuda, fp32 on cpu.")
    max_length: int = Field(512, ge=1, description="hf: tokens per document, truncated (FineWeb-Edu: 512).")

    @field_validator("path")
    @classmethod
    def _model_file(cls, v: Path, info: ValidationInfo) -> Path:
        kind = info.data.get("kind")
        if kind == "fasttext":
            load_fasttext(v)
        elif kind == "hf":
            cfg = _hf_config(v)
            n = len(_hf_labels(cfg))
            if info.data.get("output") == "regressor" and n != 1:
                raise ValueError(f"{v}: output regressor needs a model with one output; this one has {n} labels")
            if info.data.get("output") == "classifier" and n < 2:
                raise ValueError(f"{v}: a model with one output is a regressor: set output: regressor")
        return v

    @field_validator("label")
    @classmethod
    def _label(cls, v: str | None, info: ValidationInfo) -> str | None:
        path, kind = info.data.get("path"), info.data.get("kind")
        if path is None:  # the path failed: that is the error to report
            return v
        if kind == "fasttext":
            labels = list(inspect_fasttext(path).labels)
            v = v or DEFAULT_LABEL
            if v not in labels and f"__label__{v}" in labels:
                v = f"__label__{v}"
            if v not in labels:
                raise ValueError(f"label {v!r} is not a label of {path} (its labels: {', '.join(labels)})")
            return v
        if info.data.get("output") == "regressor":
            if v is not None:
                raise ValueError("a regressor has no labels: leave label out")
            return v
        labels = _hf_labels(_hf_config(path))
        if v not in labels:
            raise ValueError(f"label {v!r} is not a label of {path} (config.json id2label: {', '.join(labels)})"
                             if v is not None else f"give the positive label, one of: {', '.join(labels)}")
        return v

    @field_validator("keep")
    @classmethod
    def _probability(cls, v: KeepRule, info: ValidationInfo) -> KeepRule:
        if v.pareto_alpha is not None and info.data.get("output") == "regressor":
            raise ValueError("pareto_alpha needs a probability; a regressor's output is not one")
        return v

    @model_validator(mode="after")
    def _kind_options(self) -> ModelSpec:
        if self.kind == "fasttext":
            given = [k for k in _HF_ONLY + ("output",) if k in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: options of kind hf, not fasttext")
            return self
        positions = _hf_config(self.path).get("max_position_embeddings")
        if isinstance(positions, int) and self.max_length > positions:
            raise ValueError(f"max_length {self.max_length} is longer than the model's max_position_embeddings "
                             f"({positions})")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device: cuda, but torch sees no CUDA device (use auto or cpu)")
        return self


class QualityOptions(BaseModel):
    """Options of the ``quality`` step: the classifiers, applied in this order."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1, description="Classifiers; a document is rejected at the "
                                    "first whose keep rule it fails.")

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must differ (meta keys): {', '.join(dup)} given twice")
        return v


# --------------------------------------------------------------------------------------------
# the step


def _fasttext_scorer(spec: ModelSpec) -> Callable[[list[Document]], np.ndarray]:
    model = load_fasttext(spec.path)
    label = spec.label or DEFAULT_LABEL

    def score(docs: list[Document]) -> np.ndarray:
        return fasttext_probs(model, [fasttext_text(d.text, spec.max_chars) for d in docs], label)
    return score


def _threads(context: StepContext) -> int | None:
    """CPU threads for one worker's torch: the cores shared by the stage's workers. None in the
    main process (one worker in-process, or `prepare`), whose torch settings are left alone."""
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = context.data.workers or cores
    return max(1, cores // workers)


def _label(spec: ModelSpec) -> str:
    if spec.kind == "fasttext":
        return f"fastText classifier {spec.path.name}, P({spec.label})"
    what = "regressor output" if spec.output == "regressor" else f"P({spec.label})"
    return f"{spec.path.name} (Hugging Face sequence classifier), {what}"


def _specs(options: QualityOptions, context: StepContext) -> list[ScoreSpec]:
    specs = []
    for m in options.models:
        make = (functools.partial(_fasttext_scorer, m) if m.kind == "fasttext"
                else functools.partial(_HFScorer, m, _threads(context)))
        specs.append(ScoreSpec(key=f"quality.{m.name}", label=_label(m), higher_is_better=True,
                               reason=f"quality_low_{m.name}", rule=m.keep, score=lazy(make)))
    return specs


def build(options: QualityOptions, context: StepContext) -> ScoredFilter:
    return ScoredFilter(STEP, _specs(options, context), load_cutoffs(STEP, context))


def prepare(options: QualityOptions, context: StepContext) -> None:
    prepare_cutoffs(STEP, _specs(options, context), context)
