"""The `Step` protocol and per-step statistics (the pipeline is assembled from the recipe by
`smelt.data.curate.build_pipeline`, through `smelt.data.steps.registry`).

A step sees one `Document` at a time and answers one question: keep it (return ``None``,
possibly after rewriting ``doc.text`` or adding to ``doc.meta``), or reject it with a short
reason (return the reason string). The runner sends rejected documents to ``rejects/`` with
``meta.rejected_by`` and ``meta.reason``; nothing is dropped without a record.

Steps count what they saw, kept and dropped (by reason), per domain, plus free-form
counters (``count``) such as PII matches by type or characters removed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from smelt.data.document import Document

log = logging.getLogger(__name__)


@dataclass
class DomainStats:
    """Counts for one step on one domain."""

    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> documents
    counters: Counter = field(default_factory=Counter)  # free-form: pii types, chars removed

    def merge(self, other: DomainStats) -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.counters.update(other.counters)

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept,
                "dropped": dict(sorted(self.dropped.items())),
                "dropped_total": sum(self.dropped.values()),
                "counters": dict(sorted(self.counters.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainStats:
        return cls(seen=d["seen"], kept=d["kept"], dropped=Counter(d.get("dropped", {})),
                   counters=Counter(d.get("counters", {})))


class StepStats:
    """Per-domain counts for one step; mergeable across tasks."""

    def __init__(self) -> None:
        self.by_domain: dict[str, DomainStats] = {}

    def domain(self, domain: str) -> DomainStats:
        ds = self.by_domain.get(domain)
        if ds is None:
            ds = self.by_domain[domain] = DomainStats()
        return ds

    def merge(self, other: StepStats) -> None:
        for dom, ds in other.by_domain.items():
            self.domain(dom).merge(ds)

    def total(self) -> DomainStats:
        t = DomainStats()
        for ds in self.by_domain.values():
            t.merge(ds)
        return t

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total().to_dict(),
                "by_domain": {d: s.to_dict() for d, s in sorted(self.by_domain.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        s = cls()
        for dom, ds in d.get("by_domain", {}).items():
            s.by_domain[dom] = DomainStats.from_dict(ds)
        return s


class Step:
    """One curation step. Subclasses set `name` and implement `process`.

    `process(doc)` returns ``None`` to keep the document (it may rewrite ``doc.text`` and add
    to ``doc.meta``) or a short reason string to reject it. Reasons are stable identifiers such
    as ``"gopher_short_doc"``: they are the keys of the stats funnel and of the report.
    Free-form counts go through ``self.count(doc, key, n)``.
    """

    name: ClassVar[str] = "step"

    def __init__(self) -> None:
        self.stats = StepStats()

    def process(self, doc: Document) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def count(self, doc: Document, key: str, n: int = 1) -> None:
        if n:
            self.stats.domain(doc.domain).counters[key] += n

    def process_batch(self, docs: list[Document]) -> list[str | None]:
        """`process` for several documents at once, in order. Steps that run a model override it
        to score a batch in one call; the outcome of a document must not depend on its batch."""
        return [self.process(doc) for doc in docs]

    def info(self) -> dict[str, Any]:
        """What the step decided once for all documents (a scoring step's thresholds), for
        ``stats.json`` and the report; empty for most steps."""
        return {}

    def _record(self, doc: Document, reason: str | None) -> None:
        ds = self.stats.domain(doc.domain)
        ds.seen += 1
        if reason is None:
            ds.kept += 1
        else:
            ds.dropped[reason] += 1

    def __call__(self, doc: Document) -> str | None:
        """Run `process` and record the outcome."""
        reason = self.process(doc)
        self._record(doc, reason)
        return reason

    def batch(self, docs: list[Document]) -> list[str | None]:
        """Run `process_batch` and record each outcome."""
        reasons = self.process_batch(docs) if docs else []
        if len(reasons) != len(docs):
            raise RuntimeError(f"step {self.name!r}: process_batch returned {len(reasons)} outcomes "
                               f"for {len(docs)} documents")
        for doc, reason in zip(docs, reasons):
            self._record(doc, reason)
        return reasons

    def run(self, docs: Iterable[Document],
            on_reject: Callable[[Document], None] | None = None) -> Iterator[Document]:
        """Generator form: yield kept documents; hand rejected ones (marked) to `on_reject`."""
        for doc in docs:
            reason = self(doc)
            if reason is None:
                yield doc
            else:
                mark_rejected(doc, self.name, reason)
                if on_reject is not None:
                    on_reject(doc)


def mark_rejected(doc: Document, step: str, reason: str) -> Document:
    doc.meta["rejected_by"] = step
    doc.meta["reason"] = reason
    return doc


class Filter(Step):
    """A step that never rewrites text: it only keeps or rejects (`reject_reason`)."""

    def reject_reason(self, doc: Document) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def process(self, doc: Document) -> str | None:
        return self.reject_reason(doc)


def run_steps(doc: Document, steps: list[Step]) -> str | None:
    """Send one document through `steps`; on rejection mark it and return the step name."""
    for step in steps:
        reason = step(doc)
        if reason is not None:
            mark_rejected(doc, step.name, reason)
            return step.name
    return None
