"""The ``perplexity`` curation step: bits per byte of each document under a reference model, and
CCNet's head/middle/tail buckets.

CCNet (Wenzek et al. 2020, Section 3.3) scores every document with a language model trained on
a clean reference corpus (Wikipedia) and splits each language into thirds by perplexity: the
``head`` reads most like the reference, the ``tail`` least. RedPajama-1T kept the head and the
middle of its CCNet buckets; so does this step by default (`KeepRule` buckets ``[33.3, 66.7]``
per domain and language, ``keep_buckets: [head, middle]``); any other keep rule of
`smelt.quality.scored` except GPT-3's Pareto draw (which needs a probability) also works.

The reference model (``options.model``) is one of:

* a smelt **run directory** or **checkpoint directory**, or a **Hugging Face** Llama directory with
  ``tokenizer.json`` (`smelt.interop.load.load_model` reads all three);
* a **KenLM** model, ARPA text or KenLM binary (recognized by its first bytes, whatever its
  name), scored with the optional ``kenlm`` package (``pip install kenlm``).

The path is checked when the recipe is (`PerplexityOptions`), without loading weights: a missing
path, a truncated checkpoint, an HF directory without ``config.json`` or a file that is not a
KenLM model is a `RecipeError` naming ``data.steps.N.options.model``.

**Score** (``meta.perplexity.bpb``, lower is better): bits per byte,
``sum of token NLL (nats) / ln 2 / UTF-8 bytes of the scored text``, which does not depend on the
tokenizer (lm-eval's ``bits_per_byte``, as `smelt.eval.perplexity` computes it). The bucket goes
to ``meta.perplexity.bucket``. With a language model:

* tokens are the document's ids as `smelt pack` encodes them (no special tokens added), its
  first ``max_tokens``; the first is predicted from the token that precedes a document in
  training (BOS when the run's packer added one, else EOS; BOS, else EOS, for an HF directory);
* a document longer than the window, ``min(max_tokens, model max_seq_len)`` tokens, is scored in
  windows that each predict the next ``window`` tokens (`smelt.eval.perplexity.rolling_windows`,
  lm-eval's ``loglikelihood_rolling``): every scored token is predicted once, and a last, shorter
  window takes earlier tokens as context up to the window length;
* the scored text is the whole document when every token is scored, else the text up to the end
  of the last scored token; only its first ``64 * max_tokens`` characters are tokenized (no
  tokenizer averages 64 characters a token, and the cut only moves the last word);
* within one `ScoredFilter.process_batch` call the windows are sorted by length and packed into
  forwards of at most ``batch_tokens`` (rows x longest window, padding included), right-padded:
  with causal attention a real position never attends to the padding after it, so a document's
  score does not depend on its batch (beyond bf16 rounding; tests check 1e-2 bpb in bf16, 1e-4 in
  fp32). The output projection and log-softmax run on the scored positions only, ``2**22 / vocab``
  rows at a time (512 at an 8K vocabulary), never on the batch's whole (B, T, vocab) logits: that
  made the debug model 2.4x faster on CPU at 8192 tokens per forward (bench/perplexity_step.py).

With KenLM, CCNet's convention: each non-empty line is scored as a sentence (``<s>`` ... ``</s>``),
its log10 probability converted to bits (x log2 10), and the bytes are the line's plus one for the
newline that ``</s>`` predicts; whole lines are scored until ``max_tokens`` words. The text is
scored as it is: CCNet's own models expect its normalization and SentencePiece pieces, which
this step does not apply.

A document shorter than ``min_chars`` or with nothing to score gets ``null`` and is kept (counter
``unscored:perplexity.bpb``). The model loads once per worker, on the first batch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from smelt.data.document import Document
from smelt.data.steps.registry import StepContext
from smelt.quality.scored import KeepRule, ScoredFilter, ScoreSpec, lazy, load_cutoffs, prepare_cutoffs

log = logging.getLogger(__name__)

__all__ = ["PerplexityOptions", "ModelScorer", "KenLMScorer", "build", "prepare", "model_kind", "token_batches",
           "make_scorer", "PerplexityFilter"]

STEP = "perplexity"
KEY = "perplexity.bpb"
BUCKET_KEY = "perplexity.bucket"
REASON = "perplexity_high"
# The first bytes of a KenLM binary (kenlm lm/binary_format.cc, kMagicBeforeVersion).
KENLM_BINARY_MAGIC = b"mmap lm http://kheafield.com/code"
ARPA_HEADER = b"\\data\\"
_CHARS_PER_TOKEN = 64  # tokenize at most this many characters per scored token (see the module doc)
_LOGIT_ELEMENTS = 1 << 22  # logits computed at once (rows x vocab): 16 MB in fp32, cache-sized chunks
_LN2 = math.log(2.0)
_BITS_PER_LOG10 = math.log2(10.0)


# --------------------------------------------------------------------------------------------
# options, and the model path checked without loading it


def ccnet_buckets() -> KeepRule:
    """CCNet's thirds per domain and language; head and middle stay (RedPajama-1T)."""
    return KeepRule(buckets=[33.3, 66.7], group_by="domain_lang", keep_buckets=["head", "middle"])


