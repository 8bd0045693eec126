"""The `smelt` command. Each verb parses, validates the recipe, and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smelt import __version__
from smelt.config import Recipe, RecipeError, load_recipe, recipe_to_dict
from smelt.fsutil import atomic_write_text

log = logging.getLogger("smelt")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set data.workers=2 (repeatable)")
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
    t.add_argument("--docs", type=int, default=None, help="eval: documents per domain (default tokenizer.eval_docs_per_domain)")
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
                   help="start from scratch even if checkpoints exist")
    _common(tr)
    tr.set_defaults(func=cmd_train)
    return ap


def setup_logging(quiet: bool, verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)], force=True)


def prepare_run(recipe: Recipe, source: str | None) -> Path:
    """Create the run directory and write the resolved recipe into it."""
    import yaml

    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# resolved recipe (from {source or 'defaults'}, overrides applied)\n"
    atomic_write_text(run_dir / "recipe.yaml",
                      header + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True))
    return run_dir


class RichProgress:
    """Progress bars for the curation phases (disabled with --quiet)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.progress: Any = None

    def __enter__(self) -> RichProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn())
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
    run_dir = prepare_run(recipe, args.recipe)
    try:
        with RichProgress(not args.quiet) as rp:
            stats = run_data_stage(recipe.data, run_dir, workers=args.workers,
                                   progress=Progress(start=rp.start, advance=rp.advance), force=args.force)
    except DataInputError as e:
        raise RecipeError(str(e)) from None
    if not args.quiet:
        print_funnel(stats, run_dir / "data")
    return 0


def _load(recipe_path: str, overrides: list[str]) -> tuple[Recipe, Path]:
    recipe = load_recipe(recipe_path, overrides)
    return recipe, prepare_run(recipe, recipe_path)


def _clean_shards(recipe: Recipe, run_dir: Path, inputs: list[str] | None) -> dict[str, list[Path]]:
    from smelt.data.curate import clean_shard_files

    if not inputs:
        try:
            return clean_shard_files(run_dir / "data")
        except FileNotFoundError as e:
            raise RecipeError(str(e)) from None
    out: dict[str, list[Path]] = {}
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise RecipeError(f"tokenizer.inputs: {p} does not exist")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        for f in files:
            out.setdefault(f.parent.name, []).append(f)
    return out


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from smelt.config import TokenizerConfig

    words = list(args.words)
    mode = "train"
    if words[0] == "eval":
        mode, words = "eval", words[1:]
    if len(words) != 1:
        raise RecipeError("usage: smelt tokenizer [eval] RECIPE")
    recipe, run_dir = _load(words[0], args.overrides)
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

    recipe, run_dir = _load(args.recipe, args.overrides)
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
    from smelt.tokens.loader import DataExhausted
    from smelt.train.stability import TrainingDiverged
    from smelt.train.trainer import train

    recipe, run_dir = _load(args.recipe, args.overrides)
    if not (run_dir / "tokens" / "manifest.json").is_file():
        raise RecipeError(f"{run_dir / 'tokens'} has no manifest (run `smelt pack {args.recipe}` first)")
    try:
        summary = train(recipe, run_dir, resume=args.resume, progress=not args.quiet)
    except (DataExhausted, TrainingDiverged) as e:
        print(f"smelt: training stopped: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        log.info("train: %s", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
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
    except KeyboardInterrupt:
        print("smelt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
