"""The `smelt` command. Each verb parses, validates the recipe, and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import smelt.quality  # noqa: F401  (registers the model-based curation steps: quality, perplexity, toxicity)
from smelt import __version__
from smelt.config import Recipe, RecipeError, load_recipe, write_resolved_recipe
from smelt.fsutil import RunDirLocked, describe_os_error

log = logging.getLogger("smelt")


def _common(p: argparse.ArgumentParser, *, overrides: bool = True) -> None:
    """--set, --quiet, --verbose. Verbs without a recipe to override (``overrides=False``) still
    parse --set, hidden, so that `_refuse_overrides` can say why it does not apply."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set data.workers=2 (repeatable)" if overrides
                   else argparse.SUPPRESS)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars; warnings and errors only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="smelt", description="End-to-end LLM pretraining: curate, tokenize, pack, train, evaluate.")
    ap.add_argument("--version", action="version", version=f"smelt {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("data", help="curate raw documents: filter, redact, decontaminate, deduplicate",
                       description="Run the curation stage of RECIPE into <runs_dir>/<name>/data: "
                                   "clean/<domain>/ shards, rejects/, duplicates/, stats.json.")
    d.add_argument("recipe", help="YAML recipe with a `data:` section")
    d.add_argument("--workers", type=int, default=None, help="worker processes (default: data.workers; 0 = all cores)")
    d.add_argument("--force", action="store_true", help="redo the stage even if it is complete")
    _common(d)
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("tokenizer", help="train a tokenizer on the curated data, or evaluate one",
                       description="`smelt tokenizer RECIPE` trains <run>/tokenizer/tokenizer.json from "
                                   "<run>/data/clean (or tokenizer.inputs). `smelt tokenizer eval RECIPE` measures "
                                   "bytes/token, characters/token, vocabulary use and the lossless round trip per "
                                   "domain and language, optionally beside a second tokenizer (--compare).")
    t.add_argument("words", nargs="+", metavar="[eval] RECIPE", help="RECIPE, or `eval RECIPE`")
    t.add_argument("--compare", default=None, help="eval: a second tokenizer (tokenizer.json or directory)")
    t.add_argument("--docs", type=int, default=None,
                   help="eval: documents per domain (default tokenizer.eval_docs_per_domain)")
    t.add_argument("--force", action="store_true", help="retrain even if the tokenizer is complete")
    _common(t)
    t.set_defaults(func=cmd_tokenizer)

    pk = sub.add_parser("pack", help="tokenize the curated data into token shards",
                        description="Tokenize <run>/data/clean with <run>/tokenizer into <run>/tokens/<domain>/"
                                    "{train,val}-NNNNN.{bin,idx} and tokens/manifest.json.")
    pk.add_argument("recipe", help="YAML recipe (the `pack:` section is optional)")
    pk.add_argument("--workers", type=int, default=None, help="worker processes (default: pack.workers; 0 = all cores)")
    pk.add_argument("--force", action="store_true", help="redo the stage even if it is complete")
    _common(pk)
    pk.set_defaults(func=cmd_pack)

    tr = sub.add_parser("train", help="train the model on the packed tokens",
                        description="Train <run>/train from <run>/tokens with the recipe's `model:`, `loader:` and "
                                    "`train:` sections. Resumes automatically from the latest complete checkpoint.")
    tr.add_argument("recipe", help="YAML recipe")
    g = tr.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_const", const=True, default=None,
                   help="require a checkpoint to resume from")
    g.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                   help="start from scratch; an existing train/ is moved aside to train.prev-N (never deleted)")
    _common(tr)
    tr.set_defaults(func=cmd_train)

    # ---- smelt eval (issue 5, evaluation) ----
    ev = sub.add_parser("eval", help="evaluate a checkpoint: perplexity, bits per byte, probes, multiple choice",
                        description="Evaluate the newest complete checkpoint of RECIPE's run (or --checkpoint) with "
                                    "the recipe's `eval:` section: perplexity / bits per byte / word perplexity per "
                                    "domain on the held-out split, probability probes, multiple-choice benchmarks. "
                                    "Writes <run>/eval/results.json, results.md and TensorBoard scalars in eval/tb. "
                                    "--all-checkpoints also tracks the probes over every checkpoint "
                                    "(eval/probes.csv, eval/probes.png).")
    ev.add_argument("recipe", help="YAML recipe of a trained run")
    evg = ev.add_mutually_exclusive_group()
    evg.add_argument("--checkpoint", default=None, metavar="PATH",
                     help="a checkpoint directory (train/checkpoints/step-NNNNNNN) or a Hugging Face export")
    evg.add_argument("--all-checkpoints", action="store_true",
                     help="probes of every checkpoint in train/checkpoints, then the full evaluation of the newest")
    _common(ev)
    ev.set_defaults(func=cmd_eval)
    # ---- end smelt eval ----

    # ---- smelt export / import / generate (issue 5, interop) ----
    ex = sub.add_parser("export", help="export a checkpoint to a Hugging Face Llama directory",
                        description="Write <run>/export (or --out): config.json, model.safetensors (sharded above "
                                    "export.max_shard_size), tokenizer files and generation_config.json, loadable by "
                                    "transformers.LlamaForCausalLM / PreTrainedTokenizerFast. Every export is "
                                    "checked: transformers' logits must match smelt's (fp32, export.parity_atol).")
    ex.add_argument("recipe", metavar="RECIPE_OR_RUN_DIR", help="YAML recipe, or a run directory")
    ex.add_argument("--checkpoint", default=None, metavar="PATH",
                    help="checkpoint directory (default: export.checkpoint, else the newest complete one)")
    ex.add_argument("--out", default=None, metavar="DIR", help="output directory (default: <run>/export)")
    ex.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights dtype (default: export.dtype)")
    ex.add_argument("--force", action="store_true", help="export even if the export is up to date")
    _common(ex)
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="import a Hugging Face Llama directory as a smelt run",
                        description="Read HF_DIR (config.json + safetensors, sharded or not; tokenizer.json) and "
                                    "write OUT_DIR as a run directory: recipe.yaml with the model section, "
                                    "tokenizer/, train/checkpoints/step-0000000 (DCP). Checked against transformers' "
                                    "logits before it is committed. Continue training with train.init_from.")
    im.add_argument("hf_dir", help="Hugging Face model directory (Llama architecture)")
    im.add_argument("out_dir", help="run directory to create (an existing one is moved aside to OUT_DIR.prev-N)")
    _common(im, overrides=False)
    im.set_defaults(func=cmd_import)

    ge = sub.add_parser("generate", help="generate text from a trained model",
                        description="Complete each --prompt with the model of a run (newest complete checkpoint), a "
                                    "checkpoint directory or a Hugging Face directory; KV-cached decoding.")
    ge.add_argument("recipe", metavar="RECIPE_OR_RUN_DIR", help="YAML recipe, run directory, checkpoint or HF dir")
    ge.add_argument("--prompt", "-p", action="append", default=[], help="prompt (repeatable; default: empty)")
    ge.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint directory to use")
    ge.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    ge.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    ge.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    ge.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off; default 0.95)")
    ge.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1: off)")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ge.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ge.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    _common(ge)
    ge.set_defaults(func=cmd_generate)
    # ---- end smelt export / import / generate ----

    # ---- smelt run / smelt report (issue 7) ----
    rn = sub.add_parser("run", help="run every stage: data, tokenizer, pack, train, eval, export, report",
                        description="Run RECIPE's stages in order into <runs_dir>/<name>, skipping each stage that "
                                    "is complete for the same inputs and config and resuming one that was "
                                    "interrupted; writes run.json and report.html. Without RECIPE: the built-in "
                                    "demo (a corpus assembled from the Python installation; SMELT_DEMO=tiny or "
                                    "--set run.demo=tiny for the small test size).")
    rn.add_argument("recipe", nargs="?", default=None, help="YAML recipe (default: the built-in demo)")
    grp = rn.add_mutually_exclusive_group()
    grp.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                     help="redo STAGE and every stage after it (data, tokenizer, pack, train, eval, export, report)")
    grp.add_argument("--only", default=None, metavar="STAGE", help="redo just STAGE")
    _common(rn)
    rn.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="write the HTML report of a run directory",
                        description="Write RUN_DIR/report.html: one self-contained page with the data funnel, "
                                    "tokenizer, mixture, training curves, evaluation, samples and timings.")
    rp.add_argument("run_dir", help="a run directory (runs/<name>)")
    rp.add_argument("--out", default=None, help="output file (default: RUN_DIR/report.html)")
    rp.add_argument("--no-samples", action="store_true", help="do not generate text samples")
    rp.add_argument("--png", default=None, metavar="PATH", help="also write the report's figures as one PNG")
    _common(rp, overrides=False)
    rp.set_defaults(func=cmd_report)
    # ---- end smelt run / smelt report ----

    # ---- smelt compare ----
    cm = sub.add_parser("compare", help="compare finished runs side by side: data kept, bits/byte, benchmarks",
                        description="Read each RUN_DIR's recipe.yaml, train/manifest.json, data/stats.json and "
                                    "eval/results.json and write a side-by-side table (tokens, steps, kept "
                                    "documents and bytes, bits/byte per domain, benchmark accuracy ± stderr, the "
                                    "best value per column in bold) as compare.md, compare.html, compare.json and "
                                    "compare.png. A missing file is a dash and a note, not an error.")
    cm.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<name>)")
    cm.add_argument("--out", default=None, metavar="DIR",
                    help="output directory (default: ./compare-<YYYYmmdd-HHMMSS>); an earlier comparison there is "
                         "moved aside (DIR.prev-N), never overwritten")
    cm.add_argument("--name", default=None, help="title of the comparison (default: 'Comparison of N runs')")
    _common(cm, overrides=False)
    cm.set_defaults(func=cmd_compare)
    # ---- end smelt compare ----

    # ---- smelt quality ----
    qu = sub.add_parser("quality", help="train the fastText quality classifier of the `quality` curation step",
                        description="`smelt quality train SPEC.yaml` trains a fastText classifier from the spec's "
                                    "positive and negative sources (files, or a run's data/clean/<domain> and "
                                    "data/rejects) with a held-out split, into models/<name>/ (or the spec's "
                                    "`out`): model.bin, config.json, report.json and report.md (held-out "
                                    "precision, recall, F1, ROC-AUC, the most indicative n-grams per class). An "
                                    "earlier model directory is moved aside (<name>.prev-N), never overwritten.")
    qus = qu.add_subparsers(dest="quality_command", metavar="{train}")
    qt = qus.add_parser("train", help="train a classifier from a spec file")
    qt.add_argument("spec", help="YAML spec: name, positive, negative, heldout_fraction, fasttext (README)")
    qt.add_argument("--out", default=None, metavar="DIR", help="model directory (default: the spec's out, or "
                                                              "models/<name>)")
    qt.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown")
    _common(qt, overrides=False)
    qt.set_defaults(func=cmd_quality_train)
    # ---- end smelt quality ----

    # ---- smelt plan / smelt scaling (plan and scale) ----
    pl = sub.add_parser("plan", help="parameters, FLOPs, memory per GPU, time and cost of a training run",
                        description="Plan RECIPE's run (or a preset with --preset, --tokens, --gpus ...): parameters, "
                                    "FLOPs per token and in total, memory per GPU under ZeRO 0-3 and the TP/PP layout, "
                                    "activations with and without recomputation, KV cache, whether it fits, "
                                    "wall-clock, GPU-hours and cost, tokens per parameter, and with --law the "
                                    "predicted loss and the compute-optimal N and D. Flags override the recipe.")
    pl.add_argument("recipe", nargs="?", default=None, help="YAML recipe (optional with --preset)")
    pl.add_argument("--preset", default=None,
                    help="model preset (llama-7b, llama-13b, ...) instead of the recipe's model")
    pl.add_argument("--vocab", type=int, default=None, help="vocabulary size, when the model has none")
    pl.add_argument("--tokens", default=None, help="training tokens (1T, 300B, 2.5e9)")
    pl.add_argument("--gpus", type=int, default=None, help="number of GPUs (default 1)")
    pl.add_argument("--device", default=None, help="a100, h100, h200, b200 or mi300x (default h100)")
    pl.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilization (default 0.4)")
    pl.add_argument("--price", type=float, default=None, help="$ per GPU-hour")
    pl.add_argument("--tp", type=int, default=None, help="tensor parallel degree")
    pl.add_argument("--pp", type=int, default=None, help="pipeline stages")
    pl.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None, help="ZeRO stage")
    pl.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="parameter dtype")
    pl.add_argument("--optimizer", choices=["adamw", "adafactor", "sgd", "none"], default=None)
    pl.add_argument("--micro-batch", type=int, default=None, help="sequences per forward on one GPU")
    pl.add_argument("--seq-len", type=int, default=None, help="training context")
    pl.add_argument("--checkpointing", choices=["none", "full", "every_k"], default=None,
                    help="activation recomputation")
    pl.add_argument("--kv-batch", type=int, default=None, help="inference KV cache: sequences (default 1)")
    pl.add_argument("--kv-len", type=int, default=None, help="inference KV cache: tokens (default: seq len)")
    pl.add_argument("--law", default=None, metavar="FIT.json", help="a fitted law (`smelt scaling fit --json`)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    _common(pl)
    pl.set_defaults(func=cmd_plan)

    sc = sub.add_parser("scaling", help="scaling-law sweeps and fits",
                        description="`smelt scaling sweep RECIPE` trains the recipe's `scaling:` ladder (IsoFLOP or "
                                    "WSD runs in <run>/scaling/, points in scaling/points.csv); `smelt scaling fit "
                                    "POINTS.csv` fits L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla "
                                    "approaches 2 and 3) and writes fit.json and plots beside the points; "
                                    "`smelt scaling check RECIPE --budget C` trains one larger run and compares its "
                                    "loss with the prediction (scaling/checks.json).")
    scs = sc.add_subparsers(dest="scaling_command", metavar="{sweep,fit,check}")
    sw = scs.add_parser("sweep", help="train the ladder of small runs")
    sw.add_argument("recipe", help="YAML recipe with packed tokens and a `scaling:` section")
    sw.add_argument("--dry-run", action="store_true", help="print the runs (sizes, budgets, steps, tokens) only")
    _common(sw)
    sw.set_defaults(func=cmd_scaling_sweep)
    sf = scs.add_parser("fit", help="fit a scaling law to points")
    sf.add_argument("points", help="CSV with params, loss and tokens or flops (e.g. <run>/scaling/points.csv)")
    sf.add_argument("--json", action="store_true", help="print the fit as JSON")
    sf.add_argument("--budgets", default=None, help="comma-separated FLOPs budgets for the compute-optimal N, D")
    sf.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits for the intervals (default 100)")
    sf.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    sf.add_argument("--out", default=None, help="directory for fit.json and plots (default: beside the points)")
    sf.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _common(sf, overrides=False)
    sf.set_defaults(func=cmd_scaling_fit)
    sk = scs.add_parser("check", help="train one run at a larger budget and compare it with the fit's prediction")
    sk.add_argument("recipe", help="the sweep's recipe (same tokens, batch, optimizer)")
    sk.add_argument("--budget", required=True, help="compute budget C in FLOPs (e.g. 2e13)")
    sk.add_argument("--depth", type=int, default=None,
                    help="ladder size by layers (default: the size nearest the law's compute-optimal N)")
    sk.add_argument("--fit", default=None, metavar="FIT.json", help="the fit (default: <run>/scaling/fit.json)")
    sk.add_argument("--json", action="store_true", help="print the record as JSON")
    _common(sk)
    sk.set_defaults(func=cmd_scaling_check)
    # ---- end smelt plan / smelt scaling ----
    return ap


def setup_logging(quiet: bool, verbose: bool) -> None:
    """Log lines and progress bars go to stderr; stdout carries only a command's output (generated
    text, result tables), so ``smelt generate ... > out.txt`` holds just the text."""
    import rich
    from rich.console import Console
    from rich.logging import RichHandler

    # Progress bars made without a console (the trainer's) use rich's global one: point it at stderr.
    rich.reconfigure(stderr=True)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
                        force=True)


