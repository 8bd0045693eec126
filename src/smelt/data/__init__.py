"""Data curation: read, normalize, filter, redact, decontaminate and deduplicate documents."""

from __future__ import annotations

from smelt.data.document import Document

__all__ = ["Document", "redact_text"]


def __getattr__(name: str):  # lazy: keep `import smelt.data` cheap for worker processes
    if name == "redact_text":
        from smelt.data.steps.redact import redact_text

        return redact_text
    raise AttributeError(name)
