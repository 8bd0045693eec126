"""The curation stage (`smelt data`): input files -> clean shards, rejects, duplicates, stats.

Work is split into phases. Per-task phases run in the process pool (one task = a group of
input files, see `executor.local`); global phases are cheap array operations in one process.

    1 filter   (per task)  read -> normalize -> language -> decontam -> heuristics -> blocklist
                           -> registered steps (data.steps) -> pii, each built from the step
                           registry (`smelt.data.steps.registry`); rejects go straight to
                           rejects/; survivors go to a work shard with their exact-dedup key
                           and MinHash signature.
    2 dedup    (global)    exact duplicates (first occurrence wins), then MinHash LSH: one pass
                           per band -> candidate pairs -> union-find clusters (optionally with
                           Jaccard verification) -> duplicate map {order: kept order}.
    3 units    (per task)  line / 3-sentence-span hashes of the surviving documents.
    4 count    (global)    units seen in more than `max_repeats` documents.
    5 write    (per task)  duplicates/ (with duplicate_of), repeated units removed, clean/<domain>/.
    6 account              stats.json funnel; input = kept + rejected + duplicates or the run fails.

Every document has a global `order` = (task index << 32) | position in the task, which is its
place in corpus order. Whenever one document of a group must be kept, it is the one with the
smallest order, so the result does not depend on scheduling.

Layout under ``<run>/data/``: ``clean/<domain>/part-NNNNN.<fmt>``, ``rejects/``,
``duplicates/``, ``stats.json``, ``manifest.json``, and ``_work/`` while running.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smelt.config import DataConfig, RecipeError, RegisteredStepConfig, StepConfig, config_hash, recipe_to_dict
from smelt.data.document import Document
from smelt.data.executor.local import default_workers, make_pool, run_tasks
from smelt.data.pipeline import Step, StepStats, mark_rejected
from smelt.fsutil import (
    active_mirror,
    atomic_write_json,
    locked,
    mirrored,
    move_aside,
    pull,
    read_json,
    remove_path,
    staged,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WORK = "_work"


class AccountingError(RuntimeError):
    """The funnel does not add up: some document was lost or counted twice."""


# --------------------------------------------------------------------------------------------
# planning


@dataclass
class Plan:
    files: list[tuple[int, str]]  # (input source index, file path)
    # task -> its pieces: a file index (the whole file), or [file index, start, end, records
    # before start] for part of a file split by `max_task_mb` (bytes of a JSON-lines file, row
    # groups of a Parquet file; `smelt.data.readers.base.FileReader.part`)
    tasks: list[list[Any]]
    # task -> its output index: the task it would be without `max_task_mb` (a group of
    # `files_per_task` files). The parts of a split file share their file's output index, and
    # their outputs are written as that one task's shards, with the same bytes.
    groups: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "tasks": self.tasks, "groups": self.groups}

    def split(self) -> bool:
        """Whether some output index has several tasks (a file was split into parts)."""
        return len(set(self.groups)) < len(self.groups)

    def parts(self) -> list[list[int]]:
        """The pieces that are parts of files (empty when every task reads whole files)."""
        return [p for t in self.tasks for p in t if isinstance(p, list)]


def plan_tasks(cfg: DataConfig) -> Plan:
    """Resolve every input to files and check the registered steps (errors here come before any
    work), and group the files into tasks."""
    from smelt.data.inputs import resolve_files
    from smelt.data.steps.registry import check_steps

    check_steps(cfg)
    if cfg.dedup.minhash.enabled and cfg.dedup.minhash.hash_family == "rensa":
        from smelt.data.dedup.minhash import load_rensa

        try:
            load_rensa()
        except ImportError as e:
            raise RecipeError(f"data.{e}") from None
    if cfg.executor.kind == "ray":
        from smelt.data.executor.ray_tasks import check_ray

        check_ray()
    from smelt.data.readers import split_file

    files: list[tuple[int, str]] = []
    for si, src in enumerate(cfg.inputs):
        for f in resolve_files(src):
            files.append((si, f))
    max_bytes = int(cfg.max_task_mb * 2**20) if cfg.max_task_mb is not None else None
    tasks: list[list[Any]] = []
    groups: list[int] = []
    fpt = cfg.files_per_task
    for g, start in enumerate(range(0, len(files), fpt)):  # the groups of whole files, as without parts
        run: list[Any] = []
        for fi in range(start, min(start + fpt, len(files))):
            si, f = files[fi]
            parts = split_file(f, cfg.inputs[si], max_bytes) if max_bytes is not None else None
            if parts is None:
                run.append(fi)
                continue
            if run:
                tasks.append(run)
                groups.append(g)
                run = []
            tasks.extend([[[fi, *p]] for p in parts])
            groups.extend([g] * len(parts))
        if run:
            tasks.append(run)
            groups.append(g)
    return Plan(files=files, tasks=tasks, groups=groups)


def _file_fingerprint(path: str) -> list[Any]:
    p = Path(path)
    if p.exists():
        st = p.stat()
        return [path, st.st_size, int(st.st_mtime)]
    return [path]


def stage_key(cfg: DataConfig, plan: Plan) -> str:
    """What the stage's outputs depend on: the config, the input files (name, size, mtime) and,
    for registered steps and formats from outside smelt.data, the code they name."""
    from smelt.data.readers import registered_readers
    from smelt.data.steps.registry import registered_steps

    conf = recipe_to_dict(cfg)
    key: dict[str, Any] = {"config": conf, "version": FORMAT_VERSION,
                           "files": [_file_fingerprint(f) for _, f in plan.files]}
    del conf["executor"]  # where tasks run does not change what they write
    del conf["max_task_mb"]  # only the parts it makes (below) change the tasks
    if plan.parts():
        key["parts"] = plan.parts()
        key["groups"] = plan.groups
    if cfg.dedup.minhash.enabled and cfg.dedup.minhash.hash_family == "rensa":
        from smelt.data.dedup.minhash import rensa_version

        key["rensa"] = rensa_version()[1]  # its signatures change with its algorithm version
    if not conf["steps"]:
        del conf["steps"]  # the key of a recipe without registered steps is as it always was
    else:
        entries = registered_steps()
        key["steps"] = {s.name: [entries[s.name].factory, entries[s.name].options] for s in cfg.steps}
    outside = {n: e.read for n, e in registered_readers().items() if not e.read.startswith("smelt.data.")}
    if outside:
        key["readers"] = outside
    return config_hash(key)


# --------------------------------------------------------------------------------------------
# step assembly (runs inside each worker process, once)


@dataclass
class Pipeline:
    steps: list[tuple[Step, StepConfig | None]]
    read: Step
    hasher: Any  # MinHasher or None

    def step_names(self) -> list[str]:
        return ["read"] + [s.name for s, _ in self.steps]


class ReadCheck(Step):
    """Read-level rejects: records the reader could not parse, empty and oversized documents."""

    name = "read"

    def __init__(self, min_chars: int, max_chars: int) -> None:
        super().__init__()
        self.min_chars = min_chars
        self.max_chars = max_chars

    def process(self, doc: Document) -> str | None:
        err = doc.meta.get("read_error")
        if err:
            return str(err)
        n = len(doc.text)
        if n > self.max_chars:
            return "too_long"
        if n < self.min_chars or not doc.text.strip():
            return "empty"
        return None


def pipeline_steps(cfg: DataConfig) -> list[tuple[str, StepConfig]]:
    """The enabled steps after ``read``, in the order they run, each with its recipe section.

    Decontamination comes before the heuristics: C4 rewrites text (drops unpunctuated lines) and
    could remove exactly the copied evaluation item that should have rejected the document.
    Gopher quality before repetition: see `build_heuristic_steps`. Registered steps
    (``data.steps``, e.g. a model-based quality filter) follow the rule-based filters, so the
    costly ones only see what the cheap ones kept. PII last: it rewrites text, and earlier steps
    (decontam in particular) should see the original.
    """
    h = cfg.heuristics
    named: list[tuple[str, StepConfig]] = [("normalize", cfg.normalize), ("language", cfg.language)]
    if cfg.decontam.sources:
        named.append(("decontam", cfg.decontam))
    named += [("gopher_quality", h.gopher_quality), ("gopher_repetition", h.gopher_repetition),
              ("c4", h.c4), ("fineweb", h.fineweb), ("blocklist", cfg.blocklist)]
    named += [(s.name, s) for s in cfg.steps]
    named.append(("pii", cfg.pii))
    return [(name, c) for name, c in named if c.enabled]


def _step_config(name: str, section: StepConfig) -> Any:
    """What a step's factory gets: its recipe section, or a registered step's validated options."""
    from smelt.data.steps.registry import step_options

    return step_options(name, section.options) if isinstance(section, RegisteredStepConfig) else section


def prepare_steps(cfg: DataConfig, work_dir: Path) -> None:
    """Each step's one-off shared work (the decontamination index), in this process."""
    from smelt.data.steps.registry import StepContext, prepare_step

    ctx = StepContext(data=cfg, work_dir=work_dir)
    for name, section in pipeline_steps(cfg):
        prepare_step(name, _step_config(name, section), ctx)


