"""smelt.model.llama: masking, positions, GQA, MoE, KV cache, init, and parity with HF LlamaForCausalLM."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from smelt.model import llama
from smelt.model.config import PRESETS, ModelConfig, preset
from smelt.model.llama import (
    KVCache,
    MoE,
    Transformer,
    apply_rope,
    explicit_attention,
    from_hf_state_dict,
    hf_config,
    rope_cos_sin,
    rope_inv_freq,
    to_hf_state_dict,
)

V = 97  # vocabulary of the test models


def tiny(**kw) -> ModelConfig:
    """debug preset (2 layers, dim 64, 4 heads over 2 KV heads) with a small vocabulary."""
    return preset("debug", vocab_size=V, **kw)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# Architectures whose masking/position/cache behaviour must hold alike.
VARIANTS = {
    "rope": {},
    "alibi": {"pos_emb": "alibi"},
    "learned": {"pos_emb": "learned"},
    "mqa-postnorm-layernorm-gelu-bias": {"n_kv_heads": 1, "norm_position": "post", "norm": "layernorm",
                                         "mlp": "gelu", "bias": True},
    "moe": {"moe_experts": 4, "moe_top_k": 2},
}


# ---------------------------------------------------------------------------------------------
# config


def test_config_presets_fill_and_override() -> None:
    cfg = ModelConfig.model_validate({"preset": "debug", "n_layers": 4})
    assert (cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.preset) == (64, 4, 2, "debug")
    assert list(PRESETS)[0] == "debug"
    # A config's dump validates back to itself (the preset fills nothing that is given).
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    seven = preset("llama-7b")
    assert (seven.hidden_dim, seven.kv_heads, seven.head_dim) == (11008, 32, 128)


@pytest.mark.parametrize("bad, match", [
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"dim": 65, "n_heads": 4}, "multiple of n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"moe_experts": 2, "moe_top_k": 3}, "moe_top_k"),
    ({"norm": "batchnorm"}, "rmsnorm"),
    ({"n_layer": 2}, "Extra inputs are not permitted"),
])
def test_config_rejects_bad_values(bad: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ModelConfig.model_validate(bad)


def test_config_import_does_not_import_torch() -> None:
    code = "import sys, smelt.model.config, smelt.model.flops; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vocab_size_required() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(preset("debug"))
    assert preset("debug").with_vocab(10).vocab_size == 10


# ---------------------------------------------------------------------------------------------
# shapes and masking


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_backward_and_aux_loss(variant: str) -> None:
    cfg = tiny(**VARIANTS[variant])
    model = build(cfg).train()
    logits = model(tokens(3, 11))
    assert logits.shape == (3, 11, V) and logits.dtype == torch.float32
    assert model.aux_loss.shape == ()
    if not cfg.moe_experts:
        assert model.aux_loss.item() == 0.0
    (F.cross_entropy(logits.flatten(0, 1), tokens(33, seed=2)) + model.aux_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_bf16_autocast_logits_dtype() -> None:
    model = build(tiny())
    x = tokens(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), model(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_future_tokens_do_not_change_past_logits(variant: str) -> None:
    model = build(tiny(**VARIANTS[variant]))
    x = tokens(2, 16)
    y = x.clone()
    y[:, 9:] = tokens(2, 7, seed=5)
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # the test can fail: later logits do change


def _pack(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate documents into one row with segment ids and restarted positions."""
    ids = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return ids, seg, pos


@pytest.mark.parametrize("variant", VARIANTS)
def test_document_mask_equals_documents_alone(variant: str) -> None:
    model = build(tiny(**VARIANTS[variant]))
    docs = [tokens(n, seed=s).view(-1) for n, s in ((5, 1), (7, 2), (4, 3))]
    ids, seg, pos = _pack(docs)
    packed = model(ids, segment_ids=seg, position_ids=pos)
    start = 0
    for d in docs:
        alone = model(d[None])
        torch.testing.assert_close(packed[0, start:start + len(d)], alone[0], atol=2e-5, rtol=1e-5)
        start += len(d)
    # Changing the first document changes nothing in the others; without the mask it would.
    other = ids.clone()
    other[0, :5] = tokens(5, seed=9).view(-1)
    torch.testing.assert_close(model(other, segment_ids=seg, position_ids=pos)[0, 5:], packed[0, 5:],
                               atol=1e-6, rtol=0)
    assert (model(other)[0, 5:] - model(ids)[0, 5:]).abs().max() > 1e-3


