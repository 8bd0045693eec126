"""The built-in demo corpus: three domains from text every Python installation has.

``build_corpus(out_dir, size)`` writes, with no network and no file outside the Python
installation and this package::

    <out_dir>/prose/part-NNNNN.jsonl   English prose: the language reference topics of
                                      `pydoc_data.topics` (what ``help("if")`` prints), split at
                                      paragraph boundaries, and the docstrings of standard-library
                                      modules (read with `ast`, never imported)
    <out_dir>/code/part-NNNNN.jsonl    Python source: standard-library modules
    <out_dir>/web/part-NNNNN.jsonl     messy web pages in English and Chinese from
                                      `smelt.data.synth`, labelled ``meta.planted`` (exact and
                                      near duplicates, PII, boilerplate, spam, mojibake, short
                                      pages, pages quoting the demo evaluation set)
    <out_dir>/eval/demo_eval.jsonl     the demo's multiple-choice evaluation set (a copy of the
                                      packaged resource): the curation stage decontaminates
                                      against it and the evaluation stage scores it
    <out_dir>/manifest.json            written last: sizes, sources, planted counts, key

Selection is deterministic: files are taken in sorted order, spread evenly over the alphabet,
until a byte budget is reached, so the same Python version gives the same corpus. Code files
and docstring files are disjoint (a docstring is not in both domains). The manifest's ``key``
hashes the size settings and the Python version; a complete corpus with the same key is reused.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
import sysconfig
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from smelt.data.synth import generate
from smelt.fsutil import atomic_write_json, atomic_write_text, read_json, staged

log = logging.getLogger(__name__)

VERSION = 1
EVAL_FILE = "demo_eval.jsonl"


@dataclass(frozen=True)
class CorpusSize:
    """Budgets of one corpus size."""

    prose_bytes: int  # pydoc topics first, then docstrings, until this many UTF-8 bytes
    code_bytes: int  # standard-library sources until this many bytes
    code_file_max_bytes: int  # larger modules are skipped (a few giant files would dominate)
    web_docs: int  # synthetic web documents (half English, half Chinese)
    files_per_domain: int  # JSONL files per domain (the curation stage's unit of parallel work)


# "full": ~3.6 MB, about 1M tokens with the demo tokenizer: enough for a few hundred steps of a
# 1M-parameter model without repeating data more than a few times. "tiny": the tests' size.
SIZES: dict[str, CorpusSize] = {
    "full": CorpusSize(prose_bytes=1_200_000, code_bytes=1_400_000, code_file_max_bytes=48_000, web_docs=1600,
                       files_per_domain=4),
    "tiny": CorpusSize(prose_bytes=90_000, code_bytes=90_000, code_file_max_bytes=24_000, web_docs=240,
                       files_per_domain=2),
}


def eval_items_path() -> Path:
    """The packaged demo evaluation set (generic JSONL ``{"id","context","choices","gold"}``)."""
    return Path(str(resources.files("smelt") / "resources" / EVAL_FILE))


def load_eval_items(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or eval_items_path()
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
    return items


# --------------------------------------------------------------------------------------------
# sources


def _chunks(text: str, max_bytes: int) -> list[str]:
    """Split at blank lines into pieces of at most ~max_bytes (a paragraph is never cut)."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        n = len(para.encode("utf-8")) + 2
        if cur and size + n > max_bytes:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += n
    if cur:
        out.append("\n\n".join(cur))
    return [c.strip() for c in out if c.strip()]