def build_pipeline(cfg: DataConfig, work_dir: Path | None) -> Pipeline:
    """The steps of `pipeline_steps`, each built by its factory in the step registry."""
    from smelt.data.steps.registry import StepContext, build_step

    ctx = StepContext(data=cfg, work_dir=work_dir)
    steps = [(build_step(name, _step_config(name, section), ctx), section)
             for name, section in pipeline_steps(cfg)]
    hasher = None
    if cfg.dedup.minhash.enabled:
        from smelt.data.dedup.minhash import MinHasher

        hasher = MinHasher(cfg.dedup.minhash)
    return Pipeline(steps=steps, read=ReadCheck(cfg.min_doc_chars, cfg.max_doc_chars), hasher=hasher)


def steps_before(cfg: DataConfig, name: str, work_dir: Path | None) -> Pipeline:
    """The pipeline up to (not including) step `name`: what a step's `prepare` runs to see a
    sample of documents as the step itself will see them (e.g. to set a top-fraction cutoff)."""
    from smelt.data.steps.registry import StepContext, build_step

    ctx = StepContext(data=cfg, work_dir=work_dir)
    steps = []
    for n, section in pipeline_steps(cfg):
        if n == name:
            break
        steps.append((build_step(n, _step_config(n, section), ctx), section))
    return Pipeline(steps=steps, read=ReadCheck(cfg.min_doc_chars, cfg.max_doc_chars), hasher=None)


def filter_documents(p: Pipeline, docs: list[Document]) -> list[Document]:
    """The documents of `docs` that `p`'s read check and steps keep (stats are not kept)."""
    ok = [d for d in docs if p.read.process(d) is None]
    return [d for d, r in zip(ok, _filter_batch(ok, p)) if r is None]


def registries() -> dict[str, Any]:
    """This process's reader and step registrations, sent with every task: spawned workers
    start with the built-in ones only (see `smelt.data.plugins`)."""
    from smelt.data.readers import registered_readers
    from smelt.data.steps.registry import registered_steps

    return {"readers": registered_readers(), "steps": registered_steps()}


def _restore_registries(reg: dict[str, Any] | None) -> None:
    if reg:
        from smelt.data.readers import restore_readers
        from smelt.data.steps.registry import restore_steps

        restore_readers(reg["readers"])
        restore_steps(reg["steps"])


_PIPELINES: dict[str, Pipeline] = {}


def _pipeline(cfg_json: str, work_dir: str | None) -> Pipeline:
    key = cfg_json + str(work_dir)
    p = _PIPELINES.get(key)
    if p is None:
        cfg = DataConfig.model_validate_json(cfg_json)
        p = _PIPELINES[key] = build_pipeline(cfg, Path(work_dir) if work_dir else None)
    return p


def _reset_stats(p: Pipeline) -> None:
    p.read.stats = StepStats()
    for s, _ in p.steps:
        s.stats = StepStats()


# --------------------------------------------------------------------------------------------
# phase 1: filter (per task)


def _sizes(doc: Document) -> tuple[int, int]:
    return len(doc.text.encode("utf-8", "surrogatepass")), len(doc.text)


BATCH_DOCS = 256  # documents a task sends through the steps together: a model-based step scores them at once
BATCH_CHARS = 8_000_000  # ... or fewer, so that a run of huge documents does not pile up in memory


def _filter_batch(docs: list[Document], p: Pipeline) -> list[tuple[str, str] | None]:
    """Each document's rejection ``(step, reason)``, or None when every step kept it. The steps run
    in order, each on the documents that the earlier ones kept and that its `domains` cover, so
    a document meets the same steps in the same order as it would alone."""
    outcome: list[tuple[str, str] | None] = [None] * len(docs)
    alive = list(range(len(docs)))
    for step, scfg in p.steps:
        idx = [i for i in alive if scfg is None or scfg.applies_to(docs[i].domain)]
        if not idx:
            continue
        for i, reason in zip(idx, step.batch([docs[i] for i in idx])):
            if reason is not None:
                outcome[i] = (step.name, reason)
        alive = [i for i in alive if outcome[i] is None]
    return outcome


def filter_task(ti: int, *, cfg_json: str, plan: dict[str, Any], data_dir: str,
                registries: dict[str, Any] | None = None) -> dict[str, Any]:
    from smelt.data.dedup.exact import exact_key
    from smelt.data.readers import read_documents
    from smelt.data.shards import ShardWriter, shard_suffix

    _restore_registries(registries)
    cfg = DataConfig.model_validate_json(cfg_json)
    p = _pipeline(cfg_json, str(Path(data_dir) / WORK))
    _reset_stats(p)
    out = Path(data_dir)
    work = out / WORK / "filter"
    fmt = cfg.output_format
    in_bytes: Counter = Counter()
    in_chars: Counter = Counter()
    orders: list[int] = []
    ids: list[str] = []
    domains: list[str] = []
    exact: list[int] = []
    sigs: list[np.ndarray] = []
    minhash_mask: list[bool] = []
    exact_mask: list[bool] = []
    read_errors: list[dict[str, Any]] = []
    pos = 0
    direct = is_direct(cfg)
    kept_docs: Counter = Counter()
    kept_bytes: Counter = Counter()
    kept_chars: Counter = Counter()
    g = plan["groups"][ti]
    alone = plan["groups"].count(g) == 1
    # A part of a split file leaves its rejects (and, without dedup, its survivors) in _work: the
    # write phase writes them into its file's own shards, as one task would have.
    rejects_path = (out / "rejects" / f"filter-{g:05d}{shard_suffix(fmt)}" if alone
                    else work / f"{ti:05d}.rejects{shard_suffix(fmt)}")
    direct = direct and alone
    with ShardWriter(rejects_path, fmt) as rejects, _KeptSink(out, work, ti, g, fmt, direct) as kept:
        buf: list[tuple[int, Document, str | None, str]] = []  # (order, doc, read-level reject reason, file)
        batch_texts: list[str] = []  # this batch's survivors that MinHash applies to
        n_signed = 0  # documents (survivors) whose signature rows are in `sigs`
        n_sig = cfg.dedup.minhash.bands * cfg.dedup.minhash.rows

        def flush() -> None:
            """Send the buffered documents through the steps, then record them in read order."""
            nonlocal n_signed
            outcome = _filter_batch([doc for _, doc, r, _ in buf if r is None], p)
            it = iter(outcome)
            for order, doc, reason, path in buf:
                if reason is not None:
                    if len(read_errors) < 100 and doc.meta.get("read_error"):
                        read_errors.append({"source": doc.meta.get("source", path), "file": path,
                                            "reason": reason, "error": doc.meta.get("error", "")})
                    rejects.write(mark_rejected(doc, "read", reason))
                    continue
                rejected = next(it)
                if rejected is not None:
                    rejects.write(mark_rejected(doc, *rejected))
                    continue
                kept.write(doc)
                if direct:  # no dedup: this is the final output, nothing else to record
                    b, c = _sizes(doc)
                    kept_docs[doc.domain] += 1
                    kept_bytes[doc.domain] += b
                    kept_chars[doc.domain] += c
                    continue
                orders.append(order)
                ids.append(doc.id)
                domains.append(doc.domain)
                use_exact = cfg.dedup.exact.applies_to(doc.domain)
                exact_mask.append(use_exact)
                exact.append(exact_key(doc.text) if use_exact else 0)
                use_mh = p.hasher is not None and cfg.dedup.minhash.applies_to(doc.domain)
                minhash_mask.append(use_mh)
                if use_mh:
                    batch_texts.append(doc.text)
            if p.hasher is not None and len(minhash_mask) > n_signed:
                # the batch's signatures in one call: the permutations run on blocks of many
                # documents' shingles (per document, numpy's per-call cost is most of the time)
                new = minhash_mask[n_signed:]
                rows = np.zeros((len(new), n_sig), dtype=np.uint32)
                if batch_texts:
                    rows[np.flatnonzero(new)] = p.hasher.signatures(batch_texts)
                sigs.append(rows)
            n_signed = len(minhash_mask)
            batch_texts.clear()
            buf.clear()

        buf_chars = 0
        for piece in plan["tasks"][ti]:
            fi, part = (piece[0], tuple(piece[1:])) if isinstance(piece, list) else (piece, None)
            si, path = plan["files"][fi]
            src = cfg.inputs[si]
            for doc in read_documents(path, src, part=part):
                order = (ti << 32) | pos
                pos += 1
                b, c = _sizes(doc)
                in_bytes[doc.domain] += b
                in_chars[doc.domain] += c
                buf.append((order, doc, p.read(doc), path))
                buf_chars += c
                if len(buf) >= BATCH_DOCS or buf_chars >= BATCH_CHARS:
                    flush()
                    buf_chars = 0
        flush()
    result = {"task": ti, "n_read": pos, "rejects": rejects.count,
              "input_bytes": dict(in_bytes), "input_chars": dict(in_chars),
              "steps": {name: s.stats.to_dict() for name, s in
                        [("read", p.read)] + [(s.name, s) for s, _ in p.steps]},
              "info": {s.name: s.info() for s, _ in p.steps if s.info()},
              "read_errors": read_errors}
    if direct:
        result["write"] = {"task": ti, "kept_docs": dict(kept_docs), "kept_bytes": dict(kept_bytes),
                           "kept_chars": dict(kept_chars), "duplicates": {}, "line_rejects": 0,
                           "line_dedup": StepStats().to_dict()}
        return result
    sig_arr = np.concatenate(sigs) if sigs else np.zeros((0, n_sig), dtype=np.uint32)
    _save_npz(work / f"{ti:05d}.npz", orders=np.array(orders, dtype=np.int64),
              exact=np.array(exact, dtype=np.uint64), exact_mask=np.array(exact_mask, dtype=bool),
              minhash_mask=np.array(minhash_mask, dtype=bool), sigs=sig_arr,
              ids=np.array(ids, dtype=str), domains=np.array(domains, dtype=str))
    return result


