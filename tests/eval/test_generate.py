"""Generation: KV cache vs full recompute, padding, EOS, seeded sampling, logits processors vs
transformers, and greedy decoding vs transformers' generate on an exported model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smelt.eval.generate import (
    apply_repetition_penalty,
    generate,
    generate_text,
    top_k_filter,
    top_p_filter,
)
from smelt.interop.load import load_model
from smelt.model.config import preset
from smelt.model.llama import KVCache, Transformer
from tests.interop._helpers import make_run

# init_std 0.2: sharp logits, so greedy choices are far from ties and float noise cannot flip them.
SHARP = {"init_std": 0.2}


def _model(**over) -> Transformer:
    torch.manual_seed(0)
    cfg = preset("debug", vocab_size=97, **{**SHARP, **over})  # debug: GQA, 4 query heads over 2 KV heads
    return Transformer(cfg).eval()


def _prompts(vocab: int = 97) -> torch.Tensor:
    return torch.randint(3, vocab, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pos_emb", ["rope", "alibi", "learned"])
def test_cache_equals_recompute_greedy(pos_emb: str) -> None:
    model = _model(pos_emb=pos_emb)
    ids = _prompts()
    a = generate(model, ids, max_new_tokens=20, use_cache=True)
    b = generate(model, ids, max_new_tokens=20, use_cache=False)
    assert a.shape == (3, 29)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :9], ids)


def test_cached_logits_match_full_forward_step_by_step() -> None:
    model = _model()
    ids = _prompts()
    cache = KVCache(model.cfg, 3, 40)
    with torch.no_grad():
        step_logits = [model(ids, cache=cache)[:, -1]]
        seq = ids
        for _ in range(12):
            nxt = step_logits[-1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            step_logits.append(model(nxt, cache=cache)[:, -1])
        full = model(seq)  # (B, T, V) in one pass, no cache
    for i, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, ids.size(1) - 1 + i], atol=1e-5, rtol=1e-5)


def test_padding_left_and_right_equal_rows_alone() -> None:
    model = _model()
    rows = [torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 9, 6)]
    alone = [generate(model, r[None], max_new_tokens=10)[0, len(r):] for r in rows]
    T = 9
    left = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    right = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        left[i, T - len(r):], mask[i, T - len(r):] = r, 1
        right[i, :len(r)] = r
    for use_cache in (True, False):
        by_mask = generate(model, left, attention_mask=mask, max_new_tokens=10, use_cache=use_cache)
        by_len = generate(model, right, lengths=[4, 9, 6], max_new_tokens=10, use_cache=use_cache)
        assert torch.equal(by_mask, by_len)
        for i in range(3):
            assert torch.equal(by_mask[i, T:], alone[i]), (use_cache, i)


def test_stops_at_eos_per_row() -> None:
    model = _model()
    ids = _prompts()
    free = generate(model, ids, max_new_tokens=12)
    eos = int(free[0, 9 + 2])  # row 0's third new token becomes "EOS"
    out = generate(model, ids, max_new_tokens=12, eos_id=eos, pad_id=0)
    row0 = out[0, 9:].tolist()
    assert row0[:3] == free[0, 9:12].tolist() and set(row0[3:]) <= {0}
    for i in range(3):  # every row stops at its first EOS; before it, it equals the free run
        new = free[i, 9:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert out[i, 9:9 + stop].tolist() == new[:stop]
    # All rows finished -> decoding ends early.
    one = generate(model, ids[:1], max_new_tokens=12, eos_id=eos)
    assert one.shape == (1, 9 + 3)


def test_sampling_is_seeded_and_leaves_global_rng_alone() -> None:
    model = _model()
    ids = _prompts()
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, ids, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, ids, seed=7, use_cache=False, **kw)
    c = generate(model, ids, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = generate(model, ids, max_new_tokens=16)
    assert not torch.equal(a, greedy)


def test_processors_match_transformers() -> None:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randn(4, 50, generator=g) * 3
        ids = torch.randint(0, 50, (4, 12), generator=g)
        for k in (1, 5, 49):
            assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(ids, scores.clone()))
        for p in (0.1, 0.5, 0.9, 0.999):
            assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(ids, scores.clone()))
        for pen in (0.7, 1.2, 2.0):
            want = RepetitionPenaltyLogitsProcessor(pen)(ids, scores.clone())
            assert torch.equal(apply_repetition_penalty(scores, ids, pen), want)
    # Padding positions do not count as occurrences.
    ids = torch.tensor([[5, 6, 7]])
    valid = torch.tensor([[False, True, True]])
    s = torch.ones(1, 10)
    out = apply_repetition_penalty(s, ids, 2.0, valid)
    assert out[0, 5] == 1 and out[0, 6] == 0.5 and out[0, 7] == 0.5


def test_invalid_settings() -> None:
    model = _model()
    with pytest.raises(ValueError, match="top_p"):
        generate(model, _prompts(), top_p=0)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, _prompts(), attention_mask=torch.tensor([[1] * 8 + [0]] * 3))


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_equals_transformers_generate(tmp_path: Path, tie: bool) -> None:
    from transformers import LlamaForCausalLM

    from smelt.interop.hf import export_hf

    run, _ = make_run(tmp_path, model={**SHARP, "tie_embeddings": tie})
    lm = load_model(run)
    export = export_hf(lm, None, tmp_path / "export")
    hf = LlamaForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    V = lm.cfg.vocab_size
    rows = [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 8)]
    T = 11
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    ours = generate(lm.model, ids, attention_mask=mask, max_new_tokens=24, pad_id=0)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)
    # Repetition penalty also goes through the same pipeline (rows without padding: transformers
    # penalizes pad ids too).
    full = ids[1:2]
    ours = generate(lm.model, full, max_new_tokens=16, repetition_penalty=1.5)
    with torch.no_grad():
        theirs = hf.generate(input_ids=full, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             repetition_penalty=1.5, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_generate_text(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path, model=SHARP)
    lm = load_model(run)
    texts = generate_text(lm, ["The quick brown", "中国的首都是", ""], max_new_tokens=8)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    again = generate_text(lm, ["The quick brown", "中国的首都是", ""], max_new_tokens=8)
    assert texts == again  # greedy by default
    sampled = generate_text(lm, ["The quick brown"], max_new_tokens=8, temperature=1.0, seed=3)
    assert sampled == generate_text(lm, ["The quick brown"], max_new_tokens=8, temperature=1.0, seed=3)
