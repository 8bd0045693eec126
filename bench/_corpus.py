"""A mixed Chinese / English / code benchmark corpus with planted near-duplicates.

Built at bench time from real third-party text in ``../shared/data`` plus the Python standard
library as the code domain; nothing is committed to the repository:

- ``wiki``: WikiText-2 ``wikitext2/valid.txt`` (tokenized form), one paragraph per document;
- ``web``: the dolma Common Crawl sample (``web_cc_dolma_sample`` jsonl + provided documents);
- ``books``: LAMBADA passages (``lambada/lambada_test.jsonl``);
- ``zh-wiki``: CMRC 2018 contexts (Simplified Chinese Wikipedia);
- ``zh-hant-wiki``: DRCD contexts (Traditional Chinese Wikipedia);
- ``code``: ``*.py`` modules of 0.5-16 KB from ``sysconfig.get_paths()["stdlib"]`` (tests excluded).

Planted near-duplicates: a share of the documents (``dup_frac``) are copies of another document
of the same domain with word tokens substituted until the true shingle Jaccard similarity
(``MinHasher(cfg).shingles`` + ``jaccard``: 5-word shingles, 5-character shingles for CJK text)
is as close as possible to a target level. Each base document gets at most one copy, so a pair
can only end up in one cluster through the pair itself (or by chance through a third document).
The ground truth is written next to the documents (``planted.json``), never into them, so both
systems read identical records.

Layout: ``<root>/<domain>/part-NNNNN.jsonl`` with records ``{"id", "text", "domain"}``, each file
``docs_per_file`` documents (so that both systems get several tasks per domain), plus
``planted.json`` and ``corpus.json`` (counts, bytes).
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

from smelt.config import MinHashConfig
from smelt.data.dedup.minhash import MinHasher, jaccard
from smelt.data.text import TOKEN_RE

log = logging.getLogger(__name__)

# Share of each domain among the base (non-planted) documents. Web is capped by the 30 pages of
# the dolma sample; the rest is split so that no source is exhausted at the default size.
DOMAIN_SHARES = {"wiki": 0.22, "books": 0.22, "zh-wiki": 0.2, "zh-hant-wiki": 0.16, "code": 0.2}
# Target Jaccard levels of planted copies: dense around the LSH threshold of 14 x 8 bands
# ((1/14)^(1/8) = 0.72, FineWeb) and on both sides of the 0.5 / 0.8 figures the bench reports.
JACCARD_LEVELS = (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# Code files: large enough to be a real module, small enough that one file does not dominate a
# task (the median stdlib module is ~8 KB).
CODE_MIN_BYTES, CODE_MAX_BYTES = 500, 16_000
# Planted copies need room for fine-grained edits: one substituted token changes up to 5 of the
# shingles, so J after one edit is about (m - 5) / (m + 5) for m tokens.
MIN_PLANT_TOKENS = 120
_WIKI_HEADING_RE = re.compile(r"^ (= )+.*( =)+ $")


@dataclass
class PlantedPair:
    base: str  # id of the original document
    copy: str  # id of the near-duplicate copy
    domain: str
    target: float  # requested Jaccard level
    jaccard: float  # measured shingle Jaccard (smelt's definition)


@dataclass
class Corpus:
    root: Path
    domains: list[str]
    files: list[Path]  # every part file, sorted (the order both systems' readers use)
    n_docs: int
    n_bytes: int  # UTF-8 bytes of all texts
    domain_of: dict[str, str]  # doc id -> domain
    pairs: list[PlantedPair] = field(default_factory=list)
    by_domain: dict[str, dict[str, int]] = field(default_factory=dict)

    def texts(self) -> list[tuple[str, str, str]]:
        """(id, domain, text) of every document in file order."""
        out = []
        for f in self.files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    r = json.loads(line)
                    out.append((r["id"], r["domain"], r["text"]))
        return out


# --------------------------------------------------------------------------------------------
# sources


def _wiki(data: Path) -> list[str]:
    """One document per WikiText paragraph (headings dropped)."""
    return [line.strip() for line in (data / "wikitext2" / "valid.txt").read_text(encoding="utf-8").splitlines()
            if line.strip() and not _WIKI_HEADING_RE.match(line)]


def _web(data: Path) -> list[str]:
    d = data / "web_cc_dolma_sample"
    out = []
    for f in sorted(d.glob("*.jsonl")):
        out += [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    with gzip.open(d / "provided_documents_000.json.gz", "rt", encoding="utf-8") as fh:
        out += [json.loads(line)["text"] for line in fh if line.strip()]
    return out


def _books(data: Path) -> list[str]:
    with open(data / "lambada" / "lambada_test.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def _squad_contexts(*files: Path) -> list[str]:
    out = []
    for f in files:
        for art in json.loads(f.read_text(encoding="utf-8"))["data"]:
            out += [p["context"] for p in art["paragraphs"]]
    return out


def _code() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if skip.intersection(rel):
            continue
        try:
            size = p.stat().st_size
            if CODE_MIN_BYTES <= size <= CODE_MAX_BYTES:
                out.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return out


def load_sources(data: Path) -> dict[str, list[str]]:
    """Every candidate document by domain (deterministic order)."""
    zh = data / "cmrc2018"
    tw = data / "drcd"
    return {
        "wiki": _wiki(data),
        "web": _web(data),
        "books": _books(data),
        "zh-wiki": _squad_contexts(zh / "cmrc2018_dev.json", zh / "cmrc2018_trial.json"),
        "zh-hant-wiki": _squad_contexts(tw / "DRCD_dev.json", tw / "DRCD_test.json"),
        "code": _code(),
    }


# --------------------------------------------------------------------------------------------
# planted near-duplicates


def _substituted(text: str, spans: list[tuple[int, int]], order: list[int], k: int,
                 vocab: list[str], rng: random.Random) -> str:
    """`text` with the tokens at the first `k` positions of `order` replaced by vocabulary tokens."""
    repl = {}
    for i in order[:k]:
        old = text[spans[i][0]:spans[i][1]].lower()
        for _ in range(8):  # a replacement equal to the original would not change anything
            new = vocab[rng.randrange(len(vocab))]
            if new.lower() != old:
                break
        repl[i] = new
    parts = []
    pos = 0
    for i in sorted(repl):
        s, e = spans[i]
        parts.append(text[pos:s])
        parts.append(repl[i])
        pos = e
    parts.append(text[pos:])
    return "".join(parts)


def make_near_duplicate(text: str, target: float, hasher: MinHasher, vocab: list[str],
                        rng: random.Random) -> tuple[str, float]:
    """A copy of `text` whose shingle Jaccard with it is as close as possible to `target`.

    Substitutions happen at a fixed random order of token positions; the number k of them is
    found by bisection (Jaccard decreases with k up to sampling noise), starting from the
    independent-substitution estimate J = q / (2 - q), q = (1 - k/m)^n.
    """
    spans = [m.span() for m in TOKEN_RE.finditer(text)]
    m = len(spans)
    base = hasher.shingles(text)
    order = list(range(m))
    rng.shuffle(order)
    seed = rng.random()
    cache: dict[int, tuple[str, float]] = {}

    def attempt(k: int) -> tuple[str, float]:
        if k not in cache:
            # same replacement words for the same k: the search sees a deterministic function
            t = _substituted(text, spans, order, k, vocab, random.Random(seed))
            cache[k] = (t, jaccard(base, hasher.shingles(t)))
        return cache[k]

    lo, hi = 1, max(1, m)  # at least one substitution: an exact copy is exact dedup's business
    while lo < hi:
        mid = (lo + hi) // 2
        if attempt(mid)[1] > target:
            lo = mid + 1
        else:
            hi = mid
    cands = [attempt(k) for k in {max(1, lo - 1), lo} if k <= m]
    return min(cands, key=lambda c: abs(c[1] - target))


# --------------------------------------------------------------------------------------------
# build


def _allocate(total: int, available: dict[str, int]) -> dict[str, int]:
    """Split `total` over domains by `DOMAIN_SHARES`; a domain's shortfall goes to the others."""
    counts = {d: 0 for d in available}
    open_ = {d for d in available if available[d] > 0}
    left = total
    while left > 0 and open_:
        weight = sum(DOMAIN_SHARES[d] for d in open_)
        give = {d: max(1, int(left * DOMAIN_SHARES[d] / weight)) for d in sorted(open_)}
        for d in sorted(open_):
            k = min(give[d], available[d] - counts[d], left)
            counts[d] += k
            left -= k
            if counts[d] >= available[d]:
                open_.discard(d)
    if left:
        log.warning("only %d of %d documents available", total - left, total)
    return counts


