"""Where documents come from and go to: the names other modules import, in one place.

The code lives in small modules; this one only re-exports them:

* `smelt.data.inputs`: `resolve_files` (recipe inputs -> files, errors before any work),
  `is_ignored_name`;
* `smelt.data.readers`: the format registry, `read_documents`, `detect_format`; one module per
  format (`readers.text`, `jsonl`, `squad`, `parquet`, `warc`, `html`), shared reader state in
  `readers.base`;
* `smelt.data.fs`: local / fsspec byte streams with gzip and zstd decompression;
* `smelt.data.shards`: the document shard format, `ShardWriter`, `read_shard`, `count_shard`;
* `smelt.data.errors`: `DataInputError`.
"""

from __future__ import annotations

from typing import Any

from smelt.data.errors import DataInputError
from smelt.data.inputs import is_ignored_name, resolve_files
from smelt.data.readers import detect_format, read_documents, register_reader
from smelt.data.readers.base import READ_ERRORS
from smelt.data.shards import SHARD_FORMAT_VERSION, ShardFormat, ShardWriter, count_shard, read_shard, shard_suffix

__all__ = [
    "DataInputError",
    "READ_ERRORS",
    "SHARD_FORMAT_VERSION",
    "SUPPORTED_EXTENSIONS",
    "ShardFormat",
    "ShardWriter",
    "count_shard",
    "detect_format",
    "is_ignored_name",
    "read_documents",
    "read_shard",
    "register_reader",
    "resolve_files",
    "shard_suffix",
]


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_EXTENSIONS":  # follows the registry: formats can be added at runtime
        from smelt.data.readers import supported_extensions

        return supported_extensions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
