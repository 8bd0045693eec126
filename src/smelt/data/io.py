"""Where documents come from and go to: the names other modules import, in one place.

The code lives in small modules; this one only re-exports them:

* `smelt.data.inputs`: `resolve_files` (recipe inputs -> files, errors before any work),
  `is_ignored_name`;
* `smelt.data.readers`: the format registry, `read_documents`, `detect_format`,
  `supported_extensions`; one module per format (`readers.text`, `jsonl`, `squad`, `parquet`,
  `warc`, `html`), shared reader state in `readers.base`;
* `smelt.data.fs`: local / fsspec byte streams with gzip and zstd decompression;
* `smelt.data.shards`: the document shard format, `ShardWriter`, `read_shard`, `count_shard`;
* `smelt.data.errors`: `DataInputError`.
"""

from __future__ import annotations

from typing import Any

from smelt.data.errors import DataInputError
from smelt.data.inputs import is_ignored_name, resolve_files
from smelt.data.readers import detect_format, read_documents, register_reader, supported_extensions
from smelt.data.readers.base import READ_ERRORS
from smelt.data.shards import SHARD_FORMAT_VERSION, ShardFormat, ShardWriter, count_shard, read_shard, shard_suffix

__all__ = [
    "DataInputError",
    "READ_ERRORS",
    "SHARD_FORMAT_VERSION",
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
    "supported_extensions",
]


def __getattr__(name: str) -> Any:
    # The old constant, kept for callers that still read it (not in __all__: a module attribute computed on
    # access, it follows the registry, so formats added at runtime appear); new code calls supported_extensions().
    if name == "SUPPORTED_EXTENSIONS":
        return supported_extensions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
