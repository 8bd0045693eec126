"""Errors of the input side of curation, shared by `smelt.data.fs`, `smelt.data.inputs` and the
readers (`smelt.data.readers`)."""

from __future__ import annotations


class DataInputError(Exception):
    """An input that cannot be read at all; raised before any work starts."""


class CorruptInputError(Exception):
    """A compressed stream that is damaged or ends early (inside the readers only)."""
