"""Packing (`smelt pack`): curated document shards -> token shards + manifest.

Output layout under ``out_dir`` (``runs/<name>/tokens/``)::

    <domain>/train-NNNNN.{bin,idx}   token shards (format: `smelt.tokens.shards`), ~pack.shard_tokens each
    <domain>/val-NNNNN.{bin,idx}     held-out documents of that domain
    manifest.json                    written last: its ``complete: true`` marks the stage done
    _work/                           while a process pool runs: plan, per-task chunks, completion markers

Every document becomes ``[BOS] ids EOS`` (BOS only with ``pack.add_bos``), ids from
``tokenizer.encode(text, add_special_tokens=False)`` with ``encode_special_tokens=True``: a
document that mentions ``<|eos|>`` gets the ids of that text, never the EOS id.

Phases
------
1. plan (parent): one task per input file, big files cut into slices of consecutive records
   (``ceil(file bytes / slice_bytes)`` slices, cut by record count). The plan depends only on
   the inputs, never on the worker count.
2. tokenize (threads or process pool, `executor.local.run_tasks`, one completion marker per
   start slot; tasks start longest first, `schedule`, saved in the plan): each task produces
   its documents' tokens, in input order, and per document the validation key and UTF-8 bytes.
   Tasks run in this process (inline, threads) keep that in memory; pool workers write it to
   ``_work/chunks/<task>.{bin,idx}`` + ``<task>.meta.npz``.
3. split (parent): choose each domain's held-out documents (below).
4. assemble (threads or in process; a pool with markers again for big outputs): each output
   shard is a run of consecutive documents of one (domain, split) stream: a document goes to
   shard ``floor(s / shard_tokens)`` where ``s`` is the stream offset of its first token
   (numbers compacted when a document longer than a shard leaves a gap). Shards therefore
   depend only on the documents, never on how the input was cut into tasks, so the output is
   byte-identical for any worker count and mode. Assembling copies each token once more and
   writes the final files (~2% of the tokenizing time on the demo corpus, from memory).
5. manifest (parent), then ``_work`` (if any) is removed.

Held-out validation split (deterministic, exact counts, parallel-safe)
---------------------------------------------------------------------
Each document gets ``key = xxh3_64("smelt.pack.val\\0" + id, seed)``; the prefix keeps the key
independent of the tokenizer's training-sample key (`smelt.tokenizer.train`), which ranks
documents by plain ``xxh3_64(id, seed)``: without it the held-out set would be exactly the
documents the tokenizer was trained on. Domain d with N documents holds out::

    k = min(max_val_docs, max(min_val_docs, round_half_up(val_fraction * N)), N - 1)   (0 if N <= 1)

namely the k documents with the smallest ``(key, order)``, ``order = task << 32 | position``
breaking ties (duplicate ids) by corpus order. The cap and the floor are enforced exactly and
without any coordination between workers: workers only write every document's key; the parent
reads the keys of the domain's tasks, keeps each task's k smallest (the global k smallest are
among them), and takes the k-th smallest ``(key, order)`` as the threshold; assembly then
routes a document to ``val`` iff its ``(key, order)`` <= the threshold. The split depends on
(seed, ids, input order), not on the number of workers or on the task cut.

Resume and re-runs
------------------
The stage key hashes the pack config (minus ``workers``/``parallelism``/``threads_below_mb``), the
seed, the tokenizer's sha256, the input files (path, size, mtime) and the slicing rule. A complete
manifest with the same key, and every shard it lists present with the right size, makes
`pack_tokens` a no-op. Otherwise work resumes from ``_work`` when its plan has the same key
(finished tasks are skipped; a task whose chunk is missing or truncated is redone), or starts over
(stale outputs removed) when the key differs. Every file is written atomically, so a run killed at
any point resumes to the same bytes. Runs whose tasks execute in this process (inline or threads) on
small inputs (`IN_MEMORY_MAX_BYTES`) write no ``_work`` at all: a killed one restarts from scratch
(see `pack_tokens`).

Encoding engines (``pack.engine``)
----------------------------------
``hf``: HF ``encode_batch_fast``. ``tiktoken``: `smelt.tokens.fast_bpe.FastBPE` (same ids,
~3.5x HF's speed per core on the bench corpus; errors if the tokenizer cannot be reproduced).
``auto``: tiktoken when `fast_bpe.analyze` accepts the tokenizer, else HF. With the fast path
each run first encodes the first ``VERIFY_CHARS`` characters of every domain with both engines
(`verify_fast_path`); a difference fails the run under ``tiktoken`` and switches the whole run
to HF (with a warning, recorded in the manifest) under ``auto``. Documents the fast path cannot
vouch for go to HF (see fast_bpe), one by one.
The fast path's analysis of the tokenizer (~0.3 s for 32k tokens) is cached beside
tokenizer.json (`fast_bpe.cached_analyze`, keyed by its sha256 and the library versions).

Parallelism (``pack.workers``, ``pack.parallelism``)
----------------------------------------------------
One worker: tasks run in the calling process (HF then uses its own thread pool on every core).
Several: ``threads`` run tasks in this process: nothing to start, the tokenizer is already
loaded, and both engines release the GIL while encoding (tiktoken per joined call of ~4M
characters, HF per batch); reading JSON lines, the per-document checks and the numpy framing
hold it. ``processes`` spawn a pool (`executor.local.make_pool`): no GIL, but each worker first
starts Python, imports, loads the tokenizer and builds the encoder. ``auto`` takes threads for
inputs below ``pack.threads_below_mb`` on disk, processes above: the crossover measured with
bench/pack.py is in bench/README.md. In pool workers HF's own thread pool is limited to
``cores // workers`` threads. Task size: ``pack.slice_mb``, else `auto_slice_bytes` (enough
tasks to keep the workers busy on a small corpus in few files).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from smelt.data.executor.local import default_workers, make_pool, marker_path, run_tasks
from smelt.fsutil import (
    active_mirror,
    atomic_open,
    atomic_write_json,
    locked,
    mirrored,
    move_aside,
    read_json,
    remove_path,
    staged,
)
from smelt.tokens.shards import HEADER_BYTES, dtype_for_vocab, open_shard, write_shard

if TYPE_CHECKING:  # workers never import the recipe schema (pydantic: ~0.1 s per process start)
    from smelt.config import ExecutorConfig, PackConfig

log = logging.getLogger(__name__)

__all__ = ["PackError", "PackTask", "find_shards", "frame_documents", "pack_tokens", "plan_tasks", "read_manifest",
           "stage_key", "val_count", "val_key"]

FORMAT_VERSION = 1
WORK = "_work"
SPLITS = ("train", "val")
# Inputs larger than this on disk are cut into slices of about this size: ~100 MB of text for
# zstd JSONL (~3x), i.e. ~25M tokens, ~10-20 s of one core with the fast path. Small enough to
# keep every core busy on a few big files, large enough that per-task costs vanish.
SLICE_BYTES = 32 << 20
# Texts per encode call: amortizes per-call overhead (HF spreads a batch over its threads)
# while bounding memory.
BATCH_CHARS = 1 << 20
BATCH_DOCS = 4096
# Characters of each domain's first documents encoded by both engines when the fast path is on
# (`verify_fast_path`): ~1.5 ms per domain.
VERIFY_CHARS = 2048
# Below this many tokens, assembling in the parent beats using the process pool's workers
# (each would first load the assembly plan and chunk files into a cold process).
INLINE_ASSEMBLE_TOKENS = 64_000_000
# Runs whose tasks execute in this process (these modes) on at most this much input on disk keep
# the tasks' output in memory (`pack_tokens`): 32 MB of zstd JSON lines is ~100 MB of text,
# ~30M tokens (~60-120 MB held), ~10 s of one core with the fast path. Bigger inputs take the
# file-backed, resumable path whatever the mode (one worker on 100 GB must not hold it all).
IN_MEMORY_MODES = frozenset({"inline", "threads"})
IN_MEMORY_MAX_BYTES = 32 << 20
# Without ``pack.slice_mb``: cut the input into about this many tasks (so that a small corpus in
# a few files still keeps every worker busy), each at least MIN_SLICE_BYTES on disk (per-task
# costs: a chunk file pair, a completion marker and a 2 KB verification, ~5 ms). 256 KB of zstd
# JSON lines is ~1 MB of text, ~40 ms of one core with the fast path: on the demo corpus (14
# files, one of them, code, a third of the work) 1 MB slices left that file as one task, the
# critical path of a 2-worker run; 256 KB slices cut it in three (bench/README.md, pack).
AUTO_SLICES = 64
MIN_SLICE_BYTES = 256 << 10
MB = 1 << 20
_VAL_KEY_PREFIX = b"smelt.pack.val\0"
_U64 = (1 << 64) - 1
_SHARD_RE = re.compile(r"^(train|val)-\d{5,}\.(bin|idx)$")

ProgressFn = Callable[[str, int, int], None]  # (phase, tasks done, tasks in phase)


class PackError(RuntimeError):
    """The packing stage cannot run or a task failed; the message names the file or setting."""


# --------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class PackTask:
    """Records ``[start, stop)`` of one input file (``stop`` None: to the end of the file)."""

    domain: str
    path: str
    start: int = 0
    stop: int | None = None


def _check_domain(domain: str) -> None:
    if (not domain or domain in (".", "..") or domain.startswith((".", "_"))
            or any(c in domain for c in "/\\\0")):
        raise PackError(f"pack: domain name {domain!r} cannot be a directory name")


def count_records(path: Path) -> int:
    """Records in one curated shard (JSONL: newline count without parsing; Parquet: metadata)."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if name.endswith((".jsonl", ".jsonl.zst", ".jsonl.zstd")):
        import zstandard

        n, last = 0, b"\n"
        with open(path, "rb") as raw:
            stream = zstandard.ZstdDecompressor().stream_reader(raw) if name.endswith(("zst", "zstd")) else raw
            try:
                while block := stream.read(1 << 22):
                    n += block.count(b"\n")
                    last = block[-1:]
            except zstandard.ZstdError as e:
                raise PackError(f"pack: cannot read input shard {path}: {e}") from e
        return n + (last != b"\n")
    from smelt.data.io import read_shard

    return sum(1 for _ in read_shard(path))


