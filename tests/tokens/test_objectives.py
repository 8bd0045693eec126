"""Objectives: shapes and invariants of causal LM, FIM, prefix LM and UL2 denoising."""

from __future__ import annotations

import numpy as np
import pytest

from smelt.config import ObjectiveConfig
from smelt.tokens.objectives import (
    IGNORE_INDEX,
    UL2,
    CausalLM,
    FillInTheMiddle,
    PrefixLM,
    SpecialIds,
    build_objective,
    random_segmentation,
    ul2_span_plan,
)

SP = SpecialIds.conventions(32)
PRE, MID, SUF, EOS, BOS, PAD = SP.fim_prefix, SP.fim_middle, SP.fim_suffix, SP.eos, SP.bos, SP.pad
N = 257  # seq_len 256 + 1


def packed_window(rng: np.random.Generator, n: int = N, min_len: int = 1, max_len: int = 40,
                  bos: bool = False) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A window of documents (ids >= 100, EOS-terminated), its segment ids, and the documents
    (the first and last cut by the window edges, as the loader's windows are)."""
    docs = []
    total = 0
    while total < n + 20:
        body = rng.integers(100, 5000, int(rng.integers(min_len, max_len)))
        doc = np.concatenate(([BOS] if bos else [], body, [EOS])).astype(np.int64)
        docs.append(doc)
        total += len(doc)
    flat = np.concatenate(docs)
    cut = int(rng.integers(0, 15))
    window = flat[cut: cut + n]
    seg = np.repeat(np.arange(len(docs)), [len(d) for d in docs])[cut: cut + n]
    seg = seg - seg[0]
    pieces = [window[seg == s] for s in range(seg[-1] + 1)]
    return window, seg, pieces


def split_docs(tokens: np.ndarray, seg: np.ndarray) -> list[np.ndarray]:
    return [tokens[seg == s] for s in np.unique(seg)]


def unfim(doc: np.ndarray) -> np.ndarray:
    """Undo one FIM document: PSM <pre> P <suf> S <mid> M or SPM <pre> <suf> S <mid> P M -> P M S."""
    lead = doc[:1] if doc[0] == BOS else doc[:0]
    body = doc[len(lead):]
    tail = body[-1:] if body[-1] == EOS else body[:0]
    body = body[: len(body) - len(tail)]
    assert body[0] == PRE
    if body[1] == SUF:  # SPM
        mid = int(np.flatnonzero(body == MID)[0])
        s, pm = body[2:mid], body[mid + 1:]
        return np.concatenate((lead, pm, s, tail))
    suf, mid = int(np.flatnonzero(body == SUF)[0]), int(np.flatnonzero(body == MID)[0])
    p, s, m = body[1:suf], body[suf + 1: mid], body[mid + 1:]
    return np.concatenate((lead, p, m, s, tail))


# ------------------------------------------------------------------------------------------


def test_causal_is_the_identity() -> None:
    window, seg, _ = packed_window(np.random.default_rng(0))
    ex = CausalLM()(window, seg, None)
    inp, tgt, s = ex.arrays()
    np.testing.assert_array_equal(inp, window[:-1])
    np.testing.assert_array_equal(tgt, window[1:])
    np.testing.assert_array_equal(s, seg[:-1])
    assert ex.prefix_len == 0


@pytest.mark.parametrize("bos", [False, True])
def test_fim_reassembles_every_document(bos: bool) -> None:
    fim = FillInTheMiddle(SP, fim_rate=1.0, spm_rate=0.5)
    n_spm = n_psm = 0
    for seed in range(40):
        window, seg, docs = packed_window(np.random.default_rng(seed), bos=bos)
        ex = fim(window, seg, np.random.default_rng(1000 + seed))
        assert ex.tokens.shape == (N,) and ex.loss_mask.all() and ex.segment_ids.shape == (N,)
        out = split_docs(ex.tokens, ex.segment_ids)
        # Each document grows by 3 tokens and the window is cut back to N at its end: the tail
        # documents drop out, the last one kept may be partial.
        assert len(docs) - 3 * len(docs) // 10 - 1 <= len(out) <= len(docs)
        np.testing.assert_array_equal(np.unique(ex.segment_ids), np.arange(len(out)))
        for orig, got in zip(docs, out[:-1]):
            np.testing.assert_array_equal(unfim(got), orig)
            assert len(got) == len(orig) + 3
            if bos and orig[0] == BOS:
                assert got[0] == BOS and got[1] == PRE
            spm = got[int(got[0] == BOS) + 1] == SUF
            n_spm += spm
            n_psm += not spm
    assert n_spm > 50 and n_psm > 50


def test_fim_rates() -> None:
    fim = FillInTheMiddle(SP, fim_rate=0.3, spm_rate=0.25)
    done = total = spm = 0
    # Long documents: with an empty prefix PSM and SPM are the same sequence (1 in ~100 here).
    for seed in range(40):
        window, seg, docs = packed_window(np.random.default_rng(seed), n=8193, min_len=150, max_len=250)
        ex = fim(window, seg, np.random.default_rng(seed))
        for got in split_docs(ex.tokens, ex.segment_ids)[:-1]:
            total += 1
            if got[0] == PRE:
                done += 1
                spm += got[1] == SUF
    assert abs(done / total - 0.3) < 0.03, done / total
    assert abs(spm / done - 0.25) < 0.04, spm / done
    window, seg, _ = packed_window(np.random.default_rng(0))
    ex = FillInTheMiddle(SP, fim_rate=0.0)(window, seg, np.random.default_rng(0))
    np.testing.assert_array_equal(ex.tokens, window)


def test_fim_is_deterministic_given_the_generator() -> None:
    window, seg, _ = packed_window(np.random.default_rng(3))
    fim = FillInTheMiddle(SP, 0.5, 0.5)
    a = fim(window, seg, np.random.default_rng([1, 2, 3]))
    b = fim(window, seg, np.random.default_rng([1, 2, 3]))
    c = fim(window, seg, np.random.default_rng([1, 2, 4]))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_prefix_lm_masks_the_prefix() -> None:
    pl = PrefixLM(0.2, 0.6)
    seen = set()
    for seed in range(300):
        window, seg, _ = packed_window(np.random.default_rng(seed))
        ex = pl(window, seg, np.random.default_rng(seed))
        p = ex.prefix_len
        assert 52 <= p <= 153  # ceil(0.2 * 256), floor(0.6 * 256)
        inp, tgt, _ = ex.arrays()
        np.testing.assert_array_equal(inp, window[:-1])
        assert (tgt[: p - 1] == IGNORE_INDEX).all()  # targets inside the (visible) prefix
        np.testing.assert_array_equal(tgt[p - 1:], window[p:])  # the first token after it is predicted
        seen.add(p)
    assert min(seen) <= 56 and max(seen) >= 149
    with pytest.raises(ValueError, match="prefix_min <= prefix_max"):
        PrefixLM(0.7, 0.3)


@pytest.mark.parametrize("mode,mu,rate", [("R", 3.0, 0.15), ("X", 32.0, 0.15), ("X", 3.0, 0.5)])
def test_ul2_spans_are_exactly_the_masked_tokens(mode: str, mu: float, rate: float) -> None:
    ul2 = UL2(SP, {"R": 1, "S": 1, "X": 1})
    sentinels = set(ul2.span_sentinels.tolist())
    rates, span_lens = [], []
    n = 1025
    for seed in range(60):
        window, seg, _ = packed_window(np.random.default_rng(seed), n=n)
        rng = np.random.default_rng(seed)
        inputs, targets = ul2.corrupt(window, mu, rate, extra=2, rng=rng)
        length, noise, spans = ul2_span_plan(n, mu, rate, 2)
        assert 2 + len(inputs) + len(targets) <= n
        assert len(inputs) + len(targets) == length + 2 * spans
        # Replace each sentinel of the inputs by its span from the targets: the source comes back.
        t_sent = np.flatnonzero(np.isin(targets, list(sentinels)))
        t_spans = [targets[a + 1: b] for a, b in zip(t_sent, list(t_sent[1:]) + [len(targets)])]
        assert len(t_spans) == spans and all(len(s) > 0 for s in t_spans)
        i_sent = np.flatnonzero(np.isin(inputs, list(sentinels)))
        np.testing.assert_array_equal(inputs[i_sent], targets[t_sent])  # same sentinels, same order
        pieces, prev = [], 0
        for pos, span in zip(i_sent, t_spans):
            pieces += [inputs[prev:pos], span]
            prev = pos + 1
        pieces.append(inputs[prev:])
        np.testing.assert_array_equal(np.concatenate(pieces), window[:length])
        assert sum(len(s) for s in t_spans) == noise
        rates.append(noise / length)
        span_lens += [len(s) for s in t_spans]
    assert abs(np.mean(rates) - rate) < 0.01
    assert abs(np.mean(span_lens) - mu) < 0.1 * mu


def test_ul2_layout_and_loss_mask() -> None:
    ul2 = UL2(SP, {"R": 1, "S": 1, "X": 1})
    modes = {SP.sentinels[-1]: "R", SP.sentinels[-2]: "X", SP.sentinels[-3]: "S"}
    seen = {"R": 0, "S": 0, "X": 0}
    for seed in range(300):
        window, seg, _ = packed_window(np.random.default_rng(seed))
        ex = ul2(window, seg, np.random.default_rng(seed))
        assert ex.tokens.shape == (N,) and ex.loss_mask.shape == (N,)
        mode = modes[int(ex.tokens[0])]
        seen[mode] += 1
        p = ex.prefix_len
        inp, tgt, _ = ex.arrays()
        assert (tgt[: p - 1] == IGNORE_INDEX).all()
        if mode == "S":
            np.testing.assert_array_equal(ex.tokens[1:], window[: N - 1])
            assert (tgt[p - 1:] != IGNORE_INDEX).all()
            assert 26 <= p - 1 <= 229
            continue
        # R / X: the targets part starts with the first span sentinel and ends with EOS, then padding.
        assert ex.tokens[p] == ul2.span_sentinels[0]
        used = int(np.flatnonzero(ex.loss_mask)[-1]) + 1
        assert ex.tokens[used - 1] == EOS
        assert (ex.tokens[used:] == PAD).all() and not ex.loss_mask[used:].any()
        assert ex.loss_mask[p:used].all()
        assert N - used <= 6  # the source length is the largest that fits
        assert (ex.segment_ids[:used] == 0).all() and (ex.segment_ids[used:] == 1).all()
    assert all(abs(v / 300 - 1 / 3) < 0.08 for v in seen.values()), seen


def test_ul2_sentinels_cycle_when_spans_outnumber_them() -> None:
    sp = SpecialIds.conventions(8)  # 5 span sentinels after the 3 mode tokens
    ul2 = UL2(sp, {"R": 1})
    window = np.arange(1000, 1000 + 1025, dtype=np.int64)
    inputs, targets = ul2.corrupt(window, 3.0, 0.15, extra=2, rng=np.random.default_rng(0))
    s = targets[np.isin(targets, sp.sentinels)]
    assert len(s) > 40
    np.testing.assert_array_equal(s, np.resize(np.array(sp.sentinels[:5]), len(s)))
    no_mode = UL2(sp, {"R": 1}, mode_tokens=False)
    assert len(no_mode.span_sentinels) == 8 and not no_mode.mode_ids
    with pytest.raises(ValueError, match="at least 4 sentinel"):
        UL2(SpecialIds.conventions(2), {"R": 1})
    with pytest.raises(ValueError, match="unknown denoisers"):
        UL2(SP, {"Q": 1})


def test_ul2_span_plan_is_the_longest_source_that_fits() -> None:
    def size(length: int, mu: float, rate: float) -> int:  # T5's rounding, written out independently
        noise = min(max(round(length * rate), 1), length - 1)
        spans = min(max(round(noise / mu), 1), noise, length - noise)
        return length + 2 * spans

    for n in (20, 65, 257, 1025):
        for mu, rate in ((3.0, 0.15), (32.0, 0.15), (3.0, 0.5)):
            length, noise, spans = ul2_span_plan(n, mu, rate, 2)
            assert 2 + size(length, mu, rate) <= n
            assert all(2 + size(m, mu, rate) > n for m in range(length + 1, n + 1))
            assert noise == round(length * rate)


def test_random_segmentation() -> None:
    rng = np.random.default_rng(0)
    for n, k in ((10, 1), (10, 10), (100, 7)):
        lens = random_segmentation(n, k, rng)
        assert len(lens) == k and lens.sum() == n and (lens >= 1).all()


def test_special_ids() -> None:
    mapping = {"pad": 0, "bos": 1, "eos": 2, "fim_prefix": 3, "fim_middle": 4, "fim_suffix": 5, "fim_pad": 6,
               "sentinel_0": 7, "sentinel_1": 8}
    assert SpecialIds.from_mapping(mapping) == SpecialIds.conventions(2)
    assert SpecialIds.from_manifest({"eos_id": 2, "bos_id": 1, "pad_id": 0, "vocab_size": 512}).sentinels[-1] == 38
    assert SpecialIds.from_manifest({"special_ids": mapping, "eos_id": 2}).sentinels == (7, 8)
    with pytest.raises(ValueError, match="eos_id=9 disagrees"):
        SpecialIds.from_manifest({"eos_id": 9})


def test_build_objective() -> None:
    assert isinstance(build_objective(ObjectiveConfig(), SP), CausalLM)
    assert isinstance(build_objective(ObjectiveConfig(kind="fim", fim_rate=0.9), SP), FillInTheMiddle)
    assert isinstance(build_objective(ObjectiveConfig(kind="prefix_lm"), SP), PrefixLM)
    assert isinstance(build_objective(ObjectiveConfig(kind="ul2"), SP), UL2)