class PerplexityOptions(BaseModel):
    """Settings of the ``perplexity`` step: ``data.steps: [{name: perplexity, options: {...}}]``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Reference model: smelt run or checkpoint directory, Hugging Face Llama "
                       "directory with tokenizer.json, or KenLM .arpa/binary file (pip install kenlm).")
    name: str = Field("ref", description="The reference model's name in stats.json and the report.")
    keep: KeepRule = Field(default_factory=ccnet_buckets, description="Keep rule; default CCNet buckets "
                           "[33.3, 66.7] per domain and language, head and middle kept.")
    max_tokens: int = Field(1024, ge=1, description="Tokens scored per document (its first ones; KenLM: whole "
                            "lines up to this many words); windows of min(this, model max_seq_len).")
    batch_tokens: int = Field(8192, ge=1, description="Tokens per forward: rows x longest window, padding "
                              "included (a longer window goes alone).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="Weights and activations (bf16 on CPU too).")
    min_chars: int = Field(0, ge=0, description="Shorter documents (characters) are not scored: kept, score "
                           "null.")

    @field_validator("model")
    @classmethod
    def _loadable(cls, v: str) -> str:
        model_kind(Path(v))
        return v

    @model_validator(mode="after")
    def _rule_and_device(self) -> PerplexityOptions:
        if self.keep.pareto_alpha is not None:
            raise ValueError("keep.pareto_alpha: GPT-3's draw needs a probability; bits per byte is not one "
                             "(use buckets, top_fraction or threshold)")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device: cuda, but torch sees no CUDA device (use auto or cpu)")
        return self


def model_kind(path: Path) -> Literal["smelt", "hf", "kenlm"]:
    """What ``path`` holds, checked without loading weights; ValueError saying what is wrong."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4096)
        if not (head.startswith(KENLM_BINARY_MAGIC) or head.lstrip().startswith(ARPA_HEADER)):
            raise ValueError(f"{path}: not a KenLM model (an ARPA file starts with \\data\\, a KenLM binary with "
                             f"{KENLM_BINARY_MAGIC.decode()!r}); a smelt run, checkpoint or Hugging Face model is "
                             f"a directory")
        try:
            import kenlm  # noqa: F401
        except ImportError:
            raise ValueError(f"{path} is a KenLM model and the kenlm package is not installed: pip install kenlm "
                             f"(or pip install 'smelt[kenlm]')") from None
        return "kenlm"
    from smelt.train.load import is_checkpoint

    if (path / "config.json").is_file() and not (path / "recipe.yaml").is_file() and not is_checkpoint(path):
        _check_hf(path)
        return "hf"
    _check_smelt(path)
    return "smelt"


