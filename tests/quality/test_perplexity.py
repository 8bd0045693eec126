"""The ``perplexity`` step (`smelt.quality.perplexity`): bits per byte against a direct computation
with the model (smelt) and with transformers (an HF directory), windows and truncation, batch
independence in fp32 and bf16, KenLM scoring of a hand-written ARPA model, recipe errors for
missing or corrupt models, and a real curation run (buckets in meta, resume, stats)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from smelt.config import RecipeError, parse_recipe
from smelt.data.curate import run_data_stage
from smelt.data.document import Document
from smelt.data.shards import read_shard
from smelt.data.steps.registry import check_steps
from smelt.eval.perplexity import HeldOutDoc, domain_perplexity
from smelt.quality import perplexity as ppl
from smelt.quality.perplexity import KenLMScorer, ModelScorer, PerplexityOptions, model_kind, token_batches
from smelt.quality.scored import ScoredFilter
from smelt.train.checkpoint import save_checkpoint
from tests.interop._helpers import TEXTS, make_run, make_tokenizer

EOS = 2  # make_run's manifest: add_bos false, so a document follows an EOS
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, Tokenizer]:
    """A debug-size run whose newest checkpoint (step 8) was trained a little on TEXTS, so that it
    prefers English prose to noise; returns (run dir, the fp32 model, its tokenizer)."""
    run, model = make_run(tmp_path_factory.mktemp("ref"))
    tok = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    seqs = [torch.tensor([EOS] + tok.encode(t, add_special_tokens=False).ids) for t in sorted(set(TEXTS))]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        for s in seqs:
            loss = F.cross_entropy(model(s[None, :-1])[0], s[1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    save_checkpoint(run / "train" / "checkpoints", 8, model, opt, {"step": 8, "tokens_seen": 8000, "samples_seen": 32})
    return run, model, tok


PROSE = ["The quick brown fox jumps over the lazy dog.", "Language models predict the next token from the "
         "previous ones.", "Numbers like 12345 and 3.14159 appear in text too."]


def _noise(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list("qxzjvkwy0987#@%&"), n))


def _docs() -> list[Document]:
    rng = np.random.default_rng(0)
    texts = [" ".join(PROSE[: 1 + i % 3]) for i in range(6)] + [_noise(rng, 20 + 13 * i) for i in range(6)]
    texts += ["中国的首都是北京。" * 3, "x", ""]
    return [Document(id=str(i), text=t) for i, t in enumerate(texts)]


@torch.no_grad()
def _direct_bpb(model: torch.nn.Module, tok: Tokenizer, text: str, *, window: int, max_tokens: int = 10**9) -> float:
    """Bits per byte by hand: each window predicts the next `window` tokens (the first after an EOS);
    a last, shorter window sees earlier tokens as context up to the window length (lm-eval)."""
    enc = tok.encode(text, add_special_tokens=False)
    ids = enc.ids[:max_tokens]
    scored = text if len(ids) == len(enc.ids) else text[: enc.offsets[len(ids) - 1][1]]
    full = [EOS] + ids
    nll = 0.0
    for start in range(0, len(ids), window):
        tgt = ids[start:start + window]
        end = start + len(tgt)
        logits = model(torch.tensor([full[max(0, end - window):end]]))[0, -len(tgt):].float()
        nll += F.cross_entropy(logits, torch.tensor(tgt), reduction="sum").item()
    return nll / LN2 / len(scored.encode("utf-8"))


def test_fp32_score_is_the_models_bits_per_byte(ref) -> None:
    run, model, tok = ref
    scorer = ModelScorer(run, dtype="fp32", device="cpu")
    assert scorer.window == 256 and scorer.prefix_id == EOS  # debug preset: max_seq_len 256
    docs = _docs()
    got = scorer(docs)
    for d, s in zip(docs, got):
        if not d.text:
            assert math.isnan(s)
            continue
        assert s == pytest.approx(_direct_bpb(model, tok, d.text, window=256), abs=1e-5), d.text
    # the model learned TEXTS: prose reads better than noise
    assert got[:6].max() < got[6:12].min()

    # a long document: 3 windows of 256 tokens, and smelt.eval.perplexity agrees
    long = " ".join(PROSE * 8)
    ids = tok.encode(long, add_special_tokens=False).ids
    assert 512 < len(ids) <= 1024
    [s] = scorer([Document(id="long", text=long)])
    assert s == pytest.approx(_direct_bpb(model, tok, long, window=256), abs=1e-5)
    want = domain_perplexity(model, [HeldOutDoc(np.asarray(ids), long)], prefix_id=EOS, max_len=256)
    assert s == pytest.approx(want["bits_per_byte"], abs=1e-5)

    # max_tokens truncates: the first 100 tokens over the bytes of the text they cover
    short = ModelScorer(run, dtype="fp32", device="cpu", max_tokens=100)
    assert short.window == 100
    [s] = short([Document(id="long", text=long)])
    assert s == pytest.approx(_direct_bpb(model, tok, long, window=100, max_tokens=100), abs=1e-5)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_batched_equals_one_document_per_forward(ref, dtype: str, tol: float) -> None:
    run, _, _ = ref
    docs = _docs() + [Document(id="long", text=" ".join(PROSE * 20))]
    batched = ModelScorer(run, dtype=dtype, device="cpu", batch_tokens=2048)(docs)
    one = ModelScorer(run, dtype=dtype, device="cpu", batch_tokens=1)
    alone = np.array([one([d])[0] for d in docs])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=tol)
    assert np.isnan(batched).sum() == 1  # the empty document
    if dtype == "bf16":
        fp32 = ModelScorer(run, dtype="fp32", device="cpu")(docs)
        np.testing.assert_allclose(batched, fp32, rtol=0, atol=0.1)


def test_token_batches_respect_the_budget() -> None:
    lengths = [5, 100, 3, 40, 40, 7, 300, 1]
    groups = token_batches(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = max(lengths[i] for i in g)
        assert len(g) * width <= 100 or len(g) == 1
        assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)
    assert groups[0] == [6] and groups[1] == [1]


def test_hf_directory_matches_transformers(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(str(hf_dir))
    tok.save(str(hf_dir / "tokenizer.json"))
    assert model_kind(hf_dir) == "hf"

    scorer = ModelScorer(hf_dir, dtype="fp32", device="cpu")
    assert scorer.window == 64 and scorer.prefix_id == 1  # an HF model: BOS starts a document
    texts = [PROSE[0], PROSE[1], "def add(a, b):\n    return a + b\n"]
    got = scorer([Document(id=str(i), text=t) for i, t in enumerate(texts)])
    for t, s in zip(texts, got):
        ids = tok.encode(t, add_special_tokens=False).ids
        assert len(ids) < 64
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([[1] + ids[:-1]])).logits[0].float()
        nll = F.cross_entropy(logits, torch.tensor(ids), reduction="sum").item()
        assert s == pytest.approx(nll / LN2 / len(t.encode("utf-8")), abs=1e-4)
    bf16 = ModelScorer(hf_dir, dtype="bf16", device="cpu")([Document(id="0", text=texts[0])])
    assert bf16[0] == pytest.approx(got[0], abs=0.1)


# --------------------------------------------------------------------------------------------
# recipe errors before any work


def _recipe(root: Path, inp: Path, options: dict, *, workers: int = 1):
    off = {"enabled": False}
    return parse_recipe({"name": "ppl", "runs_dir": str(root / "runs"), "data": {
        "inputs": [{"path": str(inp), "glob": "*.jsonl", "domain": "web"}], "workers": workers,
        "files_per_task": 1, "language": off, "pii": off,
        "heuristics": {"gopher_quality": off, "gopher_repetition": off, "c4": off, "fineweb": off},
        "dedup": {"exact": off, "minhash": off, "lines": off},
        "steps": [{"name": "perplexity", "options": options}]}})


def _model_error(tmp_path: Path, options: dict) -> str:
    with pytest.raises(RecipeError) as e:
        check_steps(_recipe(tmp_path, tmp_path, options).data)
    return str(e.value)


def test_missing_or_unloadable_models_are_recipe_errors(tmp_path: Path, ref) -> None:
    key = "data.steps.0.options.model: "
    assert key in _model_error(tmp_path, {"model": str(tmp_path / "absent")})
    assert "no such file" in _model_error(tmp_path, {"model": str(tmp_path / "absent")})
    (tmp_path / "empty").mkdir()
    assert "neither a smelt run" in _model_error(tmp_path, {"model": str(tmp_path / "empty")})
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a KenLM model" in _model_error(tmp_path, {"model": str(tmp_path / "notes.txt")})
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                "num_hidden_layers": 2, "intermediate_size": 128,
                                                "vocab_size": 100}))
    assert "no model.safetensors" in _model_error(tmp_path, {"model": str(hf)})
    (hf / "config.json").write_text("{broken")
    assert "config.json: unreadable" in _model_error(tmp_path, {"model": str(hf)})
    run, _, _ = ref
    err = _model_error(tmp_path, {"model": str(run), "keep": {"pareto_alpha": 9}})
    assert "data.steps.0.options: Value error, keep.pareto_alpha" in err
    check_steps(_recipe(tmp_path, tmp_path, {"model": str(run)}).data)  # a good run passes


def test_truncated_checkpoint_is_a_recipe_error(tmp_path: Path, ref) -> None:
    run = tmp_path / "run"
    shutil.copytree(ref[0], run)
    ckpts = run / "train" / "checkpoints"
    newest = ckpts / "step-0000008"
    data = next(newest.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    err = _model_error(tmp_path, {"model": str(newest)})
    assert "data.steps.0.options.model:" in err and "incomplete or corrupt checkpoint" in err
    assert "has 100 bytes" in err
    check_steps(_recipe(tmp_path, tmp_path, {"model": str(run)}).data)  # the run falls back to step 7, as load_model
    older = next((ckpts / "step-0000007").glob("*.distcp"))
    older.write_bytes(older.read_bytes()[:-1])
    err = _model_error(tmp_path, {"model": str(run)})
    assert "no complete checkpoint" in err and "step-0000008" in err and "step-0000007" in err


# --------------------------------------------------------------------------------------------
# KenLM

# A bigram model by hand. Unigrams: log10 p(a) = -0.30103 (1 bit), p(b) and p(</s>) 2 bits; backoff
# weights 1 (log10 0); one bigram, p(b | a) = 1/2 (1 bit instead of 2).
ARPA = """\\data\\
ngram 1=5
ngram 2=1

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t0
-0.60206\t</s>\t0
-0.30103\ta\t0
-0.60206\tb\t0