def prepare_run(recipe: Recipe, source: str | None, stage: str) -> Path:
    """Create the run directory and write the resolved recipe into it (for a `runs_dir` URL:
    mirror it to the store, or refuse a `stage` that needs a local one)."""
    from smelt.run import use_store

    use_store(recipe, [stage])
    return write_resolved_recipe(recipe, source)


class RichProgress:
    """Progress bars for the curation phases (disabled with --quiet)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.progress: Any = None

    def __enter__(self) -> RichProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start(self, phase: str, total: int) -> None:
        if self.progress is not None:
            self.bars[phase] = self.progress.add_task(phase, total=total)

    def advance(self, phase: str) -> None:
        if self.progress is not None and phase in self.bars:
            self.progress.advance(self.bars[phase])

    def update(self, phase: str, done: int, total: int) -> None:
        """`progress(phase, done, total)` callbacks (packing)."""
        if self.progress is None:
            return
        if phase not in self.bars:
            self.start(phase, total)
        self.progress.update(self.bars[phase], completed=done, total=total)


def cmd_data(args: argparse.Namespace) -> int:
    from smelt.data.curate import Progress, run_data_stage
    from smelt.data.io import DataInputError

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.data is None:
        raise RecipeError(f"{args.recipe}: the recipe has no `data:` section")
    run_dir = prepare_run(recipe, args.recipe, "data")
    try:
        with RichProgress(not args.quiet) as rp:
            stats = run_data_stage(recipe.data, run_dir, workers=args.workers,
                                   progress=Progress(start=rp.start, advance=rp.advance), force=args.force)
    except DataInputError as e:
        raise RecipeError(str(e)) from None
    if not args.quiet:
        print_funnel(stats, run_dir / "data")
    return 0


def _local_run(recipe: Recipe, stage: str) -> None:
    """RecipeError when the recipe's run directory is on a store and `stage` needs a local one."""
    from smelt.run import use_store

    if recipe.run_url is not None:
        use_store(recipe, [stage])


