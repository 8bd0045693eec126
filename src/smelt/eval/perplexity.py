"""Log-likelihood scoring, and perplexity / bits per byte per domain on the held-out split.

Scoring (`score_requests`) is the one primitive that probes and multiple-choice tasks share: a
request is a (context, target) pair of token lists; its score is ``sum_i log p(target_i | context,
target_<i)``. Requests are sorted by length (longest first, as lm-eval's ``Collator`` does, so
padding is small), right-padded into batches and scored with ONE forward per batch; the log-softmax
is taken only at the target positions, all gathered with tensor indexing (no Python loop over
tokens). Causal attention makes right padding harmless: no real position attends to a pad.

Perplexity follows lm-eval's definitions (``lm_eval/api/metrics.py`` and ``Task.process_results``
of the ``loglikelihood_rolling`` tasks, e.g. wikitext), summed over all evaluated documents of a
domain:

    loss           = -sum(loglik) / sum(tokens)               (nats per token)
    ppl            = exp(loss)
    bits_per_byte  = -sum(loglik) / sum(UTF-8 bytes) / ln 2   (tokenizer-independent)
    word_ppl       = exp(-sum(loglik) / sum(words)),  words = len(re.split(r"\\s+", text))

Long documents are cut into windows with lm-eval's ``get_rolling_token_windows`` semantics
(`rolling_windows`): every token of the document is predicted exactly once; the first window
predicts up to ``max_len`` tokens after a one-token prefix; each later window predicts ``stride``
new tokens with the ``max_len - stride`` tokens before them as context (``stride = max_len`` gives
lm-eval's default disjoint windows, ``context_len = 1``; a small stride approaches the
full-context perplexity at more compute, as in the Hugging Face perplexity guide).

Documents come from ``tokens/<domain>/val-*`` (`smelt.tokens.loader.TokenStore`). Each packed
document is ``[BOS] ids EOS``; the scored tokens are ``ids`` (lm-eval scores the text's tokens,
not an end-of-text token), and the one-token prefix is the token that precedes a document in
training: BOS when ``pack.add_bos`` put one in the document, else the previous document's EOS.
The text is recovered by decoding ``ids`` (smelt's tokenizers have no normalizer and a lossless
decoder, `smelt.tokenizer.train`), which gives the UTF-8 byte and word counts; when a whole split
is evaluated the byte count is checked against ``tokens/manifest.json``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["Request", "Score", "Unscorable", "score_requests", "encode_text", "encode_pair", "rolling_windows",
           "HeldOutDoc", "held_out_documents",
           "document_prefix_id", "count_words", "cjk_share", "domain_perplexity", "perplexity_by_domain",
           "model_device"]

_WORD_SPLIT = re.compile(r"\s+")
# CJK ideographs, kana, hangul, CJK punctuation and full-width forms: scripts written without spaces.
_CJK = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# scoring


@dataclass(frozen=True)
class Request:
    """Score ``target`` given ``context`` (token ids; the context holds at least one token)."""

    context: Sequence[int]
    target: Sequence[int]
    alone: bool = False  # `encode_pair`: the continuation was encoded on its own (see there)


class Unscorable(ValueError):
    """A (context, continuation) pair with nothing to score, or more than the window can hold.
    Probes and tasks count and report such items; they never fail an evaluation."""


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the target tokens' log-probabilities (nats)
    n_tokens: int
    greedy: bool  # every target token is the argmax at its position (lm-eval's is_greedy)
    rank: int | None = None  # 1-based rank of target[0] among the vocabulary (1 = argmax); with ranks=True


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def score_requests(model: nn.Module, requests: Sequence[Request], *, batch_size: int, max_len: int,
                   pad_id: int = 0, ranks: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> list[Score]:
    """Log-likelihood of each request's target, in request order (see the module docstring).

    The model input is ``(context + target)[:-1]`` keeping its last ``max_len`` tokens (context is
    cut from the left, as lm-eval does); a target longer than ``max_len`` is an error. ``progress``
    is called as ``progress(requests_done, total)`` after each batch.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError("batch_size and max_len must be >= 1")
    n = len(requests)
    for i, r in enumerate(requests):
        if len(r.context) < 1 or len(r.target) < 1:
            raise ValueError(f"request {i}: context and target need at least one token each")
        if len(r.target) > max_len:
            raise ValueError(f"request {i}: target of {len(r.target)} tokens exceeds the window of {max_len} tokens")
    device = model_device(model)
    lengths = [min(len(r.context) + len(r.target) - 1, max_len) for r in requests]
    order = sorted(range(n), key=lambda i: -lengths[i])
    out: list[Score | None] = [None] * n
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, n, batch_size):
            idx = order[b0: b0 + batch_size]
            T = lengths[idx[0]]
            inputs = np.full((len(idx), T), pad_id, dtype=np.int64)
            rows, cols, tgts, req_of = [], [], [], []
            for j, i in enumerate(idx):
                r = requests[i]
                seq = np.asarray(list(r.context) + list(r.target), dtype=np.int64)[:-1][-max_len:]
                L, p = len(seq), len(r.target)
                inputs[j, :L] = seq
                rows.append(np.full(p, j))
                cols.append(np.arange(L - p, L))
                tgts.append(np.asarray(r.target, dtype=np.int64))
                req_of.append(np.full(p, j))
            logits = model(torch.from_numpy(inputs).to(device))  # (B, T, V)
            rows_t = torch.from_numpy(np.concatenate(rows)).to(device)
            cols_t = torch.from_numpy(np.concatenate(cols)).to(device)
            tgt_t = torch.from_numpy(np.concatenate(tgts)).to(device)
            sel = logits[rows_t, cols_t].float()  # (N, V): only the target positions
            tgt_logit = sel.gather(1, tgt_t[:, None])[:, 0]
            lp = (tgt_logit - torch.logsumexp(sel, dim=-1)).double()
            hit = (sel.argmax(dim=-1) == tgt_t)
            seg = torch.from_numpy(np.concatenate(req_of)).to(device)
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, seg, lp)
            misses = torch.zeros(len(idx), dtype=torch.int64, device=device).index_add_(0, seg, (~hit).long())
            rank_v = None
            if ranks:
                first = torch.from_numpy(np.cumsum([0] + [len(t) for t in tgts[:-1]])).to(device)
                rank_v = ((sel[first] > tgt_logit[first, None]).sum(dim=-1) + 1).tolist()
            sums_l, misses_l = sums.tolist(), misses.tolist()
            for j, i in enumerate(idx):
                out[i] = Score(logprob=sums_l[j], n_tokens=len(requests[i].target), greedy=misses_l[j] == 0,
                               rank=int(rank_v[j]) if rank_v is not None else None)
            if progress is not None:
                progress(min(b0 + batch_size, n), n)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as `smelt pack` encodes documents: no special tokens added, and special
    tokens' text (``<|eos|>``) encoded as text, never as the special id."""
    prev = getattr(tokenizer, "encode_special_tokens", None)
    if prev is not None:
        tokenizer.encode_special_tokens = True
    try:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    finally:
        if prev is not None:
            tokenizer.encode_special_tokens = prev


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix_id: int, *,
                max_len: int | None = None) -> Request:
    """lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the continuation, the
    pair is encoded whole and the context alone, and the continuation's ids are the difference
    ``whole[len(context_ids):]``, so they are the ids the model sees in running text. ``prefix_id``
    (the document-start token, `document_prefix_id`) comes first, so an empty context is scored too.

    BPE merges across the boundary: with a tokenizer trained on Chinese text, ``"万里长城位于中国"``
    can be fewer tokens than ``"万里长城位于"``. Where the difference is not empty it is kept as
    lm-eval keeps it, even when the context's ids are not a prefix of the whole's (lm-eval parity,
    tests/interop/test_lm_eval.py). Where it is empty, lm-eval would score nothing (log-likelihood
    0, the best possible); here the continuation is then encoded on its own after the context's ids
    (``alone=True``): its text is scored, in a tokenization the model may not meet in running text.

    Raises `Unscorable` when the continuation has no tokens even alone (an empty string) or more
    than ``max_len`` (the scoring window) tokens.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context) if context else []
    target, alone = whole[len(ctx):], False
    if not target and continuation:
        target, alone = encode_text(tokenizer, continuation), True
        log.debug("encode_pair: %r merges into the context %r; continuation encoded alone",
                  continuation, context[-40:])
    if not target:
        raise Unscorable(f"continuation {continuation!r} encodes to no tokens")
    if max_len is not None and len(target) > max_len:
        raise Unscorable(f"continuation of {len(target)} tokens exceeds the window of {max_len} tokens")
    return Request([prefix_id] + ctx, target, alone)


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int, stride: int | None = None) -> list[Request]:
    """lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window`` as `Request`s.

    ``context_len = max_len - stride + 1`` in lm-eval's terms; ``stride=None`` means ``max_len``
    (lm-eval's ``loglikelihood_rolling`` default, ``context_len=1``). Every token is a target of
    exactly one request, and every request's input ``(context + target)[:-1]`` is at most
    ``max_len`` tokens.
    """
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    toks = list(tokens)
    if not toks:
        return []
    out: list[Request] = []
    first = min(max_len, len(toks))
    out.append(Request([prefix], toks[:first]))  # input [prefix] + toks[:first-1]
    done = first
    while done < len(toks):
        p = min(len(toks) - done, stride)
        end = done + p
        inp = toks[max(0, end - max_len - 1): end - 1]
        out.append(Request(inp[: len(inp) - p + 1], toks[end - p: end]))
        done = end
    return out


# --------------------------------------------------------------------------------------------
# held-out documents


@dataclass(frozen=True)
class HeldOutDoc:
    tokens: np.ndarray  # the document's content ids (no BOS/EOS), int64
    text: str  # decoded content

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8", "surrogatepass"))


def count_words(text: str) -> int:
    """lm-eval's ``Task.count_words``: ``len(re.split(r"\\s+", doc))``."""
    return len(_WORD_SPLIT.split(text))


def cjk_share(texts: Sequence[str]) -> float:
    """Share of CJK characters among the non-whitespace characters of ``texts``."""
    cjk = sum(len(_CJK.findall(t)) for t in texts)
    total = sum(len(_WORD_SPLIT.sub("", t)) for t in texts)
    return cjk / total if total else 0.0


def document_prefix_id(manifest: dict[str, Any]) -> int:
    """The token that precedes a document's first token in training (see the module docstring)."""
    if manifest.get("add_bos") and manifest.get("bos_id") is not None:
        return int(manifest["bos_id"])
    return int(manifest["eos_id"])


def held_out_documents(tokens_dir: str | Path, tokenizer: Any, *, max_docs: int | None = None,
                       max_tokens: int | None = None,
                       domains: Sequence[str] | None = None) -> dict[str, list[HeldOutDoc]]:
    """The first documents of each domain's ``val`` split (it is already a hashed random sample),
    whole documents only, up to ``max_docs`` documents and ``max_tokens`` content tokens (at least
    one document). Empty documents are skipped (nothing to score)."""
    from smelt.tokens.loader import TokenStore

    store = TokenStore(tokens_dir, split="val")
    m = store.manifest
    bos = int(m["bos_id"]) if m.get("add_bos") and m.get("bos_id") is not None else None
    eos = store.eos_id
    out: dict[str, list[HeldOutDoc]] = {}
    for domain in domains or store.domains:
        stream = store[domain]
        docs: list[HeldOutDoc] = []
        n_tok = 0
        complete = True
        for shard in stream.shards:
            for i in range(shard.n_docs):
                if (max_docs is not None and len(docs) >= max_docs) or (
                        max_tokens is not None and docs and n_tok >= max_tokens):
                    complete = False
                    break
                ids = np.asarray(shard.document(i), dtype=np.int64)
                if len(ids) and ids[-1] == eos:
                    ids = ids[:-1]
                if bos is not None and len(ids) and ids[0] == bos:
                    ids = ids[1:]
                if len(ids) == 0:
                    continue
                if max_tokens is not None and docs and n_tok + len(ids) > max_tokens:
                    complete = False
                    break
                docs.append(HeldOutDoc(ids, tokenizer.decode(ids.tolist(), skip_special_tokens=False)))
                n_tok += len(ids)
            if not complete:
                break
        if not docs:
            log.warning("perplexity: domain %r has no held-out documents (pack.val_fraction?); skipped", domain)
            continue
        want = m["domains"][domain].get("val", {}).get("bytes")
        got = sum(d.n_bytes for d in docs)
        if complete and want is not None and int(want) != got:
            log.warning("perplexity: %s: decoded held-out text has %d UTF-8 bytes, manifest says %s "
                        "(tokenizer round trip not lossless?); bits per byte uses the decoded count",
                        domain, got, want)
        out[domain] = docs
    return out


def text_documents(sources: Sequence[Any], tokenizer: Any, *, max_docs: int | None = None,
                   max_tokens: int | None = None) -> dict[str, list[HeldOutDoc]]:
    """`eval.texts`: the first documents of each source (an `InputSource`, read like data.inputs),
    named by its ``domain``, tokenized with the run's tokenizer, up to ``max_docs`` documents and
    ``max_tokens`` tokens. Bytes are counted on the text as read, so that bits per byte compares
    runs whose tokenizers differ."""
    from smelt.data.inputs import resolve_files
    from smelt.data.readers import read_documents

    out: dict[str, list[HeldOutDoc]] = {}
    for src in sources:
        docs = out.setdefault(src.domain, [])
        n_tok = sum(len(d.tokens) for d in docs)
        for path in resolve_files(src):
            for doc in read_documents(path, src):
                if (max_docs is not None and len(docs) >= max_docs) or (max_tokens is not None and n_tok >= max_tokens):
                    break
                if doc.meta.get("read_error") or not doc.text.strip():
                    continue
                ids = np.asarray(encode_text(tokenizer, doc.text), dtype=np.int64)
                if len(ids):
                    docs.append(HeldOutDoc(ids, doc.text))
                    n_tok += len(ids)
    return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------------------------
# perplexity


def domain_perplexity(model: nn.Module, docs: Sequence[HeldOutDoc], *, prefix_id: int, max_len: int,
                      stride: int | None = None, batch_size: int = 8, pad_id: int = 0,
                      space_delimited: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """{"loss", "ppl", "bits_per_byte", "word_ppl", "tokens", "bytes", "docs"} for one domain."""
    requests: list[Request] = []
    for d in docs:
        requests.extend(rolling_windows(d.tokens.tolist(), prefix_id, max_len, stride))
    scores = score_requests(model, requests, batch_size=batch_size, max_len=max_len, pad_id=pad_id,
                            progress=progress)
    ll = math.fsum(s.logprob for s in scores)
    n_tok = sum(s.n_tokens for s in scores)
    n_bytes = sum(d.n_bytes for d in docs)
    n_words = sum(count_words(d.text) for d in docs)
    assert n_tok == sum(len(d.tokens) for d in docs), "rolling windows must score every token once"
    loss = -ll / n_tok
    return {
        "loss": loss,
        "ppl": _exp(loss),
        "bits_per_byte": -ll / n_bytes / _LN2 if n_bytes else None,
        "word_ppl": _exp(-ll / n_words) if space_delimited and n_words else None,
        "tokens": n_tok,
        "bytes": n_bytes,
        "docs": len(docs),
    }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def perplexity_by_domain(model: nn.Module, docs_by_domain: dict[str, list[HeldOutDoc]], *, prefix_id: int,
                         max_len: int, stride: int | None = None, batch_size: int = 8, pad_id: int = 0,
                         word_ppl_max_cjk: float = 0.1,
                         progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """`domain_perplexity` for every domain; word perplexity where the text is space-delimited."""
    out: dict[str, dict[str, Any]] = {}
    for domain, docs in docs_by_domain.items():
        share = cjk_share([d.text for d in docs])
        cb = (lambda done, total, _d=domain: progress(f"ppl {_d}", done, total)) if progress else None
        out[domain] = domain_perplexity(model, docs, prefix_id=prefix_id, max_len=max_len, stride=stride,
                                        batch_size=batch_size, pad_id=pad_id,
                                        space_delimited=share <= word_ppl_max_cjk, progress=cb)
        log.info("perplexity: %-10s loss %.4f  ppl %.3f  bpb %.4f  (%d docs, %d tokens, CJK %.0f%%)", domain,
                 out[domain]["loss"], out[domain]["ppl"], out[domain]["bits_per_byte"] or float("nan"),
                 out[domain]["docs"], out[domain]["tokens"], 100 * share)
    return out

