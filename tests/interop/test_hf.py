"""Hugging Face export/import: transformers logit parity (GQA, tied/untied, bf16, shards), the
tokenizer, refusal of non-Llama configs, a RoPE layout mix-up caught by the parity check, import
of a transformers-made model, and import -> export byte-identical round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smelt.interop.hf import (
    INDEX_FILE,
    InteropError,
    ParityError,
    export_hf,
    export_run,
    import_hf,
    model_config_from_hf,
    permute_meta_to_hf,
    read_hf_weights,
)
from smelt.interop.load import load_model
from smelt.model.config import preset
from smelt.model.llama import Transformer
from tests.interop._helpers import TEXTS, make_run

# rope_theta 5e5 (LLaMA-3's), not the default: an export that dropped it would fail parity.
MODEL = {"rope_theta": 500000.0, "init_std": 0.1}


def _hf_logits(export: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


@pytest.mark.parametrize("tie", [False, True])
def test_export_matches_transformers(tmp_path: Path, tie: bool) -> None:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    run, ref = make_run(tmp_path, model={**MODEL, "tie_embeddings": tie})
    out = export_hf(load_model(run), None, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "special_tokens_map.json", "smelt_export.json"} <= names
    assert not any(n.startswith(".") for n in {p.name for p in tmp_path.iterdir()})  # no staging leftovers

    cfg = LlamaConfig.from_pretrained(str(out))
    assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads == 4  # GQA
    assert cfg.rope_parameters["rope_theta"] == 500000.0
    assert cfg.tie_word_embeddings is tie
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert ("lm_head.weight" in load_file(str(out / "model.safetensors"))) is not tie

    ids = torch.randint(0, ref.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids)
    got = _hf_logits(out, ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert want.std() > 0.1  # logits not trivially flat

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.model_max_length == ref.cfg.max_seq_len
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    for text in TEXTS[:5]:
        assert tok(text)["input_ids"] == ours.encode(text).ids
        assert tok.decode(tok(text)["input_ids"]) == text

    manifest = json.loads((out / "smelt_export.json").read_text())
    assert manifest["source"]["step"] == 7 and manifest["parity"]["max_abs_logit_diff"] <= 1e-4


def test_bf16_sharded_export(tmp_path: Path) -> None:
    run, ref = make_run(tmp_path, model=MODEL)
    out = export_hf(load_model(run), None, tmp_path / "export", dtype="bfloat16", shard_size="60KB")
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    weights = read_hf_weights(out)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in weights.values())
    # Reference: smelt with the same bf16-rounded weights, computing in fp32.
    sd = {k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()}
    rounded = Transformer(ref.cfg).eval()
    rounded.load_state_dict(sd)
    ids = torch.randint(0, ref.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = rounded(ids)
    assert (_hf_logits(out, ids) - want).abs().max().item() <= 1e-4
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("change", [{"pos_emb": "alibi"}, {"moe_experts": 4}, {"norm": "layernorm"},
                                    {"mlp": "gelu"}, {"norm_position": "post"}])
def test_export_refuses_non_llama_configs_before_writing(tmp_path: Path, change: dict) -> None:
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=64, **change))
    with pytest.raises(InteropError, match="cannot be exported to Hugging Face Llama format"):
        export_hf(model, None, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parity_check_catches_a_rope_layout_mixup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  dtype: str) -> None:
    """An exporter that wrote Meta's interleaved wq/wk layout must fail loudly, leaving nothing."""
    import smelt.model.llama as llama

    run, _ = make_run(tmp_path, model=MODEL)
    real = llama.to_hf_state_dict

    def wrong_layout(model: Transformer) -> dict[str, torch.Tensor]:
        sd = dict(real(model))
        for k in list(sd):
            if k.endswith("q_proj.weight"):
                sd[k] = permute_meta_to_hf(sd[k], model.cfg.n_heads)
            elif k.endswith("k_proj.weight"):
                sd[k] = permute_meta_to_hf(sd[k], model.cfg.kv_heads)
        return sd

    monkeypatch.setattr(llama, "to_hf_state_dict", wrong_layout)
    with pytest.raises(ParityError, match="differ from smelt's by"):
        export_hf(load_model(run), None, tmp_path / "export", dtype=dtype)
    assert not (tmp_path / "export").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_import_export_round_trip_is_byte_identical(tmp_path: Path) -> None:
    run, ref = make_run(tmp_path, model={**MODEL, "tie_embeddings": True})
    for dtype in ("float32", "bfloat16"):
        first = export_hf(load_model(run), None, tmp_path / f"export-{dtype}", dtype=dtype)
        imported = import_hf(first, tmp_path / f"imported-{dtype}")
        lm = load_model(imported)
        assert lm.step == 0 and lm.cfg.tie_embeddings and lm.cfg.rope_theta == 500000.0
        assert (lm.eos_id, lm.bos_id, lm.pad_id) == (2, 1, 0)
        manifest = json.loads((imported / "import_manifest.json").read_text())
        assert manifest["parity"]["max_abs_logit_diff"] <= 1e-4
        second = export_hf(lm, None, tmp_path / f"again-{dtype}", dtype=dtype)
        a, b = read_hf_weights(first), read_hf_weights(second)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert a[k].view(torch.uint8).equal(b[k].view(torch.uint8)), k  # byte-identical
        assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
        assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    # fp32 import: the smelt model is exactly the original.
    lm = load_model(tmp_path / "imported-float32")
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), lm.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_import_a_transformers_model(tmp_path: Path) -> None:
    """A model saved by transformers itself (not a smelt export): untied, GQA, theta 1e6, bias."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6,
                      tie_word_embeddings=False, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    out = import_hf(tmp_path / "hf", tmp_path / "imp")
    lm = load_model(out)
    assert lm.cfg.n_kv_heads == 2 and lm.cfg.ffn_hidden == 100 and lm.cfg.bias and lm.cfg.rope_theta == 1e6
    assert lm.tokenizer is None
    ids = torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (lm.model(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
    # The imported directory is a run: the recipe validates and names the full model.
    from smelt.config import load_recipe

    assert load_recipe(out / "recipe.yaml").model.dim == 48


def test_import_refuses_what_smelt_cannot_express(tmp_path: Path) -> None:
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100}
    assert model_config_from_hf(base).dim == 64
    bad = [({"model_type": "mistral"}, "model_type 'mistral'"),
           ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
           ({"hidden_act": "gelu"}, "hidden_act"),
           ({"attention_bias": True}, "one `bias` switch"),
           ({"head_dim": 32}, "head_dim")]
    for change, msg in bad:
        with pytest.raises(InteropError, match=msg):
            model_config_from_hf({**base, **change}, "x/config.json")
    with pytest.raises(InteropError, match="required key 'vocab_size'"):
        model_config_from_hf({k: v for k, v in base.items() if k != "vocab_size"})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(base))
    with pytest.raises(InteropError, match="no model.safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_run_cli_and_truncated_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from smelt.cli import main
    from smelt.config import load_recipe
    from smelt.train.checkpoint import CheckpointError

    run, _ = make_run(tmp_path, model=MODEL)
    recipe = load_recipe(run / "recipe.yaml")
    out = export_run(recipe, run)
    assert out == run / "export" and (out / "config.json").is_file()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    export_run(recipe, run)  # up to date: untouched
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    assert main(["export", str(run), "--out", str(tmp_path / "cli-export"), "--dtype", "bfloat16", "-q"]) == 0
    assert json.loads((tmp_path / "cli-export" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["import", str(tmp_path / "cli-export"), str(tmp_path / "cli-import"), "-q"]) == 0
    assert load_model(tmp_path / "cli-import").step == 0
    assert main(["generate", str(tmp_path / "cli-import"), "--prompt", "The quick", "--max-new-tokens", "4",
                 "--temperature", "0", "-q"]) == 0
    assert "The quick" in capsys.readouterr().out

    ckpt = run / "train" / "checkpoints" / "step-0000007"
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="step-0000007: incomplete or corrupt checkpoint"):
        export_run(recipe, run, checkpoint=ckpt, out_dir=tmp_path / "never")
    assert main(["export", str(run), "--checkpoint", str(ckpt), "--out", str(tmp_path / "never"), "-q"]) == 2
    assert "incomplete or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