def plan_tasks(shard_files: dict[str, list[Path]], slice_bytes: int = SLICE_BYTES) -> list[PackTask]:
    """Tasks in corpus order: domains sorted, files in the order given, slices in file order."""
    tasks: list[PackTask] = []
    for domain in sorted(shard_files):
        _check_domain(domain)
        for f in shard_files[domain]:
            p = Path(f)
            if not p.is_file():
                raise PackError(f"pack: input shard {p} does not exist (domain {domain})")
            size = p.stat().st_size
            n_slices = max(1, math.ceil(size / slice_bytes))
            if n_slices == 1:
                tasks.append(PackTask(domain, str(p)))
                continue
            n = count_records(p)
            per = max(1, math.ceil(n / n_slices))
            starts = list(range(0, max(n, 1), per))
            for j, a in enumerate(starts):
                tasks.append(PackTask(domain, str(p), a, starts[j + 1] if j + 1 < len(starts) else None))
    return tasks


def find_shards(clean_dir: Path) -> dict[str, list[Path]]:
    """``{domain: sorted shard files}`` of a curation output (``<run>/data/clean/<domain>/*``)."""
    from smelt.data.io import is_ignored_name

    clean_dir = Path(clean_dir)
    if not clean_dir.is_dir():
        raise PackError(f"pack: no curated shards at {clean_dir} (run `smelt data` first)")
    return {d.name: sorted(f for f in d.iterdir() if f.is_file() and not is_ignored_name(f.name))
            for d in sorted(clean_dir.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))}


def _fingerprints(shard_files: dict[str, list[Path]]) -> list[list[Any]]:
    out = []
    for domain in sorted(shard_files):
        for f in shard_files[domain]:
            st = os.stat(f)
            out.append([domain, str(f), st.st_size, st.st_mtime_ns])
    return out