def _check_hf(path: Path) -> None:
    from smelt.interop.hf import InteropError, model_config_from_hf
    from smelt.interop.load import is_hf_dir

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        model_config_from_hf(config, str(path / "config.json"))
    except (OSError, ValueError) as e:  # InteropError is a ValueError
        raise ValueError(str(e) if isinstance(e, InteropError) else f"{path / 'config.json'}: unreadable ({e})") \
            from None
    if not is_hf_dir(path):
        raise ValueError(f"{path}: config.json but no model.safetensors (or its index)")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: no tokenizer.json (the step tokenizes with the model's own tokenizer)")


def _check_smelt(path: Path) -> None:
    """A checkpoint whose files all have their recorded sizes (the load checks their checksums), in a
    run with a tokenizer."""
    from smelt.train.checkpoint import list_checkpoints, verify_checkpoint
    from smelt.train.load import is_checkpoint

    if is_checkpoint(path):
        problem = verify_checkpoint(path, content=False)
        if problem is not None:
            raise ValueError(f"{path}: incomplete or corrupt checkpoint: {problem}")
        run = path.parents[2] if path.parent.name == "checkpoints" and len(path.parents) > 2 else None
        if run is None or not (run / "recipe.yaml").is_file():
            raise ValueError(f"{path}: checkpoint outside a run directory (expected <run>/train/checkpoints/"
                             f"{path.name} with <run>/recipe.yaml)")
    elif (path / "recipe.yaml").is_file():
        run = path
        ckpts = run / "train" / "checkpoints"
        problems = []
        for _, p in reversed(list_checkpoints(ckpts)):
            problem = verify_checkpoint(p, content=False)
            if problem is None:
                break
            problems.append(f"{p.name}: {problem}")
        else:
            raise ValueError(f"{ckpts}: no complete checkpoint" + (f" ({'; '.join(problems)})" if problems else ""))
    else:
        raise ValueError(f"{path}: neither a smelt run directory (no recipe.yaml), a checkpoint (no .metadata) nor "
                         f"a Hugging Face directory (no config.json)")
    if not (run / "tokenizer" / "tokenizer.json").is_file():
        raise ValueError(f"{run / 'tokenizer' / 'tokenizer.json'}: not found (the step needs the run's tokenizer)")


# --------------------------------------------------------------------------------------------
# scoring with a language model


def token_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into forwards, longest first: each group's rows x its longest
    length is at most ``budget`` (an item longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        if cur and (len(cur) + 1) * width > budget:
            out.append(cur)
            cur = []
        if not cur:
            width = lengths[i]
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _valid_utf8(text: str) -> str:
    """``text``, with lone surrogates (which no tokenizer takes) replaced by '?'."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class ModelScorer:
    """Bits per byte of documents under a smelt or Hugging Face model (see the module doc)."""

    def __init__(self, path: str | Path, *, max_tokens: int = 1024, batch_tokens: int = 8192, device: str = "auto",
                 dtype: str = "bf16", min_chars: int = 0) -> None:
        import torch

        from smelt.interop.load import LoadError, load_model

        self.device = resolve_device(device)
        self.lm = load_model(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=self.device)
        if self.lm.tokenizer is None:
            raise LoadError(f"{path}: the model has no tokenizer")
        ids = self.lm.special_ids
        # The token before a document's first token in training (smelt.eval.perplexity.document_prefix_id).
        first = ("bos", "eos") if self.lm.run_dir is None or self.lm.add_bos else ("eos",)
        prefix = next((ids[k] for k in first if k in ids), None)
        if prefix is None:
            raise LoadError(f"{path}: no {' or '.join(k.upper() for k in first)} id: cannot tell the token "
                            f"that starts a document")
        self.prefix_id = int(prefix)
        self.pad_id = int(self.lm.pad_id or 0)
        # The output projection is applied here, to the target positions in chunks of `logit_rows`:
        # the (B, T, vocab) logits of a whole batch would take batch_tokens x vocab x 4 bytes (1 GB
        # at 8192 tokens and a 32K vocabulary) and, on CPU, more time than the model's layers.
        self.model = self.lm.model
        self.head = self.model.output
        self.model.output = None  # this scorer's own copy: its forward now returns normed hidden states
        self.logit_rows = max(1, _LOGIT_ELEMENTS // self.lm.cfg.vocab_size)
        self.max_tokens = max_tokens
        self.window = min(max_tokens, self.lm.cfg.max_seq_len)
        self.batch_tokens = batch_tokens
        self.min_chars = min_chars
        log.info("perplexity: %s loaded on %s in %s, windows of %d tokens, %d tokens per forward", path,
                 self.device, dtype, self.window, batch_tokens)

    def encode(self, texts: Sequence[str]) -> list[tuple[list[int], int]]:
        """(scored token ids, UTF-8 bytes of the scored text) per text."""
        tok = self.lm.tokenizer
        cap = _CHARS_PER_TOKEN * self.max_tokens
        heads = [_valid_utf8(t[:cap]) for t in texts]
        prev = getattr(tok, "encode_special_tokens", None)
        if prev is not None:  # special tokens' text is text, as `smelt pack` encodes it
            tok.encode_special_tokens = True
        try:
            encs = tok.encode_batch(heads, add_special_tokens=False)
        finally:
            if prev is not None:
                tok.encode_special_tokens = prev
        out = []
        for text, head, enc in zip(texts, heads, encs):
            ids = list(enc.ids[:self.max_tokens])
            if not ids:
                out.append(([], 0))
                continue
            whole = len(ids) == len(enc.ids) and len(head) == len(text)
            scored = head if whole else head[:enc.offsets[len(ids) - 1][1]]
            out.append((ids, len(scored.encode("utf-8"))))
        return out

    def __call__(self, docs: list[Document]) -> np.ndarray:
        from smelt.eval.perplexity import rolling_windows

        out = np.full(len(docs), np.nan)
        todo = [i for i, d in enumerate(docs) if len(d.text) >= max(self.min_chars, 1)]
        requests, owner = [], []
        n_bytes = np.zeros(len(docs))
        for i, (ids, nb) in zip(todo, self.encode([docs[i].text for i in todo])):
            if not ids or not nb:
                continue
            n_bytes[i] = nb
            for r in rolling_windows(ids, self.prefix_id, self.window):
                requests.append(r)
                owner.append(i)
        nll = np.zeros(len(docs))
        inputs = [(list(r.context) + list(r.target))[:-1][-self.window:] for r in requests]
        for group in token_batches([len(x) for x in inputs], self.batch_tokens):
            for j, v in zip(group, self.window_nll([inputs[j] for j in group], [requests[j].target for j in group])):
                nll[owner[j]] += v
        done = n_bytes > 0
        out[done] = nll[done] / _LN2 / n_bytes[done]
        return out

    def window_nll(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[float]:
        """Summed NLL (nats) of each window's targets, the last ``len(target)`` positions of its input
        shifted by one; ONE forward for all windows, right-padded to the longest."""
        import torch

        width = max(len(x) for x in inputs)
        batch = np.full((len(inputs), width), self.pad_id, dtype=np.int64)
        rows, cols = [], []
        for j, (x, t) in enumerate(zip(inputs, targets)):
            batch[j, :len(x)] = x
            rows.append(np.full(len(t), j))
            cols.append(np.arange(len(x) - len(t), len(x)))
        dev = self.device
        row_t = torch.from_numpy(np.concatenate(rows)).to(dev)
        tgt = torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])).to(dev)
        with torch.no_grad():
            h = self.model(torch.from_numpy(batch).to(dev))  # (B, T, dim): the model without its output layer
            h = h[row_t, torch.from_numpy(np.concatenate(cols)).to(dev)]  # (N, dim): target positions only
            lp = torch.empty(len(tgt), dtype=torch.float64, device=dev)
            for c in range(0, len(tgt), self.logit_rows):  # (rows, vocab) logits at a time, never (B, T, vocab)
                logits = self.head(h[c:c + self.logit_rows]).float()
                t = tgt[c:c + self.logit_rows, None]
                lp[c:c + len(t)] = (torch.logsumexp(logits, dim=-1) - logits.gather(1, t)[:, 0]).double()
            sums = torch.zeros(len(inputs), dtype=torch.float64, device=dev).index_add_(0, row_t, lp)
        return sums.tolist()


# --------------------------------------------------------------------------------------------
# scoring with KenLM


class KenLMScorer:
    """Bits per byte under a KenLM model, line by line as CCNet scores (see the module doc)."""

    def __init__(self, path: str | Path, *, max_tokens: int = 1024, min_chars: int = 0) -> None:
        import kenlm

        self.lm = kenlm.Model(str(path))
        self.max_tokens = max_tokens
        self.min_chars = min_chars
        log.info("perplexity: KenLM %d-gram model %s loaded", self.lm.order, path)

    def score_text(self, text: str) -> float:
        log10 = 0.0
        n_bytes = words = 0
        for line in _valid_utf8(text).split("\n"):
            n = len(line.split())
            if not n:
                continue
            log10 += self.lm.score(line, bos=True, eos=True)
            n_bytes += len(line.encode("utf-8")) + 1  # + the newline that </s> predicts
            words += n + 1
            if words >= self.max_tokens:
                break
        return -log10 * _BITS_PER_LOG10 / n_bytes if n_bytes else float("nan")

    def __call__(self, docs: list[Document]) -> np.ndarray:
        return np.array([self.score_text(d.text) if len(d.text) >= self.min_chars else np.nan for d in docs],
                        dtype=np.float64)


# --------------------------------------------------------------------------------------------
# the step


def make_scorer(options: PerplexityOptions) -> ModelScorer | KenLMScorer:
    """The scorer of ``options.model`` (loads the model)."""
    if model_kind(Path(options.model)) == "kenlm":
        return KenLMScorer(options.model, max_tokens=options.max_tokens, min_chars=options.min_chars)
    return ModelScorer(options.model, max_tokens=options.max_tokens, batch_tokens=options.batch_tokens,
                       device=options.device, dtype=options.dtype, min_chars=options.min_chars)


def _specs(options: PerplexityOptions) -> list[ScoreSpec]:
    kind = model_kind(Path(options.model))
    label = f"bits per byte under {options.name} ({kind}: {Path(options.model).name}), lower is better"
    return [ScoreSpec(key=KEY, label=label, higher_is_better=False, reason=REASON, rule=options.keep,
                      score=lazy(lambda: make_scorer(options)), bucket_key=BUCKET_KEY)]


class PerplexityFilter(ScoredFilter):
    """The step: a `ScoredFilter` whose stats.json ``info`` also names the reference model."""

    def __init__(self, options: PerplexityOptions, cutoffs: dict[str, dict[str, dict[str, float]]] | None = None
                 ) -> None:
        super().__init__(STEP, _specs(options), cutoffs)
        self.options = options

    def info(self) -> dict[str, Any]:
        o = self.options
        return {**super().info(), "reference": {
            "name": o.name, "model": o.model, "kind": model_kind(Path(o.model)),
            **o.model_dump(include={"max_tokens", "batch_tokens", "device", "dtype", "min_chars"})}}


def build(options: PerplexityOptions, context: StepContext) -> PerplexityFilter:
    return PerplexityFilter(options, load_cutoffs(STEP, context))


def prepare(options: PerplexityOptions, context: StepContext) -> None:
    """Cutoffs (CCNet's bucket percentiles) from a sample of each group, once, in the parent."""
    prepare_cutoffs(STEP, _specs(options), context)
