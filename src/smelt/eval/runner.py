"""`smelt eval`: evaluate a checkpoint of a run, or every checkpoint's probes.

`run_eval(recipe, run_dir)` loads the newest complete checkpoint (or ``checkpoint``) with the
loader it is given (`smelt eval` passes `smelt.interop.load.load_model`, which also reads a Hugging
Face directory; by default `smelt.train.load.load_checkpoint_model`, run and checkpoint directories),
runs the parts named in ``eval.run`` and writes ``run_dir/eval/``::

    results.json   {"checkpoint", "step", "tokens_seen",
                    "perplexity": {domain: {"loss", "ppl", "bits_per_byte", "word_ppl", "tokens", "bytes", "docs"}},
                    "probes": [{"name", "kind", "prompt", "target" | "a"/"b", "logprob", "rank", "passed",
                                "score", ["unscored": reason], ...}],
                    "tasks": {task: {"acc", "acc_norm", "random", "n", "shots", "skipped",
                                     "unscored": [{"item", "reason"}], ...}},
                    "config": {...}, "seconds": ...}                    (schema version RESULTS_VERSION)
    results.md     the same as markdown tables
    tb/            TensorBoard scalars at the checkpoint's step: eval/ppl/<domain>, eval/bpb/<domain>,
                   eval/probe/<name>, eval/task/<task>/acc[_norm]
    probes.csv     with ``all_checkpoints``: probe x checkpoint (step, tokens_seen, score, ...)
    probes.png     with ``all_checkpoints``: each probe's score vs training tokens

`evaluate_in_training(model, tokenizer, recipe, run_dir)` is the small-budget version for use during
training: perplexity on ``eval.in_training_docs`` documents per domain and the probes, returned as a
flat ``{"eval/ppl/<domain>": ..., "eval/probe/<name>": ...}``. `InTrainingEvaluator` wraps it as the
hook the trainer is given (`smelt.train.trainer.Evaluator`, every ``eval.every_steps`` steps):
``smelt train`` and ``smelt run`` pass one, the training layer never imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smelt.config import EvalConfig, Recipe, RecipeError, recipe_to_dict
from smelt.eval.perplexity import (
    HeldOutDoc,
    document_prefix_id,
    held_out_documents,
    perplexity_by_domain,
    text_documents,
)
from smelt.eval.probes import Probe, load_probe_files, run_probes, write_history
from smelt.eval.tasks import evaluate_task
from smelt.fsutil import atomic_write_json, atomic_write_text, locked, move_aside, read_json
from smelt.model.loaded import ModelLoader

log = logging.getLogger(__name__)

__all__ = ["run_eval", "evaluate_in_training", "InTrainingEvaluator", "evaluate_model", "format_markdown",
           "unscored_items", "eval_max_len", "RESULTS_VERSION"]

RESULTS_VERSION = 1
Progress = Callable[[str, int, int], None]


def _device(cfg: EvalConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("eval.device: cuda requested but no CUDA device is available")
    return torch.device(cfg.device)


def eval_max_len(recipe: Recipe, cfg: EvalConfig, model_max_seq_len: int) -> int:
    """``eval.max_len``, else the training sequence length (RoPE never saw longer), else the
    model's max_seq_len; never above the model's max_seq_len."""
    want = cfg.max_len or (recipe.loader.seq_len if recipe.loader is not None else model_max_seq_len)
    if want > model_max_seq_len:
        raise RecipeError(f"invalid recipe:\n  eval.max_len: {want} exceeds model.max_seq_len ({model_max_seq_len})")
    if cfg.stride is not None and cfg.stride > want:
        raise RecipeError(f"invalid recipe:\n  eval.stride: {cfg.stride} exceeds the window of {want} tokens")
    return want


def _tokens_manifest(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "tokens" / "manifest.json"
    return read_json(p) if p.is_file() else {}


def _special(manifest: dict[str, Any], fallback: dict[str, int]) -> tuple[int, int]:
    """(document-start prefix id, pad id) from the tokens manifest (else the loaded model's ids)."""
    if "eos_id" in manifest:
        return document_prefix_id(manifest), int(manifest.get("pad_id") or 0)
    if "eos" not in fallback:
        raise RecipeError("eval: no tokens/manifest.json and no EOS id in the tokenizer: cannot tell the "
                          "document-start token")
    return int(fallback.get("bos", fallback["eos"])), int(fallback.get("pad", 0))


# --------------------------------------------------------------------------------------------
# one model, every configured part


def evaluate_model(model: nn.Module, tokenizer: Any, recipe: Recipe, run_dir: Path, *, max_len: int,
                   prefix_id: int, pad_id: int, parts: list[str] | None = None,
                   docs: dict[str, list[HeldOutDoc]] | None = None, probes: list[Probe] | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """{"perplexity", "probes", "tasks"} of one model (parts not run are empty)."""
    cfg = recipe.eval or EvalConfig()
    parts = list(cfg.run if parts is None else parts)
    out: dict[str, Any] = {"perplexity": {}, "probes": [], "tasks": {}}
    if "perplexity" in parts:
        tokens_dir = run_dir / "tokens"
        if not (tokens_dir / "manifest.json").is_file():
            log.warning("eval: %s has no manifest; perplexity skipped (run `smelt pack` first)", tokens_dir)
        else:
            if docs is None:
                docs = held_out_documents(tokens_dir, tokenizer, max_docs=cfg.max_docs, max_tokens=cfg.max_tokens)
                for name, tdocs in text_documents(cfg.texts, tokenizer, max_docs=cfg.max_docs,
                                                  max_tokens=cfg.max_tokens).items():
                    docs[name if name not in docs else f"{name} (text)"] = tdocs
            out["perplexity"] = perplexity_by_domain(
                model, docs, prefix_id=prefix_id, max_len=max_len, stride=cfg.stride, batch_size=cfg.batch_size,
                pad_id=pad_id, word_ppl_max_cjk=cfg.word_ppl_max_cjk, progress=progress)
    if "probes" in parts:
        probes = load_probe_files(cfg.probes) if probes is None else probes
        if probes:
            out["probes"] = run_probes(model, tokenizer, probes, prefix_id=prefix_id, max_len=max_len,
                                       batch_size=cfg.batch_size, pad_id=pad_id)
            passed = sum(r["passed"] for r in out["probes"])
            unscored = sum(1 for r in out["probes"] if r.get("unscored"))
            log.info("probes: %d/%d passed%s", passed, len(out["probes"]),
                     f" ({unscored} not scored)" if unscored else "")
    if "tasks" in parts:
        seed = cfg.seed if cfg.seed is not None else recipe.seed
        for task in cfg.tasks:
            cb = (lambda done, total, _n=task.name: progress(f"task {_n}", done, total)) if progress else None
            out["tasks"][task.name] = evaluate_task(model, tokenizer, task, seed=seed, prefix_id=prefix_id,
                                                    max_len=max_len, batch_size=cfg.batch_size, pad_id=pad_id,
                                                    progress=cb)
    return out


# --------------------------------------------------------------------------------------------
# smelt eval


def _check_final_checkpoint(run_dir: Path) -> None:
    """A finished run's results belong to its final checkpoint: when that no longer verifies,
    stop rather than silently evaluate an older one and overwrite the results."""
    from smelt.train.checkpoint import verify_checkpoint

    tm = run_dir / "train" / "manifest.json"
    if not tm.is_file():
        return
    m = read_json(tm)
    if not (m.get("complete") and m.get("checkpoint")):
        return
    problem = verify_checkpoint(run_dir / m["checkpoint"])
    if problem is not None:
        raise RecipeError(f"eval: the run's final checkpoint {m['checkpoint']} does not verify ({problem}); "
                          "`smelt train` (or `smelt run`) resumes from the newest good checkpoint and redoes the "
                          "steps, or pass --checkpoint to evaluate an older one")


@locked("smelt eval", lambda a: a["run_dir"])
def run_eval(recipe: Recipe, run_dir: str | Path, checkpoint: str | Path | None = None, *,
             all_checkpoints: bool = False, progress: Progress | None = None,
             load_model: ModelLoader | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default: the newest complete one) and write eval/ (module docstring).

    ``all_checkpoints``: the probes of every complete checkpoint in train/checkpoints (probes.csv,
    probes.png, TensorBoard), then the full evaluation of the newest. ``load_model(path, dtype=,
    device=)`` loads each model (default: run and checkpoint directories only). Returns
    results.json's content.
    """
    from smelt.train.checkpoint import list_checkpoints, verify_checkpoint
    from smelt.train.load import load_checkpoint_model

    read_model = load_model or load_checkpoint_model

    run_dir = Path(run_dir)
    cfg = recipe.eval or EvalConfig()
    if all_checkpoints and checkpoint is not None:
        raise RecipeError("eval: give either a checkpoint or all_checkpoints, not both")
    device = _device(cfg)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    eval_dir = run_dir / "eval"
    manifest = _tokens_manifest(run_dir)
    probes = load_probe_files(cfg.probes) if "probes" in cfg.run or all_checkpoints else []
    t0 = time.perf_counter()

    def load(path: Path) -> Any:
        lm = read_model(path, dtype=dtype, device=device)
        if lm.tokenizer is None:
            raise RecipeError(f"eval: {path} has no tokenizer (expected {run_dir / 'tokenizer' / 'tokenizer.json'})")
        return lm

    history: list[dict[str, Any]] = []
    targets: list[Path]
    if all_checkpoints:
        ckpt_dir = run_dir / "train" / "checkpoints"
        targets = []
        for _step, p in list_checkpoints(ckpt_dir):
            problem = verify_checkpoint(p)
            if problem is None:
                targets.append(p)
            else:
                log.warning("eval: skipping %s (%s)", p, problem)
        if not targets:
            raise RecipeError(f"eval: no complete checkpoint in {ckpt_dir} (run `smelt train` first)")
    else:
        targets = [Path(checkpoint) if checkpoint is not None else run_dir]
        if checkpoint is None:
            _check_final_checkpoint(run_dir)

    if (eval_dir / "results.json").is_file():
        move_aside(eval_dir, "eval")  # earlier results (another checkpoint or config) are kept
    tb = _tb_writer(eval_dir, cfg)
    lm: Any = None
    try:
        for k, path in enumerate(targets):
            lm = load(path)
            max_len = eval_max_len(recipe, cfg, lm.cfg.max_seq_len)
            prefix_id, pad_id = _special(manifest, lm.special_ids)
            if len(targets) > 1 and k < len(targets) - 1:
                res = run_probes(lm.model, lm.tokenizer, probes, prefix_id=prefix_id, max_len=max_len,
                                 batch_size=cfg.batch_size, pad_id=pad_id)
                history.append({"step": lm.step, "tokens_seen": lm.tokens_seen, "probes": res})
                _tb_scalars(tb, {"probes": res, "perplexity": {}, "tasks": {}}, lm.step)
                if progress is not None:
                    progress("checkpoints", k + 1, len(targets))
                log.info("eval: probes of %s done (%d/%d)", path.name, k + 1, len(targets))
                continue
            parts = list(cfg.run)
            if all_checkpoints and "probes" not in parts:
                parts.append("probes")
            body = evaluate_model(lm.model, lm.tokenizer, recipe, run_dir, max_len=max_len, prefix_id=prefix_id,
                                  pad_id=pad_id, parts=parts, probes=probes, progress=progress)
            if all_checkpoints:
                history.append({"step": lm.step, "tokens_seen": lm.tokens_seen, "probes": body["probes"]})
                if progress is not None:
                    progress("checkpoints", k + 1, len(targets))
            results = {"version": RESULTS_VERSION, "checkpoint": str(lm.checkpoint), "step": lm.step,
                       "tokens_seen": lm.tokens_seen, **body,
                       "config": {"max_len": max_len, "stride": cfg.stride or max_len, "device": str(device),
                                  "precision": cfg.precision, "eval": recipe_to_dict(cfg)},
                       "seconds": round(time.perf_counter() - t0, 3)}
            _tb_scalars(tb, results, lm.step or 0)
    finally:
        if tb is not None:
            tb.close()
    atomic_write_json(eval_dir / "results.json", results)
    atomic_write_text(eval_dir / "results.md", format_markdown(results))
    if all_checkpoints:
        csv_path, png_path = write_history(history, eval_dir)
        log.info("eval: probe history of %d checkpoints in %s%s", len(history), csv_path,
                 f" and {png_path}" if png_path else "")
    log.info("eval: wrote %s", eval_dir / "results.json")
    return results


def _tb_writer(eval_dir: Path, cfg: EvalConfig) -> Any:
    if not cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(eval_dir / "tb"))


def _tb_scalars(tb: Any, results: dict[str, Any], step: int) -> None:
    if tb is None:
        return
    for tag, value in flat_scalars(results).items():
        tb.add_scalar(tag, value, global_step=step)
    tb.flush()


def flat_scalars(results: dict[str, Any]) -> dict[str, float]:
    """results -> {"eval/ppl/<d>", "eval/bpb/<d>", "eval/loss/<d>", "eval/word_ppl/<d>",
    "eval/probe/<name>", "eval/probes_passed" (of the scored probes), "eval/task/<t>/acc", ".../acc_norm"};
    finite only."""
    out: dict[str, float] = {}
    for d, r in results.get("perplexity", {}).items():
        for key, name in (("loss", "loss"), ("ppl", "ppl"), ("bits_per_byte", "bpb"), ("word_ppl", "word_ppl")):
            if r.get(key) is not None:
                out[f"eval/{name}/{d}"] = float(r[key])
    probes = [p for p in results.get("probes", []) if p.get("score") is not None]  # unscored: no scalar
    for p in probes:
        out[f"eval/probe/{p['name']}"] = float(p["score"])
    if probes:
        out["eval/probes_passed"] = sum(bool(p["passed"]) for p in probes) / len(probes)
    for t, r in results.get("tasks", {}).items():
        for key in ("acc", "acc_norm"):
            if r.get(key) is not None:
                out[f"eval/task/{t}/{key}"] = float(r[key])
    return {k: v for k, v in out.items() if math.isfinite(v)}


# --------------------------------------------------------------------------------------------
# during training

_DOCS_CACHE: dict[tuple, dict[str, list[HeldOutDoc]]] = {}
_PROBES_CACHE: dict[tuple, list[Probe]] = {}


def evaluate_in_training(model: nn.Module, tokenizer: Any, recipe: Recipe, run_dir: str | Path) -> dict[str, float]:
    """Small-budget evaluation for the trainer: perplexity on ``eval.in_training_docs`` held-out
    documents per domain and the probes (no benchmarks). Returns flat scalars (`flat_scalars`).

    The held-out documents and probes are read once per process and cached. The model's
    train/eval mode is restored; gradients are not touched (scoring runs under no_grad).
    """
    run_dir = Path(run_dir)
    cfg = recipe.eval or EvalConfig()
    manifest = _tokens_manifest(run_dir)
    if not manifest:
        raise RecipeError(f"eval: {run_dir / 'tokens' / 'manifest.json'} not found")
    model_cfg = getattr(model, "cfg", None)
    max_len = eval_max_len(recipe, cfg, model_cfg.max_seq_len if model_cfg is not None else
                           (recipe.loader.seq_len if recipe.loader is not None else 1024))
    prefix_id, pad_id = _special(manifest, {})
    parts = [p for p in cfg.run if p in ("perplexity", "probes")]
    docs = None
    if "perplexity" in parts:
        mpath = run_dir / "tokens" / "manifest.json"
        key = (str(mpath.resolve()), mpath.stat().st_mtime_ns, cfg.in_training_docs, cfg.max_tokens, id(tokenizer))
        if key not in _DOCS_CACHE:
            _DOCS_CACHE[key] = held_out_documents(run_dir / "tokens", tokenizer, max_docs=cfg.in_training_docs,
                                                  max_tokens=cfg.max_tokens)
        docs = _DOCS_CACHE[key]
    probes = None
    if "probes" in parts:
        pkey = tuple(cfg.probes)
        if pkey not in _PROBES_CACHE:
            _PROBES_CACHE[pkey] = load_probe_files(cfg.probes)
        probes = _PROBES_CACHE[pkey]
    res = evaluate_model(model, tokenizer, recipe, run_dir, max_len=max_len, prefix_id=prefix_id, pad_id=pad_id,
                         parts=parts, docs=docs, probes=probes)
    return flat_scalars(res)


class InTrainingEvaluator:
    """`evaluate_in_training` as the trainer's evaluator (`smelt.train.trainer.Evaluator`).

    ``every``: ``eval.every_steps``. `prepare` reads the probe files (a bad one fails before the
    first step). A call reads the run's tokenizer (``tokenizer/tokenizer.json``) the first time;
    without one it warns and returns None, which turns in-training evaluation off for the run.
    With ``eval.precision: bf16`` the model runs under bf16 autocast."""

    def __init__(self, recipe: Recipe, run_dir: str | Path) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.every = recipe.eval.every_steps if recipe.eval is not None else 0
        self._tokenizer: Any = None

    def prepare(self) -> None:
        load_probe_files((self.recipe.eval or EvalConfig()).probes)

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.run_dir / "tokenizer" / "tokenizer.json"
            if not path.is_file():
                log.warning("eval.every_steps: %s not found; in-training evaluation disabled for this run", path)
                return None
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def __call__(self, model: nn.Module) -> dict[str, float] | None:
        tokenizer = self._load_tokenizer()
        if tokenizer is None:
            return None
        bf16 = self.recipe.eval is not None and self.recipe.eval.precision == "bf16"
        device_type = next(model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return evaluate_in_training(model, tokenizer, self.recipe, self.run_dir)


# --------------------------------------------------------------------------------------------
# markdown


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def _cell(s: str, width: int = 40) -> str:
    s = s.replace("|", "\\|").replace("\n", "⏎")
    return s if len(s) <= width else s[: width - 1] + "…"


def format_markdown(results: dict[str, Any]) -> str:
    """results.json as markdown tables (perplexity, probes, tasks)."""
    lines = [f"# Evaluation of `{results['checkpoint']}`", "",
             f"step {results['step']}, {results['tokens_seen']:,} training tokens"
             if results.get("tokens_seen") is not None else f"step {results['step']}", ""]
    if results["perplexity"]:
        lines += ["## Perplexity (held-out split)", "",
                  "| domain | loss (nats/token) | ppl | bits/byte | word ppl | tokens | bytes | docs |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for d, r in results["perplexity"].items():
            lines.append(f"| {d} | {_f(r['loss'])} | {_f(r['ppl'], 3)} | {_f(r['bits_per_byte'])} | "
                         f"{_f(r['word_ppl'], 3)} | {r['tokens']:,} | {r['bytes']:,} | {r['docs']:,} |")
        lines.append("")
    if results["probes"]:
        lines += ["## Probes", "", "| probe | kind | text | log P / margin | rank | passed |",
                  "| --- | --- | --- | ---: | ---: | :---: |"]
        for p in results["probes"]:
            if p["kind"] == "target":
                text = f"{p['prompt']} → {p['target']}"
            else:
                text = f"{p['prompt']}[{p['a']}] vs [{p['b']}] (expect {p['expect']})"
            passed = "not scored" if p.get("unscored") else "yes" if p["passed"] else "no"
            lines.append(f"| {p['name']} | {p['kind']} | {_cell(text, 60)} | {_f(p['score'])} | "
                         f"{_f(p['rank'])} | {passed} |")
        lines.append("")
    if results["tasks"]:
        lines += ["## Multiple choice", "", "| task | shots | n | acc | acc_norm | random | not scored |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t, r in results["tasks"].items():
            lines.append(f"| {t} | {r['shots']} | {r['n']:,} | {_f(r['acc'])} | {_f(r['acc_norm'])} | "
                         f"{_f(r['random'])} | {r.get('skipped', 0):,} |")
        lines.append("")
    unscored = unscored_items(results)
    if unscored:
        total = sum(1 for p in results["probes"] if p.get("unscored")) + sum(
            r.get("skipped", 0) for r in results["tasks"].values())
        lines += ["## Not scored", "", f"{total} item(s) could not be scored and are left out of the figures "
                  "above (at most 20 listed per task):", "", "| part | item | reason |", "| --- | --- | --- |"]
        lines += [f"| {part} | {_cell(item, 60)} | {_cell(reason, 80)} |" for part, item, reason in unscored]
        lines.append("")
    return "\n".join(lines)


def unscored_items(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(part, item, reason) of every probe and listed task item that could not be scored."""
    out = [("probes", str(p["name"]), str(p["unscored"])) for p in results.get("probes", []) if p.get("unscored")]
    for t, r in results.get("tasks", {}).items():
        out += [(f"task {t}", str(u["item"]), str(u["reason"])) for u in r.get("unscored", [])]
    return out