def test_prefix_lm_mask() -> None:
    model = build(tiny())
    x = tokens(2, 12)
    P = torch.tensor([5, 8])
    out = model(x, prefix_len=P)
    # Inside the prefix attention is bidirectional: a later prefix token changes an earlier logit ...
    y = x.clone()
    y[0, 4], y[1, 7] = (x[0, 4] + 1) % V, (x[1, 7] + 1) % V
    changed = model(y, prefix_len=P)
    assert (changed[0, 0] - out[0, 0]).abs().max() > 1e-4 and (changed[1, 0] - out[1, 0]).abs().max() > 1e-4
    # ... but tokens after the prefix stay causal and invisible to the prefix.
    z = x.clone()
    z[0, 9:], z[1, 10:] = tokens(3, seed=7).view(-1), tokens(2, seed=8).view(-1)
    torch.testing.assert_close(model(z, prefix_len=P)[0, :9], out[0, :9], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(z, prefix_len=P)[1, :10], out[1, :10], atol=1e-6, rtol=0)
    # A zero-length prefix is the causal model.
    torch.testing.assert_close(model(x, prefix_len=torch.zeros(2, dtype=torch.long)), model(x), atol=1e-6, rtol=0)
    # A prefix of length 1 is causal too (a token always sees itself).
    torch.testing.assert_close(model(x, prefix_len=torch.ones(2, dtype=torch.long)), model(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# positions and attention heads


def test_rope_depends_only_on_relative_position() -> None:
    hd = 16
    inv = rope_inv_freq(hd, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)

    def score(m: int, n: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([[m]]), inv)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), inv)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    for m, n in [(3, 1), (10, 2), (7, 7)]:
        for shift in (1, 13, 500):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    # Norm preserving (a rotation), and the model is invariant to shifting every position.
    c, s = rope_cos_sin(torch.tensor([[37]]), inv)
    assert apply_rope(q, c, s).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)
    model = build(tiny())
    x = tokens(2, 10)
    torch.testing.assert_close(model(x, position_ids=torch.arange(10)[None] + 100), model(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv: int) -> None:
    gqa = build(tiny(n_kv_heads=n_kv))
    mha = build(tiny(n_kv_heads=4), seed=1)
    sd = gqa.state_dict()
    rep, hd = 4 // n_kv, 64 // 4
    for i in range(2):
        for w in ("wk", "wv"):  # query head h reads KV head h // rep: repeat each KV head's rows
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(n_kv, hd, 64).repeat_interleave(rep, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    x = tokens(2, 13)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# mixture of experts


def test_moe_routes_top_k_and_renormalizes() -> None:
    cfg = tiny(moe_experts=4, moe_top_k=2)
    moe = MoE(cfg)
    torch.manual_seed(0)
    moe.init_weights(0.02, 0.02)
    calls: list[int] = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: calls.extend([e] * inp[0].shape[0]))
    x = torch.randn(2, 5, cfg.dim)
    out = moe(x)
    probs = moe.router(x.view(10, -1)).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert sorted(calls) == sorted(top.indices.flatten().tolist())  # every token visits its top 2
    # Reference: a per-token loop over the chosen experts with renormalized gates.
    ref = torch.zeros(10, cfg.dim)
    for t in range(10):
        g = top.values[t] / top.values[t].sum()
        for j in range(2):
            ref[t] += g[j] * moe.experts[int(top.indices[t, j])](x.view(10, -1)[t])
    torch.testing.assert_close(out.view(10, -1), ref, atol=1e-6, rtol=1e-5)


def test_moe_with_identical_experts_equals_dense() -> None:
    dense = build(tiny())
    moe = build(tiny(moe_experts=3, moe_top_k=2))
    sd = moe.state_dict()
    for name, value in dense.state_dict().items():
        if ".feed_forward." in name:
            for e in range(3):
                sd[name.replace(".feed_forward.", f".feed_forward.experts.{e}.")] = value
        else:
            sd[name] = value
    moe.load_state_dict(sd)
    x = tokens(2, 9)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)  # gates sum to 1


