"""The record every curation step sees.

A document on disk is one JSON object (JSONL) or one Parquet row with the columns
``id, text, domain, meta``. Rejected documents carry ``meta.rejected_by`` (the step name) and
``meta.reason``; duplicates carry ``meta.duplicate_of`` (the id of the document that was kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Document:
    """One text document. Steps may rewrite ``text`` and add keys to ``meta``."""

    id: str
    text: str
    domain: str = "default"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "domain": self.domain, "meta": self.meta}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Document:
        return cls(id=str(rec["id"]), text=rec["text"], domain=rec.get("domain") or "default",
                   meta=dict(rec.get("meta") or {}))