def is_direct(cfg: DataConfig) -> bool:
    """Without any dedup, the filter phase writes the final clean shards itself."""
    d = cfg.dedup
    return not (d.exact.enabled or d.minhash.enabled or d.lines.enabled)


class _KeptSink:
    """Where the filter phase puts survivors: one work shard (dedup follows), or the final
    per-domain clean shards (no dedup configured)."""

    def __init__(self, out: Path, work: Path, ti: int, g: int, fmt: str, direct: bool) -> None:
        from smelt.data.shards import ShardWriter, shard_suffix

        self._mk = ShardWriter
        self.out, self.ti, self.g, self.fmt, self.direct = out, ti, g, fmt, direct
        self.sfx = shard_suffix(fmt)
        self.writers: dict[str, Any] = {}
        if not direct:
            self.writers[""] = ShardWriter(work / f"{ti:05d}.kept.jsonl.zst", "jsonl.zst")

    def __enter__(self) -> _KeptSink:
        return self

    def write(self, doc: Document) -> None:
        key = doc.domain if self.direct else ""
        w = self.writers.get(key)
        if w is None:
            w = self.writers[key] = self._mk(
                self.out / "clean" / _safe(doc.domain) / f"part-{self.g:05d}{self.sfx}", self.fmt)
        w.write(doc)

    def __exit__(self, et: Any, e: Any, tb: Any) -> None:
        for w in self.writers.values():
            w.__exit__(et, e, tb)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    from smelt.fsutil import atomic_open

    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(staged(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------
# phase 2: document dedup (global)


EXACT, NEAR = 0, 1


def sharded_dedup(cfg: DataConfig) -> bool:
    """Whether the dedup phase runs as tasks (`sharded_exact_task`, `band_task`, `verify_task`)
    rather than in the driver: ``data.executor.sharded_dedup``, by default on with Ray."""
    flag = cfg.executor.sharded_dedup
    return cfg.executor.kind == "ray" if flag is None else flag


# How many tasks the sharded exact dedup and Jaccard verification use: enough to spread over a
# cluster, few enough that each reads every filter task's keys only a handful of times.
DEDUP_PARTITIONS = 16


def _members(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Only the named arrays of an .npz (np.savez stores members uncompressed; the others are not read)."""
    with np.load(staged(path), allow_pickle=False) as z:
        return {k: z[k] for k in names}


def sharded_exact_task(p: int, *, data_dir: str, n_tasks: int, n_parts: int) -> dict[str, Any]:
    """Exact dedup of hash partition `p`: every exact key with ``key % n_parts == p``, from every
    filter task; writes the duplicates (order, first order) to ``_work/dedup/exact-NNNNN.npz``."""
    from smelt.data.dedup.exact import first_occurrence

    work = Path(data_dir) / WORK
    keys, orders = [], []
    for t in range(n_tasks):
        z = _members(work / "filter" / f"{t:05d}.npz", ("orders", "exact", "exact_mask"))
        sel = z["exact_mask"] & (z["exact"] % np.uint64(n_parts) == np.uint64(p))
        keys.append(z["exact"][sel])
        orders.append(z["orders"][sel])
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    o = np.concatenate(orders) if orders else np.zeros(0, np.int64)
    first = first_occurrence(k, o)
    dup = first != o
    _save_npz(work / "dedup" / f"exact-{p:05d}.npz", orders=o[dup], first=first[dup])
    return {"partition": p, "keys": int(k.size), "duplicates": int(dup.sum())}


def band_task(i: int, *, data_dir: str, n_tasks: int, bands: int, rows: int, splits: int = 1) -> dict[str, Any]:
    """Candidate pairs of LSH band ``b = i // splits``, key range ``i % splits`` (the keys with
    ``key % splits`` equal to it; a bucket is never cut): that band's rows of every filter task's
    signatures (of the documents MinHash applies to that are not exact duplicates) -> band keys ->
    buckets -> pairs, written to ``_work/dedup/band-<splits>-NNNNN.npy``. Only that share of one
    band's keys is in memory at a time."""
    from smelt.data.dedup.minhash import band_keys, bucket_pairs

    b, part = divmod(i, splits)
    work = Path(data_dir) / WORK
    exact_dups = np.load(staged(work / "dedup" / "exact.npy"))
    keys, orders = [], []
    for t in range(n_tasks):
        z = _members(work / "filter" / f"{t:05d}.npz", ("orders", "minhash_mask", "sigs"))
        alive = z["minhash_mask"] & ~np.isin(z["orders"], exact_dups)
        k = band_keys(z["sigs"][alive], bands, rows, band=b)
        mine = k % np.uint64(splits) == np.uint64(part)
        keys.append(k[mine])
        orders.append(z["orders"][alive][mine])
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    o = np.concatenate(orders) if orders else np.zeros(0, np.int64)
    pairs = bucket_pairs(k, o)
    from smelt.fsutil import atomic_open

    with atomic_open(work / "dedup" / f"band-{splits}-{i:05d}.npy", "wb") as f:
        np.save(f, pairs)
    return {"band": b, "split": part, "documents": int(o.size), "pairs": int(len(pairs))}


def _cc_file(work: Path, splits: int, step: int, src: int, dest: int) -> Path:
    return work / "dedup" / f"cc-{splits}" / f"{step:03d}-{src:03d}-{dest:03d}.npy"


def _write_cc(work: Path, splits: int, step: int, src: int, edges: np.ndarray, both: bool, n_parts: int) -> None:
    """Edges for the next components step, one file per destination node partition, keyed by the
    first column: both orientations of each edge (for a large-star), or as given (a small-star)."""
    from smelt.data.dedup.minhash import node_partition
    from smelt.fsutil import atomic_open

    recs = np.concatenate([edges, edges[:, ::-1]]) if both else edges
    q = node_partition(recs[:, 0], n_parts)
    for dest in range(n_parts):
        with atomic_open(_cc_file(work, splits, step, src, dest), "wb") as f:
            np.save(f, recs[q == dest])


def edges_task(v: int, *, data_dir: str, n_tasks: int, n_lsh: int, splits: int, n_parts: int,
               cfg_json: str) -> dict[str, Any]:
    """Pair shard `v` (`pair_partition`) of every LSH task's candidate pairs, deduplicated, with a
    true-Jaccard check when ``verify_jaccard`` is set, written as the components' first step."""
    from smelt.data.dedup.minhash import MinHasher, jaccard, pair_partition

    cfg = DataConfig.model_validate_json(cfg_json)
    work = Path(data_dir) / WORK
    mine = []
    for i in range(n_lsh):
        pairs = np.load(staged(work / "dedup" / f"band-{splits}-{i:05d}.npy")).reshape(-1, 2)
        mine.append(pairs[pair_partition(pairs, n_parts) == v])
    pairs = np.unique(np.concatenate(mine), axis=0) if mine else np.zeros((0, 2), np.int64)
    n_pairs = len(pairs)
    thr = cfg.dedup.minhash.verify_jaccard
    if thr is not None and n_pairs:
        texts = _load_texts(work, n_tasks, set(pairs.ravel().tolist()))
        hasher = MinHasher(cfg.dedup.minhash)
        sh = {o: hasher.shingles(t) for o, t in texts.items()}
        pairs = pairs[np.array([jaccard(sh[a], sh[b]) >= thr for a, b in pairs.tolist()], dtype=bool)]
    _write_cc(work, splits, 0, v, pairs.astype(np.int64), True, n_parts)
    return {"shard": v, "pairs": int(n_pairs), "verified": int(len(pairs))}


def cc_task(p: int, *, data_dir: str, splits: int, step: int, n_parts: int) -> dict[str, Any]:
    """Components step `step` on node partition `p`: a large-star on odd steps, a small-star on
    even ones (`smelt.data.dedup.minhash.large_star` / `small_star`), over the edges that the
    previous step's tasks wrote for this partition."""
    from smelt.data.dedup.minhash import large_star, small_star

    work = Path(data_dir) / WORK
    recs = np.concatenate([np.load(staged(_cc_file(work, splits, step - 1, s, p))).reshape(-1, 2)
                           for s in range(n_parts)])
    large = step % 2 == 1
    out, changed = (large_star if large else small_star)(recs)
    # a large-star's output is read by a small-star, keyed by its larger end (the first column);
    # a small-star's by a large-star, which needs both ends
    _write_cc(work, splits, step, p, out, not large, n_parts)
    return {"partition": p, "records": int(len(recs)), "edges": int(len(out)), "changed": changed}


# At most this many components steps: star contraction needs O(log^2 n) rounds (Kiveris et al.),
# a few on duplicate graphs (measured: 2-4 on random graphs, 12 on a 2,000-node path).
MAX_CC_STEPS = 400


def components_phase(cfg: DataConfig, data_dir: Path, n_tasks: int, phase: Callable[..., list[dict[str, Any]]],
                     n_lsh: int, splits: int) -> tuple[np.ndarray, np.ndarray]:
    """Near duplicates and their roots (the smallest order of their component), sorted by order:
    `connected_components` of the LSH tasks' candidate pairs (verified when configured), computed
    as tasks over `DEDUP_PARTITIONS` node partitions. The phases are resumable step by step."""
    P = DEDUP_PARTITIONS
    common = {"data_dir": str(data_dir), "splits": splits, "n_parts": P}
    phase("edges", functools.partial(edges_task, n_tasks=n_tasks, n_lsh=n_lsh, cfg_json=cfg.model_dump_json(),
                                     **common), f"cc-{splits}-000.done", P)
    step = 1
    while True:
        res = [phase(f"cc-{name}", functools.partial(cc_task, step=s, **common), f"cc-{splits}-{s:03d}.done", P)
               for s, name in ((step, "large"), (step + 1, "small"))]
        if not any(r["changed"] for rs in res for r in rs):
            break
        step += 2
        if step > MAX_CC_STEPS:  # pragma: no cover - a bug, not data
            raise RuntimeError(f"connected components did not converge in {MAX_CC_STEPS} steps")
    work = data_dir / WORK
    final = [np.load(staged(_cc_file(work, splits, step + 1, s, q))).reshape(-1, 2) for s in range(P) for q in range(P)]
    edges = np.concatenate(final)
    edges = np.unique(edges[edges[:, 0] > edges[:, 1]], axis=0)  # (duplicate, root): a star forest
    return edges[:, 0].copy(), edges[:, 1].copy()


def _sharded_dedup(cfg: DataConfig, data_dir: Path, n_tasks: int, phase: Callable[..., list[dict[str, Any]]],
                   exact_on: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The dedup phase as tasks: hash-partitioned exact dedup, one task per LSH band, Jaccard
    verification by pair shard, connected components by node partition; only the duplicates come
    back to the driver, as arrays. Returns (exact duplicates' orders, their first orders, near
    duplicates' orders, their cluster roots), the same decisions as the single-process path."""
    work = data_dir / WORK
    (work / "dedup").mkdir(parents=True, exist_ok=True)
    empty = np.zeros(0, np.int64)
    ex_o, ex_f = empty, empty
    if exact_on:
        phase("exact", functools.partial(sharded_exact_task, data_dir=str(data_dir), n_tasks=n_tasks,
                                         n_parts=DEDUP_PARTITIONS), "exact.done", DEDUP_PARTITIONS)
        parts = [_load_npz(work / "dedup" / f"exact-{p:05d}.npz") for p in range(DEDUP_PARTITIONS)]
        ex_o = np.concatenate([z["orders"] for z in parts]).astype(np.int64)
        ex_f = np.concatenate([z["first"] for z in parts]).astype(np.int64)
    mh = cfg.dedup.minhash
    if not mh.enabled:
        return ex_o, ex_f, empty, empty
    from smelt.fsutil import atomic_open

    with atomic_open(work / "dedup" / "exact.npy", "wb") as f:
        np.save(f, np.sort(ex_o))
    splits = cfg.executor.lsh_splits
    n_lsh = mh.bands * splits
    # The marker directory names the split count: a resume with another count starts LSH afresh.
    phase("lsh", functools.partial(band_task, data_dir=str(data_dir), n_tasks=n_tasks, bands=mh.bands,
                                   rows=mh.rows, splits=splits), f"lsh-{splits}.done", n_lsh)
    # The components of the candidate pairs (Jaccard-verified first when configured), as tasks: the
    # driver gets only the final (duplicate, root) rows, never the pairs (`components_phase`).
    near_o, near_r = components_phase(cfg, data_dir, n_tasks, phase, n_lsh, splits)
    return ex_o, ex_f, near_o, near_r


def dedup_phase(cfg: DataConfig, data_dir: Path, n_tasks: int,
                phase: Callable[..., list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Exact then near dedup over all tasks' survivors; writes ``_work/dedup.npz``. With `phase`
    (`sharded_dedup`), the work runs as tasks and the driver holds no signature."""
    from smelt.data.dedup.exact import first_occurrence
    from smelt.data.dedup.minhash import MinHasher, band_keys, bucket_pairs, clusters, jaccard

    work = data_dir / WORK
    if phase is not None:
        return _sharded_dedup_phase(cfg, data_dir, n_tasks, phase)
    parts = [_load_npz(work / "filter" / f"{t:05d}.npz") for t in range(n_tasks)]
    orders = np.concatenate([p["orders"] for p in parts]) if parts else np.zeros(0, np.int64)
    ids = np.concatenate([p["ids"] for p in parts]) if parts else np.zeros(0, str)
    domains = np.concatenate([p["domains"] for p in parts]) if parts else np.zeros(0, str)
    dup_of: dict[int, tuple[int, int]] = {}  # order -> (kept order, kind)
    stats: dict[str, StepStats] = {"exact_dedup": StepStats(), "minhash_dedup": StepStats()}
    exact_mask = np.concatenate([p["exact_mask"] for p in parts]) if parts else np.zeros(0, bool)

    # exact: among documents the step applies to, every later copy points at the first one
    if cfg.dedup.exact.enabled and exact_mask.any():
        keys = np.concatenate([p["exact"] for p in parts])[exact_mask]
        sel = orders[exact_mask]
        first = first_occurrence(keys, sel)
        for o, f in zip(sel.tolist(), first.tolist()):
            if o != f:
                dup_of[o] = (f, EXACT)
    _count_dedup(stats["exact_dedup"], domains, orders, exact_mask, dup_of, EXACT, "exact_duplicate")

    mh = cfg.dedup.minhash
    mh_mask = np.concatenate([p["minhash_mask"] for p in parts]) if parts else np.zeros(0, bool)
    alive = mh_mask & np.array([o not in dup_of for o in orders.tolist()], dtype=bool)
    if mh.enabled and alive.sum() > 1:
        sigs = np.concatenate([p["sigs"] for p in parts])[alive]
        sel = orders[alive]
        keys = band_keys(sigs, mh.bands, mh.rows)
        pairs = [bucket_pairs(keys[:, b], sel) for b in range(mh.bands)]
        all_pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
        verify: Callable[[int, int], bool] | None = None
        if mh.verify_jaccard is not None and len(all_pairs):
            texts = _load_texts(work, n_tasks, set(all_pairs.ravel().tolist()))
            hasher = MinHasher(mh)
            cache: dict[int, np.ndarray] = {}

            def shingles(o: int) -> np.ndarray:
                if o not in cache:
                    cache[o] = hasher.shingles(texts[o])
                return cache[o]

            def verify(a: int, b: int) -> bool:
                return jaccard(shingles(a), shingles(b)) >= mh.verify_jaccard

        roots = clusters(all_pairs, verify=verify)
    else:
        roots = {}
    return _finish_dedup(cfg, work, orders, ids, domains, alive, dup_of, roots, stats)


def _finish_dedup(cfg: DataConfig, work: Path, orders: np.ndarray, ids: np.ndarray, domains: np.ndarray,
                  alive: np.ndarray, dup_of: dict[int, tuple[int, int]], roots: dict[int, int],
                  stats: dict[str, StepStats]) -> dict[str, Any]:
    """Near-duplicate clusters into `dup_of`, the funnel counts and ``_work/dedup.npz``."""
    cluster_sizes: Counter = Counter()
    sizes: Counter = Counter()
    for o, r in roots.items():
        dup_of[o] = (r, NEAR)
        sizes[r] += 1
    for n in sizes.values():
        cluster_sizes[n + 1] += 1
    _count_dedup(stats["minhash_dedup"], domains, orders, alive if cfg.dedup.minhash.enabled else np.zeros_like(alive),
                 dup_of, NEAR, "near_duplicate")

    id_of = dict(zip(orders.tolist(), ids.tolist()))
    d_orders = np.array(sorted(dup_of), dtype=np.int64)
    d_of = np.array([dup_of[o][0] for o in d_orders.tolist()], dtype=np.int64)
    d_kind = np.array([dup_of[o][1] for o in d_orders.tolist()], dtype=np.int8)
    d_ids = np.array([id_of[o] for o in d_of.tolist()], dtype=str)
    _save_npz(work / "dedup.npz", orders=d_orders, dup_of=d_of, kind=d_kind, dup_of_id=d_ids)
    return {"steps": {name: s.to_dict() for name, s in stats.items()},
            "cluster_sizes": {str(k): v for k, v in sorted(cluster_sizes.items())}}


def _sharded_dedup_phase(cfg: DataConfig, data_dir: Path, n_tasks: int,
                         phase: Callable[..., list[dict[str, Any]]]) -> dict[str, Any]:
    """`dedup_phase` as tasks, with nothing per document in the driver: the decisions (one row
    per duplicate, numpy arrays) go to ``_work/dedup/decisions-NNNNN.npz`` by the task that holds
    the document, one `resolve_task` per filter task counts its own documents into the funnel and
    names the kept documents that live in it, and the driver sums the counts and writes
    ``_work/dedup.npz`` (one row per duplicate) as the single-process phase does."""
    work = data_dir / WORK
    ex_o, ex_f, near_o, near_r = _sharded_dedup(cfg, data_dir, n_tasks, phase, cfg.dedup.exact.enabled)
    _, counts = np.unique(near_r, return_counts=True)
    cluster_sizes = Counter((counts + 1).tolist())
    all_o = np.concatenate([ex_o, near_o])
    order = np.argsort(all_o, kind="stable")
    d_orders = all_o[order]
    d_of = np.concatenate([ex_f, near_r])[order]
    d_kind = np.concatenate([np.full(len(ex_o), EXACT, np.int8), np.full(len(near_o), NEAR, np.int8)])[order]
    # each resolve task gets the decisions about its own documents and the cluster roots it holds
    edges = np.arange(n_tasks + 1, dtype=np.int64) << 32
    cut = np.searchsorted(d_orders, edges)
    roots = np.unique(d_of)
    rcut = np.searchsorted(roots, edges)
    for t in range(n_tasks):
        _save_npz(work / "dedup" / f"decisions-{t:05d}.npz", orders=d_orders[cut[t]:cut[t + 1]],
                  kind=d_kind[cut[t]:cut[t + 1]], roots=roots[rcut[t]:rcut[t + 1]])
    res = phase("resolve", functools.partial(resolve_task, data_dir=str(data_dir),
                                             minhash=cfg.dedup.minhash.enabled), "resolve.done")
    stats: dict[str, StepStats] = {"exact_dedup": StepStats(), "minhash_dedup": StepStats()}
    root_ids = []
    for t, r in enumerate(res):  # in task order: domains appear as in the single-process count
        for name in stats:
            stats[name].merge(StepStats.from_dict(r[name]))
        root_ids.append(_load_npz(work / "dedup" / f"roots-{t:05d}.npz")["ids"])
    ids = np.concatenate(root_ids) if root_ids else np.zeros(0, str)  # aligned with `roots` (both by order)
    d_ids = ids[np.searchsorted(roots, d_of)] if len(d_of) else np.zeros(0, str)
    for t in range(n_tasks):  # what each units/write task reads: its own rows only
        a, b = cut[t], cut[t + 1]
        _save_npz(work / "dedup" / f"final-{t:05d}.npz", orders=d_orders[a:b], dup_of=d_of[a:b], kind=d_kind[a:b],
                  dup_of_id=d_ids[a:b])
    _save_npz(work / "dedup.npz", orders=d_orders, dup_of=d_of, kind=d_kind, dup_of_id=d_ids)
    return {"steps": {name: s.to_dict() for name, s in stats.items()},
            "cluster_sizes": {str(k): v for k, v in sorted(cluster_sizes.items())}}


def resolve_task(t: int, *, data_dir: str, minhash: bool) -> dict[str, Any]:
    """The dedup funnel of filter task `t`'s documents (exact and near: seen, kept, dropped per
    domain) from the duplicate decisions, and the ids of the kept documents of any cluster that
    live in this task (``_work/dedup/roots-NNNNN.npz``)."""
    work = Path(data_dir) / WORK
    z = _members(work / "filter" / f"{t:05d}.npz", ("orders", "ids", "domains", "exact_mask", "minhash_mask"))
    d = _load_npz(work / "dedup" / f"decisions-{t:05d}.npz")
    orders = z["orders"]
    idx = np.searchsorted(d["orders"], orders)
    hit = idx < len(d["orders"])
    hit[hit] = d["orders"][idx[hit]] == orders[hit]
    kind = np.full(len(orders), -1, dtype=np.int8)
    kind[hit] = d["kind"][idx[hit]]
    # the single-process phase's own counting, on this task's documents and decisions
    dup_of = {o: (-1, k) for o, k in zip(d["orders"].tolist(), d["kind"].tolist())}
    exact_st, near_st = StepStats(), StepStats()
    _count_dedup(exact_st, z["domains"], orders, z["exact_mask"], dup_of, EXACT, "exact_duplicate")
    alive = z["minhash_mask"] & (kind != EXACT)
    if minhash:
        _count_dedup(near_st, z["domains"], orders, alive, dup_of, NEAR, "near_duplicate")
    mine = d["roots"]
    pos = np.searchsorted(orders, mine)  # a task's orders ascend: (task << 32) | position
    _save_npz(work / "dedup" / f"roots-{t:05d}.npz", orders=mine, ids=z["ids"][pos])
    return {"task": t, "exact_dedup": exact_st.to_dict(), "minhash_dedup": near_st.to_dict()}


def _count_dedup(st: StepStats, domains: np.ndarray, orders: np.ndarray, mask: np.ndarray,
                 dup_of: dict[int, tuple[int, int]], kind: int, reason: str) -> None:
    for dom, o, m in zip(domains.tolist(), orders.tolist(), mask.tolist()):
        if not m:
            continue
        d = st.domain(dom)
        d.seen += 1
        hit = dup_of.get(o)
        if hit is not None and hit[1] == kind:
            d.dropped[reason] += 1
        else:
            d.kept += 1


def _load_texts(work: Path, n_tasks: int, wanted: set[int]) -> dict[int, str]:
    from smelt.data.shards import read_shard

    out: dict[int, str] = {}
    holders = {o >> 32 for o in wanted}  # an order is (filter task << 32) | position
    for t in range(n_tasks):
        if t not in holders:
            continue
        arr = _members(work / "filter" / f"{t:05d}.npz", ("orders",))["orders"].tolist()
        need = {i for i, o in enumerate(arr) if o in wanted}
        if not need:
            continue
        for i, doc in enumerate(read_shard(staged(work / "filter" / f"{t:05d}.kept.jsonl.zst"))):
            if i in need:
                out[arr[i]] = doc.text
    return out


# --------------------------------------------------------------------------------------------
# phases 3-4: line / sentence units


def _dedup_rows(work: Path, ti: int) -> dict[str, np.ndarray]:
    """The duplicate decisions a per-task phase needs: its own task's rows when the sharded dedup
    phase wrote them (``_work/dedup/final-NNNNN.npz``), else every row of ``_work/dedup.npz``."""
    own = work / "dedup" / f"final-{ti:05d}.npz"
    return _load_npz(own if staged(own).is_file() else work / "dedup.npz")


def _dup_map(work: Path, ti: int) -> dict[int, tuple[int, str]]:
    z = _dedup_rows(work, ti)
    return {o: (of, i) for o, of, i in zip(z["orders"].tolist(), z["dup_of"].tolist(), z["dup_of_id"].tolist())}


def units_task(ti: int, *, cfg_json: str, data_dir: str) -> dict[str, Any]:
    from smelt.data.dedup.lines import units
    from smelt.data.shards import read_shard

    cfg = DataConfig.model_validate_json(cfg_json)
    lc = cfg.dedup.lines
    work = Path(data_dir) / WORK
    orders = _load_npz(work / "filter" / f"{ti:05d}.npz")["orders"].tolist()
    dups = _dup_map(work, ti)
    hs: list[int] = []
    os_: list[int] = []
    for o, doc in zip(orders, read_shard(staged(work / "filter" / f"{ti:05d}.kept.jsonl.zst"))):
        if o in dups or not lc.applies_to(doc.domain):
            continue
        uniq = {h for _, _, h in units(doc.text, lc.mode, lc.min_chars)}
        hs.extend(uniq)
        os_.extend([o] * len(uniq))
    _save_npz(work / "units" / f"{ti:05d}.npz", hashes=np.array(hs, dtype=np.uint64),
              orders=np.array(os_, dtype=np.int64))
    return {"task": ti, "units": len(hs)}


def _repeated(hashes: np.ndarray, orders: np.ndarray, max_repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, first orders) of the units found in more than `max_repeats` documents, by hash."""
    if not len(hashes):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    idx = np.lexsort((orders, hashes))  # by hash, then corpus order
    h, o = hashes[idx], orders[idx]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    counts = np.diff(np.r_[starts, len(h)])
    rep = counts > max_repeats
    return h[starts][rep], o[starts][rep]


def count_units_phase(cfg: DataConfig, data_dir: Path, n_tasks: int,
                      phase: Callable[..., list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Units in more than `max_repeats` documents, with the first document that has each. With
    `phase` (`sharded_dedup`), counted in hash partitions as tasks; the driver sees only the
    repeated units."""
    work = data_dir / WORK
    if phase is not None:
        (work / "dedup").mkdir(parents=True, exist_ok=True)
        phase("count", functools.partial(sharded_units_task, data_dir=str(data_dir), n_tasks=n_tasks,
                                         n_parts=DEDUP_PARTITIONS, max_repeats=cfg.dedup.lines.max_repeats),
              "count.done", DEDUP_PARTITIONS)
        parts = [_load_npz(work / "dedup" / f"units-{p:05d}.npz") for p in range(DEDUP_PARTITIONS)]
        h = np.concatenate([p["hashes"] for p in parts])
        o = np.concatenate([p["first"] for p in parts])
        idx = np.argsort(h, kind="stable")  # by hash, as the single-process count orders them
        rep_h, rep_first = h[idx], o[idx]
    else:
        parts = [_load_npz(work / "units" / f"{t:05d}.npz") for t in range(n_tasks)]
        hashes = np.concatenate([p["hashes"] for p in parts]) if parts else np.zeros(0, np.uint64)
        orders = np.concatenate([p["orders"] for p in parts]) if parts else np.zeros(0, np.int64)
        rep_h, rep_first = _repeated(hashes, orders, cfg.dedup.lines.max_repeats)
    _save_npz(work / "repeated_units.npz", hashes=rep_h, first=rep_first)
    return {"repeated_units": int(len(rep_h))}


def sharded_units_task(p: int, *, data_dir: str, n_tasks: int, n_parts: int, max_repeats: int) -> dict[str, Any]:
    """Repeated units of hash partition `p` (``hash % n_parts == p``) over every task's units."""
    work = Path(data_dir) / WORK
    hs, os_ = [], []
    for t in range(n_tasks):
        z = _members(work / "units" / f"{t:05d}.npz", ("hashes", "orders"))
        sel = z["hashes"] % np.uint64(n_parts) == np.uint64(p)
        hs.append(z["hashes"][sel])
        os_.append(z["orders"][sel])
    h = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
    o = np.concatenate(os_) if os_ else np.zeros(0, np.int64)
    rep_h, rep_first = _repeated(h, o, max_repeats)
    _save_npz(work / "dedup" / f"units-{p:05d}.npz", hashes=rep_h, first=rep_first)
    return {"partition": p, "units": int(len(h)), "repeated": int(len(rep_h))}


# --------------------------------------------------------------------------------------------
# phase 5: write


def write_task(g: int, *, cfg_json: str, data_dir: str, groups: tuple[int, ...] | None = None,
               dedup: bool = True) -> dict[str, Any]:
    """Write output index `g`: its survivors that are not duplicates (line dedup applied) to
    ``clean/<domain>/part-g``, its duplicates to ``duplicates/part-g``, the documents line dedup
    emptied to ``rejects/lines-g``. With `groups` (`Plan.groups`: a file was split into parts),
    over every task of index `g`, in order, also writing their filter-phase rejects into
    ``rejects/filter-g``; `dedup` False: no dedup ran (the parts' survivors are written as they are)."""
    from smelt.data.dedup.lines import remove_spans, units
    from smelt.data.shards import ShardWriter, read_shard, shard_suffix

    cfg = DataConfig.model_validate_json(cfg_json)
    lc = cfg.dedup.lines
    out = Path(data_dir)
    work = out / WORK
    fmt = cfg.output_format
    sfx = shard_suffix(fmt)
    members = [g] if groups is None else [t for t, x in enumerate(groups) if x == g]
    line_stats = StepStats()
    kept_bytes: Counter = Counter()
    kept_chars: Counter = Counter()
    kept_docs: Counter = Counter()
    dup_docs: Counter = Counter()
    n_rejects = 0
    if not dedup and len(members) == 1:  # a whole file without dedup: the filter phase wrote its shards
        return {"task": g, "kept_docs": {}, "kept_bytes": {}, "kept_chars": {}, "duplicates": {}, "line_rejects": 0,
                "line_dedup": line_stats.to_dict()}
    if len(members) > 1:  # the parts' filter-phase rejects, in order, as one task would have written them
        with ShardWriter(out / "rejects" / f"filter-{g:05d}{sfx}", fmt) as fw:
            for ti in members:
                for doc in read_shard(staged(work / "filter" / f"{ti:05d}.rejects{sfx}")):
                    fw.write(doc)
    use_lines = lc.enabled
    rep: dict[int, int] = {}
    if use_lines:
        z = _load_npz(work / "repeated_units.npz")
        rep = dict(zip(z["hashes"].tolist(), z["first"].tolist()))
    writers: dict[str, ShardWriter] = {}
    try:
        # without dedup there are neither duplicates nor line rejects, and no files for them (as
        # when the filter phase writes the final shards itself)
        none = contextlib.nullcontext
        with (ShardWriter(out / "duplicates" / f"part-{g:05d}{sfx}", fmt) if dedup else none()) as dw, \
                (ShardWriter(out / "rejects" / f"lines-{g:05d}{sfx}", fmt) if dedup else none()) as rw:
            for ti in members:
                orders = _load_npz(work / "filter" / f"{ti:05d}.npz")["orders"].tolist()
                dups: dict[int, tuple[int, str]] = {}
                kinds: dict[int, int] = {}
                if dedup:
                    rows = _dedup_rows(work, ti)
                    dups = {o: (of, i) for o, of, i in zip(rows["orders"].tolist(), rows["dup_of"].tolist(),
                                                           rows["dup_of_id"].tolist())}
                    kinds = dict(zip(rows["orders"].tolist(), rows["kind"].tolist()))
                for o, doc in zip(orders, read_shard(staged(work / "filter" / f"{ti:05d}.kept.jsonl.zst"))):
                    hit = dups.get(o)
                    if hit is not None:
                        doc.meta["duplicate_of"] = hit[1]
                        doc.meta["dedup"] = "exact" if kinds[o] == EXACT else "minhash"
                        dw.write(doc)
                        dup_docs[doc.domain] += 1
                        continue
                    if use_lines and rep and lc.applies_to(doc.domain):
                        ds = line_stats.domain(doc.domain)
                        ds.seen += 1
                        spans = [(s, e) for s, e, h in units(doc.text, lc.mode, lc.min_chars)
                                 if h in rep and not (lc.keep_first and rep[h] == o)]
                        if spans:
                            before = len(doc.text)
                            doc.text = remove_spans(doc.text, spans)
                            ds.counters["units_removed"] += len(spans)
                            ds.counters["chars_removed"] += before - len(doc.text)
                            ds.counters["docs_modified"] += 1
                        if len(doc.text.strip()) < cfg.min_doc_chars or not doc.text.strip():
                            ds.dropped["empty_after_line_dedup"] += 1
                            rw.write(mark_rejected(doc, "line_dedup", "empty_after_line_dedup"))
                            n_rejects += 1
                            continue
                        ds.kept += 1
                    w = writers.get(doc.domain)
                    if w is None:
                        w = writers[doc.domain] = ShardWriter(
                            out / "clean" / _safe(doc.domain) / f"part-{g:05d}{sfx}", fmt).__enter__()
                    w.write(doc)
                    b, c = _sizes(doc)
                    kept_bytes[doc.domain] += b
                    kept_chars[doc.domain] += c
                    kept_docs[doc.domain] += 1
        for w in writers.values():
            w.__exit__(None, None, None)
    except BaseException as e:
        for w in writers.values():
            w.__exit__(type(e), e, e.__traceback__)
        raise
    return {"task": g, "kept_docs": dict(kept_docs), "kept_bytes": dict(kept_bytes),
            "kept_chars": dict(kept_chars), "duplicates": dict(dup_docs), "line_rejects": n_rejects,
            "line_dedup": line_stats.to_dict()}


def _safe(domain: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in domain) or "default"


# --------------------------------------------------------------------------------------------
# phase 6: accounting


def build_stats(filter_res: list[dict[str, Any]], dedup_stats: dict[str, Any],
                write_res: list[dict[str, Any]], step_order: list[str]) -> dict[str, Any]:
    steps: dict[str, StepStats] = {}
    for r in filter_res:
        for name, d in r["steps"].items():
            steps.setdefault(name, StepStats()).merge(StepStats.from_dict(d))
    for name, d in dedup_stats["steps"].items():
        steps[name] = StepStats.from_dict(d)
    lines = StepStats()
    for r in write_res:
        lines.merge(StepStats.from_dict(r["line_dedup"]))
    steps["line_dedup"] = lines

    def dsum(results: list[dict[str, Any]], key: str) -> Counter:
        c: Counter = Counter()
        for r in results:
            c.update(r[key])
        return c

    in_docs = Counter({d: s.seen for d, s in steps["read"].by_domain.items()})
    in_bytes, in_chars = dsum(filter_res, "input_bytes"), dsum(filter_res, "input_chars")
    kept, kept_b, kept_c = dsum(write_res, "kept_docs"), dsum(write_res, "kept_bytes"), dsum(write_res, "kept_chars")
    dups = dsum(write_res, "duplicates")
    rejected: Counter = Counter()
    by_reason: Counter = Counter()
    for name, st in steps.items():
        if name in ("exact_dedup", "minhash_dedup"):
            continue
        for dom, ds in st.by_domain.items():
            n = sum(ds.dropped.values())
            rejected[dom] += n
            for reason, k in ds.dropped.items():
                by_reason[f"{name}/{reason}"] += k
    domains = sorted(set(in_docs) | set(kept))
    by_domain = {d: {"input": in_docs[d], "kept": kept[d], "rejected": rejected[d], "duplicates": dups[d],
                     "bytes_in": in_bytes[d], "bytes_kept": kept_b[d],
                     "chars_in": in_chars[d], "chars_kept": kept_c[d]} for d in domains}
    order = [n for n in step_order if n in steps]
    order += [n for n in ("exact_dedup", "minhash_dedup", "line_dedup") if n in steps and steps[n].by_domain]
    info: dict[str, Any] = {}  # every task's step decided the same (thresholds fixed before the filter phase)
    for r in filter_res:
        for name, d in r.get("info", {}).items():
            info.setdefault(name, d)
    read_errors = [e for r in filter_res for e in r["read_errors"]][:100]
    return {
        "format_version": FORMAT_VERSION,
        "documents": {"input": sum(in_docs.values()), "kept": sum(kept.values()),
                      "rejected": sum(rejected.values()), "duplicates": sum(dups.values())},
        "bytes": {"input": sum(in_bytes.values()), "kept": sum(kept_b.values())},
        "chars": {"input": sum(in_chars.values()), "kept": sum(kept_c.values())},
        "by_domain": by_domain,
        "rejects_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "steps": [{"name": n, **steps[n].to_dict(), **({"info": info[n]} if n in info else {})} for n in order],
        "minhash_cluster_sizes": dedup_stats["cluster_sizes"],
        "read_errors": read_errors,
    }


def check_accounting(stats: dict[str, Any], data_dir: Path, fmt: str) -> None:
    """input = kept + rejected + duplicates, overall and per domain, and on disk."""
    from smelt.data.shards import count_shard

    problems = []
    for dom, d in stats["by_domain"].items():
        if d["input"] != d["kept"] + d["rejected"] + d["duplicates"]:
            problems.append(f"domain {dom}: input {d['input']} != kept {d['kept']} + rejected "
                            f"{d['rejected']} + duplicates {d['duplicates']}")
    on_disk = {}
    for kind in ("clean", "rejects", "duplicates"):
        pull(data_dir / kind)  # on a store, shards that tasks wrote on other nodes: counted here as well
        on_disk[kind] = sum(count_shard(f) for f in sorted((data_dir / kind).rglob("*")) if f.is_file())
    doc = stats["documents"]
    for kind, key in (("clean", "kept"), ("rejects", "rejected"), ("duplicates", "duplicates")):
        if on_disk[kind] != doc[key]:
            problems.append(f"{kind}/ holds {on_disk[kind]} documents, stats say {doc[key]}")
    if problems:
        raise AccountingError("curation accounting failed:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------
# the stage


@dataclass
class Progress:
    """Hooks for a progress display; the CLI passes rich-backed callables."""

    start: Callable[[str, int], None] = lambda phase, total: None
    advance: Callable[[str], None] = lambda phase: None


@locked("smelt data", lambda a: a["run_dir"])
def run_data_stage(cfg: DataConfig, run_dir: Path, workers: int | None = None,
                   progress: Progress | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume, or skip) curation into ``run_dir/data``; return the stats funnel."""
    progress = progress or Progress()
    data_dir = run_dir / "data"
    mirror = active_mirror()
    # with a store, every read below goes through `staged`: the store decides what is done
    mirror = mirror if mirror is not None and mirror.covers(data_dir) else None
    plan = plan_tasks(cfg)  # input errors surface here, before any work
    key = stage_key(cfg, plan)
    manifest_path = data_dir / "manifest.json"
    if not force and staged(manifest_path).is_file():
        m = read_json(manifest_path)
        if m.get("complete") and m.get("key") == key:
            log.info("data: complete for the same inputs and config, skipping")
            return read_json(data_dir / "stats.json")
    work = data_dir / WORK
    plan_file = work / "plan.json"
    if force or not staged(plan_file).is_file() or read_json(plan_file).get("key") != key:
        # other inputs/config (or --force): keep the earlier output, set aside (here and on the store)
        if data_dir.exists() or (mirror is not None and mirror.exists(data_dir)):
            move_aside(data_dir, "data")
        atomic_write_json(plan_file, {"key": key, **plan.to_dict()})
    _remove_stale_temp_files(data_dir)  # left by a killed run; their content is redone
    n_workers = default_workers(workers if workers is not None else cfg.workers)
    if mirror is not None and mirror.url.startswith("memory://") and (n_workers > 1 or cfg.executor.kind == "ray"):
        raise RecipeError(f"runs_dir {mirror.url}: a memory:// store lives in this process only, so its tasks "
                          "cannot run in worker processes; use workers: 1 with the local executor (tests), or a "
                          "store every process reaches")
    t0 = time.time()
    timings: dict[str, float] = {}
    cfg_json = cfg.model_dump_json()

    prepare_steps(cfg, work)  # e.g. the decontamination index, built once for all tasks
    n_tasks = len(plan.tasks)

    on_ray = cfg.executor.kind == "ray"
    if on_ray:
        from smelt.data.executor.ray_tasks import ensure_ray, run_tasks_ray

        started_ray = ensure_ray(cfg.executor, cpus=n_workers)
        pool = None
    else:
        pool = make_pool(min(n_workers, n_tasks))

    def phase(name: str, fn: Callable[[int], dict[str, Any]], done: str, n: int | None = None) -> list[dict[str, Any]]:
        n = n_tasks if n is None else n
        ts = time.time()
        progress.start(name, n)
        tick = lambda i: progress.advance(name)  # noqa: E731
        fn = mirrored(fn)  # a run directory on a store: each task reads and writes through it
        if on_ray:
            res = run_tasks_ray(fn, n, work / done, cfg.executor, on_done=tick)
        else:
            res = run_tasks(fn, n, work / done, n_workers, on_done=tick, pool=pool)
        timings[name] = round(timings.get(name, 0.0) + time.time() - ts, 3)  # components steps add up
        return res

    try:
        stats = _run_phases(cfg, plan, data_dir, work, cfg_json, n_tasks, phase, timings)
        if on_ray and mirror is not None:  # every node's stage copy of _work: the store keeps the truth
            from smelt.data.executor.ray_tasks import drop_local, on_every_node

            on_every_node(functools.partial(drop_local, str(work.absolute())))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if on_ray and started_ray:
            import ray

            ray.shutdown()
    # A worker that died mid-task (killed, out of memory; Ray retried its task) left its temp files:
    # every task has finished now, so whatever temp file remains belongs to no one.
    _remove_stale_temp_files(data_dir)
    check_accounting(stats, data_dir, cfg.output_format)
    atomic_write_json(data_dir / "stats.json", stats)
    timings["total"] = round(time.time() - t0, 3)
    atomic_write_json(manifest_path, {
        "stage": "data", "complete": True, "key": key, "format_version": FORMAT_VERSION,
        "inputs": [f for _, f in plan.files], "tasks": n_tasks, "workers": n_workers,
        "executor": cfg.executor.kind,
        "output_format": cfg.output_format, "documents": stats["documents"],
        "domains": sorted(stats["by_domain"]), "timings_s": timings})
    remove_path(work)  # after the manifest: a kill here loses nothing
    return stats


def _run_phases(cfg: DataConfig, plan: Plan, data_dir: Path, work: Path, cfg_json: str, n_tasks: int,
                phase: Callable[..., list[dict[str, Any]]], timings: dict[str, float]) -> dict[str, Any]:
    """Phases 1-5 (each skipped where its markers say it is done); returns the stats funnel."""
    filter_res = phase("filter", functools.partial(
        filter_task, cfg_json=cfg_json, plan=plan.to_dict(), data_dir=str(data_dir),
        registries=registries()), "filter.done")
    step_order = ["read"] + [name for name, _ in pipeline_steps(cfg)]
    empty = {"steps": {}, "cluster_sizes": {}}
    split = plan.split()
    if is_direct(cfg) and not split:
        return build_stats(filter_res, empty, [r["write"] for r in filter_res], step_order)
    if is_direct(cfg):  # no dedup, but parts of split files to write into their file's shards
        dedup_stats = empty
    else:
        ts = time.time()
        dedup_file = work / "dedup_stats.json"
        if staged(dedup_file).is_file():
            dedup_stats = read_json(dedup_file)
        else:
            dedup_stats = dedup_phase(cfg, data_dir, n_tasks, phase if sharded_dedup(cfg) else None)
            atomic_write_json(dedup_file, dedup_stats)
        timings["dedup"] = round(time.time() - ts, 3)
        if cfg.dedup.lines.enabled:
            phase("units", functools.partial(units_task, cfg_json=cfg_json, data_dir=str(data_dir)), "units.done")
            if not staged(work / "repeated_units.npz").is_file():
                count_units_phase(cfg, data_dir, n_tasks, phase if sharded_dedup(cfg) else None)
    if not split:
        write_res = phase("write", functools.partial(write_task, cfg_json=cfg_json, data_dir=str(data_dir)),
                          "write.done")
    else:  # one write task per output index, over the tasks that share it
        direct_ = [r["write"] for r in filter_res if "write" in r]  # the whole files' tasks, written already
        write_res = direct_ + phase("write", functools.partial(
            write_task, cfg_json=cfg_json, data_dir=str(data_dir), groups=tuple(plan.groups), dedup=not is_direct(cfg)),
            "write-groups.done", plan.groups[-1] + 1)
    return build_stats(filter_res, dedup_stats, write_res, step_order)


def _remove_stale_temp_files(data_dir: Path) -> None:
    for f in data_dir.rglob(".*"):
        if f.is_file() and ".tmp" in f.name:
            f.unlink(missing_ok=True)


def clean_shard_files(data_dir: Path) -> dict[str, list[Path]]:
    """The kept shards of a completed curation stage, by domain (the next stages' input)."""
    manifest = data_dir / "manifest.json"
    if not staged(manifest).is_file() or not read_json(manifest).get("complete"):
        raise FileNotFoundError(f"{data_dir}: no completed curation stage (run `smelt data` first)")
    out: dict[str, list[Path]] = {}
    clean = data_dir / "clean"
    pull(clean)  # a run directory on a store: the driver of the next stages reads them here
    for d in sorted(p for p in clean.iterdir() if p.is_dir()) if clean.is_dir() else []:
        files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
        if files:
            out[d.name] = files
    return out
