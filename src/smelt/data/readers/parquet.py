"""Parquet: one document per row, fields as for JSON lines (`FileReader.from_record`); binary
columns (images, raw bytes) are never read."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from smelt.data.document import Document
from smelt.data.fs import CORRUPT_ERRORS, is_url, local_path, open_input
from smelt.data.readers.base import FileReader

_PARQUET_BATCH_ROWS = 256   # rows converted to Python at a time (memory ~ one row group anyway)


def read(r: FileReader) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    # Local files go to Arrow's native reader by path; fsspec URLs as Python file objects.
    with open_input(r.path, decompress=False) if is_url(r.path) else contextlib.nullcontext(local_path(r.path)) as raw:
        try:
            pf = pq.ParquetFile(raw)
            # Binary columns (images, raw bytes) never become text or meta: do not even read them.
            schema = pf.schema_arrow
            binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                      or pa.types.is_fixed_size_binary(f.type)]
            groups = None
            rows = pf.metadata.num_rows
            if r.part is not None:  # a part of a split file: row groups [start, end), after n rows
                start, end, n = r.part
                groups = list(range(start, end))
                rows = sum(pf.metadata.row_group(g).num_rows for g in groups)
            for name in binary:
                r.dropped_fields[name] += rows
            columns = [f.name for f in schema if f.name not in binary]
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns, row_groups=groups):
                for row in batch.to_pylist():
                    n += 1
                    doc = r.from_record(row, n)
                    if type(doc) is tuple:
                        yield r.error_doc(n, doc[0], doc[1],
                                          json.dumps(row, ensure_ascii=False, default=str), doc[2])
                    else:
                        yield doc
        except (pa.ArrowException, *CORRUPT_ERRORS) as e:
            yield r.error_doc(n + 1, "corrupt_file", f"{type(e).__name__}: {e}")