def pydoc_topic_docs() -> list[dict[str, Any]]:
    """The language reference topics that ``help()`` shows, in sorted topic order."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        for j, chunk in enumerate(_chunks(topics[name], 3000)):
            docs.append({"id": f"pydoc/{name}/{j}", "text": chunk, "meta": {"origin": "pydoc_topics"}})
    return docs


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # `this.py` is ROT13 text, `antigravity.py` opens a browser when imported; neither is read
    # as code here, but they are not representative source either.
    return sorted(p for p in root.glob("*.py") if p.name not in ("this.py", "antigravity.py"))


def _spread(files: list[Path]) -> list[Path]:
    """Reorder so that any prefix samples the whole alphabet: 0, n/2, n/4, 3n/4, ..."""
    n = len(files)
    order: list[int] = []
    seen = set()
    step = 1
    while len(order) < n:
        for k in range(step):
            i = (2 * k + 1) * n // (2 * step) if step > 1 else 0
            if i < n and i not in seen:
                seen.add(i)
                order.append(i)
        step *= 2
        if step > 2 * n:
            order += [i for i in range(n) if i not in seen]
            break
    return [files[i] for i in order]


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        log.debug("demo: skipping %s: %s", path, e)
        return None


def code_docs(size: CorpusSize) -> tuple[list[dict[str, Any]], set[Path]]:
    """Standard-library modules until the byte budget; returns (documents, files used)."""
    docs, used, total = [], set(), 0
    for p in _spread(_stdlib_files()):
        if total >= size.code_bytes:
            break
        n = p.stat().st_size
        if n > size.code_file_max_bytes or n < 500:
            continue
        text = _read_source(p)
        if text is None:
            continue
        docs.append({"id": f"stdlib/{p.name}", "text": text, "meta": {"origin": "stdlib_source", "file": p.name}})
        used.add(p)
        total += len(text.encode("utf-8"))
    return docs, used


def docstring_docs(exclude: set[Path], min_chars: int = 200) -> list[dict[str, Any]]:
    """The module, class and function docstrings of each module not used as code, parsed with
    `ast` (importing would run module code), in documents of at most ~3 kB."""
    docs = []
    for p in _spread(_stdlib_files()):
        if p in exclude:
            continue
        src = _read_source(p)
        if src is None:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= min_chars and d not in parts:
                    parts.append(d)
        for j, chunk in enumerate(_chunks("\n\n".join(parts), 3000) if parts else []):
            docs.append({"id": f"docstrings/{p.stem}/{j}", "text": chunk,
                         "meta": {"origin": "stdlib_docstrings", "file": p.name}})
    return docs


def prose_docs(size: CorpusSize, exclude: set[Path]) -> list[dict[str, Any]]:
    docs, total = [], 0
    # Interleave topics and docstrings so that the tiny size has both kinds.
    topics, strings = pydoc_topic_docs(), docstring_docs(exclude)
    for i in range(max(len(topics), len(strings))):
        for pool in (topics, strings):
            if i < len(pool) and total < size.prose_bytes:
                docs.append(pool[i])
                total += len(pool[i]["text"].encode("utf-8"))
    return docs


def web_docs(size: CorpusSize, seed: int, eval_items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Synthetic messy pages; contaminated ones quote an evaluation item (context + gold answer)."""
    quoted = [f"{it['context']}{it['choices'][it['gold']]}" for it in eval_items]
    return [{"id": d.id, "text": d.text, "meta": d.meta}
            for d in generate(size.web_docs, seed=seed, eval_items=quoted)]


# --------------------------------------------------------------------------------------------
# the corpus


def corpus_key(size_name: str, seed: int) -> str:
    size = SIZES[size_name]
    blob = json.dumps({"version": VERSION, "size": asdict(size), "seed": seed,
                       "python": sys.version.split()[0], "eval": eval_items_path().read_text(encoding="utf-8")},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_domain(out: Path, docs: list[dict[str, Any]], files: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    per = max(1, -(-len(docs) // files))
    names = []
    for f in range(files):
        part = docs[f * per:(f + 1) * per]
        if not part:
            break
        name = f"part-{f:05d}.jsonl"
        atomic_write_text(out / name, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in part))
        names.append(name)
    return names


def build_corpus(out_dir: Path, size: str = "full", seed: int = 0, force: bool = False) -> dict[str, Any]:
    """Write the demo corpus into `out_dir` (skipped when complete with the same key)."""
    if size not in SIZES:
        raise ValueError(f"demo corpus size {size!r}: expected one of {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    key = corpus_key(size, seed)
    manifest_path = out_dir / "manifest.json"
    if not force and staged(manifest_path).is_file():  # (the store's, for a run directory on one)
        m = read_json(manifest_path)
        if m.get("complete") and m.get("key") == key:
            log.info("demo corpus: %s is complete, reusing it", out_dir)
            return m
    manifest_path.unlink(missing_ok=True)
    sz = SIZES[size]
    items = load_eval_items()
    code, used = code_docs(sz)
    domains = {"prose": prose_docs(sz, used), "code": code, "web": web_docs(sz, seed, items)}
    summary: dict[str, Any] = {}
    for dom, docs in domains.items():
        files = _write_domain(out_dir / dom, docs, sz.files_per_domain)
        summary[dom] = {"documents": len(docs), "bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
                        "files": files, "origins": dict(Counter(d["meta"].get("origin", "synth") for d in docs))}
    atomic_write_text(out_dir / "eval" / EVAL_FILE, eval_items_path().read_text(encoding="utf-8"))
    planted = Counter(d["meta"]["planted"] for d in domains["web"])
    manifest = {"stage": "demo_corpus", "complete": True, "key": key, "version": VERSION, "size": size,
                "seed": seed, "python": sys.version.split()[0], "domains": summary,
                "planted": dict(sorted(planted.items())), "eval_items": len(items)}
    atomic_write_json(manifest_path, manifest)
    log.info("demo corpus (%s): %s", size, ", ".join(f"{d} {s['documents']} docs / {s['bytes'] / 1e6:.2f} MB"
                                                    for d, s in summary.items()))
    return manifest
