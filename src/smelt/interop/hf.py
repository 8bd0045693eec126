"""Hugging Face Llama format: export a smelt checkpoint, import a Llama-architecture model.

Export directory (`export_hf`, format version 1), loadable by
``transformers.LlamaForCausalLM.from_pretrained`` and ``PreTrainedTokenizerFast.from_pretrained``::

    config.json                       LlamaConfig fields (rope_theta also as rope_parameters, the
                                      transformers 5 spelling), bos/eos/pad ids, dtype
    model.safetensors                 weights under LlamaForCausalLM names, or, above the shard size,
    model-0000i-of-0000n.safetensors  + model.safetensors.index.json (HF's sharded layout)
    tokenizer.json                    the run's tokenizer, unchanged
    tokenizer_config.json             PreTrainedTokenizerFast + special tokens, model_max_length
    special_tokens_map.json
    generation_config.json            bos/eos/pad ids
    smelt_export.json                 provenance: source checkpoint, step, tokens seen, parity results

RoPE layout: smelt's RoPE rotates channel pairs (i, i + head_dim/2) ("rotate_half", the GPT-NeoX
and HF layout; `smelt.model.llama.rope_cos_sin`), so export and import are a pure renaming of
tensors (`to_hf_state_dict` / `from_hf_state_dict`). Meta's original checkpoints use interleaved
pairs (2i, 2i+1) and need the row permutation of transformers' ``convert_llama_weights_to_hf.py``
(`permute_meta_to_hf` here, for reference and for the test that proves the parity check catches a
layout mix-up). Any layout error shows up as logit differences of order 1, far above tolerance.

Parity check (after every export and every import, before the directory is committed): the
directory is loaded with transformers in fp32 and its logits compared with smelt's on a few
sequences (seeded random ids plus tokenized sample text); max |Δ| above ``atol`` (1e-4, fp32) is
a `ParityError` and no directory is left behind. The tokenizer is checked too: for a few strings
``PreTrainedTokenizerFast`` must produce exactly the ids of ``tokenizers.Tokenizer`` and decode
back to the same text.

Both directions write to a temporary sibling directory and rename it into place (DESIGN.md
principle 1): a crash or a failed check never leaves a half-written export.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from smelt.fsutil import atomic_write_json, locked, move_aside, read_json
from smelt.model.config import ModelConfig
from smelt.model.loaded import LoadedModel, cast_parameters

if TYPE_CHECKING:
    from smelt.config import Recipe

log = logging.getLogger(__name__)

VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "smelt_export.json"
IMPORT_MANIFEST_FILE = "import_manifest.json"
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default max_shard_size ("5GB", decimal)
PARITY_ATOL = 1e-4  # fp32 logits; smelt and HF differ by summation order only (~1e-6 on small models)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Strings for the tokenizer round-trip check: ASCII, Chinese, code, digits, a special-token string.
_PROBE_TEXTS = ("Hello world, this is a test.", "中国的首都是北京。", "def f(x):\n    return x * 2  # ok\n",
                "3.14159 and 1,234,567 numbers", "  leading spaces and trailing  ")

__all__ = [
    "InteropError", "ParityError", "export_hf", "export_run", "import_hf", "load_hf_model", "check_exportable",
    "model_config_from_hf", "hf_config_json", "read_hf_weights", "write_safetensors", "check_logits_parity",
    "check_tokenizer_parity", "permute_meta_to_hf", "parse_size",
]


class InteropError(ValueError):
    """A model or directory that cannot be converted (message names the file / key)."""


class ParityError(InteropError):
    """smelt and transformers disagree on the converted model: the conversion is wrong."""


# --------------------------------------------------------------------------------------------
# small helpers


def parse_size(size: int | str) -> int:
    """Bytes from ``1000000``, ``"500MB"``, ``"5GB"``, ``"2GiB"`` (decimal units as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not m:
        raise InteropError(f"shard size {size!r}: expected bytes or a size like 500MB, 5GB")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InteropError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temp sibling of ``out_dir``, renamed into place on clean exit, deleted on error. An
    existing ``out_dir`` (an earlier export, or whatever the user had there) is moved aside to
    ``<name>.prev-N``, never deleted."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own staging directory from a process with this PID that died
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_aside(out_dir, "write")
    os.replace(tmp, out_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _quiet_transformers() -> None:
    """transformers logs load reports and hub hints at warning level; we check the result ourselves."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# configs


def check_exportable(cfg: ModelConfig) -> None:
    """InteropError unless ``cfg`` is expressible as a transformers LlamaConfig."""
    from smelt.model.llama import check_hf_compatible

    try:
        check_hf_compatible(cfg)
    except ValueError as e:
        raise InteropError(f"this model cannot be exported to Hugging Face Llama format: {e}. LlamaForCausalLM "
                           f"has RoPE, RMSNorm before each sublayer, a SwiGLU MLP and no experts") from None
    if cfg.vocab_size is None:
        raise InteropError("model.vocab_size is None: export needs the resolved config of a trained run")


def hf_config_json(cfg: ModelConfig, special_ids: dict[str, int], dtype: torch.dtype) -> dict[str, Any]:
    """The body of config.json: `hf_config` plus token ids, dtype and the transformers-5 rope spelling."""
    from smelt.model.llama import hf_config

    check_exportable(cfg)
    out = hf_config(cfg)
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out["rope_scaling"] = None  # transformers < 5 reads this key; no scaling is used
    out["attention_dropout"] = 0.0
    for name in ("bos", "eos", "pad"):
        out[f"{name}_token_id"] = special_ids.get(name)
    out["dtype"] = out["torch_dtype"] = _dtype_name(dtype)  # 5.x reads "dtype", 4.x "torch_dtype"
    out["use_cache"] = True
    return out


def _rope_theta(config: dict[str, Any], where: str) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
        if kind != "default":
            raise InteropError(f"{where}: rope_type {kind!r} (RoPE scaling) is not supported by smelt's model; "
                               f"only plain RoPE imports")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(config: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    """A smelt ModelConfig from a Llama-architecture config.json (the inverse of `hf_config`)."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise InteropError(f"{where}: model_type {model_type!r}; only 'llama' (LlamaForCausalLM) imports")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise InteropError(f"{where}: hidden_act {act!r}; smelt's SwiGLU uses silu")
    try:
        dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        layers, inter, vocab = (int(config["num_hidden_layers"]), int(config["intermediate_size"]),
                                int(config["vocab_size"]))
    except KeyError as e:
        raise InteropError(f"{where}: required key {e.args[0]!r} is missing") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads != dim:
        raise InteropError(f"{where}: head_dim {head_dim} * num_attention_heads {n_heads} != hidden_size {dim}; "
                           f"smelt derives head_dim = hidden_size / heads")
    attn_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise InteropError(f"{where}: attention_bias={attn_bias} but mlp_bias={mlp_bias}; smelt has one `bias` "
                           f"switch for all linear layers")
    try:
        return ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=layers, n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads), ffn_hidden=inter,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(config, where),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)), bias=attn_bias,
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except ValueError as e:
        raise InteropError(f"{where}: not a valid smelt model: {e}") from None


