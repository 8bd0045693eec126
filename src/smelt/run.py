"""`smelt run`: every stage in order, each skipped when it is complete for the same inputs/config.

    [demo corpus] -> data -> tokenizer -> pack -> train -> eval -> export -> report

Each stage is the same library call its own verb makes (`smelt data`, `smelt tokenizer`, ...),
so a stage run here and a stage run by hand are interchangeable. What decides "complete for the
same inputs and config" is a **stage key**: the stage's own key (the hash its manifest records:
curation's ``stage_key``, the tokenizer's ``fingerprint``, packing's ``stage_key``, the trainer's
``run_config_hash``; for the later stages a hash of their recipe section) chained with the key
of the stage before it, so that redoing any stage invalidates everything after it.

``runs/<name>/run.json`` (format version 1) records, per stage::

    status        complete | running | failed | interrupted | unavailable | not_configured
    key           the stage key it completed with
    action        ran | up to date | resumed | skipped   (what the last `smelt run` did)
    started_at, ended_at, duration_s   of the last execution that did work
    summary       a few numbers from the stage's manifest
    error         the message of a failure

A stage is skipped when ``run.json`` says complete with the same key *and* the stage's own
completion marker is on disk (data/manifest.json, tokenizer/stats.json, tokens/manifest.json,
train/manifest.json, eval/results.json, export/config.json, report.html); otherwise the stage
function is called, and resumes from its own partial state where it has one (curation task
markers, packing chunks, training checkpoints). ``from_stage`` redoes that stage and every later
one; ``only`` redoes just that one. Redoing never deletes: a stage that starts over moves its
previous output aside (``train.prev-1/``, ``data.prev-1/``, ...), and ``run.json``'s
``set_aside`` lists those copies. Training resumes (rather than restarts) when only keys that do
not change the steps already taken differ (``smelt.train.trainer.RESUMABLE_TRAIN_KEYS``), and
stops with the differing keys otherwise; the train stage is complete only while its final
checkpoint verifies by content.

One writer at a time: `run` holds ``runs/<name>/.smelt.lock`` (`smelt.fsutil.run_lock`) for its
whole duration. Disk-full and permission errors end the stage as "failed" with one sentence
naming the path (`smelt.fsutil.describe_os_error`); Ctrl-C ends it as "interrupted".

Stages whose implementation is not in this build (``smelt.eval.runner``,
``smelt.interop.hf``) are logged and recorded as ``unavailable``; the report says "stage not run".
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib.util
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import smelt.quality  # noqa: F401  (registers the model-based curation steps: quality, perplexity, toxicity)
from smelt.config import (
    Recipe,
    RecipeError,
    apply_override,
    config_hash,
    parse_recipe,
    read_recipe_tree,
    recipe_to_dict,
    write_resolved_recipe,
)
from smelt.fsutil import (
    RemoteStoreError,
    RunMirror,
    activate_mirror,
    atomic_write_json,
    describe_os_error,
    read_json,
    run_lock,
    set_aside,
    staged,
)

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("data", "tokenizer", "pack", "train", "eval", "export", "report")
RUN_VERSION = 1
DEMO_ENV = "SMELT_DEMO"  # full | tiny: the built-in demo's size (the tests use tiny)
RUN_DIR_VAR = "${run_dir}"
STDLIB_VAR = "${stdlib}"  # the running Python's standard library: a code corpus every machine has


class StageProgress(Protocol):
    """What `run` drives for a progress display (the CLI's RichProgress)."""

    def start(self, phase: str, total: int) -> None: ...

    def advance(self, phase: str) -> None: ...

    def update(self, phase: str, done: int, total: int) -> None: ...


class LazyProgress:
    """A `StageProgress` that opens a display (``factory()``, a context manager) on first use and
    closes it at the end of each stage, so that no two live displays overlap (the trainer
    opens its own progress bar)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.cm: Any = None
        self.display: Any = None

    def _get(self) -> Any:
        if self.display is None:
            self.cm = self.factory()
            self.display = self.cm.__enter__()
        return self.display

    def start(self, phase: str, total: int) -> None:
        self._get().start(phase, total)

    def advance(self, phase: str) -> None:
        self._get().advance(phase)

    def update(self, phase: str, done: int, total: int) -> None:
        self._get().update(phase, done, total)

    def close(self) -> None:
        if self.cm is not None:
            self.cm.__exit__(None, None, None)
        self.cm = self.display = None


class StageFailed(RuntimeError):
    """A stage raised; run.json records it and the message names the stage."""


class StageInterrupted(KeyboardInterrupt):
    """A stage stopped cleanly on Ctrl-C (training saved a checkpoint); run.json says "interrupted"."""


# --------------------------------------------------------------------------------------------
# run directories on object stores

# The stages that work on a run directory at an fsspec URL; the others read and write it in ways
# a local stage cannot mirror file by file (memory-mapped token shards, checkpoints, TensorBoard's
# appended event files) and need it on a local or shared filesystem.
STORE_STAGES: tuple[str, ...] = ("data", "tokenizer", "pack")


def use_store(recipe: Recipe, stages: list[str] | tuple[str, ...]) -> RunMirror | None:
    """With `runs_dir` an fsspec URL, mirror this process's run directory (``recipe.run_dir``, the
    local stage) to ``recipe.run_url`` for `stages`; None for a local `runs_dir`.

    A RecipeError for a stage outside `STORE_STAGES` or a filesystem that cannot be opened. The
    small files that say what is done are taken from the store, not from this machine's copy, and
    the tokenizer's and packing's outputs are pulled for the stages that read them."""
    url = recipe.run_url
    if url is None:
        return None
    other = [s for s in stages if s not in STORE_STAGES]
    if other:
        raise RecipeError(f"runs_dir {recipe.runs_dir} is a URL: {', '.join(STORE_STAGES)} run against an object "
                          f"store, but {', '.join(other)} need(s) a local or shared run directory (copy {url} down "
                          "and point runs_dir at the copy, or set run.stages to those three)")
    m = RunMirror(url, recipe.run_dir)
    try:
        _ = m.fs
    except RemoteStoreError as e:
        raise RecipeError(str(e)) from None
    activate_mirror(m)
    run_dir = recipe.run_dir
    m.fetch(run_dir / "run.json")  # read by plain path (RunState.load)
    # read by plain paths too (the tokenizer's up-to-date check, pack's shard checks)
    if "tokenizer" in stages or "pack" in stages:
        m.pull(run_dir / "tokenizer")
    if "pack" in stages:
        m.pull(run_dir / "tokens")
    log.info("run directory %s (working copy %s)", url, run_dir)
    return m


# --------------------------------------------------------------------------------------------
# recipes: the built-in demo, ${run_dir}, the tiny overlay


def demo_recipe_path() -> Path:
    return Path(str(resources.files("smelt") / "resources" / "demo.yaml"))


def _tiny_overlay_path() -> Path:
    return Path(str(resources.files("smelt") / "resources" / "demo-tiny.yaml"))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _substitute(node: Any, run_dir: str) -> Any:
    if isinstance(node, str):
        if STDLIB_VAR in node:
            import sysconfig

            node = node.replace(STDLIB_VAR, sysconfig.get_paths()["stdlib"])
        return node.replace(RUN_DIR_VAR, run_dir)
    if isinstance(node, list):
        return [_substitute(v, run_dir) for v in node]
    if isinstance(node, dict):
        return {k: _substitute(v, run_dir) for k, v in node.items()}
    return node


def _read_tree(path: Path) -> dict[str, Any]:
    return read_recipe_tree(path)


def load_run_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """The recipe `smelt run` executes: `path` (None: the built-in demo) with overrides applied.

    With ``run.demo`` on, the size comes from ``--set run.demo=...``, else ``$SMELT_DEMO``, else
    the recipe; ``tiny`` also applies the packaged tiny overlay (smaller model, fewer steps),
    under the user's overrides. ``${run_dir}`` in any string becomes ``<runs_dir>/<name>`` and
    ``${stdlib}`` the running Python's standard-library directory.
    """
    overrides = list(overrides or [])
    base = _read_tree(Path(path) if path is not None else demo_recipe_path())
    tree = copy.deepcopy(base)
    for ov in overrides:
        apply_override(tree, ov)
    run_sec = tree.get("run") or {}
    demo = run_sec.get("demo", "off") if isinstance(run_sec, dict) else "off"
    env = os.environ.get(DEMO_ENV)
    if demo != "off" and env and not any(o.split("=", 1)[0].strip() == "run.demo" for o in overrides):
        if env not in ("full", "tiny"):
            raise RecipeError(f"${DEMO_ENV}={env!r}: expected full or tiny")
        demo = env
    if demo == "tiny":
        tree = _deep_merge(base, _read_tree(_tiny_overlay_path()))
        tree.setdefault("run", {})["demo"] = "tiny"
        for ov in overrides:
            apply_override(tree, ov)
    elif demo != "off":
        tree.setdefault("run", {})["demo"] = demo
    runs_dir, name = str(tree.get("runs_dir", "runs")), str(tree.get("name", "run"))
    # a runs_dir URL stays a URL (Path would fold "s3://" into "s3:/"): inputs under it are read through fsspec
    run_dir = f"{runs_dir.rstrip('/')}/{name}" if "://" in runs_dir else str(Path(runs_dir) / name)
    return parse_recipe(_substitute(tree, run_dir))


# --------------------------------------------------------------------------------------------
# run.json


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class RunState:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        p = run_dir / "run.json"
        data: dict[str, Any] = {}
        if p.is_file():
            try:
                data = read_json(p)
            except ValueError:
                log.warning("run: %s is not valid JSON; starting a new one", p)
        data.setdefault("version", RUN_VERSION)
        data.setdefault("stages", {})
        return cls(p, data)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def save(self) -> None:
        self.data["stages"] = {s: self.data["stages"][s] for s in STAGES if s in self.data["stages"]}
        atomic_write_json(self.path, self.data)


# --------------------------------------------------------------------------------------------
# stages


@dataclass
class Ctx:
    recipe: Recipe
    run_dir: Path
    progress: StageProgress | None
    force: bool = False
    upstream_key: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """One pipeline stage: its key, its completion marker and the call that does the work."""

    name: str
    key: Callable[[Ctx], str]
    done: Callable[[Ctx], bool]
    execute: Callable[[Ctx], dict[str, Any]]
    available: Callable[[], str | None] = lambda: None  # reason it cannot run, or None
    configured: Callable[[Recipe], str | None] = lambda r: None  # reason it is not configured


def _module_missing(name: str) -> str | None:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{name} is not part of this build"


def _shards(ctx: Ctx) -> dict[str, list[Path]]:
    from smelt.tokenizer.train import input_files

    return input_files(ctx.run_dir, ctx.recipe.tokenizer.inputs if ctx.recipe.tokenizer is not None else None)


def _marker(ctx: Ctx, rel: str, key: str = "complete") -> bool:
    p = ctx.run_dir / rel
    if not staged(p).is_file():
        return False
    if not key:
        return True
    try:
        return bool(read_json(p).get(key))
    except ValueError:
        return False


# data ------------------------------------------------------------------------------------------

def _data_key(ctx: Ctx) -> str:
    from smelt.data.curate import plan_tasks, stage_key
    from smelt.data.io import DataInputError

    assert ctx.recipe.data is not None
    try:  # planning lists the inputs: a missing or unreachable one is the user's to fix
        return stage_key(ctx.recipe.data, plan_tasks(ctx.recipe.data))
    except DataInputError as e:
        raise RecipeError(str(e)) from None


def _data_run(ctx: Ctx) -> dict[str, Any]:
    from smelt.data.curate import Progress, run_data_stage
    from smelt.data.io import DataInputError

    assert ctx.recipe.data is not None
    p = ctx.progress
    prog = Progress(start=p.start, advance=p.advance) if p is not None else None
    try:
        stats = run_data_stage(ctx.recipe.data, ctx.run_dir, progress=prog, force=ctx.force)
    except DataInputError as e:
        raise RecipeError(str(e)) from None
    return {"documents": stats["documents"], "bytes": stats["bytes"]}


# tokenizer -------------------------------------------------------------------------------------

def _tok_cfg(ctx: Ctx) -> Any:
    from smelt.config import TokenizerConfig

    return ctx.recipe.tokenizer or TokenizerConfig()


def _tok_key(ctx: Ctx) -> str:
    from smelt.tokenizer.train import fingerprint

    return fingerprint(_tok_cfg(ctx), _shards(ctx), ctx.recipe.seed)[:16]


def _tok_done(ctx: Ctx) -> bool:
    from smelt.tokenizer.train import is_up_to_date

    out = ctx.run_dir / "tokenizer"
    return is_up_to_date(out, _tok_cfg(ctx), _shards(ctx), ctx.recipe.seed) and (out / "eval.json").is_file()


def _tok_run(ctx: Ctx) -> dict[str, Any]:
    from smelt.tokenizer.evaluate import evaluate_tokenizer
    from smelt.tokenizer.train import is_up_to_date, train_tokenizer

    cfg, shards, out = _tok_cfg(ctx), _shards(ctx), ctx.run_dir / "tokenizer"
    if ctx.force or not is_up_to_date(out, cfg, shards, ctx.recipe.seed):
        stats = train_tokenizer(cfg, shards, out, ctx.recipe.seed)
    else:
        stats = read_json(out / "stats.json")
    # Compression per domain for the report (what `smelt tokenizer eval` writes).
    result = evaluate_tokenizer(out / "tokenizer.json", shards, cfg.eval_docs_per_domain)
    atomic_write_json(out / "eval.json", result)
    return {"vocab_size": stats["vocab_size"], "train_chars": stats["train_chars"]}


# pack ------------------------------------------------------------------------------------------

def _pack_cfg(ctx: Ctx) -> Any:
    from smelt.config import PackConfig

    return ctx.recipe.pack or PackConfig()


def _pack_key(ctx: Ctx) -> str:
    from smelt.tokenizer.train import tokenizer_sha256
    from smelt.tokens.pack import stage_key

    tok = ctx.run_dir / "tokenizer" / "tokenizer.json"
    sha = tokenizer_sha256(tok) if tok.is_file() else "none"
    return stage_key(_pack_cfg(ctx), sha, _shards(ctx), ctx.recipe.seed)[:16]


def _pack_run(ctx: Ctx) -> dict[str, Any]:
    from smelt.tokens.pack import pack_tokens

    tok = ctx.run_dir / "tokenizer" / "tokenizer.json"
    if not tok.is_file():
        raise RecipeError(f"{tok} not found (the tokenizer stage has not run)")
    p = ctx.progress
    m = pack_tokens(_pack_cfg(ctx), tok, _shards(ctx), ctx.run_dir / "tokens", ctx.recipe.seed,
                    progress=p.update if p is not None else None, force=ctx.force)
    return {"tokens": m["totals"]["tokens"], "docs": m["totals"]["docs"], "vocab_size": m["vocab_size"]}


# train -----------------------------------------------------------------------------------------

def _train_key(ctx: Ctx) -> str:
    from smelt.config import resolve_model_config
    from smelt.train.resume import run_config_hash

    tm = ctx.run_dir / "tokens" / "manifest.json"
    manifest = read_json(tm) if tm.is_file() else {}
    return config_hash({"train": run_config_hash(ctx.recipe, resolve_model_config(ctx.recipe, manifest)),
                        "tokens": manifest.get("key")})


def _train_done(ctx: Ctx) -> bool:
    """train/manifest.json complete, and the checkpoint it names still verifies by content."""
    from smelt.train.checkpoint import verify_checkpoint

    if not _marker(ctx, "train/manifest.json"):
        return False
    name = read_json(ctx.run_dir / "train" / "manifest.json").get("checkpoint")
    if not name:
        return False
    problem = verify_checkpoint(ctx.run_dir / name)
    if problem is not None:
        log.warning("train: the final checkpoint %s no longer verifies (%s); training is not complete: resuming "
                    "from the newest checkpoint that does", name, problem)
        return False
    return True


def _train_run(ctx: Ctx) -> dict[str, Any]:
    from smelt.eval.runner import InTrainingEvaluator
    from smelt.train.trainer import train

    if not (ctx.run_dir / "tokens" / "manifest.json").is_file():
        raise RecipeError(f"{ctx.run_dir / 'tokens'} has no manifest (the pack stage has not run)")
    # Resume whatever is there (the trainer stops with the differing keys when the recipe changed
    # what the steps already taken depend on); start over, moving train/ aside, only when asked.
    summary = train(ctx.recipe, ctx.run_dir, resume=False if ctx.force else None, progress=ctx.progress is not None,
                    evaluator=InTrainingEvaluator(ctx.recipe, ctx.run_dir))
    if summary.get("interrupted"):
        raise StageInterrupted(f"training interrupted at step {summary.get('steps')} (checkpoint saved)")
    if not summary.get("complete"):
        raise StageFailed(f"training stopped before train.max_steps: {summary.get('stopped')}")
    return {k: summary.get(k) for k in ("steps", "tokens", "final_loss", "val_loss", "tokens_per_s", "mfu",
                                         "checkpoint")}


# eval / export / report ------------------------------------------------------------------------

def _section_key(ctx: Ctx, section: str) -> str:
    sec = getattr(ctx.recipe, section, None)
    tm = ctx.run_dir / "train" / "manifest.json"
    ckpt = read_json(tm).get("checkpoint") if tm.is_file() else None
    return config_hash({section: recipe_to_dict(sec) if sec is not None else None, "checkpoint": ckpt})


def _eval_run(ctx: Ctx) -> dict[str, Any]:
    from smelt.eval.runner import run_eval  # type: ignore[import-not-found]

    res = run_eval(ctx.recipe, ctx.run_dir)
    ppl = res.get("perplexity") or {}
    return {"checkpoint": res.get("checkpoint"),
            "bits_per_byte": {d: v.get("bits_per_byte") for d, v in ppl.items() if isinstance(v, dict)},
            "tasks": {t: v.get("acc") for t, v in (res.get("tasks") or {}).items() if isinstance(v, dict)}}


def _export_run(ctx: Ctx) -> dict[str, Any]:
    from smelt.interop.hf import export_run  # type: ignore[import-not-found]

    out = export_run(ctx.recipe, ctx.run_dir, force=ctx.force)
    return {"path": str(out)}


def _report_key(ctx: Ctx) -> str:
    return config_hash({"run": recipe_to_dict(ctx.recipe.run), "upstream": ctx.upstream_key})


def _report_run(ctx: Ctx) -> dict[str, Any]:
    from smelt.report import generate_samples, write_report

    generate_samples(ctx.run_dir, ctx.recipe)
    return {"path": str(write_report(ctx.run_dir))}


def _no_section(section: str) -> Callable[[Recipe], str | None]:
    return lambda r: None if getattr(r, section) is not None else f"the recipe has no `{section}:` section"


PIPELINE: dict[str, Stage] = {s.name: s for s in [
    Stage("data", _data_key, lambda c: _marker(c, "data/manifest.json"), _data_run, configured=_no_section("data")),
    Stage("tokenizer", _tok_key, _tok_done, _tok_run),
    Stage("pack", _pack_key, lambda c: _marker(c, "tokens/manifest.json"), _pack_run),
    Stage("train", _train_key, _train_done, _train_run),
    Stage("eval", lambda c: _section_key(c, "eval"), lambda c: _marker(c, "eval/results.json", ""), _eval_run,
          available=lambda: _module_missing("smelt.eval.runner")),
    Stage("export", lambda c: _section_key(c, "export"), lambda c: _marker(c, "export/config.json", ""), _export_run,
          available=lambda: _module_missing("smelt.interop.hf")),
    Stage("report", _report_key, lambda c: _marker(c, "report.html", ""), _report_run),
]}


# --------------------------------------------------------------------------------------------
# the driver


def _save_state_after_failure(state: RunState) -> None:
    """Record the failure even on a full disk: run.json is small, so retry a few times (the
    failed stage's temporary files are removed as its exception unwinds, freeing space)."""
    for attempt in range(3):
        try:
            state.save()
            return
        except OSError as e:
            if attempt == 2:
                log.error("run: cannot record the failure in %s (%s)", state.path, describe_os_error(e) or e)
            time.sleep(0.2)


def _close(progress: StageProgress | None) -> None:
    close = getattr(progress, "close", None)
    if close is not None:
        close()


def _check_stage(name: str | None, what: str) -> None:
    if name is not None and name not in STAGES:
        raise RecipeError(f"{what} {name!r}: expected one of {', '.join(STAGES)}")


def run(recipe: Recipe, *, from_stage: str | None = None, only: str | None = None,
        progress: StageProgress | None = None, source: str | None = None) -> dict[str, Any]:
    """Run the recipe's stages in order into ``recipe.run_dir``; returns run.json's content.

    ``from_stage``: redo this stage and every later one. ``only``: redo just this stage.
    ``progress``: a progress display (None: logging only). ``source``: the recipe's origin,
    recorded in the resolved ``recipe.yaml``.
    """
    _check_stage(from_stage, "--from")
    _check_stage(only, "--only")
    if from_stage and only:
        raise RecipeError("--from and --only exclude each other")
    use_store(recipe, [s for s in STAGES if s in recipe.run.stages] if only is None else [only])
    with run_lock(recipe.run_dir, "smelt run"):
        return _run_locked(recipe, from_stage, only, progress, source)


def _run_locked(recipe: Recipe, from_stage: str | None, only: str | None, progress: StageProgress | None,
                source: str | None) -> dict[str, Any]:
    run_dir = write_resolved_recipe(recipe, source or "the built-in demo")
    if recipe.run.demo != "off":
        from smelt.demo.corpus import build_corpus

        t0 = time.perf_counter()
        build_corpus(run_dir / "corpus", recipe.run.demo, seed=recipe.seed)
        log.info("run: demo corpus ready in %.1fs", time.perf_counter() - t0)
    state = RunState.load(run_dir)
    state.data["recipe_hash"] = config_hash(recipe)
    state.data["last_invocation"] = {"started_at": _now(), "from": from_stage, "only": only}
    selected = [s for s in STAGES if s in recipe.run.stages]
    if only is not None:
        selected = [only]
    forced_from = STAGES.index(from_stage) if from_stage else len(STAGES)
    upstream = ""
    t_all = time.perf_counter()
    for name in selected:
        stage = PIPELINE[name]
        rec = state.stage(name)
        why_not = stage.configured(recipe) or stage.available()
        if why_not:
            log.warning("%s: skipped: %s (stage not run)", name, why_not)
            rec.update(status="unavailable" if stage.available() else "not_configured", action="skipped",
                       reason=why_not, key=None)
            state.save()
            continue
        ctx = Ctx(recipe, run_dir, progress, upstream_key=upstream,
                  force=(only == name) or STAGES.index(name) >= forced_from)
        key = config_hash({"stage": stage.key(ctx), "upstream": upstream})
        if not ctx.force and rec.get("status") == "complete" and rec.get("key") == key and stage.done(ctx):
            log.info("%s: up to date, skipping", name)
            rec["action"] = "up to date"
            state.save()
            upstream = key
            continue
        resumed = rec.get("status") in ("running", "failed") and rec.get("key") == key and not ctx.force
        log.info("%s: %s", name, "resuming" if resumed else "running")
        rec.update(status="running", key=key, started_at=_now(), ended_at=None, error=None,
                   action="resumed" if resumed else "ran")
        state.save()
        t0 = time.perf_counter()
        try:
            summary = stage.execute(ctx)
        except BaseException as e:
            _close(progress)
            interrupted = isinstance(e, KeyboardInterrupt)
            disk = describe_os_error(e)
            rec.update(status="interrupted" if interrupted else "failed", ended_at=_now(),
                       duration_s=round(time.perf_counter() - t0, 3),
                       error=(str(e) or "interrupted") if interrupted else disk or f"{type(e).__name__}: {e}")
            state.data["set_aside"] = set_aside(run_dir)
            _save_state_after_failure(state)
            if isinstance(e, (RecipeError, KeyboardInterrupt, StageFailed)):
                raise
            log.debug("%s", traceback.format_exc())
            if disk is not None:
                raise StageFailed(f"{name} failed: {disk}") from e
            raise StageFailed(f"{name} failed: {type(e).__name__}: {e}") from e
        _close(progress)
        rec.update(status="complete", ended_at=_now(), duration_s=round(time.perf_counter() - t0, 3),
                   summary=summary)
        state.data["set_aside"] = set_aside(run_dir)
        if name != "report":
            # the key of what the stage produced (recomputed: e.g. data's files now exist)
            rec["key"] = key = config_hash({"stage": stage.key(ctx), "upstream": upstream})
        state.save()
        log.info("%s: done in %.1fs", name, rec["duration_s"])
        upstream = key
    state.data["last_invocation"]["ended_at"] = _now()
    state.data["last_invocation"]["duration_s"] = round(time.perf_counter() - t_all, 3)
    state.data["last_invocation"]["ran"] = [s for s in selected if state.stage(s).get("action") in ("ran", "resumed")]
    state.save()
    return state.data