def test_moe_aux_loss_on_a_constructed_router() -> None:
    cfg = tiny(moe_experts=4, moe_top_k=1)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([2.0, 1.0, 0.0, 0.0])  # channel 0 steers to expert 0
        moe.router.weight[:, 1] = torch.tensor([0.0, 3.0, 0.0, 0.0])  # channel 1 steers to expert 1
    x = torch.zeros(1, 4, cfg.dim)
    x[0, :3, 0] = 1.0  # 3 tokens -> expert 0 (logits 2, 1, 0, 0)
    x[0, 3, 1] = 1.0   # 1 token  -> expert 1 (logits 0, 3, 0, 0)
    moe(x)
    p_a = torch.tensor([2.0, 1.0, 0.0, 0.0]).softmax(0)
    p_b = torch.tensor([0.0, 3.0, 0.0, 0.0]).softmax(0)
    P = (3 * p_a + p_b) / 4
    f = torch.tensor([0.75, 0.25, 0.0, 0.0])
    assert moe.aux_loss.item() == pytest.approx(4 * (f * P).sum().item(), rel=1e-6)
    # A perfectly balanced router (uniform probabilities) scores 1 whatever k is.
    moe2 = MoE(tiny(moe_experts=4, moe_top_k=2))
    with torch.no_grad():
        moe2.router.weight.zero_()
    moe2(torch.randn(1, 8, cfg.dim))
    assert moe2.aux_loss.item() == pytest.approx(1.0)


def test_moe_gradients_reach_the_router() -> None:
    model = build(tiny(moe_experts=4, moe_top_k=2)).train()
    x = tokens(2, 8)
    model(x).square().mean().backward()  # no aux loss: the gates alone carry gradient to the router
    for layer in model.layers:
        assert layer.feed_forward.router.weight.grad.abs().sum() > 0
    model.zero_grad()
    model(x)
    model.aux_loss.backward()
    assert all(layer.feed_forward.router.weight.grad.abs().sum() > 0 for layer in model.layers)


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_incremental_equals_full_forward(variant: str) -> None:
    cfg = tiny(**VARIANTS[variant])
    model = build(cfg)
    x = tokens(2, 14)
    full = model(x)
    cache = KVCache(cfg, batch_size=2, max_seq_len=32)
    pieces = [model(x[:, :5], cache=cache)]  # prefill
    pieces += [model(x[:, 5:8], cache=cache)]  # a chunk after the cache (needs an explicit mask)
    pieces += [model(x[:, t:t + 1], cache=cache) for t in range(8, 14)]  # one token at a time
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-5)