def build_corpus(data: Path, out: Path, n_docs: int = 4000, seed: int = 0, dup_frac: float = 0.1,
                 docs_per_file: int = 200, minhash_cfg: MinHashConfig | None = None) -> Corpus:
    """Sample `n_docs` documents (including the planted copies) and write them under `out`."""
    rng = random.Random(seed)
    hasher = MinHasher(minhash_cfg or MinHashConfig())
    sources = load_sources(data)
    n_planted = int(round(n_docs * dup_frac))
    n_base = n_docs - n_planted
    picked: dict[str, list[str]] = {"web": list(sources["web"])[: n_base]}
    counts = _allocate(n_base - len(picked["web"]), {d: len(sources[d]) for d in DOMAIN_SHARES})
    for dom, k in counts.items():
        picked[dom] = rng.sample(sources[dom], k)

    docs: dict[str, list[tuple[str, str]]] = {}  # domain -> [(id, text)]
    for dom, texts in picked.items():
        docs[dom] = [(f"{dom}-{i:06d}", t) for i, t in enumerate(texts)]

    # planted copies: base documents drawn in proportion to the domains, never the same twice
    vocab = {dom: [t for _, txt in docs[dom][:200] for t in TOKEN_RE.findall(txt)] for dom in docs}
    candidates = [(dom, i) for dom in docs for i in range(len(docs[dom]))
                  if len(TOKEN_RE.findall(docs[dom][i][1])) >= MIN_PLANT_TOKENS]
    chosen = rng.sample(candidates, min(n_planted, len(candidates)))
    pairs: list[PlantedPair] = []
    for j, (dom, i) in enumerate(chosen):
        target = JACCARD_LEVELS[j % len(JACCARD_LEVELS)]
        base_id, text = docs[dom][i]
        copy, jac = make_near_duplicate(text, target, hasher, vocab[dom], rng)
        copy_id = f"{base_id}-nd{j:04d}"
        docs[dom].append((copy_id, copy))
        pairs.append(PlantedPair(base=base_id, copy=copy_id, domain=dom, target=target, jaccard=round(jac, 4)))

    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    domain_of: dict[str, str] = {}
    by_domain: dict[str, dict[str, int]] = {}
    n_bytes = 0
    for dom in sorted(docs):
        items = docs[dom]
        rng.shuffle(items)  # copies land in other files than their originals
        d = out / dom
        d.mkdir(exist_ok=True)
        b = 0
        for p in range(0, len(items), docs_per_file):
            f = d / f"part-{p // docs_per_file:05d}.jsonl"
            with open(f, "w", encoding="utf-8") as fh:
                for doc_id, text in items[p:p + docs_per_file]:
                    fh.write(json.dumps({"id": doc_id, "text": text, "domain": dom}, ensure_ascii=False) + "\n")
                    b += len(text.encode("utf-8"))
                    domain_of[doc_id] = dom
            files.append(f)
        by_domain[dom] = {"docs": len(items), "bytes": b, "files": -(-len(items) // docs_per_file)}
        n_bytes += b
    corpus = Corpus(root=out, domains=sorted(docs), files=sorted(files), n_docs=len(domain_of),
                    n_bytes=n_bytes, domain_of=domain_of, pairs=pairs, by_domain=by_domain)
    (out / "planted.json").write_text(json.dumps([asdict(p) for p in pairs], indent=1), encoding="utf-8")
    (out / "corpus.json").write_text(json.dumps({"docs": corpus.n_docs, "bytes": n_bytes, "seed": seed,
                                                 "by_domain": by_domain}, indent=1), encoding="utf-8")
    return corpus