def stage_key(cfg: PackConfig, tokenizer_sha256: str, shard_files: dict[str, list[Path]], seed: int,
              slice_bytes: int = SLICE_BYTES) -> str:
    """What the outputs depend on (how many workers run, and how, excluded: the output does not
    depend on it, and a run may resume with other settings)."""
    from smelt.config import recipe_to_dict

    conf = recipe_to_dict(cfg)
    for name in ("workers", "parallelism", "threads_below_mb", "executor"):
        conf.pop(name, None)
    blob = json.dumps({"config": conf, "seed": seed, "tokenizer_sha256": tokenizer_sha256,
                       "inputs": _fingerprints(shard_files), "slice_bytes": slice_bytes,
                       "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def val_key(doc_id: str, seed: int) -> int:
    """The document's held-out ranking key (see module doc)."""
    return xxhash.xxh3_64_intdigest(_VAL_KEY_PREFIX + doc_id.encode("utf-8", "surrogatepass"), seed=seed & _U64)


def val_count(n_docs: int, cfg: PackConfig) -> int:
    """How many of a domain's `n_docs` documents are held out (cap, floor, one left to train)."""
    if n_docs <= 1:
        return 0
    k = max(cfg.min_val_docs, math.floor(cfg.val_fraction * n_docs + 0.5))
    return max(0, min(k, cfg.max_val_docs, n_docs - 1))


# --------------------------------------------------------------------------------------------
# encoding (runs in the workers)


def _hf_encode_flat(tok: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    fn = getattr(tok, "encode_batch_fast", tok.encode_batch)
    lists = [e.ids for e in fn(list(texts), add_special_tokens=False)]
    lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    return np.fromiter(chain.from_iterable(lists), dtype=np.uint32, count=int(lens.sum())), lens


def frame_documents(ids: np.ndarray, lens: np.ndarray, eos: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``[BOS] ids EOS`` per document from back-to-back ids; returns (tokens, framed lengths)."""
    extra = 2 if bos is not None else 1
    out_lens = lens + extra
    ends = np.cumsum(out_lens)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint32)
    body = np.ones(len(out), dtype=bool)
    body[ends - 1] = False
    if bos is not None:
        body[ends - out_lens] = False
        out[ends - out_lens] = bos
    out[body] = ids
    out[ends - 1] = eos
    return out, out_lens


@dataclass
class _WorkerState:
    key: str
    tasks: list[PackTask]
    tok: Any
    fast: Any  # FastBPE or None
    requested: str
    eos: int
    bos: int | None
    dtype: np.dtype
    seed: int


_STATE: dict[str, _WorkerState] = {}


def _worker_state(work: Path, key: str, parent_pid: int) -> _WorkerState:
    cached = _STATE.get(str(work))
    if cached is not None and cached.key == key:
        return cached
    plan = read_json(work / "plan.json")
    if plan["key"] != key:
        raise PackError(f"pack: {work}/plan.json belongs to another run")
    if os.getpid() != parent_pid:
        # A pool worker, one per core: HF's own thread pool (encoding, fallback, verification)
        # must not multiply that. Read by HF before its first parallel call in this process.
        os.environ.setdefault("RAYON_NUM_THREADS", str(plan["threads"]))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if plan["threads"] > 1 else "false")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(staged(plan["tokenizer"])))
    tok.encode_special_tokens = True  # special-token strings in documents are text
    fast = None
    if plan["engine"] == "tiktoken":
        from smelt.tokens.fast_bpe import load_spec

        spec = load_spec(staged(work / "fast_bpe.npz"), key)
        if spec is None:
            raise PackError(f"pack: {work}/fast_bpe.npz is missing or belongs to another run")
        fast = _fast_encoder(spec, tok)
    state = _WorkerState(key=key, tasks=[PackTask(**t) for t in plan["tasks"]], tok=tok, fast=fast,
                         requested=plan["requested"], eos=plan["eos_id"],
                         bos=plan["bos_id"] if plan["add_bos"] else None, dtype=np.dtype(plan["dtype"]),
                         seed=plan["seed"])
    _STATE.clear()  # one run at a time per process
    _STATE[str(work)] = state
    return state


def _fast_encoder(spec: Any, tok: Any) -> Any:
    from smelt.tokens.fast_bpe import FastBPE

    return FastBPE(spec, tok)


def _read_error(task: PackTask, n: int, e: BaseException) -> PackError:
    return PackError(f"pack: cannot read input shard {task.path} (after {n} records): {type(e).__name__}: {e}")


def _read_batches(task: PackTask, batch_chars: int = BATCH_CHARS) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) of the task's records, in order, in batches of about `BATCH_CHARS` bytes.

    JSON lines (plain or zstd): the lines of a batch are parsed with one ``json.loads`` of
    ``[line, line, ...]``: one C call instead of one per record, and records before
    ``task.start`` are skipped without parsing. Any problem (a batch that is not exactly one
    value per line, a record without ``id``/string ``text``) is then located line by line and
    named with its line number. Other formats go through `smelt.data.shards.read_shard`.
    """
    from smelt.data.fs import CORRUPT_ERRORS, open_input  # the same decompression (truncation-checked)

    if not task.path.endswith((".jsonl", ".jsonl.zst", ".jsonl.zstd")):
        yield from _read_batches_generic(task, batch_chars)
        return
    n = 0  # lines consumed so far (= records: one per line)
    try:
        with open_input(task.path) as stream:
            lines: list[bytes] = []
            size = 0
            for line in stream:
                if n >= task.start:
                    if task.stop is not None and n >= task.stop:
                        break
                    lines.append(line)
                    size += len(line)
                    if size >= batch_chars or len(lines) >= BATCH_DOCS:
                        yield _parse_lines(task, n + 1 - len(lines), lines)
                        lines, size = [], 0
                n += 1
            if lines:
                yield _parse_lines(task, n - len(lines), lines)
    except PackError:
        raise
    except (*CORRUPT_ERRORS, OSError) as e:  # damaged zstd, truncated file, missing file, ...
        raise _read_error(task, n, e) from e


def _parse_lines(task: PackTask, first: int, lines: list[bytes]) -> tuple[list[str], list[str]]:
    """Records of `lines` (record `first` of the file is ``lines[0]``) as (ids, texts)."""
    try:
        recs = json.loads(b"[" + b",".join(lines) + b"]")
        if len(recs) == len(lines):  # else a line held several values, or one spanned lines
            ids = [str(r["id"]) for r in recs]
            texts = [r["text"] for r in recs]
            if all(type(t) is str for t in texts):
                return ids, texts
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    for k, line in enumerate(lines):  # find and name the first bad line
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or "id" not in r or not isinstance(r.get("text"), str):
                raise ValueError("not a record with an id and a string text")
        except (ValueError, RecursionError) as e:
            err = ValueError(f"{task.path}:{first + k + 1}: damaged shard record: {type(e).__name__}: {e}")
            raise _read_error(task, first + k, err) from e
    raise AssertionError("unreachable: every line parses alone")  # pragma: no cover


def _read_batches_generic(task: PackTask, batch_chars: int = BATCH_CHARS) -> Iterator[tuple[list[str], list[str]]]:
    from smelt.data.io import read_shard

    it = iter(read_shard(task.path))
    n = 0
    ids: list[str] = []
    texts: list[str] = []
    size = 0
    while task.stop is None or n < task.stop:
        try:
            doc = next(it)
        except StopIteration:
            break
        except Exception as e:  # damaged file, bad record, missing file, ...
            raise _read_error(task, n, e) from e
        if n >= task.start:
            ids.append(doc.id)
            texts.append(doc.text)
            size += len(doc.text)
            if size >= batch_chars or len(texts) >= BATCH_DOCS:
                yield ids, texts
                ids, texts, size = [], [], 0
        n += 1
    if texts:
        yield ids, texts


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def chunk_base(work: Path, i: int) -> Path:
    return work / "chunks" / f"{i:05d}"


@dataclass
class _Chunk:
    """One task's output: its documents' framed tokens (input order, the output dtype) and
    document ends, and per document the held-out key and UTF-8 byte count."""

    tokens: np.ndarray
    ends: np.ndarray
    keys: np.ndarray
    nbytes: np.ndarray


def _encode_task(w: _WorkerState, i: int) -> tuple[dict[str, Any], _Chunk]:
    """Tokenize task `i`; returns its counts (the completion marker's content) and its chunk."""
    t0 = time.perf_counter()
    task = w.tasks[i]
    staged(task.path)  # a run directory on a store: the curated shard, on whichever node this runs
    engine = "tiktoken" if w.fast is not None else "hf"
    fallback: Counter[str] = Counter()  # this task's own (tasks may run in threads side by side)
    keys: list[int] = []
    nbytes: list[int] = []
    tokens: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    batch: list[str] = []
    ids: list[str] = []

    def flush() -> None:
        if not batch:
            return
        try:
            flat, ln = encode()
        except PackError:
            raise
        except Exception as e:  # e.g. lone surrogates, which no UTF-8 tokenizer can take
            bad_id = next((d for d, t in zip(ids, batch, strict=True) if not _encodes(t)), ids[0])
            raise PackError(f"pack: cannot encode document {bad_id!r} of {task.path}: {type(e).__name__}: {e}") from e
        framed, framed_lens = frame_documents(flat, ln, w.eos, w.bos)
        tokens.append(framed)
        lens.append(framed_lens)
        batch.clear()
        ids.clear()

    def encode() -> tuple[np.ndarray, np.ndarray]:
        return w.fast.encode_flat(batch, fallback) if engine == "tiktoken" else _hf_encode_flat(w.tok, batch)

    seed = w.seed
    for batch_ids, batch_texts in _read_batches(task):
        keys.extend(val_key(d, seed) for d in batch_ids)
        nbytes.extend(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in batch_texts)
        batch.extend(batch_texts)
        ids.extend(batch_ids)
        flush()
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.uint32)
    if len(flat) and int(flat.max()) > np.iinfo(w.dtype).max:  # pragma: no cover - dtype_for_vocab's job
        raise PackError(f"pack: token id {int(flat.max())} of {task.path} does not fit {w.dtype}")
    chunk = _Chunk(tokens=flat.astype(w.dtype, copy=False),
                   ends=np.cumsum(np.concatenate(lens)) if lens else np.zeros(0, dtype=np.int64),
                   keys=np.array(keys, dtype=np.uint64), nbytes=np.array(nbytes, dtype=np.int64))
    return {"domain": task.domain, "docs": len(chunk.ends), "tokens": len(chunk.tokens), "bytes": int(sum(nbytes)),
            "engine": engine, "fallback": {k: v for k, v in fallback.items() if v},
            "seconds": round(time.perf_counter() - t0, 3)}, chunk


def _tokenize_task(i: int, *, work: str, key: str, parent_pid: int) -> dict[str, Any]:
    """Tokenize task `i` into ``_work/chunks/<i>`` (the file-backed path: process pools)."""
    t0 = time.perf_counter()
    w = _worker_state(Path(work), key, parent_pid)
    res, chunk = _encode_task(w, i)
    base = chunk_base(Path(work), i)
    write_shard(base, chunk.tokens, ends=chunk.ends, dtype=w.dtype)
    with atomic_open(base.with_suffix(".meta.npz"), "wb") as f:
        np.savez(f, keys=chunk.keys, nbytes=chunk.nbytes)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res




# --------------------------------------------------------------------------------------------
# validation split and assembly


def _chunk_ok(work: Path, i: int, res: dict[str, Any], itemsize: int) -> bool:
    base = chunk_base(work, i)
    try:
        return (staged(base.with_suffix(".bin")).stat().st_size == HEADER_BYTES + res["tokens"] * itemsize
                and staged(base.with_suffix(".idx")).stat().st_size == HEADER_BYTES + 8 * res["docs"]
                and staged(base.with_suffix(".meta.npz")).is_file())
    except OSError:
        return False


def _load_meta(work: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(staged(chunk_base(work, i).with_suffix(".meta.npz"))) as z:
        return z["keys"], z["nbytes"]


class _FileChunks:
    """The tasks' chunks as files under ``_work/chunks`` (process pools; resumable)."""

    def __init__(self, work: Path) -> None:
        self.work = Path(work)

    def tokens_ends(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sh = open_shard(chunk_base(self.work, i))
        return sh.tokens, np.asarray(sh.ends, dtype=np.int64)

    def ends(self, i: int) -> np.ndarray:
        return np.asarray(open_shard(chunk_base(self.work, i)).ends, dtype=np.int64)

    def meta(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return _load_meta(self.work, i)


class _MemoryChunks:
    """The tasks' chunks held in this process (inline and threads: see `pack_tokens`)."""

    def __init__(self, chunks: Sequence[_Chunk]) -> None:
        self.chunks = chunks

    def tokens_ends(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.chunks[i].tokens, self.chunks[i].ends

    def ends(self, i: int) -> np.ndarray:
        return self.chunks[i].ends

    def meta(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.chunks[i].keys, self.chunks[i].nbytes


_Chunks = _FileChunks | _MemoryChunks


def _orders(task: int, lo: int, hi: int) -> np.ndarray:
    return (np.uint64(task) << np.uint64(32)) | np.arange(lo, hi, dtype=np.uint64)


def _is_val(keys: np.ndarray, orders: np.ndarray, threshold: list[int] | None) -> np.ndarray:
    if threshold is None:
        return np.zeros(len(keys), dtype=bool)
    h, o = np.uint64(threshold[0]), np.uint64(threshold[1])
    return (keys < h) | ((keys == h) & (orders <= o))


def val_thresholds(cfg: PackConfig, chunks: _Chunks, tasks: list[PackTask], results: list[dict[str, Any]]
                   ) -> dict[str, dict[str, Any]]:
    """Per domain: documents, held-out count k and the (key, order) of the k-th smallest."""
    out: dict[str, dict[str, Any]] = {}
    by_domain: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_domain.setdefault(t.domain, []).append(i)
    for domain, idx in by_domain.items():
        n = sum(results[i]["docs"] for i in idx)
        k = val_count(n, cfg)
        threshold = None
        if k:
            cand_k, cand_o = [], []
            for i in idx:
                keys, _ = chunks.meta(i)
                if not len(keys):
                    continue
                if len(keys) > k:  # everything <= the task's k-th smallest key (ties included)
                    sel = np.nonzero(keys <= np.partition(keys, k - 1)[k - 1])[0]
                else:
                    sel = np.arange(len(keys))
                cand_k.append(keys[sel])
                cand_o.append(_orders(i, 0, len(keys))[sel])
            ck, co = np.concatenate(cand_k), np.concatenate(cand_o)
            j = np.lexsort((co, ck))[k - 1]
            threshold = [int(ck[j]), int(co[j])]
        out[domain] = {"docs": n, "val_docs": k, "threshold": threshold}
    return out


def plan_assembly(cfg: PackConfig, chunks: _Chunks, tasks: list[PackTask], split_info: dict[str, dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Output shards in order: {domain, split, name, pieces [(task, lo, hi)], tokens, docs, bytes}."""
    shards: list[dict[str, Any]] = []
    by_domain: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_domain.setdefault(t.domain, []).append(i)
    for domain in sorted(by_domain):
        th = split_info[domain]["threshold"]
        acc: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in SPLITS}
        offset = dict.fromkeys(SPLITS, 0)
        for i in by_domain[domain]:
            ends = chunks.ends(i)
            if not len(ends):
                continue
            doc_lens = np.diff(ends, prepend=0)
            keys, nbytes = chunks.meta(i)
            val = _is_val(keys, _orders(i, 0, len(keys)), th)
            for split, sel in (("train", ~val), ("val", val)):
                pos = np.nonzero(sel)[0]
                if not len(pos):
                    continue
                lens_s = doc_lens[pos]
                starts = offset[split] + np.cumsum(lens_s) - lens_s
                offset[split] += int(lens_s.sum())
                sid = starts // cfg.shard_tokens
                cuts = np.nonzero(np.diff(sid))[0] + 1
                for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(pos)], strict=True):
                    s = acc[split].setdefault(int(sid[a]), {"pieces": [], "tokens": 0, "docs": 0, "bytes": 0})
                    s["pieces"].append([i, int(pos[a]), int(pos[b - 1]) + 1])
                    s["tokens"] += int(lens_s[a:b].sum())
                    s["docs"] += int(b - a)
                    s["bytes"] += int(nbytes[pos[a:b]].sum())
        for split in SPLITS:
            for j, sid_ in enumerate(sorted(acc[split])):
                shards.append({"domain": domain, "split": split, "name": f"{split}-{j:05d}", **acc[split][sid_]})
    return shards


_ASSEMBLY: dict[str, Any] = {}


def _assembly_plan(work: Path, key: str) -> dict[str, Any]:
    """``_work/assemble.json``, read once per process (it lists every shard's pieces)."""
    plan = _ASSEMBLY.get(str(work))
    if plan is None or plan["key"] != key:
        plan = read_json(work / "assemble.json")
        if plan["key"] != key:
            raise PackError(f"pack: {work}/assemble.json belongs to another run")
        _ASSEMBLY.clear()
        _ASSEMBLY[str(work)] = plan
    return plan


def _assemble_task(j: int, *, work: str, out_dir: str, key: str) -> dict[str, Any]:
    """Write output shard `j` of ``_work/assemble.json`` from the task chunk files."""
    plan = _assembly_plan(Path(work), key)
    spec = plan["shards"][j]
    return _assemble_shard(spec, plan["thresholds"][spec["domain"]], _FileChunks(Path(work)), Path(out_dir),
                           np.dtype(plan["dtype"]))


def _assemble_shard(spec: dict[str, Any], th: list[int] | None, chunks: _Chunks, out_dir: Path, dtype: np.dtype
                    ) -> dict[str, Any]:
    """Write one output shard (`plan_assembly`'s `spec`) from the tasks' chunks."""
    want_val = spec["split"] == "val"
    parts: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    for task, lo, hi in spec["pieces"]:
        tokens, all_ends = chunks.tokens_ends(task)
        keys, _ = chunks.meta(task)
        keep = _is_val(keys[lo:hi], _orders(task, lo, hi), th) == want_val
        ends = all_ends[lo:hi]
        first = int(all_ends[lo - 1]) if lo else 0
        doc_lens = np.diff(ends, prepend=first)
        toks = tokens[first: int(ends[-1])]
        parts.append(toks if keep.all() else toks[np.repeat(keep, doc_lens)])
        lens.append(doc_lens[keep])
    flat = np.concatenate(parts)
    doc_lens = np.concatenate(lens)
    if len(flat) != spec["tokens"] or len(doc_lens) != spec["docs"]:
        raise PackError(f"pack: shard {spec['domain']}/{spec['name']}: assembled {len(flat)} tokens / "
                        f"{len(doc_lens)} docs, planned {spec['tokens']} / {spec['docs']}")
    n_tok, n_doc = write_shard(out_dir / spec["domain"] / spec["name"], flat, ends=np.cumsum(doc_lens), dtype=dtype)
    return {"tokens": n_tok, "docs": n_doc}


# --------------------------------------------------------------------------------------------
# the stage


def _shard_files_ok(out_dir: Path, manifest: dict[str, Any]) -> bool:
    width = np.dtype(manifest["dtype"]).itemsize
    for domain, splits in manifest["domains"].items():
        for s in splits.values():
            for name, n_tok, n_doc in zip(s["shards"], s["shard_tokens"], s["shard_docs"], strict=True):
                base = out_dir / domain / name
                try:
                    if (staged(base.with_suffix(".bin")).stat().st_size != HEADER_BYTES + n_tok * width
                            or staged(base.with_suffix(".idx")).stat().st_size != HEADER_BYTES + 8 * n_doc):
                        return False
                except OSError:
                    return False
    return True


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The stage's manifest if it is complete, else None."""
    p = Path(out_dir) / "manifest.json"
    try:
        m = read_json(p)
    except (OSError, ValueError):
        return None
    return m if m.get("complete") else None


def _clear_outputs(out_dir: Path) -> None:
    """Remove what an earlier run with other inputs/config left (only files this stage writes)."""
    remove_path(out_dir / "manifest.json")
    remove_path(out_dir / WORK)
    if not out_dir.is_dir():
        return
    for d in out_dir.iterdir():
        if d.is_dir() and d.name != WORK:
            for f in d.iterdir():
                if f.is_file() and (_SHARD_RE.match(f.name) or (f.name.startswith(".") and f.name.endswith(".tmp"))):
                    remove_path(f)
            if not any(d.iterdir()):
                d.rmdir()


def _remove_stale_temp_files(out_dir: Path) -> None:
    for f in out_dir.rglob(".*.tmp"):
        if f.is_file():
            f.unlink(missing_ok=True)


def verify_fast_path(fast: Any, tasks: Sequence[PackTask], requested: str) -> str | None:
    """Encode the first `VERIFY_CHARS` characters of every domain (its first task's first
    documents) with both engines; return the first document id where they differ, or None.

    Once per run, not per task or per document: the fast path's equality with HF is proven for
    the tokenizer it accepts (`smelt.tokens.fast_bpe`'s docstring, checked exhaustively by
    tests/tokens/test_fast_bpe.py), and documents it cannot vouch for go to HF one by one. This
    is a tripwire for a broken environment (a tiktoken or tokenizers build whose regex or merge
    loop behaves otherwise, a damaged analysis cache), which every task of the run shares; one
    sample per domain still exercises each script (Chinese, code, ...) the run encodes.
    Under ``pack.engine=tiktoken`` a difference raises `PackError`.
    """
    ids: list[str] = []
    texts: list[str] = []
    where: list[str] = []
    seen: set[str] = set()
    for task in tasks:
        if task.domain in seen:
            continue
        seen.add(task.domain)
        budget = VERIFY_CHARS
        batches = _read_batches(task, batch_chars=VERIFY_CHARS)  # reads only the first few records
        try:
            for batch_ids, batch_texts in batches:
                for d, text in zip(batch_ids, batch_texts, strict=True):
                    if budget <= 0:
                        break
                    if not _encodes(text):  # the task names it (`_encode_task`)
                        continue
                    ids.append(d)
                    texts.append(text[:budget])
                    where.append(task.path)
                    budget -= len(texts[-1])
                if budget <= 0:
                    break
        finally:
            batches.close()
    bad = fast.mismatches(texts) if texts else []
    if not bad:
        return None
    msg = (f"pack: tiktoken and HF ids differ on document {ids[bad[0]]!r} of {where[bad[0]]} "
           f"(first {VERIFY_CHARS} characters of each domain)")
    if requested == "tiktoken":
        raise PackError(msg + "; use pack.engine=hf or auto")
    log.warning("%s; this run encodes with HF", msg)
    return ids[bad[0]]


def _choose_engine(cfg: PackConfig, tok: Any, tok_file: Path, tok_sha: str) -> tuple[Any, dict[str, Any]]:
    """(FastBPE, or None for HF; what the manifest records about the choice).

    The tokenizer's analysis is cached beside it (`fast_bpe.cached_analyze`): ~0.3 s for a 32k
    vocabulary, a third of packing a 10 MB corpus, paid once per tokenizer instead of per run.
    """
    if cfg.engine == "hf":
        return None, {"reason": "pack.engine=hf"}
    from smelt.tokens.fast_bpe import FastBPE, FastPathUnsupported, cached_analyze

    try:
        spec, cached = cached_analyze(tok, tok_file, tok_sha)
        fast = FastBPE(spec, tok)  # also compiles the regex: a rejected pattern fails here
    except FastPathUnsupported as e:
        if cfg.engine == "tiktoken":
            raise PackError(f"pack.engine=tiktoken: this tokenizer has no exact tiktoken equivalent: {e}") from e
        log.info("pack: tiktoken fast path off (%s); encoding with HF tokenizers", e)
        return None, {"reason": str(e)}
    return fast, {"fast_path": fast.spec.stats, "analysis_cached": cached}


def auto_slice_bytes(input_bytes: int) -> int:
    """Task size when ``pack.slice_mb`` is unset: 1/`AUTO_SLICES` of the input, clamped to
    [`MIN_SLICE_BYTES`, `SLICE_BYTES`]. Depends on the inputs only (never on the worker count),
    so the plan, and a resume of it, is the same for any number of workers."""
    return int(min(SLICE_BYTES, max(MIN_SLICE_BYTES, math.ceil(input_bytes / AUTO_SLICES))))


def parallel_mode(cfg: PackConfig, workers: int, input_bytes: int) -> str:
    """How `workers` parallel tasks run: ``inline`` (one worker: this process), ``threads`` or
    ``processes`` (``pack.parallelism``; ``auto``: threads below ``pack.threads_below_mb`` of
    input on disk, else processes). See the module doc for the trade-off."""
    if workers <= 1:
        return "inline"
    if cfg.parallelism != "auto":
        return cfg.parallelism
    return "threads" if input_bytes < cfg.threads_below_mb * MB else "processes"


def _make_executor(mode: str, workers: int) -> Executor | None:
    if mode == "threads":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smelt-pack")
    if mode == "processes":
        return make_pool(workers)  # spawned: see smelt.data.executor.local
    return None


def _resumable(work: Path, key: str) -> bool:
    try:
        plan = read_json(work / "plan.json")
    except (OSError, ValueError):
        return False
    return plan.get("key") == key


def schedule(tasks: Sequence[PackTask]) -> list[int]:
    """Order in which to start the tasks: longest first (LPT), by on-disk bytes per task.

    Tasks start in submission order; with the small tasks of a small corpus (or one big file
    among small ones) a big task started last is the run's tail, one worker busy and the others
    idle. Starting the biggest first bounds that tail by the smallest tasks (Graham's LPT rule,
    makespan <= 4/3 of optimal). A sliced file's bytes are shared evenly by its slices. Depends
    on the plan only (saved in it, so a resume maps completion markers the same way); the
    output does not depend on it (chunks are named by task, not by start order)."""
    share = Counter(t.path for t in tasks)
    sizes: dict[str, int] = {}
    for t in tasks:
        if t.path not in sizes:
            try:
                sizes[t.path] = os.path.getsize(t.path)
            except OSError:
                sizes[t.path] = 0  # reported by the task that reads it
    cost = [sizes[t.path] / share[t.path] for t in tasks]
    return sorted(range(len(tasks)), key=lambda i: (-cost[i], i))


def _run_in_memory(state: _WorkerState, order: Sequence[int], pool: Executor | None, progress: ProgressFn | None
                   ) -> tuple[list[dict[str, Any]], list[_Chunk]]:
    """Run every task in this process (inline, or on `pool`'s threads), started in `order`;
    returns (counts, chunks) indexed by task. The first failure propagates (the caller shuts
    the pool down, cancelling the tasks not started)."""
    n = len(state.tasks)
    if sorted(order) != list(range(n)):
        raise PackError(f"pack: tokenize: schedule is not a permutation of the {n} tasks")
    out: list[tuple[dict[str, Any], _Chunk] | None] = [None] * n
    if pool is None:
        for done, i in enumerate(order, 1):
            out[i] = _encode_task(state, i)
            if progress:
                progress("tokenize", done, n)
    else:
        futures = {pool.submit(_encode_task, state, i): i for i in order}
        for done, f in enumerate(as_completed(futures), 1):
            out[futures[f]] = f.result()
            if progress:
                progress("tokenize", done, n)
    return [r for r, _ in out], [c for _, c in out]  # type: ignore[misc]


def _run_slot(slot: int, *, fn: Callable[[int], dict[str, Any]], order: tuple[int, ...]) -> dict[str, Any]:
    return fn(order[slot])


def _run_checked(phase: str, fn: Callable[[int], dict[str, Any]], n: int, done_dir: Path, workers: int,
                 ok: Callable[[int, dict[str, Any]], bool], progress: ProgressFn | None,
                 pool: Executor | None = None, order: Sequence[int] | None = None,
                 ray_cfg: ExecutorConfig | None = None) -> list[dict[str, Any]]:
    """run_tasks, then redo (once) any task whose marker exists but whose outputs do not.

    `order`: start task ``order[k]`` k-th (its completion marker is slot k's); results come
    back indexed by task. `ray_cfg`: run the tasks on Ray (`run_tasks_ray`) instead."""
    if order is not None and list(order) != list(range(n)):
        if sorted(order) != list(range(n)):
            raise PackError(f"pack: {phase}: schedule is not a permutation of the {n} tasks")
        slot_of = {t: k for k, t in enumerate(order)}
        slot_results = _run_checked(phase, functools.partial(_run_slot, fn=fn, order=tuple(order)), n, done_dir,
                                    workers, lambda k, r: ok(order[k], r), progress, pool, ray_cfg=ray_cfg)
        return [slot_results[slot_of[i]] for i in range(n)]
    fn = mirrored(fn)  # a run directory on a store: each task reads and writes through it
    for attempt in range(2):
        done = 0

        def tick(_i: int) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(phase, done, n)

        if ray_cfg is not None:
            from smelt.data.executor.ray_tasks import run_tasks_ray

            results = run_tasks_ray(fn, n, done_dir, ray_cfg, on_done=tick)
        else:
            results = run_tasks(fn, n, done_dir, workers, on_done=tick, pool=pool)
        bad = [i for i, r in enumerate(results) if not ok(i, r)]
        if not bad:
            return results
        if attempt:
            raise PackError(f"pack: {phase}: outputs of tasks {bad[:5]} are missing right after writing them")
        log.warning("pack: %s: %d finished task(s) lost their output; redoing them", phase, len(bad))
        for i in bad:
            remove_path(marker_path(done_dir, i))
    raise AssertionError("unreachable")  # pragma: no cover


@locked("smelt pack", lambda a: Path(a["out_dir"]).parent)
def pack_tokens(cfg: PackConfig, tokenizer_path: Path, shard_files: dict[str, list[Path]], out_dir: Path,
                seed: int, workers: int | None = None, progress: ProgressFn | None = None, *,
                slice_bytes: int | None = None, force: bool = False) -> dict[str, Any]:
    """Tokenize `shard_files` ({domain: curated shard files}) into `out_dir`; return the manifest.

    `workers`: parallel tasks (None: ``cfg.workers``; 0: one per core), run by threads or
    processes (`parallel_mode`). `progress(phase, done, total)` is called as tasks finish.
    `slice_bytes`: files larger than this are split into several tasks (None: ``cfg.slice_mb``,
    or `auto_slice_bytes`). `force`: redo everything even if a complete manifest matches.
    """
    from smelt.config import recipe_to_dict
    from smelt.tokenizer.train import load_tokenizer, special_ids, tokenizer_sha256

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    tokenizer_path = Path(tokenizer_path)
    tok_file = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
    tok = load_tokenizer(tok_file, encode_special_tokens=True)
    tok_sha = tokenizer_sha256(tok_file)
    specials = special_ids(tok)
    for name in ("eos", "bos", "pad"):
        if name not in specials:
            raise PackError(f"pack: tokenizer {tok_file} has no <|{name}|> special token (not a smelt tokenizer?)")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for_vocab(vocab_size)

    for domain in sorted(shard_files):  # input errors surface here, before any work
        _check_domain(domain)
        for f in shard_files[domain]:
            if not Path(f).is_file():
                raise PackError(f"pack: input shard {f} does not exist (domain {domain})")
    input_bytes = sum(os.path.getsize(f) for fs in shard_files.values() for f in fs)
    if slice_bytes is None:
        slice_bytes = int(cfg.slice_mb * MB) if cfg.slice_mb is not None else auto_slice_bytes(input_bytes)
    tasks = plan_tasks(shard_files, slice_bytes)
    key = stage_key(cfg, tok_sha, shard_files, seed, slice_bytes)
    if not force:
        m = read_manifest(out_dir)
        if m is not None and m.get("key") == key:
            if _shard_files_ok(out_dir, m):
                log.info("pack: %s is complete for the same inputs, tokenizer and config; skipping", out_dir)
                return m
            log.warning("pack: %s: shards listed in the manifest are missing or truncated; packing again", out_dir)
    if read_manifest(out_dir) is not None:  # a complete earlier result (other inputs, or forced): keep it
        move_aside(out_dir, "pack")
    remove_path(out_dir / "manifest.json")
    work = out_dir / WORK
    plan_file = work / "plan.json"
    n_workers = default_workers(workers if workers is not None else cfg.workers)
    on_ray = cfg.executor.kind == "ray"
    if on_ray:
        from smelt.data.executor.ray_tasks import check_ray

        check_ray()  # before anything is written
    # ray: every task is a Ray task, file-backed with completion markers as with a process pool
    mode = "ray" if on_ray else parallel_mode(cfg, n_workers, input_bytes)
    # Tasks that run in this process (inline, threads) on a small input (`IN_MEMORY_MAX_BYTES`) keep
    # their chunks in memory and assembly reads them from there: no chunk files, no .meta.npz,
    # no completion markers, no plan on disk. Resuming a stage that takes about a second (10 MB
    # of text) buys nothing, while those ~130 small atomic files cost ~10% of it
    # (bench/README.md, pack). Safety does not depend on them: the manifest, written last and
    # atomically, still makes a re-run a no-op, and a run killed before it leaves no manifest,
    # so the next run redoes the stage from scratch (stale shards of the killed run removed).
    # Process pools (big inputs) keep the resumable file-backed path below.
    in_memory = mode in IN_MEMORY_MODES and input_bytes <= IN_MEMORY_MAX_BYTES
    resumable = not force and not in_memory and _resumable(work, key)
    if not resumable:
        _clear_outputs(out_dir)
    _remove_stale_temp_files(out_dir)

    threads = max(1, default_workers(0) // n_workers)  # HF's own threads per worker process
    if resumable:
        # Same key -> same tokenizer, config and inputs: the plan on disk is this run's plan.
        plan = read_json(plan_file)
        engine_info = plan["engine_info"]
        fast = _choose_engine(cfg, tok, tok_file, tok_sha)[0] if plan["engine"] == "tiktoken" else None
        if plan["engine"] == "tiktoken" and fast is None:  # pragma: no cover - same key, same answer
            raise PackError(f"pack: {work} was planned with tiktoken, which now refuses the tokenizer")
    else:
        fast, engine_info = _choose_engine(cfg, tok, tok_file, tok_sha)
    # Every run, resumed ones too: the environment may have changed since the plan was made.
    mismatch = verify_fast_path(fast, tasks, cfg.engine) if fast is not None else None
    if mismatch is not None:  # pack.engine=auto (tiktoken raised): the whole run with HF
        fast = None
        engine_info = {**engine_info, "reason": f"fast path verification failed on document {mismatch!r}"}
        if resumable:  # its chunks came from the fast path
            log.warning("pack: discarding %s (encoded with the fast path)", work)
            _clear_outputs(out_dir)
            resumable = False
    if resumable:
        plan["threads"] = threads
        atomic_write_json(plan_file, plan, indent=None)
        log.info("pack: resuming %s", work)
    else:
        plan = {"key": key, "tokenizer": str(tok_file.resolve()), "engine": "tiktoken" if fast is not None else "hf",
                "engine_info": engine_info, "requested": cfg.engine, "eos_id": specials["eos"],
                "bos_id": specials["bos"], "add_bos": cfg.add_bos, "dtype": dtype.name, "seed": seed,
                "threads": threads, "tasks": [asdict(t) for t in tasks], "schedule": schedule(tasks)}
    if not in_memory:
        work.mkdir(parents=True, exist_ok=True)
        if fast is not None and mode in ("processes", "ray") and not (resumable and (work / "fast_bpe.npz").is_file()):
            from smelt.tokens.fast_bpe import save_spec  # what the worker processes build their encoder from

            save_spec(fast.spec, work / "fast_bpe.npz", key)
        if not resumable:
            atomic_write_json(plan_file, plan, indent=None)  # after fast_bpe.npz: a plan on disk is complete
    # Tasks that run in this process (inline or threads) use what is already loaded here.
    state = _WorkerState(key=key, tasks=tasks, tok=tok, fast=fast, requested=cfg.engine, eos=specials["eos"],
                         bos=specials["bos"] if cfg.add_bos else None, dtype=dtype, seed=seed)
    _STATE.clear()
    _STATE[str(work)] = state
    timings: dict[str, float] = {"setup": round(time.perf_counter() - t_start, 3)}
    pool = _make_executor(mode, n_workers)
    started_ray = False
    if on_ray:
        from smelt.data.executor.ray_tasks import ensure_ray

        started_ray = ensure_ray(cfg.executor, cpus=n_workers)
    ray_cfg = cfg.executor if on_ray else None
    try:
        ts = time.perf_counter()
        if in_memory:
            results, chunk_list = _run_in_memory(state, plan["schedule"], pool, progress)
            chunks: _Chunks = _MemoryChunks(chunk_list)
        else:
            results = _run_checked(
                "tokenize", functools.partial(_tokenize_task, work=str(work), key=key, parent_pid=os.getpid()),
                len(tasks), work / "tokenize.done", n_workers, lambda i, r: _chunk_ok(work, i, r, dtype.itemsize),
                progress, pool,
                # Any worker count (markers are per slot; a resume may change it). A plan written
                # before schedules existed ran, and marked, its tasks in plan order.
                order=plan.get("schedule"), ray_cfg=ray_cfg)
            chunks = _FileChunks(work)
        timings["tokenize"] = round(time.perf_counter() - ts, 3)
        timings["tokenize_tasks_sum"] = round(sum(r["seconds"] for r in results), 3)  # busy time of the workers

        ts = time.perf_counter()
        split_info = val_thresholds(cfg, chunks, tasks, results)
        shards = plan_assembly(cfg, chunks, tasks, split_info)
        thresholds = {d: s["threshold"] for d, s in split_info.items()}
        if in_memory:
            def assemble(j: int) -> dict[str, Any]:
                return _assemble_shard(shards[j], thresholds[shards[j]["domain"]], chunks, out_dir, dtype)

            # In input order, so that the output shards appear in order (as in the file path).
            for j, _ in enumerate(pool.map(assemble, range(len(shards))) if pool is not None
                                  else map(assemble, range(len(shards)))):
                if progress:
                    progress("assemble", j + 1, len(shards))
            del chunk_list, chunks  # the tokens: no longer needed
        else:
            atomic_write_json(work / "assemble.json", {"key": key, "dtype": dtype.name, "shards": shards,
                                                       "thresholds": thresholds}, indent=None)
            # Threads cost nothing to start; a process pool pays off only for big outputs.
            total_tokens = sum(r["tokens"] for r in results)
            asm_pool = pool if mode == "threads" or total_tokens >= INLINE_ASSEMBLE_TOKENS else None
            asm_ray = ray_cfg if total_tokens >= INLINE_ASSEMBLE_TOKENS else None
            width = dtype.itemsize

            def shard_ok(j: int, r: dict[str, Any]) -> bool:
                base = out_dir / shards[j]["domain"] / shards[j]["name"]
                try:
                    # staged: on a store, a shard an assemble task wrote on another node
                    return (r["tokens"] == shards[j]["tokens"]
                            and staged(base.with_suffix(".bin")).stat().st_size == HEADER_BYTES + r["tokens"] * width
                            and staged(base.with_suffix(".idx")).stat().st_size == HEADER_BYTES + 8 * r["docs"])
                except OSError:
                    return False

            _run_checked("assemble", functools.partial(_assemble_task, work=str(work), out_dir=str(out_dir), key=key),
                         len(shards), work / "assemble.done", n_workers if asm_pool else 1, shard_ok, progress,
                         asm_pool, ray_cfg=asm_ray)
        timings["assemble"] = round(time.perf_counter() - ts, 3)
        if on_ray and active_mirror() is not None:  # every node's stage copy of _work: the store keeps the truth
            from smelt.data.executor.ray_tasks import drop_local, on_every_node

            on_every_node(functools.partial(drop_local, str(work.absolute())))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if started_ray:
            import ray

            ray.shutdown()
        _STATE.clear()  # release the tokenizer and the encoder: the run is over
        _ASSEMBLY.clear()

    domains: dict[str, dict[str, Any]] = {}
    for domain in sorted(shard_files):
        domains[domain] = {s: {"tokens": 0, "docs": 0, "bytes": 0, "shards": [], "shard_tokens": [], "shard_docs": []}
                           for s in SPLITS}
    for s in shards:
        e = domains[s["domain"]][s["split"]]
        e["tokens"] += s["tokens"]
        e["docs"] += s["docs"]
        e["bytes"] += s["bytes"]
        e["shards"].append(s["name"])
        e["shard_tokens"].append(s["tokens"])
        e["shard_docs"].append(s["docs"])
    used = Counter(r["engine"] for r in results)
    fallback: Counter[str] = Counter()
    for r in results:
        fallback.update(r["fallback"])
    timings["total"] = round(time.perf_counter() - t_start, 3)
    totals = {k: sum(d[s][k] for d in domains.values() for s in SPLITS) for k in ("tokens", "docs", "bytes")}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "stage": "pack",
        "tokenizer": str(tok_file),
        "tokenizer_sha256": tok_sha,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": specials["eos"],
        "bos_id": specials["bos"],
        "pad_id": specials["pad"],
        # Every special token as the tokenizer defines it (name without brackets -> id), so the
        # loader and objectives (`SpecialIds.from_manifest`) need not assume the id layout.
        "special_ids": specials,
        "add_bos": cfg.add_bos,
        "domains": domains,
        "totals": totals,
        "val_split": {d: {"docs": s["docs"], "val_docs": s["val_docs"]} for d, s in split_info.items()},
        "engine": {"requested": cfg.engine, "tasks": dict(used), "fallback_docs": dict(fallback),
                   "verify_mismatches": [mismatch] if mismatch is not None else [],
                   **engine_info},
        "seed": seed,
        "config": recipe_to_dict(cfg),
        "inputs": _fingerprints(shard_files),
        "tasks": len(tasks),
        "workers": n_workers,
        "parallelism": mode,
        "timings_s": timings,
        "key": key,
        "complete": True,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    remove_path(work)  # after the manifest: a kill here loses nothing
    log.info("pack: %s tokens in %s documents (%s) -> %s in %.1fs", f"{totals['tokens']:,}", f"{totals['docs']:,}",
             ", ".join(f"{k} {v} tasks" for k, v in sorted(used.items())), out_dir, timings["total"])
    return manifest