def _load(recipe_path: str, overrides: list[str], stage: str) -> tuple[Recipe, Path]:
    recipe = load_recipe(recipe_path, overrides)
    return recipe, prepare_run(recipe, recipe_path, stage)


def _clean_shards(recipe: Recipe, run_dir: Path, inputs: list[str] | None) -> dict[str, list[Path]]:
    from smelt.tokenizer.train import input_files

    return input_files(run_dir, inputs)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from smelt.config import TokenizerConfig

    words = list(args.words)
    mode = "train"
    if words[0] == "eval":
        mode, words = "eval", words[1:]
    if len(words) != 1:
        raise RecipeError("usage: smelt tokenizer [eval] RECIPE")
    recipe, run_dir = _load(words[0], args.overrides, "tokenizer")
    cfg = recipe.tokenizer or TokenizerConfig()
    shards = _clean_shards(recipe, run_dir, cfg.inputs)
    out = run_dir / "tokenizer"
    if mode == "train":
        from smelt.tokenizer.train import is_up_to_date, train_tokenizer

        if is_up_to_date(out, cfg, shards, recipe.seed) and not args.force:
            log.info("tokenizer: %s is up to date, skipping (--force to retrain)", out / "tokenizer.json")
            return 0
        train_tokenizer(cfg, shards, out, recipe.seed)
        return 0
    from smelt.fsutil import atomic_write_json
    from smelt.tokenizer.evaluate import evaluate_tokenizer, format_eval_table

    tok = out / "tokenizer.json"
    if not tok.is_file():
        raise RecipeError(f"{tok} not found (run `smelt tokenizer {words[0]}` first)")
    result = evaluate_tokenizer(tok, shards, args.docs or cfg.eval_docs_per_domain,
                                compare=Path(args.compare) if args.compare else None)
    atomic_write_json(out / "eval.json", result)
    print(format_eval_table(result))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from smelt.config import PackConfig
    from smelt.tokens.pack import pack_tokens

    recipe, run_dir = _load(args.recipe, args.overrides, "pack")
    cfg = recipe.pack or PackConfig()
    tok = run_dir / "tokenizer" / "tokenizer.json"
    if not tok.is_file():
        raise RecipeError(f"{tok} not found (run `smelt tokenizer {args.recipe}` first)")
    shards = _clean_shards(recipe, run_dir, recipe.tokenizer.inputs if recipe.tokenizer else None)
    with RichProgress(not args.quiet) as rp:
        manifest = pack_tokens(cfg, tok, shards, run_dir / "tokens", recipe.seed,
                               workers=args.workers, progress=rp.update if not args.quiet else None, force=args.force)
    if not args.quiet:
        for dom, d in manifest["domains"].items():
            log.info("pack: %-10s train %12s tokens (%s docs)  val %10s tokens", dom,
                     f"{d['train']['tokens']:,}", f"{d['train']['docs']:,}", f"{d['val']['tokens']:,}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from smelt.eval.runner import InTrainingEvaluator
    from smelt.tokens.loader import DataExhausted
    from smelt.train.stability import TrainingDiverged
    from smelt.train.trainer import train

    recipe, run_dir = _load(args.recipe, args.overrides, "train")
    if not (run_dir / "tokens" / "manifest.json").is_file():
        raise RecipeError(f"{run_dir / 'tokens'} has no manifest (run `smelt pack {args.recipe}` first)")
    try:
        summary = train(recipe, run_dir, resume=args.resume, progress=not args.quiet,
                        evaluator=InTrainingEvaluator(recipe, run_dir))
    except (DataExhausted, TrainingDiverged) as e:
        print(f"smelt: training stopped: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        log.info("train: %s", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    if summary.get("interrupted"):
        print(f"smelt: interrupted at step {summary.get('steps')} (checkpoint saved; run again to resume)",
              file=sys.stderr)
        return 130
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from smelt.eval.probes import ProbeFormatError
    from smelt.eval.runner import run_eval
    from smelt.eval.tasks import BenchmarkFormatError
    from smelt.interop.load import load_model
    from smelt.model.loaded import LoadError
    from smelt.train.checkpoint import CheckpointError

    # The run's recipe.yaml is not rewritten: it is what the checkpoints' model is rebuilt from.
    recipe = load_recipe(args.recipe, args.overrides)
    _local_run(recipe, "eval")
    run_dir = recipe.run_dir
    if not run_dir.is_dir():
        raise RecipeError(f"run directory {run_dir} not found (train it first: `smelt train {args.recipe}`)")
    try:
        with RichProgress(not args.quiet) as rp:
            results = run_eval(recipe, run_dir, args.checkpoint, all_checkpoints=args.all_checkpoints,
                               progress=rp.update if not args.quiet else None, load_model=load_model)
    except (ProbeFormatError, BenchmarkFormatError, LoadError, CheckpointError) as e:
        raise RecipeError(str(e)) from None
    if not args.quiet:
        from rich.console import Console
        from rich.markdown import Markdown

        from smelt.eval.runner import format_markdown

        Console().print(Markdown(format_markdown(results)))
        log.info("eval: %s", run_dir / "eval" / "results.json")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from smelt.run import LazyProgress, StageFailed, load_run_recipe, run

    recipe = load_run_recipe(args.recipe, args.overrides)
    # one progress display per stage: the trainer opens its own, and rich allows one at a time
    progress = None if args.quiet else LazyProgress(lambda: RichProgress(True))
    try:
        state = run(recipe, from_stage=args.from_stage, only=args.only, progress=progress, source=args.recipe)
    except StageFailed as e:
        print(f"smelt: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        for name, rec in state["stages"].items():
            log.info("%-9s %-14s %-10s %s", name, rec.get("status", ""), rec.get("action", ""),
                     f"{rec['duration_s']:.1f}s" if rec.get("duration_s") is not None else rec.get("reason", ""))
        report = recipe.run_dir / "report.html"
        if report.is_file():
            log.info("report: %s", report)
    return 0


def _refuse_overrides(args: argparse.Namespace, why: str) -> None:
    if args.overrides:
        raise RecipeError(f"smelt {args.command} takes no --set ({why}); got --set {args.overrides[0]}")


def cmd_report(args: argparse.Namespace) -> int:
    from smelt.report import generate_samples, write_report

    _refuse_overrides(args, "it reports what the run directory recorded; rerun a stage with --set to change it")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RecipeError(f"run directory not found: {run_dir}")
    if not args.no_samples:
        generate_samples(run_dir)
    out = write_report(run_dir, Path(args.out) if args.out else None)
    if args.png:
        from smelt.report import write_report_png

        write_report_png(out, Path(args.png))
    if not args.quiet:
        log.info("report: %s", out)
    return 0


def print_funnel(stats: dict[str, Any], data_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"curation funnel — {data_dir}")
    for col in ("domain", "input", "kept", "rejected", "duplicates", "MB in", "MB kept"):
        t.add_column(col, justify="right" if col != "domain" else "left")
    rows = list(stats["by_domain"].items())
    d = stats["documents"]
    rows.append(("[bold]all", {"input": d["input"], "kept": d["kept"], "rejected": d["rejected"],
                               "duplicates": d["duplicates"], "bytes_in": stats["bytes"]["input"],
                               "bytes_kept": stats["bytes"]["kept"]}))
    for dom, r in rows:
        t.add_row(dom, str(r["input"]), str(r["kept"]), str(r["rejected"]), str(r["duplicates"]),
                  f"{r['bytes_in'] / 1e6:.2f}", f"{r['bytes_kept'] / 1e6:.2f}")
    c.print(t)
    reasons = Table(title="rejects and duplicates by step/reason")
    reasons.add_column("step/reason")
    reasons.add_column("documents", justify="right")
    for k, v in list(stats["rejects_by_reason"].items())[:25]:
        reasons.add_row(k, str(v))
    for st in stats["steps"]:
        for reason, n in st["total"]["dropped"].items():
            if st["name"] in ("exact_dedup", "minhash_dedup"):
                reasons.add_row(f"{st['name']}/{reason}", str(n))
    c.print(reasons)


# ---- smelt export / import / generate (issue 5, interop) ----


def _recipe_or_run(arg: str, overrides: list[str]) -> tuple[Recipe | None, Path]:
    """(recipe, run dir) from a recipe file or a directory (a run's resolved recipe.yaml is read)."""
    p = Path(arg)
    if p.is_file():
        recipe = load_recipe(p, overrides)
        _local_run(recipe, "export")
        return recipe, recipe.run_dir
    if not p.is_dir():
        raise RecipeError(f"{p}: no such recipe file or directory")
    recipe = load_recipe(p / "recipe.yaml", overrides) if (p / "recipe.yaml").is_file() else None
    return recipe, p


def _interop_errors() -> tuple[type[Exception], ...]:
    from smelt.interop.hf import InteropError
    from smelt.model.loaded import LoadError
    from smelt.train.checkpoint import CheckpointError

    return InteropError, LoadError, CheckpointError


def cmd_export(args: argparse.Namespace) -> int:
    from smelt.interop.hf import export_run

    recipe, run_dir = _recipe_or_run(args.recipe, args.overrides)
    if recipe is None:
        raise RecipeError(f"{run_dir}: no recipe.yaml (not a run directory)")
    if args.dtype is not None:
        from smelt.config import ExportConfig

        recipe = recipe.model_copy(update={"export": (recipe.export or ExportConfig()).model_copy(
            update={"dtype": args.dtype})})
    try:
        out = export_run(recipe, run_dir, checkpoint=args.checkpoint, out_dir=args.out, force=args.force)
    except _interop_errors() as e:
        raise RecipeError(str(e)) from None
    log.info("export: %s", out)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from smelt.interop.hf import import_hf

    _refuse_overrides(args, "the recipe it writes comes from the Hugging Face config; override it in the "
                            "commands that use the imported run")
    try:
        out = import_hf(Path(args.hf_dir), Path(args.out_dir))
    except _interop_errors() as e:
        raise RecipeError(str(e)) from None
    log.info("import: %s (continue training with train.init_from: %s)", out,
             out / "train" / "checkpoints" / "step-0000000")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from smelt.eval.generate import generate_text
    from smelt.interop.load import load_model

    source: Path
    if args.checkpoint is not None:
        source = Path(args.checkpoint)
    else:
        p = Path(args.recipe)
        source = _recipe_or_run(args.recipe, args.overrides)[1] if p.is_file() else p
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    log.info("generate: %s on %s (%s)", source, device, args.dtype)
    try:
        loaded = load_model(source, dtype=dtype, device=device)
        prompts = args.prompt or [""]
        texts = generate_text(loaded, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, use_cache=not args.no_cache)
    except (*_interop_errors(), ValueError) as e:
        raise RecipeError(str(e)) from None
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}")
        if len(prompts) > 1:
            print("-" * 40)
    return 0


# ---- end smelt export / import / generate ----


# ---- smelt plan / smelt scaling (plan and scale) ----


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from smelt.model.config import ModelConfig, preset
    from smelt.scaling.plan import PlanInputs, format_plan, from_recipe, make_plan, parse_count

    fields: dict[str, Any] = {}
    if args.recipe is not None:
        cfg, fields = from_recipe(load_recipe(args.recipe, args.overrides))
    elif args.preset is None:
        raise RecipeError("smelt plan needs a RECIPE or --preset NAME")
    else:
        _refuse_overrides(args, "there is no recipe; use the flags")
        cfg = ModelConfig()
    try:
        if args.preset is not None:
            cfg = preset(args.preset)
        if args.vocab is not None:
            cfg = cfg.with_vocab(args.vocab)
        flags = {"tokens": parse_count(args.tokens) if args.tokens else None, "gpus": args.gpus,
                 "device": args.device, "mfu": args.mfu, "price_per_gpu_hour": args.price, "tp": args.tp,
                 "pp": args.pp, "zero": args.zero, "precision": args.precision, "optimizer": args.optimizer,
                 "micro_batch": args.micro_batch, "seq_len": args.seq_len, "checkpointing": args.checkpointing,
                 "kv_batch": args.kv_batch, "kv_len": args.kv_len}
        fields.update({k: v for k, v in flags.items() if v is not None})
        if args.seq_len is None and args.recipe is None:
            fields["seq_len"] = cfg.max_seq_len
        if "tokens" not in fields:
            raise RecipeError("smelt plan: give --tokens (or a recipe with a train: section)")
        if args.law:
            law = json.loads(Path(args.law).read_text(encoding="utf-8"))
            fields["law"] = {k: float(law[k]) for k in ("E", "A", "B", "alpha", "beta")}
        plan = make_plan(cfg, PlanInputs(**fields))
    except (ValueError, KeyError, OSError) as e:
        raise RecipeError(f"smelt plan: {e}") from None
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_scaling_sweep(args: argparse.Namespace) -> int:
    from smelt.scaling.sweep import format_sweep, plan_sweep, run_sweep

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(format_sweep(plan_sweep(recipe, recipe.run_dir)))
        return 0
    from smelt.tokens.loader import DataExhausted
    from smelt.train.stability import TrainingDiverged

    try:
        points = run_sweep(recipe, prepare_run(recipe, args.recipe, "scaling"), source=args.recipe)
    except (DataExhausted, TrainingDiverged) as e:
        print(f"smelt: training stopped: {e}", file=sys.stderr)
        return 1
    log.info("scaling: %d points in %s (fit them: smelt scaling fit %s)", len(points),
             recipe.run_dir / "scaling" / "points.csv", recipe.run_dir / "scaling" / "points.csv")
    return 0


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    import json

    from smelt.fsutil import atomic_write_json
    from smelt.scaling.fit import fit_points, format_fit, plot_fit
    from smelt.scaling.plan import parse_count
    from smelt.scaling.points import PointsError, read_points

    _refuse_overrides(args, "it reads a points file, not a recipe")
    try:
        points = read_points(args.points)
        budgets = [parse_count(b) for b in args.budgets.split(",")] if args.budgets else None
        result = fit_points(points, bootstrap=args.bootstrap, seed=args.seed, budgets=budgets)
    except (PointsError, ValueError) as e:
        raise RecipeError(str(e)) from None
    out = Path(args.out) if args.out else Path(args.points).parent
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "fit.json", result)
    if not args.no_plots:
        plot_fit(points, result, out)
    shown = {k: v for k, v in result.items() if k != "samples"}  # the bootstrap laws stay in fit.json
    print(json.dumps(shown, indent=2) if args.json else format_fit(result))
    return 0


def cmd_scaling_check(args: argparse.Namespace) -> int:
    import json

    from smelt.scaling.plan import parse_count
    from smelt.scaling.sweep import format_check, run_check

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        budget = parse_count(args.budget)
    except ValueError as e:
        raise RecipeError(f"--budget: {e}") from None
    from smelt.tokens.loader import DataExhausted
    from smelt.train.stability import TrainingDiverged

    try:
        rec = run_check(recipe, prepare_run(recipe, args.recipe, "scaling"), budget, depth=args.depth,
                        fit_path=Path(args.fit) if args.fit else None, source=args.recipe)
    except (DataExhausted, TrainingDiverged) as e:
        print(f"smelt: training stopped: {e}", file=sys.stderr)
        return 1
    print(json.dumps(rec, indent=2) if args.json else format_check(rec))
    return 0


# ---- end smelt plan / smelt scaling ----


# ---- smelt quality ----


def cmd_quality_train(args: argparse.Namespace) -> int:
    from smelt.quality.train import load_train_spec, report_markdown, train_classifier

    _refuse_overrides(args, "the spec file is the whole configuration")
    spec = load_train_spec(args.spec)
    report = train_classifier(spec, Path(args.out) if args.out else None)
    if report["moved_aside"]:
        log.info("the earlier model directory was moved aside to %s", report["moved_aside"])
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    elif not args.quiet:
        print(report_markdown(spec, report))
    return 0


# ---- end smelt quality ----


# ---- smelt compare ----


def cmd_compare(args: argparse.Namespace) -> int:
    from smelt.compare import CompareError, compare_runs, default_out_dir, format_markdown, write_comparison

    _refuse_overrides(args, "it compares what the run directories recorded")
    try:
        cmp = compare_runs([Path(p) for p in args.run_dirs], name=args.name)
    except CompareError as e:
        raise RecipeError(str(e)) from None
    write_comparison(cmp, Path(args.out) if args.out else default_out_dir())
    if not args.quiet:
        print(format_markdown(cmp), end="")  # plain markdown: the table is wider than a terminal
    return 0


# ---- end smelt compare ----


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    setup_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RecipeError as e:
        print(f"smelt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"smelt: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except RunDirLocked as e:
        print(f"smelt: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # Disk full, permissions: one sentence with the path and what to do, not a traceback.
        described = describe_os_error(e)
        if described is None:
            raise
        print(f"smelt: {described}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