# --------------------------------------------------------------------------------------------
# weights


def write_safetensors(tensors: dict[str, Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or HF's sharded layout plus index when the total exceeds the limit.

    Shards are filled greedily in name order (a tensor larger than the limit gets a shard of its
    own, as in transformers' ``shard_checkpoint``). Returns the file names written.
    """
    from safetensors.torch import save_file

    meta = {"format": "pt"}  # transformers refuses safetensors whose format is not pt/tf/flax/mlx
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata=meta)
        return [WEIGHTS_FILE]
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out_dir / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(out_dir / INDEX_FILE, index)
    return [*names, INDEX_FILE]


def read_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards its index names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX_FILE).is_file():
        try:
            weight_map = read_json(hf_dir / INDEX_FILE)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise InteropError(f"{hf_dir / INDEX_FILE}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / WEIGHTS_FILE).is_file():
        files, weight_map = [WEIGHTS_FILE], None
    else:
        bins = sorted(p.name for p in hf_dir.glob("pytorch_model*.bin"))
        hint = f" ({bins[0]} found: pickled weights are not read; re-save with safe_serialization=True)" if bins else ""
        raise InteropError(f"{hf_dir}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")
    out: dict[str, Tensor] = {}
    for fname in files:
        f = hf_dir / fname
        if not f.is_file():
            raise InteropError(f"{hf_dir / INDEX_FILE}: names {fname}, which is missing")
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise InteropError(f"{f}: unreadable safetensors file ({e})") from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise InteropError(f"{hf_dir / INDEX_FILE}: lists {len(missing)} tensors not in the shards, e.g. "
                               f"{missing[:3]}")
    return out


def permute_meta_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Reorder wq/wk rows from Meta's interleaved RoPE pairs to HF's rotate-half layout.

    transformers' ``convert_llama_weights_to_hf.py`` ``permute``: per head, rows (2i, 2i+1) become
    (i, i + head_dim/2). smelt already uses the HF layout, so export/import never call this.
    """
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _fresh_model(cfg: ModelConfig, state: dict[str, Tensor] | None = None) -> nn.Module:
    from smelt.model.llama import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# parity checks


def _parity_inputs(vocab: int, max_len: int, tokenizer: Any | None) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    length = min(64, max_len)
    rows = [torch.randint(0, vocab, (2, length), generator=g)]
    if tokenizer is not None:
        for text in _PROBE_TEXTS[:2]:
            ids = tokenizer.encode(text).ids[:max_len]
            if ids and max(ids) < vocab:
                rows.append(torch.tensor([ids]))
    return rows


def check_logits_parity(model: nn.Module, hf_dir: Path, inputs: Sequence[Tensor], *,
                        atol: float = PARITY_ATOL) -> float:
    """Max |Δ| between ``model``'s fp32 logits and LlamaForCausalLM's from ``hf_dir``; ParityError above atol."""
    from transformers import LlamaForCausalLM

    _quiet_transformers()
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    worst = 0.0
    with torch.no_grad():
        for ids in inputs:
            ours = model(ids).float()
            theirs = hf(input_ids=ids).logits.float()
            if ours.shape != theirs.shape:
                raise ParityError(f"{hf_dir}: logits shape {tuple(theirs.shape)} from transformers, "
                                  f"{tuple(ours.shape)} from smelt")
            worst = max(worst, (ours - theirs).abs().max().item())
    del hf
    if not worst <= atol:  # also catches NaN
        raise ParityError(f"{hf_dir}: transformers' LlamaForCausalLM logits differ from smelt's by {worst:.3g} "
                          f"(max |Δ|, fp32; tolerance {atol:g}): the conversion is wrong")
    log.info("parity: max |Δlogits| = %.2e over %d batches (tolerance %g)", worst, len(inputs), atol)
    return worst


def check_tokenizer_parity(tokenizer: Any, hf_dir: Path, texts: Sequence[str] = _PROBE_TEXTS) -> int:
    """PreTrainedTokenizerFast from ``hf_dir`` must give ``tokenizer``'s ids and decode back; returns #checked."""
    from transformers import PreTrainedTokenizerFast

    _quiet_transformers()
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    for text in texts:
        want = tokenizer.encode(text).ids
        got = hf_tok(text)["input_ids"]  # the default call, as lm-eval and pipelines make it
        if got != want:
            raise ParityError(f"{hf_dir}: PreTrainedTokenizerFast encodes {text!r} as {got[:12]}..., "
                              f"tokenizers.Tokenizer as {want[:12]}...")
        back = hf_tok.decode(got)
        if back != tokenizer.decode(want, skip_special_tokens=False) and back != text:
            raise ParityError(f"{hf_dir}: PreTrainedTokenizerFast decodes {text!r} to {back!r}")
    return len(texts)


# --------------------------------------------------------------------------------------------
# tokenizer files


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_files(tokenizer: Any, tokenizer_path: Path, special_ids: dict[str, int],
                     max_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json: the run's own, completed, or built here."""
    src = tokenizer_path.parent / "tokenizer_config.json"
    config: dict[str, Any] = read_json(src) if src.is_file() else {}
    named: dict[str, str] = {}
    for name, tid in special_ids.items():
        token = tokenizer.id_to_token(tid)
        if token is None:
            raise InteropError(f"{tokenizer_path}: {name} id {tid} is not in the vocabulary")
        named[f"{name}_token"] = token
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = _token_content(config.get(key))
        if token is not None:
            named.setdefault(key, token)
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    extra = [t for t in config.get("additional_special_tokens", added) if t not in named.values()]
    config.update({
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": extra,
        "add_bos_token": False,  # the packer frames documents; the tokenizer adds nothing
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    })
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    config.setdefault("padding_side", "right")
    return config, {**named, "additional_special_tokens": extra}


# --------------------------------------------------------------------------------------------
# export


def export_hf(loaded_or_model: LoadedModel | nn.Module, tokenizer_path: str | Path | None, out_dir: str | Path,
              *, shard_size: int | str = DEFAULT_SHARD_SIZE, dtype: torch.dtype | str = torch.float32,
              special_ids: dict[str, int] | None = None, atol: float = PARITY_ATOL,
              provenance: dict[str, Any] | None = None) -> Path:
    """Write an HF Llama directory at ``out_dir`` (atomically) and check it with transformers.

    ``loaded_or_model``: a `LoadedModel` (its tokenizer path, special ids, step and checkpoint
    are used) or a bare `Transformer`. ``special_ids``: bos/eos/pad ids (default: the loaded
    run's; else looked up as ``<|bos|>``... in the tokenizer). Raises InteropError before writing
    anything for an architecture LlamaForCausalLM cannot express, ParityError when the written
    directory does not reproduce the model's logits or tokenization.
    """
    from smelt.model.llama import to_hf_state_dict

    t0 = time.perf_counter()
    loaded = loaded_or_model if isinstance(loaded_or_model, LoadedModel) else None
    model = loaded.model if loaded is not None else loaded_or_model
    cfg: ModelConfig = model.cfg
    check_exportable(cfg)
    out_dir = Path(out_dir)
    dtype = _dtype(dtype)
    max_shard = parse_size(shard_size)
    if tokenizer_path is None and loaded is not None:
        tokenizer_path = loaded.tokenizer_path
    tokenizer = None
    if tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer_path = Path(tokenizer_path)
        if tokenizer_path.is_dir():
            tokenizer_path = tokenizer_path / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise InteropError(f"{tokenizer_path}: tokenizer not found")
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if tokenizer.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
            raise InteropError(f"{tokenizer_path}: {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
                               f"more than the model's vocab_size {cfg.vocab_size}")
    else:
        log.warning("export: no tokenizer given; %s will hold the model only", out_dir)
    ids = dict(special_ids if special_ids is not None else (loaded.special_ids if loaded is not None else {}))
    if tokenizer is not None:
        for name in ("bos", "eos", "pad"):
            if name not in ids and (tid := tokenizer.token_to_id(f"<|{name}|>")) is not None:
                ids[name] = tid

    # The reference the parity check compares against: the model with the exported dtype's rounding.
    hf_sd = {k: v.detach().to("cpu", dtype) for k, v in to_hf_state_dict(model).items()}
    with _staging_dir(out_dir) as tmp:
        files = write_safetensors(hf_sd, tmp, max_shard)
        atomic_write_json(tmp / CONFIG_FILE, hf_config_json(cfg, ids, dtype))
        gen = {"_from_model_config": False, "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
               "pad_token_id": ids.get("pad"), "do_sample": False}
        atomic_write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            assert isinstance(tokenizer_path, Path)
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            tok_cfg, smap = _tokenizer_files(tokenizer, tokenizer_path, ids, cfg.max_seq_len)
            atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
            atomic_write_json(tmp / "special_tokens_map.json", smap)

        model_fp32 = model
        needs_copy = dtype != torch.float32 or any(p.dtype != torch.float32 or p.device.type != "cpu"
                                                   for p in model.parameters())
        if needs_copy:
            # Built from the model's own state dict, never through the name map under test.
            model_fp32 = _fresh_model(cfg, {k: v.detach().to("cpu", dtype).float()
                                            for k, v in model.state_dict().items()})
        was_training = model.training
        model_fp32.eval()
        try:
            delta = check_logits_parity(model_fp32, tmp, _parity_inputs(cfg.vocab_size, cfg.max_seq_len, tokenizer),
                                        atol=atol)
        finally:
            model.train(was_training)
        n_texts = check_tokenizer_parity(tokenizer, tmp) if tokenizer is not None else 0
        manifest = {
            "version": VERSION,
            "format": "huggingface-llama",
            "dtype": _dtype_name(dtype),
            "files": {f: (tmp / f).stat().st_size for f in sorted(os.listdir(tmp))},
            "weights": files,
            "parameters": sum(t.numel() for t in hf_sd.values()),
            "special_ids": ids,
            "parity": {"max_abs_logit_diff": delta, "atol": atol, "tokenizer_strings": n_texts},
            "source": {
                "checkpoint": str(loaded.checkpoint) if loaded is not None else None,
                "step": loaded.step if loaded is not None else None,
                "tokens_seen": loaded.tokens_seen if loaded is not None else None,
                "tokenizer_sha256": _sha256(tmp / "tokenizer.json") if tokenizer is not None else None,
            },
            **(provenance or {}),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    log.info("export: %s (%s, %d weight file(s), parity max |Δ| %.1e) in %.1f s", out_dir, _dtype_name(dtype),
             len([f for f in files if f.endswith(".safetensors")]), delta, time.perf_counter() - t0)
    return out_dir


@locked("smelt export", lambda a: a["run_dir"])
def export_run(recipe: Recipe, run_dir: str | Path, checkpoint: str | Path | None = None,
               out_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Export a run's newest complete checkpoint (or ``checkpoint``) to ``run_dir/export`` (or ``out_dir``).

    Settings come from ``recipe.export``. An export whose manifest names the same checkpoint and
    the same settings is left as it is unless ``force``.
    """
    from smelt.config import ExportConfig, config_hash
    from smelt.train.load import load_checkpoint_model, resolve_checkpoint

    cfg = recipe.export or ExportConfig()
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    source = Path(checkpoint) if checkpoint is not None else (Path(cfg.checkpoint) if cfg.checkpoint else run_dir)
    ckpt, _ = resolve_checkpoint(source)
    settings = config_hash(cfg)
    manifest_path = out / MANIFEST_FILE
    if not force and manifest_path.is_file():
        done = read_json(manifest_path)
        if (done.get("source", {}).get("checkpoint") == str(ckpt) and done.get("settings_hash") == settings
                and all((out / f).is_file() for f in done.get("files", {}))):
            log.info("export: %s is up to date (%s); nothing to do", out, ckpt.name)
            return out
    loaded = load_checkpoint_model(ckpt)
    return export_hf(loaded, loaded.tokenizer_path, out, shard_size=cfg.max_shard_size, dtype=cfg.dtype,
                     atol=cfg.parity_atol, provenance={"settings_hash": settings})


# --------------------------------------------------------------------------------------------
# loading an HF directory and importing it as a smelt checkpoint


def _hf_model(hf_dir: Path) -> tuple[ModelConfig, nn.Module, dict[str, Any]]:
    """(config, fp32 smelt model, config.json) from a Llama HF directory."""
    from smelt.model.llama import from_hf_state_dict, hf_name_map

    cfg_path = hf_dir / CONFIG_FILE
    try:
        config = read_json(cfg_path)
    except (OSError, ValueError) as e:
        raise InteropError(f"{cfg_path}: unreadable ({e})") from None
    cfg = model_config_from_hf(config, str(cfg_path))
    weights = read_hf_weights(hf_dir)
    expected = set(hf_name_map(cfg).values())
    # Ignorable extras: old checkpoints store RoPE buffers; tied models may still carry lm_head.
    extra = sorted(k for k in set(weights) - expected
                   if not k.endswith("rotary_emb.inv_freq") and not (cfg.tie_embeddings and k == "lm_head.weight"))
    if extra:
        raise InteropError(f"{hf_dir}: {len(extra)} tensors that a Llama model does not have, e.g. {extra[:3]} "
                           f"(a different architecture?)")
    try:
        sd = from_hf_state_dict(weights, cfg)
        model = _fresh_model(cfg, {k: v.float() for k, v in sd.items()})
    except (KeyError, RuntimeError) as e:
        raise InteropError(f"{hf_dir}: weights do not match {cfg_path}: {e}") from None
    return cfg, model, config


def _hf_special_ids(config: dict[str, Any]) -> dict[str, int]:
    ids = {}
    for name in ("bos", "eos", "pad"):
        v = config.get(f"{name}_token_id")
        if isinstance(v, list):  # LLaMA-3 lists several EOS ids; the first is the document end
            v = v[0] if v else None
        if v is not None:
            ids[name] = int(v)
    return ids


def load_hf_model(hf_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> LoadedModel:
    """A `LoadedModel` from an HF Llama directory (a smelt export or any Llama-architecture model)."""
    from tokenizers import Tokenizer

    hf_dir = Path(hf_dir)
    cfg, model, config = _hf_model(hf_dir)
    model.to(device)
    cast_parameters(model, dtype)
    tok_path = hf_dir / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path.is_file() else None
    src = read_json(hf_dir / MANIFEST_FILE).get("source", {}) if (hf_dir / MANIFEST_FILE).is_file() else {}
    return LoadedModel(model=model, cfg=cfg, tokenizer=tokenizer, tokenizer_path=tok_path if tokenizer else None,
                       step=src.get("step"), tokens_seen=src.get("tokens_seen"), checkpoint=hf_dir, run_dir=None,
                       special_ids=_hf_special_ids(config))


def _copy_tokenizer(hf_dir: Path, out: Path) -> bool:
    """tokenizer.json (+ its HF config files) into ``out``; converts a slow-only tokenizer if transformers can."""
    out.mkdir(parents=True, exist_ok=True)
    if (hf_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, out / name)
        return True
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        if not getattr(tok, "is_fast", False):
            raise ValueError("no fast tokenizer")
        tok.save_pretrained(str(out))
        return (out / "tokenizer.json").is_file()
    except Exception as e:  # noqa: BLE001 - any failure means: no tokenizer, said loudly below
        log.warning("import: %s has no tokenizer.json and it could not be converted (%s); the run gets no "
                    "tokenizer", hf_dir, e)
        return False


@locked("smelt import", lambda a: a["out_dir"])
def import_hf(hf_dir: str | Path, out_dir: str | Path, *, atol: float = PARITY_ATOL) -> Path:
    """Import an HF Llama directory as a smelt run directory that `smelt.interop.load.load_model` and
    `smelt train` read.

    Writes (atomically)::

        out_dir/recipe.yaml                        name + the full `model:` section
        out_dir/tokenizer/tokenizer.json           (+ tokenizer_config.json, special_tokens_map.json)
        out_dir/train/checkpoints/step-0000000/    DCP checkpoint of the fp32 weights (model only)
        out_dir/import_manifest.json               source, config, special ids, parity result

    Continued pretraining points a recipe at the checkpoint (``train.init_from``) and copies the
    ``model:`` section. The logits of the written checkpoint, loaded back by smelt, are compared
    with transformers' on the source directory (fp32, max |Δ| <= atol) before the rename.
    """
    import yaml

    from smelt.config import load_recipe, recipe_to_dict
    from smelt.fsutil import atomic_write_text
    from smelt.train.checkpoint import save_checkpoint
    from smelt.train.load import load_checkpoint_model

    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / CONFIG_FILE).is_file():
        raise InteropError(f"{hf_dir}: no {CONFIG_FILE} (not a Hugging Face model directory)")
    cfg, model, config = _hf_model(hf_dir)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", out_dir.name).strip("-") or "imported"
    with _staging_dir(out_dir) as tmp:
        recipe = {"name": name, "model": {k: v for k, v in recipe_to_dict(cfg).items() if v is not None}}
        header = f"# imported from {hf_dir} by `smelt import`; the model: section is the source's config.json\n"
        atomic_write_text(tmp / "recipe.yaml", header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
        load_recipe(tmp / "recipe.yaml")  # the written recipe must validate
        has_tok = _copy_tokenizer(hf_dir, tmp / "tokenizer")
        # An optimizer with no state: save_checkpoint then stores the model alone.
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        save_checkpoint(tmp / "train" / "checkpoints", 0, model, opt,
                        {"step": 0, "tokens_seen": 0, "samples_seen": 0, "imported_from": str(hf_dir.resolve())})
        del model, opt
        back = load_checkpoint_model(tmp)  # exactly what training and evaluation will read
        delta = check_logits_parity(back.model, hf_dir, _parity_inputs(cfg.vocab_size, cfg.max_seq_len,
                                                                        back.tokenizer), atol=atol)
        atomic_write_json(tmp / IMPORT_MANIFEST_FILE, {
            "version": VERSION,
            "source": str(hf_dir.resolve()),
            "source_config_sha256": _sha256(hf_dir / CONFIG_FILE),
            "model": recipe["model"],
            "parameters": sum(p.numel() for p in back.model.parameters()),
            "special_ids": _hf_special_ids(config),
            "tokenizer": has_tok,
            "checkpoint": "train/checkpoints/step-0000000",
            "parity": {"max_abs_logit_diff": delta, "atol": atol},
            "seconds": round(time.perf_counter() - t0, 3),
        })
    log.info("import: %s -> %s (%d layers, parity max |Δ| %.1e) in %.1f s", hf_dir, out_dir, cfg.n_layers, delta,
             time.perf_counter() - t0)
    return out_dir