def test_kv_cache_left_padded_batch() -> None:
    """Rows of different prompt lengths: left padding in its own segment, positions from 0."""
    cfg = tiny()
    model = build(cfg)
    a, b = tokens(6, seed=3).view(-1), tokens(3, seed=4).view(-1)
    pad = 3
    ids = torch.stack([a, torch.cat([torch.zeros(pad, dtype=torch.long), b])])
    seg = torch.tensor([[1] * 6, [0] * pad + [1] * 3])
    pos = torch.tensor([list(range(6)), [0] * pad + list(range(3))])
    cache = KVCache(cfg, batch_size=2, max_seq_len=16)
    out = model(ids, segment_ids=seg, position_ids=pos, cache=cache)
    nxt = torch.tensor([[5], [7]])
    step = model(nxt, position_ids=torch.tensor([[6], [3]]), cache=cache)  # continues segment 1
    torch.testing.assert_close(out[1, pad:], model(b[None])[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], model(torch.cat([b, nxt[1]])[None])[0, -1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], model(torch.cat([a, nxt[0]])[None])[0, -1], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention kernels: explicit (short spans on CPU) vs SDPA


def _attention_case(case: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None, bool]:
    g = torch.Generator().manual_seed(5)
    B, H, T, S, hd = 2, 4, 6, 6, 8
    kv_heads = 2 if case == "gqa" else H
    if case == "decode":
        T = 1
    if case == "chunk-after-cache":
        T = 3
    q = torch.randn(B, H, T, hd, generator=g)
    k, v = torch.randn(2, B, kv_heads, S, hd, generator=g)
    mask: torch.Tensor | None = None
    if case in ("bool", "chunk-after-cache"):
        q_idx = torch.arange(S - T, S)
        seg = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
        mask = (torch.arange(S)[None, :] <= q_idx[:, None])[None] & (seg[:, S - T:, None] == seg[:, None, :])
        mask = mask[:, None]  # (B, 1, T, S)
    if case == "float":
        mask = torch.randn(B, H, T, S, generator=g).masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1),
                                                                 float("-inf"))
    is_causal = mask is None and T == S
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], mask, is_causal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "gqa", "decode", "bool", "chunk-after-cache", "float"])
def test_explicit_attention_equals_sdpa(case: str, dtype: torch.dtype) -> None:
    """Outputs and gradients of the explicit path equal SDPA's for every mask kind the model uses."""
    (q, k, v), mask, is_causal = _attention_case(case, dtype)
    ours = explicit_attention(q, k, v, mask, is_causal)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(dtype) if mask is not None and
                                         mask.is_floating_point() else mask,
                                         is_causal=is_causal, enable_gqa=q.size(1) != k.size(1))
    assert ours.dtype == dtype and ours.shape == ref.shape
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(ours, ref, **tol)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    grads = torch.autograd.grad(ours, (q, k, v), dy)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dy)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("variant", ["rope", "alibi", "mqa-postnorm-layernorm-gelu-bias"])
def test_model_attention_paths_agree(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits and gradients are the same whether attention takes the explicit path or SDPA,
    with the causal fast path and with document masking."""
    cfg = tiny(**VARIANTS[variant])
    x = tokens(2, 12)
    seg = (torch.arange(12) >= 5).long()[None].expand(2, 12)
    for kwargs in ({}, {"segment_ids": seg}):
        results = []
        for max_keys in (llama.EXPLICIT_ATTENTION_MAX_KEYS, 0):
            monkeypatch.setattr(llama, "EXPLICIT_ATTENTION_MAX_KEYS", max_keys)
            model = build(cfg)
            logits = model(x, **kwargs)
            logits.square().mean().backward()
            results.append((logits, [p.grad for p in model.parameters()]))
        (a, ga), (b, gb) = results
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        for p, q in zip(ga, gb):
            torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-4)


def test_attention_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short spans on CPU take the explicit path; longer ones SDPA (its CPU flash kernel wins there)."""
    calls: list[int] = []

    def spy(q: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(q.size(2))
        return explicit_attention(q, *args)

    monkeypatch.setattr(llama, "explicit_attention", spy)
    n = llama.EXPLICIT_ATTENTION_MAX_KEYS
    model = build(tiny(n_layers=1, max_seq_len=n + 8))
    model(tokens(1, n))
    assert calls == [n]
    model(tokens(1, n + 1))
    assert calls == [n]


def test_attention_path_choice_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the longer compiled cut-off applies (inductor fuses the explicit
    path; SDPA's kernel stays opaque), and the compiled explicit path gives SDPA's logits and
    gradients. backend="aot_eager" traces forward and backward as inductor does, without its
    C++ compile, so the test stays fast."""
    n_eager, n_compiled = llama.EXPLICIT_ATTENTION_MAX_KEYS, llama.EXPLICIT_ATTENTION_MAX_KEYS_COMPILED
    assert n_compiled > n_eager
    calls: list[int] = []

    def spy(q: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(q.size(2))  # runs while tracing: one call per layer and compilation
        return explicit_attention(q, *args)

    monkeypatch.setattr(llama, "explicit_attention", spy)
    cfg = tiny(n_layers=1, max_seq_len=n_compiled + 8)
    x = tokens(1, n_eager + 1)
    eager = build(cfg)
    ref = eager(x)  # eager: past the eager cut-off, SDPA
    assert calls == []
    ref.square().mean().backward()

    torch._dynamo.reset()
    compiled = build(cfg)
    out = torch.compile(compiled, backend="aot_eager", dynamic=False)(x)
    assert calls == [n_eager + 1]
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-6, rtol=1e-4)

    calls.clear()
    torch._dynamo.reset()
    torch.compile(build(cfg), backend="aot_eager", dynamic=False)(tokens(1, n_compiled + 1))
    assert calls == []  # past the compiled cut-off: SDPA
    torch._dynamo.reset()


def test_kv_cache_overflow_is_an_error() -> None:
    cfg = tiny()
    cache = KVCache(cfg, batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        build(cfg)(tokens(1, 5), cache=cache)


# ---------------------------------------------------------------------------------------------
# initialization


def _trunc_std(std: float) -> float:
    """Std of N(0, std) truncated at +-3 std."""
    phi = math.exp(-4.5) / math.sqrt(2 * math.pi)
    mass = math.erf(3 / math.sqrt(2))
    return std * math.sqrt(1 - 6 * phi / mass)


@pytest.mark.parametrize("scheme", ["scaled", "normal", "depth"])
def test_init_statistics(scheme: str) -> None:
    cfg = preset("cpu-1m", vocab_size=512, n_layers=4, init=scheme, init_std=0.02)
    model = build(cfg)
    out_std = {"scaled": lambda i: 0.02 / math.sqrt(8), "normal": lambda i: 0.02,
               "depth": lambda i: 0.02 / math.sqrt(2 * (i + 1))}[scheme]
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
            continue
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        want = out_std(layer) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        assert p.mean().abs().item() < 0.1 * want, name
        assert p.std().item() == pytest.approx(_trunc_std(want), rel=0.05), name
        assert p.abs().max().item() <= 3 * want + 1e-7, name


def test_init_is_deterministic_and_works_from_meta() -> None:
    cfg = tiny(tie_embeddings=True)
    a = Transformer(cfg)
    torch.manual_seed(3)
    a.init_weights()
    with torch.device("meta"):
        b = Transformer(cfg)
    b.to_empty(device="cpu")
    torch.manual_seed(3)
    b.init_weights()
    assert b.output.weight is b.tok_embeddings.weight  # still tied after to_empty
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    x = tokens(1, 6)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)  # buffers (RoPE frequencies) restored too
    torch.manual_seed(4)
    b.init_weights()
    assert not torch.equal(a.layers[0].attention.wq.weight, b.layers[0].attention.wq.weight)


# ---------------------------------------------------------------------------------------------
# Hugging Face parity


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "bias": True},
                                {"rope_theta": 500000.0, "ffn_hidden": 100}])
def test_logits_equal_hf_llama(kw: dict) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = tiny(**kw)
    model = build(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg), attn_implementation="eager"))
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == (["lm_head.weight"] if cfg.tie_embeddings else [])
    hf.eval()
    x = tokens(2, 21)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(input_ids=x).logits, atol=1e-5, rtol=0)
        pos = torch.cat([torch.arange(9), torch.arange(12)])[None].expand(2, 21)  # restarted positions
        torch.testing.assert_close(model(x, position_ids=pos), hf(input_ids=x, position_ids=pos).logits,
                                   atol=1e-5, rtol=0)
    # And back: HF weights load into a fresh smelt model and give the same logits.
    fresh = build(cfg, seed=7)
    fresh.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_hf_mapping_rejects_non_llama_architectures() -> None:
    with pytest.raises(ValueError, match="pos_emb"):
        hf_config(tiny(pos_emb="alibi"))


def test_dense_model_traces_as_one_graph() -> None:
    """torch.compile sees the whole forward (also with document masking) without graph breaks."""
    import torch._dynamo as dynamo

    model = build(tiny())
    x = tokens(2, 16)
    seg = (torch.arange(16) >= 8).long()[None].expand(2, 16)
    for kwargs in ({}, {"segment_ids": seg, "position_ids": torch.arange(16)[None] % 8}):
        explained = dynamo.explain(model)(x, **kwargs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
