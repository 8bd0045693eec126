"""Text generation: greedy or sampled decoding with a KV cache (`smelt generate`).

`generate(model, input_ids, ...)` decodes a batch. Prompts of different lengths are given either
left-padded with an ``attention_mask`` (HF's convention) or right-padded with ``lengths``; they
are run left-padded: padding gets segment id 0 and real tokens 1, so no real token attends to
padding (the KV cache keeps the segment ids while decoding), and each row's positions count from
its first real token, so a padded row computes exactly what it computes alone.

With ``use_cache`` the prompt is prefilled once and every new token costs one position
(`smelt.model.llama.KVCache`); without it, each step reruns the whole sequence (the reference the
tests compare against: same tokens, logits equal to float tolerance).

The logits pipeline is transformers' (so results match ``model.generate`` on an export):
repetition penalty (Keskar et al. 2019, CTRL: divide positive / multiply negative logits of every
token already in the sequence, prompt included), then temperature, top-k, top-p (nucleus; Holtzman
et al. 2020), then a draw from the softmax; ``temperature == 0`` is greedy (argmax, first index
on ties). A row stops at ``eos_id`` and is filled with ``pad_id`` after it; decoding ends when
every row stopped or after ``max_new_tokens``. Sampling draws from a private `torch.Generator`
seeded with ``seed``: reproducible, and the caller's global RNG is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from smelt.model.loaded import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["generate", "generate_text", "apply_repetition_penalty", "top_k_filter", "top_p_filter",
           "process_logits"]


# --------------------------------------------------------------------------------------------
# logits processors (each mirrors the transformers class named in its docstring)


def apply_repetition_penalty(scores: Tensor, ids: Tensor, penalty: float, valid: Tensor | None = None) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: for every token id present in ``ids``
    (B, S), logit / penalty if positive, logit * penalty if negative. ``valid`` (B, S) excludes
    padding positions (transformers would penalize the pad token too)."""
    if penalty == 1.0:
        return scores
    B, V = scores.shape
    ids = ids.clamp(max=V)
    if valid is not None:
        ids = ids.masked_fill(~valid, V)  # index V is a scratch column, dropped below
    present = torch.zeros(B, V + 1, dtype=torch.bool, device=scores.device).scatter_(1, ids, True)[:, :V]
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(present, penalized, scores)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """transformers' TopKLogitsWarper: -inf below the k-th largest logit (ties with it kept)."""
    if k <= 0 or k >= scores.size(-1):
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """transformers' TopPLogitsWarper: keep the smallest set of most likely tokens whose
    probability reaches p (at least one token)."""
    if p >= 1.0:
        return scores
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def process_logits(scores: Tensor, ids: Tensor, valid: Tensor | None, *, temperature: float, top_k: int,
                   top_p: float, repetition_penalty: float) -> Tensor:
    """Scores (B, V) fp32 after the penalty and, when sampling, temperature, top-k and top-p."""
    scores = apply_repetition_penalty(scores, ids, repetition_penalty, valid)
    if temperature > 0:
        scores = top_p_filter(top_k_filter(scores / temperature, top_k), top_p)
    return scores


# --------------------------------------------------------------------------------------------
# decoding