\\2-grams:
-0.30103\ta b

\\end\\
"""


def test_kenlm_scores_lines_in_bits_per_byte(tmp_path: Path) -> None:
    pytest.importorskip("kenlm")
    arpa = tmp_path / "bi.arpa"
    arpa.write_text(ARPA)
    assert model_kind(arpa) == "kenlm"
    scorer = KenLMScorer(arpa)
    # "a b": a 1 + b|a 1 + </s> 2 = 4 bits over 3 + 1 bytes; "b a a a": 2 + 1 + 1 + 1 + 2 = 7 bits over
    # 7 + 1 bytes; the empty line is skipped
    [s] = scorer([Document(id="0", text="a b\n\nb a a a")])
    assert s == pytest.approx((4 + 7) / (4 + 8), abs=1e-4)
    # max_tokens: whole lines until that many words (with </s>) are scored
    assert KenLMScorer(arpa, max_tokens=3).score_text("a b\nb a a") == pytest.approx(4 / 4, abs=1e-4)
    assert math.isnan(scorer([Document(id="e", text="\n \n")])[0])
    # the step, with a threshold: "a a a" 5 bits / 6 bytes kept, "b b b" 8 / 6 rejected
    opts = PerplexityOptions(model=str(arpa), keep={"threshold": 1.2})
    f = ppl.build(opts, ppl.StepContext(data=None, work_dir=None))  # type: ignore[arg-type]
    assert f.batch([Document(id="0", text="a a a"), Document(id="1", text="b b b")]) == [None, "perplexity_high"]


def test_kenlm_binary_is_recognized_by_its_magic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "en.arpa.bin"  # CCNet's name for its binaries
    binary.write_bytes(ppl.KENLM_BINARY_MAGIC + b" format version 5\n\0" + bytes(64))
    monkeypatch.setitem(sys.modules, "kenlm", object())  # stands in for the package where it is absent
    assert model_kind(binary) == "kenlm"


def test_kenlm_model_without_the_package_says_pip_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arpa = tmp_path / "bi.arpa"
    arpa.write_text(ARPA)
    monkeypatch.setitem(sys.modules, "kenlm", None)  # import kenlm raises ImportError
    err = _model_error(tmp_path, {"model": str(arpa)})
    assert "data.steps.0.options.model:" in err and "pip install kenlm" in err


# --------------------------------------------------------------------------------------------
# a real curation run


def _inputs(root: Path) -> Path:
    inp = root / "in"
    inp.mkdir()
    rng = np.random.default_rng(1)
    for f in range(2):
        with open(inp / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(30):
                if i % 2:
                    text = " ".join(PROSE[j % 3] for j in range(i % 5, i % 5 + 1 + i % 3)) + f" ({f}, {i})"
                else:
                    text = _noise(rng, 15 + 7 * i)
                if i == 4:
                    text = "tiny"  # below min_chars: unscored, kept
                fh.write(json.dumps({"id": f"d{f}-{i}", "text": text}) + "\n")
    return inp


def _all_docs(data: Path) -> list[dict]:
    return [d.to_record() for sub in ("clean", "rejects") for f in sorted((data / sub).rglob("*.jsonl*"))
            for d in read_shard(f)]


def _digest(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file() and f.name != "manifest.json"}


def test_curation_buckets_resume_and_stats(tmp_path: Path, ref, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _, _ = ref
    inp = _inputs(tmp_path)
    options = {"model": str(run), "min_chars": 10}
    loads = []
    import smelt.interop.load as load_mod

    real_load = load_mod.load_model
    monkeypatch.setattr(load_mod, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    straight = _recipe(tmp_path / "a", inp, options)
    stats = run_data_stage(straight.data, straight.run_dir)
    assert len(loads) == 2  # once for the cutoff sample (parent), once for the worker's two tasks
    docs = _all_docs(straight.run_dir / "data")
    assert len(docs) == 60
    by_bucket: dict[str | None, list[float]] = {}
    for d in docs:
        p = d["meta"]["perplexity"]
        if d["text"] == "tiny":
            assert p["bpb"] is None and "bucket" not in p and "reason" not in d["meta"]
            continue
        assert p["bpb"] > 0
        by_bucket.setdefault(p["bucket"], []).append(p["bpb"])
        assert (d["meta"].get("reason") is None) == (p["bucket"] in ("head", "middle"))
        if d["meta"].get("reason") is not None:
            assert d["meta"]["rejected_by"] == "perplexity" and d["meta"]["reason"] == "perplexity_high"
    assert set(by_bucket) == {"head", "middle", "tail"}
    assert max(by_bucket["head"]) <= min(by_bucket["middle"]) and max(by_bucket["middle"]) <= min(by_bucket["tail"])
    assert 15 <= len(by_bucket["tail"]) <= 25  # a third of the 58 scored documents
    step = next(s for s in stats["steps"] if s["name"] == "perplexity")
    info = step["info"]
    spec = info["scores"][0]
    assert spec["key"] == "perplexity.bpb" and spec["bucket_key"] == "perplexity.bucket"
    assert spec["rule"] == "buckets" and spec["higher_is_better"] is False
    assert spec["rule_options"]["group_by"] == "domain_lang" and spec["rule_options"]["buckets"] == [33.3, 66.7]
    cut = spec["cutoffs"]["web/unknown"]
    assert cut["head"] < cut["tail"]
    assert info["reference"]["kind"] == "smelt" and info["reference"]["dtype"] == "bf16"
    assert step["total"]["counters"]["unscored:perplexity.bpb"] == 2
    assert stats["documents"]["kept"] == len(by_bucket["head"]) + len(by_bucket["middle"]) + 2

    # Resume: the second task fails once, after the first task is done; the re-run finishes the
    # stage with the cutoffs it wrote, and the output is byte-identical to the straight run.
    resumed = _recipe(tmp_path / "b", inp, options)
    real_batch = ScoredFilter.process_batch

    def failing(self, docs):
        if any(d.id.startswith("d1-") for d in docs):
            raise RuntimeError("killed")
        return real_batch(self, docs)

    monkeypatch.setattr(ScoredFilter, "process_batch", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run_data_stage(resumed.data, resumed.run_dir)
    work = resumed.run_dir / "data" / "_work"
    assert (work / "perplexity.cutoffs.json").is_file() and len(list((work / "filter.done").glob("*.json"))) == 1
    monkeypatch.setattr(ScoredFilter, "process_batch", real_batch)
    assert run_data_stage(resumed.data, resumed.run_dir)["documents"] == stats["documents"]
    assert _digest(resumed.run_dir / "data") == _digest(straight.run_dir / "data")
