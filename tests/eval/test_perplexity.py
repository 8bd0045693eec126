"""Scoring and perplexity: hand-computable bits per byte and word perplexity, lm-eval's rolling
windows (its own gold vectors), rolling = full-context loss, batching never changes a score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smelt.eval.perplexity import (
    HeldOutDoc,
    Request,
    Unscorable,
    cjk_share,
    count_words,
    domain_perplexity,
    encode_pair,
    held_out_documents,
    rolling_windows,
    score_requests,
)
from smelt.model.config import preset
from smelt.model.llama import Transformer
from smelt.tokens.shards import write_shard

from .util import CharTokenizer, Fixed, Uniform, merging_bpe

V = 50


def _doc(text: str, tok: CharTokenizer) -> HeldOutDoc:
    return HeldOutDoc(np.array(tok.encode(text).ids, dtype=np.int64), text)


def test_uniform_model_gives_ln_v_bits_per_byte_and_word_ppl_exactly() -> None:
    """Exact up to fp32 log-softmax rounding (~1e-7 relative)."""
    tok = CharTokenizer()
    texts = ["hello world, this is text", "two  spaces\tand a tab", "中文也算字节"]
    docs = [_doc(t, tok) for t in texts]
    model = Uniform(tok.vocab)
    r = domain_perplexity(model, docs, prefix_id=2, max_len=8, batch_size=3)
    n_tok = sum(len(t.encode()) for t in texts)  # one token per byte
    assert r["tokens"] == n_tok and r["bytes"] == n_tok and r["docs"] == 3
    assert r["loss"] == pytest.approx(math.log(tok.vocab), rel=1e-6)
    assert r["ppl"] == pytest.approx(tok.vocab, rel=1e-6)
    # lm-eval: -sum(ll) / bytes / ln 2 = n_tok * ln V / n_bytes / ln 2 = log2 V (one byte per token)
    assert r["bits_per_byte"] == pytest.approx(math.log2(tok.vocab), rel=1e-6)
    words = 5 + 5 + 1  # whitespace runs split; the Chinese text is one "word"
    assert r["word_ppl"] == pytest.approx(math.exp(n_tok * math.log(tok.vocab) / words), rel=1e-6)


def test_bits_per_byte_with_multibyte_tokens() -> None:
    """Tokens of 2 bytes each: bpb = ln V / 2 / ln 2, independent of the tokenization's length."""
    docs = [HeldOutDoc(np.arange(3, 13), "ab" * 10)]  # 10 tokens, 20 bytes
    r = domain_perplexity(Uniform(V), docs, prefix_id=2, max_len=4, space_delimited=False)
    assert r["bits_per_byte"] == pytest.approx(10 * math.log(V) / 20 / math.log(2), rel=1e-6)
    assert r["word_ppl"] is None


def test_word_counting_and_cjk_share() -> None:
    assert count_words("a b  c") == 3
    assert count_words(" a") == 2  # lm-eval's re.split counts the empty leading field
    assert cjk_share(["中国 ab"]) == pytest.approx(0.5)
    assert cjk_share(["only latin"]) == 0.0


# lm-eval's own tests (tests/test_utils.py): (input_tokens, pred_tokens) per window
_GOLD = {
    (34, 10, 1): [(list(range(-1, 9)), list(range(10))), (list(range(9, 19)), list(range(10, 20))),
                  (list(range(19, 29)), list(range(20, 30))), (list(range(23, 33)), [30, 31, 32, 33])],
    (34, 10, 8): [(list(range(-1, 9)), list(range(10))), (list(range(2, 12)), [10, 11, 12]),
                  (list(range(5, 15)), [13, 14, 15]), (list(range(8, 18)), [16, 17, 18]),
                  (list(range(11, 21)), [19, 20, 21]), (list(range(14, 24)), [22, 23, 24]),
                  (list(range(17, 27)), [25, 26, 27]), (list(range(20, 30)), [28, 29, 30]),
                  (list(range(23, 33)), [31, 32, 33])],
    (34, 10, 10): [(list(range(-1, 9)), list(range(10)))] + [(list(range(i - 10, i)), [i]) for i in range(10, 34)],
    (30, 10, 1): [(list(range(-1, 9)), list(range(10))), (list(range(9, 19)), list(range(10, 20))),
                  (list(range(19, 29)), list(range(20, 30)))],
    (9, 2, 1): [([-1, 0], [0, 1]), ([1, 2], [2, 3]), ([3, 4], [4, 5]), ([5, 6], [6, 7]), ([6, 7], [8])],
}


@pytest.mark.parametrize("n,max_len,context_len", list(_GOLD))
def test_rolling_windows_match_lm_eval_gold(n: int, max_len: int, context_len: int) -> None:
    stride = max_len - context_len + 1  # lm-eval's pred_len
    got = rolling_windows(list(range(n)), prefix=-1, max_len=max_len, stride=stride)
    as_lm_eval = [((list(r.context) + list(r.target))[:-1], list(r.target)) for r in got]
    gold = [(inp if inp[0] != -1 or len(inp) <= 1 else inp, pred) for inp, pred in _GOLD[(n, max_len, context_len)]]
    # gold inputs of the first window start with the prefix token (-100 in lm-eval, -1 here)
    assert as_lm_eval == gold
    assert sum(len(r.target) for r in got) == n


def test_rolling_windows_empty_and_bad_stride() -> None:
    assert rolling_windows([], 0, 4) == []
    with pytest.raises(ValueError, match="stride"):
        rolling_windows([1, 2], 0, 4, stride=5)


def _tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(preset("debug").with_vocab(V))
    return m.eval()


def _full_context_logprobs(model: Transformer, prefix: int, toks: list[int]) -> torch.Tensor:
    seq = torch.tensor([[prefix] + toks])
    with torch.no_grad():
        lp = F.log_softmax(model(seq[:, :-1]).float(), dim=-1)
    return lp[0].gather(1, seq[0, 1:, None])[:, 0]


def test_rolling_loss_equals_full_context_loss_when_window_covers_document() -> None:
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(3, V, (40,), generator=g).tolist()
    ref = float(_full_context_logprobs(model, 2, toks).double().sum())
    for max_len, stride in ((40, None), (64, None), (40, 7)):
        r = domain_perplexity(model, [HeldOutDoc(np.array(toks), "x" * 40)], prefix_id=2, max_len=max_len,
                              stride=stride)
        assert r["tokens"] == 40
        assert -r["loss"] * 40 == pytest.approx(ref, abs=1e-4)


def test_rolling_windows_score_each_token_with_its_truncated_context() -> None:
    """Small windows, stride 1: token i is scored with exactly the max_len tokens before it."""
    model = _tiny_model(1)
    toks = torch.randint(3, V, (25,), generator=torch.Generator().manual_seed(2)).tolist()
    max_len = 6
    full = [2] + toks
    ref = 0.0
    for i in range(1, len(full)):
        ctx = full[max(0, i - max_len): i]
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([ctx])).float()[0, -1], dim=-1)
        ref += float(lp[full[i]])
    scores = score_requests(model, rolling_windows(toks, 2, max_len, stride=1), batch_size=5, max_len=max_len)
    assert math.fsum(s.logprob for s in scores) == pytest.approx(ref, abs=1e-4)
    # the first window predicts max_len tokens with growing context; stride 1 scores one token each after
    assert len(scores) == 1 + (25 - max_len)


def test_batching_and_padding_do_not_change_scores() -> None:
    model = _tiny_model(2)
    g = torch.Generator().manual_seed(3)
    reqs = [Request(torch.randint(3, V, (int(c),), generator=g).tolist(),
                    torch.randint(3, V, (int(t),), generator=g).tolist())
            for c, t in zip(torch.randint(1, 12, (9,), generator=g), torch.randint(1, 5, (9,), generator=g))]
    one = score_requests(model, reqs, batch_size=1, max_len=16, ranks=True)
    many = score_requests(model, reqs, batch_size=4, max_len=16, pad_id=7, ranks=True)
    for a, b in zip(one, many):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert (a.rank, a.greedy, a.n_tokens) == (b.rank, b.greedy, b.n_tokens)


def test_context_is_cut_from_the_left_to_the_window() -> None:
    model = _tiny_model(3)
    ctx, tgt = list(range(3, 33)), [5, 6]
    cut = score_requests(model, [Request(ctx, tgt)], batch_size=1, max_len=8)[0]
    ref = score_requests(model, [Request(ctx[-7:], tgt)], batch_size=1, max_len=64)[0]
    assert cut.logprob == pytest.approx(ref.logprob, abs=1e-5)
    with pytest.raises(ValueError, match="exceeds the window"):
        score_requests(model, [Request([1], list(range(3, 20)))], batch_size=1, max_len=8)


def test_rank_and_greedy_on_a_fixed_distribution() -> None:
    logits = torch.zeros(V)
    logits[10], logits[11], logits[12] = 5.0, 4.0, 4.0
    model = Fixed(logits)
    s = score_requests(model, [Request([1], [10]), Request([1], [11]), Request([1], [12, 10]), Request([1], [30])],
                       batch_size=2, max_len=4, ranks=True)
    assert [x.rank for x in s] == [1, 2, 2, 4]  # ties share a rank; rank = 1 + #strictly higher logits
    assert [x.greedy for x in s] == [True, False, False, False]
    lse = torch.logsumexp(logits, 0)
    assert s[2].logprob == pytest.approx(float(logits[12] - lse + logits[10] - lse), abs=1e-6)


def test_encode_pair_moves_trailing_space_to_the_continuation() -> None:
    tok = CharTokenizer()
    r = encode_pair(tok, "Paris is ", "nice", prefix_id=2)
    assert list(r.context) == [2] + tok.encode("Paris is").ids
    assert list(r.target) == tok.encode(" nice").ids
    r = encode_pair(tok, "", "ab", prefix_id=1)
    assert list(r.context) == [1] and list(r.target) == tok.encode("ab").ids


def _lm_eval_encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``TemplateLM._encode_pair`` (lm_eval/api/model.py), decoder-only branch."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole_enc[len(context_enc):]


def test_encode_pair_where_bpe_merges_across_the_boundary() -> None:
    """The failure of a real run: the whole is fewer tokens than the context, so lm-eval's
    difference is empty; the continuation is then encoded alone. Where the difference is not
    empty it is lm-eval's, even when the context's tokens are not a prefix of the whole's."""
    tok = merging_bpe()
    ids = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    ctx, whole = ids("万里长城位于"), ids("万里长城位于中国")
    assert len(whole) <= len(ctx)  # the case: BPE merged across the boundary
    r = encode_pair(tok, "万里长城位于", "中国", prefix_id=1)
    assert r.alone and list(r.context) == [1] + ctx and list(r.target) == ids("中国")
    assert ids("长城位于中国")[: len(ids("长城位于"))] != ids("长城位于")  # merges, difference not empty
    for context, cont in (("长城位于", "中国"), ("The capital of France is", " Paris"),
                          ("The capital of France is ", "Paris")):
        context_enc, continuation_enc = _lm_eval_encode_pair(ids, context, cont)
        r = encode_pair(tok, context, cont, prefix_id=1)
        assert not r.alone and list(r.context) == [1] + context_enc and list(r.target) == continuation_enc


def test_encode_pair_unscorable_pairs() -> None:
    tok = CharTokenizer()
    with pytest.raises(Unscorable, match="no tokens"):
        encode_pair(tok, "context", "", prefix_id=2)
    r = encode_pair(tok, "context ", "", prefix_id=2)  # lm-eval scores the moved space
    assert list(r.target) == tok.encode(" ").ids
    with pytest.raises(Unscorable, match="exceeds the window of 4 tokens"):
        encode_pair(tok, "c", "abcde", prefix_id=2, max_len=4)
    assert isinstance(Unscorable("x"), ValueError)


def test_held_out_documents_strip_specials_decode_and_respect_budgets(tmp_path: Path) -> None:
    tok = CharTokenizer()
    texts = ["first doc", "второй", "third one here", "x"]
    docs = [np.array([1] + tok.encode(t).ids + [2]) for t in texts]  # [BOS] ids EOS, add_bos
    write_shard(tmp_path / "en" / "val-00000", docs, dtype=np.uint16)
    write_shard(tmp_path / "en" / "train-00000", docs[:1], dtype=np.uint16)
    n_bytes = sum(len(t.encode()) for t in texts)
    manifest = {"format_version": 1, "vocab_size": tok.vocab, "dtype": "uint16", "eos_id": 2, "bos_id": 1,
                "pad_id": 0, "add_bos": True, "complete": True,
                "domains": {"en": {"train": {"tokens": len(docs[0]), "docs": 1, "shards": ["train-00000"]},
                                   "val": {"tokens": int(sum(len(d) for d in docs)), "docs": 4,
                                           "shards": ["val-00000"], "bytes": n_bytes}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    got = held_out_documents(tmp_path, tok)["en"]
    assert [d.text for d in got] == texts
    assert sum(d.n_bytes for d in got) == n_bytes
    assert got[0].tokens.tolist() == tok.encode("first doc").ids
    assert len(held_out_documents(tmp_path, tok, max_docs=2)["en"]) == 2
    # token budget: whole documents only, at least one
    assert [d.text for d in held_out_documents(tmp_path, tok, max_tokens=12)["en"]] == ["first doc"]
    assert [d.text for d in held_out_documents(tmp_path, tok, max_tokens=1)["en"]] == ["first doc"]