def _left_pad(input_ids: Tensor, attention_mask: Tensor | None, lengths: Tensor | Sequence[int] | None,
              pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, valid) with every row's real tokens at the right end."""
    B, T = input_ids.shape
    if attention_mask is not None and lengths is not None:
        raise ValueError("give attention_mask (left padding) or lengths (right padding), not both")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=input_ids.device)
        if lengths.shape != (B,) or (lengths < 1).any() or (lengths > T).any():
            raise ValueError(f"lengths must be ({B},) values in 1..{T}, got {lengths.tolist()}")
        shift = T - lengths  # right-padded row r moves right by shift[r]
        src = (torch.arange(T, device=input_ids.device)[None] - shift[:, None])  # (B, T)
        valid = src >= 0
        ids = input_ids.gather(1, src.clamp(min=0)).masked_fill(~valid, pad_id)
        return ids, valid
    if attention_mask is None:
        return input_ids, torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
    valid = attention_mask.bool()
    if valid.shape != (B, T):
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {(B, T)}")
    if not valid[:, -1].all() or (valid[:, 1:].int() < valid[:, :-1].int()).any():
        raise ValueError("attention_mask must describe left padding (zeros, then ones up to the last column)")
    if not valid.any(dim=1).all():
        raise ValueError("every row needs at least one real token")
    return input_ids, valid


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, eos_id: int | None = None,
             pad_id: int | None = None, seed: int | None = None, use_cache: bool = True,
             attention_mask: Tensor | None = None, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
    """Decode up to ``max_new_tokens`` after each prompt; returns (B, T + n) token ids.

    ``input_ids`` (B, T) int64, left-padded with ``attention_mask`` (1 = real) or right-padded
    with ``lengths``; the result holds the prompts left-padded (padding = ``pad_id``) followed by
    the n <= max_new_tokens generated tokens of the longest row (``pad_id`` after a row's EOS).
    ``pad_id`` defaults to ``eos_id`` (transformers' habit), else 0.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise ValueError(f"invalid sampling settings: temperature={temperature} (>= 0), top_p={top_p} (0, 1], "
                         f"top_k={top_k} (>= 0), repetition_penalty={repetition_penalty} (> 0)")
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(f"input_ids must be (batch, length >= 1), got {tuple(input_ids.shape)}")
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    ids, valid = _left_pad(input_ids, attention_mask, lengths, pad)
    B, T = ids.shape
    device = ids.device
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.pos_emb == "learned" and T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed the learned position table "
                         f"({cfg.max_seq_len})")
    if max_new_tokens <= 0:
        return ids

    padded = not bool(valid.all())
    # Positions count from each row's first real token; padding sits in segment 0.
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    segments = valid.long()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()

    cache = None
    if use_cache:
        from smelt.model.llama import KVCache

        dtype = next(model.parameters()).dtype
        cache = KVCache(model.cfg, B, T + max_new_tokens, device=device, dtype=dtype)

    out = torch.full((B, T + max_new_tokens), pad, dtype=torch.long, device=device)
    out[:, :T] = ids
    valid_all = torch.zeros(B, T + max_new_tokens, dtype=torch.bool, device=device)
    valid_all[:, :T] = valid
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1  # (B,)
    n = 0
    try:
        # Prefill: the prompts (with segment ids only when there is padding: the fast causal path otherwise).
        logits = model(ids, position_ids=positions if padded else None, segment_ids=segments if padded else None,
                       cache=cache)[:, -1]
        for n in range(1, max_new_tokens + 1):
            scores = process_logits(logits.float(), out[:, :T + n - 1], valid_all[:, :T + n - 1],
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty)
            if temperature == 0:
                token = scores.argmax(dim=-1)
            else:
                token = torch.multinomial(scores.softmax(dim=-1), 1, generator=gen).squeeze(1)
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            out[:, T + n - 1] = token
            valid_all[:, T + n - 1] = unfinished
            if eos_id is not None:
                unfinished &= token != eos_id
            if not unfinished.any() or n == max_new_tokens:
                break
            if cache is not None:
                logits = model(token[:, None], position_ids=next_pos[:, None] if padded else None,
                               cache=cache)[:, -1]
            else:
                # Reference path: the whole sequence again (segment ids keep padding masked).
                full = out[:, :T + n]
                seg = torch.cat([segments, torch.ones(B, n, dtype=torch.long, device=device)], dim=1)
                pos = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(n, device=device)[None]], dim=1)
                logits = model(full, position_ids=pos if padded else None,
                               segment_ids=seg if padded else None)[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return out[:, :T + n]


# --------------------------------------------------------------------------------------------
# text in, text out


def generate_text(loaded: LoadedModel, prompts: Sequence[str], **kw: Any) -> list[str]:
    """Completions (the new text only, up to EOS) of ``prompts`` with ``loaded``'s tokenizer.

    Prompts are encoded as the packer encoded documents (BOS first when the run used one); an
    empty prompt starts from BOS, or EOS, the token that precedes every document in packed
    training data. Keyword arguments go to `generate` (eos/pad ids default to the run's).
    """
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"{loaded.checkpoint}: no tokenizer loaded with this model")
    if isinstance(prompts, str):
        prompts = [prompts]
    eos = kw.pop("eos_id", loaded.eos_id)
    pad = kw.pop("pad_id", loaded.pad_id if loaded.pad_id is not None else eos)
    start = loaded.bos_id if loaded.add_bos and loaded.bos_id is not None else None
    rows = []
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False).ids
        if start is not None:
            ids = [start, *ids]
        if not ids:
            first = loaded.bos_id if loaded.bos_id is not None else eos
            if first is None:
                raise ValueError("empty prompt and no BOS/EOS id to start from")
            ids = [first]
        rows.append(ids)
    T = max(len(r) for r in rows)
    device = next(loaded.model.parameters()).device
    pad_fill = pad if pad is not None else 0
    input_ids = torch.full((len(rows), T), pad_fill, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r):] = torch.tensor(r, device=device)
        mask[i, T - len(r):] = 1
    out = generate(loaded.model, input_ids, attention_mask=mask, eos_id=eos, pad_id=pad, **kw)
    texts = []
    for row in out[:, T:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts
