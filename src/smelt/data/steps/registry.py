"""The step registry: step name -> factory, for the built-in steps and for steps from above.

Curation builds its per-document steps by name (`smelt.data.curate.build_pipeline`). The
built-in steps (``normalize`` ... ``pii``) are registered at the bottom of this module and
configured by their own recipe sections (``data.normalize``, ``data.heuristics.c4``, ...).
Steps that need a model (a quality classifier, a reference LM's perplexity) live above the
model layer and register here at import time, so that `smelt.data` never imports
`smelt.model` or `smelt.train`::

    # smelt/quality/classifier.py
    class QualityOptions(BaseModel):            # the step's settings, validated before any work
        model: str
        threshold: float = 0.5

    def build(options: QualityOptions, context: StepContext) -> Step:
        return QualityFilter(options)             # a smelt.data.pipeline.Step

    register_step("quality", "smelt.quality.classifier:build",
                  options="smelt.quality.classifier:QualityOptions")

and a recipe turns it on under ``data.steps``; registered steps run in that order, after the
rule-based filters (blocklist) and before PII redaction (which rewrites text)::

    data:
      steps:
        - {name: quality, domains: [web], options: {model: fasttext.bin, threshold: 0.6}}

A name that is not registered, or options its model refuses, is a `RecipeError` naming the key
path, raised when the stage is planned (`check_steps`), before any work.

Workers are spawned processes that import modules fresh, so an entry is a ``"module:attr"``
path, not an object (see `smelt.data.plugins`): the parent sends its entries with every task
(`registered_steps` / `restore_steps`), and a worker imports a factory when it first builds
the pipeline. A factory is ``factory(config, context) -> Step``; `config` is the step's recipe
section (built-in steps) or its validated options (registered steps), `context` a
`StepContext`. An optional ``prepare(config, context)`` runs once in the parent before the
filter phase, for work that all tasks share (the decontamination index is built there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smelt.data.plugins import import_path, load
from smelt.fsutil import staged

if TYPE_CHECKING:
    from smelt.config import DataConfig
    from smelt.data.pipeline import Step

__all__ = [
    "BUILTIN_STEPS",
    "StepContext",
    "StepEntry",
    "build_step",
    "check_steps",
    "register_step",
    "registered_steps",
    "restore_steps",
    "step_options",
    "unregister_step",
]


@dataclass(frozen=True)
class StepContext:
    """What a factory may need besides its own config."""

    data: DataConfig        # the whole `data:` section (heuristics share one CJK threshold)
    work_dir: Path | None   # the stage's _work/ directory: where `prepare` leaves shared files


@dataclass(frozen=True)
class StepEntry:
    """One registered step. Only strings: entries travel to worker processes as they are."""

    name: str
    factory: str                  # "module:attr" of factory(config, context) -> Step
    options: str | None = None    # "module:attr" of a pydantic model for the recipe's `options`
    prepare: str | None = None    # "module:attr" of prepare(config, context), run once in the parent


_STEPS: dict[str, StepEntry] = {}

# The built-in steps, each configured by its own recipe section (`data.<name>`, the heuristics
# under `data.heuristics.<name>`); `data.steps` cannot name them.
BUILTIN_STEPS = ("normalize", "language", "decontam", "gopher_quality", "gopher_repetition", "c4",
                 "fineweb", "blocklist", "pii")
_HEURISTICS = ("gopher_quality", "gopher_repetition", "c4", "fineweb")


def register_step(name: str, factory: Callable[..., Step] | str | None = None, *,
                  options: type | str | None = None, prepare: Callable[..., None] | str | None = None,
                  replace: bool = False) -> Any:
    """Register step `name`, built by `factory` (a ``"module:attr"`` path or a module-level function).

    `options` is a pydantic model (or its path) that the recipe's ``options`` must satisfy; its
    instance is what the factory gets (a plain dict without one). Without `factory` this
    returns a decorator. A name already taken raises ``ValueError`` unless `replace`.
    """
    if factory is None:
        def deco(fn: Callable[..., Step]) -> Callable[..., Step]:
            register_step(name, fn, options=options, prepare=prepare, replace=replace)
            return fn
        return deco
    what = f"step {name!r}"
    entry = StepEntry(name=name, factory=import_path(factory, what),
                      options=import_path(options, what) if options is not None else None,
                      prepare=import_path(prepare, what) if prepare is not None else None)
    old = _STEPS.get(name)
    if old is not None and old != entry and not replace:
        raise ValueError(f"step {name!r} is already registered ({old.factory}); pass replace=True to replace it")
    _STEPS[name] = entry
    return None


def unregister_step(name: str) -> None:
    """Remove step `name` (tests; a missing name is ignored)."""
    _STEPS.pop(name, None)


def registered_steps() -> dict[str, StepEntry]:
    """A copy of the registry: what the parent sends to its worker processes."""
    return dict(_STEPS)


def restore_steps(entries: dict[str, StepEntry]) -> None:
    """Make this process's registry hold `entries` (in a worker: the parent's registrations)."""
    _STEPS.update(entries)


def _entry(name: str) -> StepEntry:
    entry = _STEPS.get(name)
    if entry is None:
        raise KeyError(f"no step registered as {name!r} (registered: {', '.join(sorted(_STEPS))})")
    return entry


def step_options(name: str, options: dict[str, Any]) -> Any:
    """`options` validated by the step's options model (unchanged when it has none)."""
    entry = _entry(name)
    if entry.options is None:
        return options
    return load(entry.options).model_validate(options)


def check_steps(cfg: DataConfig) -> None:
    """Every ``data.steps`` entry names a registered step and has valid options; `RecipeError` if not."""
    from pydantic import ValidationError

    from smelt.config import RecipeError

    problems = []
    for i, s in enumerate(cfg.steps):
        key = f"data.steps.{i}"
        if s.name in BUILTIN_STEPS:
            section = f"heuristics.{s.name}" if s.name in _HEURISTICS else s.name
            problems.append(f"{key}.name: {s.name!r} is a built-in step; configure it under data.{section}")
            continue
        if s.name not in _STEPS:
            known = sorted(set(_STEPS) - set(BUILTIN_STEPS))
            problems.append(f"{key}.name: unknown step {s.name!r}; registered steps: "
                            f"{', '.join(known) if known else 'none (a step registers when its module is imported)'}")
            continue
        try:
            step_options(s.name, s.options)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(f"{key}.options{'.' + loc if loc else ''}: {err['msg']}")
        except ImportError as e:
            problems.append(f"{key}.name: step {s.name!r} cannot be loaded: {e}")
    names = [s.name for s in cfg.steps]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"data.steps: step {n!r} is listed more than once")
    if problems:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems))


def prepare_step(name: str, config: Any, context: StepContext) -> None:
    """Run the step's `prepare` hook, if it has one (in the parent, before the filter phase)."""
    entry = _entry(name)
    if entry.prepare is not None:
        load(entry.prepare)(config, context)


def build_step(name: str, config: Any, context: StepContext) -> Step:
    """The step `name`, built by its factory from `config` (section, or validated options)."""
    step = load(_entry(name).factory)(config, context)
    if step.name != name:  # stats and rejects are keyed by the step's own name
        raise ValueError(f"step registered as {name!r} builds a step named {step.name!r}")
    return step


# --------------------------------------------------------------------------------------------
# the built-in steps: factories import their module when first used


def _normalize(cfg: Any, ctx: StepContext) -> Step:
    from smelt.data.steps.normalize import Normalizer

    return Normalizer(cfg)


def _language(cfg: Any, ctx: StepContext) -> Step:
    from smelt.data.steps.language import LanguageFilter

    return LanguageFilter(cfg)


_DECONTAM_INDEX = "decontam_index.npz"


def _decontam_prepare(cfg: Any, ctx: StepContext) -> None:
    """Build the n-gram index of the evaluation sets once; every task loads it."""
    if ctx.work_dir is None:
        return
    path = ctx.work_dir / _DECONTAM_INDEX
    if not staged(path).is_file():  # a resumed run reuses it (this machine's, or the store's)
        from smelt.data.steps.decontam import DecontamIndex

        DecontamIndex.from_config(cfg).save(path)


def _decontam(cfg: Any, ctx: StepContext) -> Step:
    from smelt.data.steps.decontam import DecontamFilter, DecontamIndex

    index = None
    if ctx.work_dir is not None and staged(ctx.work_dir / _DECONTAM_INDEX).is_file():
        index = DecontamIndex.load(ctx.work_dir / _DECONTAM_INDEX)
    return DecontamFilter(cfg, index)


def _heuristic(cls_name: str) -> Callable[[Any, StepContext], Step]:
    def factory(cfg: Any, ctx: StepContext) -> Step:
        from smelt.data.steps import heuristics

        # Every heuristic gets gopher_quality's CJK threshold (see build_heuristic_steps).
        return getattr(heuristics, cls_name)(cfg, ctx.data.heuristics.gopher_quality.zh_min_cjk_ratio)
    return factory


_gopher_quality = _heuristic("GopherQualityFilter")
_gopher_repetition = _heuristic("GopherRepetitionFilter")
_c4 = _heuristic("C4Filter")
_fineweb = _heuristic("FineWebFilter")


def _blocklist(cfg: Any, ctx: StepContext) -> Step:
    from smelt.data.steps.blocklist import BlocklistFilter

    return BlocklistFilter(cfg)


def _pii(cfg: Any, ctx: StepContext) -> Step:
    from smelt.data.steps.redact import PIIRedactor

    return PIIRedactor(cfg)


register_step("normalize", f"{__name__}:_normalize")
register_step("language", f"{__name__}:_language")
register_step("decontam", f"{__name__}:_decontam", prepare=f"{__name__}:_decontam_prepare")
register_step("gopher_quality", f"{__name__}:_gopher_quality")
register_step("gopher_repetition", f"{__name__}:_gopher_repetition")
register_step("c4", f"{__name__}:_c4")
register_step("fineweb", f"{__name__}:_fineweb")
register_step("blocklist", f"{__name__}:_blocklist")
register_step("pii", f"{__name__}:_pii")
