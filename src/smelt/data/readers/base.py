"""What every reader shares: `FileReader`, the per-file state a reader function gets.

A reader is ``read(r: FileReader) -> Iterator[Document]``. It opens ``r.path`` (with
`smelt.data.fs.open_input` for decompression and fsspec), and for each record yields either a
`Document` or, for a record it cannot read, ``r.error_doc(n, reason, message, raw)``: bad input
never raises in the middle of a file and is never dropped silently. The error document carries
``meta["read_error"]`` (a stable reason, see `READ_ERRORS`), ``meta["error"]`` (a short
message) and, as text, the raw record decoded with ``errors="replace"``; the pipeline rejects
it at step ``read`` with that reason, so it lands in ``rejects/`` and in the funnel. A damaged
or truncated compressed file yields the documents before the damage, then one ``corrupt_file``
document, then stops. Records that are not documents at all (blank lines, WARC requests) are
counted with ``r.skip``. Failures of the storage itself (a network error, a file deleted
under us) do raise: the task is retried, and outputs are written atomically.

``r.from_record`` maps one JSON object / table row to a `Document` (text and id fields, meta
flattening, bulky fields left out); ``r.gen_id(n)`` names a record that has no id.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from smelt.data.document import Document
from smelt.data.fs import CORRUPT_ERRORS, GLOB_MAGIC, basename, glob_root, is_url, local_path, open_input, url_fs

if TYPE_CHECKING:
    from smelt.config import InputSource

# One logger for all readers (bad records, skipped fields), whatever the format's module.
log = logging.getLogger("smelt.data.readers")

# Stable ``meta["read_error"]`` reasons (the keys of the funnel at step "read"). A new format
# may add its own; these are the ones the built-in readers use.
READ_ERRORS = (
    "invalid_utf8",           # the line / block / file is not valid UTF-8
    "invalid_unicode",        # valid JSON whose text holds lone UTF-16 surrogates ("\ud800")
    "invalid_json",           # a JSON line that does not parse
    "not_an_object",          # a JSON line that parses to a list, string, number, ...
    "missing_text",           # no text field (nor `content`), or it is null
    "non_string_text",        # the text field holds a number, list, object, ...
    "not_squad_layout",       # a .json file without data[].paragraphs[].context
    "corrupt_file",           # damaged / truncated compressed stream or container
    "html_extraction_failed", # trafilatura raised
    "html_no_text",           # trafilatura found no main text (navigation-only pages, ...)
)

# A top-level string field longer than this is not copied into meta (e.g. raw HTML kept next
# to extracted text, a second copy of the text). Our own choice: meta travels with the
# document through every step and into every shard, and 2 KiB is above any URL, title, date
# or label, yet far below a page. Dropped fields are counted and logged once per file.
META_MAX_CHARS = 2048
# meta keys we set ourselves; a record's own values for them move to "orig_<key>".
_RESERVED_META = ("source", "read_error", "error")
_MAX_ERROR_CHARS = 200      # meta["error"] is a short message, not a dump
_WARN_PER_FILE = 10         # individual warnings per file; the rest is summed up at the end

# Lone UTF-16 surrogates: JSON may spell them ("\ud800"), UTF-8 cannot hold them.
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class FileReader:
    """Per-file state shared by the format readers: naming, field mapping, error accounting."""

    path: str
    display: str        # file name relative to the source root: used in ids and meta.source
    name: str           # id prefix: src.name or the file stem
    domain: str
    text_field: str
    id_field: str
    skipped: Counter | None
    src: InputSource | None = None  # the whole input source, for format options (txt_split)
    # Part of the file to read (`smelt.data.readers.split_file`): (start, end, records before
    # start) as bytes of a JSON-lines file or row groups of a Parquet file; None: all of it.
    part: tuple[int, int, int] | None = None
    problems: Counter = field(default_factory=Counter)
    dropped_fields: Counter = field(default_factory=Counter)

    def gen_id(self, n: int) -> str:
        return f"{self.name}/{self.display}:{n}"

    def error_doc(self, n: int, reason: str, message: str, raw: str = "",
                  doc_id: str | None = None) -> Document:
        """A document that records an unreadable record (rejected at step ``read``); logged."""
        message = message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."
        self.problems[reason] += 1
        if sum(self.problems.values()) <= _WARN_PER_FILE:
            log.warning("%s:%d: %s: %s", self.path, n, reason, message)
        return Document(id=doc_id or self.gen_id(n), text=raw, domain=self.domain,
                        meta={"source": f"{self.display}:{n}", "read_error": reason, "error": message})

    def read_whole(self) -> bytes | Document:
        """The whole file's bytes, or the ``corrupt_file`` error document when a compressed file
        cannot be read to its end (formats that parse a file at once: text, HTML, SQuAD)."""
        with open_input(self.path) as stream:
            try:
                return stream.read()
            except CORRUPT_ERRORS as e:
                return self.error_doc(1, "corrupt_file", f"{type(e).__name__}: {e}")

    def skip(self, key: str, n: int, why: str) -> None:
        """Count record `n` that is not a document at all (under `key` in the skip counts)."""
        log.debug("%s:%d: skipped (%s)", self.path, n, why)
        if self.skipped is not None:
            self.skipped[key] += 1

    def finish(self) -> None:
        total = sum(self.problems.values())
        if total > _WARN_PER_FILE:
            log.warning("%s: %d bad records in all (%d not logged individually): %s", self.path,
                        total, total - _WARN_PER_FILE, dict(sorted(self.problems.items())))
        if self.dropped_fields:
            log.info("%s: bulky fields not copied into meta (> %d chars or binary): %s",
                     self.path, META_MAX_CHARS, dict(sorted(self.dropped_fields.items())))

    def from_record(self, rec: dict[str, Any], n: int) -> Document | tuple[str, str, str | None]:
        """A `Document` from one JSON object / Parquet row, or ``(reason, message, id)``."""
        rid = rec.get(self.id_field)
        doc_id = str(rid) if rid is not None and rid != "" else None
        text_key = self.text_field if self.text_field in rec else "content"
        text = rec.get(text_key)
        if text is None:
            return ("missing_text", f"no {self.text_field!r} or 'content' field (or it is null)", doc_id)
        if type(text) is not str:
            return ("non_string_text", f"field {text_key!r} holds {type(text).__name__}, not a string", doc_id)
        meta: dict[str, Any] = {}
        # datatrove/dolma keep metadata nested under "metadata", smelt under "meta": flatten
        # it, then let top-level fields win (datatrove's `metadata | data`).
        nested_keys = ()
        for key in ("metadata", "meta"):
            nested = rec.get(key)
            if isinstance(nested, str) and nested[:1] == "{":
                try:
                    nested = json.loads(nested)
                except ValueError:
                    continue
            if isinstance(nested, dict):
                meta.update(nested)
                nested_keys += (key,)
        for k, v in rec.items():
            if k == text_key or k == self.id_field or k in nested_keys:
                continue
            if (type(v) is str and len(v) > META_MAX_CHARS) or isinstance(v, (bytes, bytearray)):
                self.dropped_fields[k] += 1
                continue
            meta[k] = v
        for k in _RESERVED_META:
            if k in meta:
                meta["orig_" + k] = meta.pop(k)
        meta["source"] = f"{self.display}:{n}"
        return Document(id=doc_id or self.gen_id(n), text=text, domain=self.domain, meta=meta)


def display_name(path: str, src: InputSource) -> str:
    """`path` relative to the source root (its file name for a single-file source).

    Relative rather than the bare file name so that ``en/000.jsonl`` and ``zh/000.jsonl`` in one
    directory source get distinct ids.
    """
    root = src.path
    if is_url(root):
        fs, root = url_fs(root)
        path = fs._strip_protocol(path)
    else:
        root, path = local_path(root), local_path(path)
    root = glob_root(root) if GLOB_MAGIC.search(root) else root
    root = root.rstrip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1:]
    return basename(path)
