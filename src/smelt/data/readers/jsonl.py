"""JSON lines (``.jsonl``, ``.ndjson``; dolma's ``.json.gz`` document files come here through
`smelt.data.readers.squad.detect`): one object per line, text in ``text_field`` (or
``content``), id in ``id_field``, other fields into meta (`FileReader.from_record`)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from smelt.data.document import Document
from smelt.data.fs import CORRUPT_ERRORS, open_input
from smelt.data.readers.base import SURROGATE, FileReader, log


def read(r: FileReader) -> Iterator[Document]:
    loads = json.loads
    blank = 0
    n = 0
    with open_input(r.path) as stream:
        # A part of a split file (`FileReader.part`): (start, end, lines before start). A plain file
        # was cut at line boundaries when planned: seek there, read end - start bytes. A compressed
        # one (lines before = -1) is decompressed from its beginning; the part owns the lines that
        # start in [start, end) of the decompressed bytes (end -1: to the end), counting the lines
        # it skips so that line numbers are the file's.
        left = None  # bytes of this part still to read (plain files)
        skip_to, stop_at = 0, -1  # decompressed byte range (compressed files)
        pos = 0  # decompressed bytes read before the current line
        if r.part is not None:
            start, end, before = r.part
            if before >= 0:
                n = before
                stream.seek(start)
                left = end - start
            else:
                skip_to, stop_at = start, end
        try:
            for line in stream:
                if left is not None:
                    if left <= 0:
                        break
                    left -= len(line)
                at, pos = pos, pos + len(line)
                n += 1
                if at < skip_to:
                    continue
                if 0 <= stop_at <= at:
                    break
                if line.isspace():
                    blank += 1
                    continue
                try:
                    s = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield r.error_doc(n, "invalid_utf8", f"invalid UTF-8 at byte {e.start}",
                                      line.decode("utf-8", "replace").rstrip("\r\n"))
                    continue
                if n == 1 and s.startswith("\ufeff"):
                    s = s[1:]
                try:
                    rec = loads(s)
                except (ValueError, RecursionError) as e:
                    yield r.error_doc(n, "invalid_json", str(e) or type(e).__name__, s.rstrip("\r\n"))
                    continue
                if type(rec) is not dict:
                    yield r.error_doc(n, "not_an_object", f"a JSON {type(rec).__name__}, not an object",
                                      s.rstrip("\r\n"))
                    continue
                doc = r.from_record(rec, n)
                if type(doc) is tuple:
                    yield r.error_doc(n, doc[0], doc[1], s.rstrip("\r\n"), doc[2])
                    continue
                # JSON may spell lone surrogates ("\ud800"): such text cannot be written as
                # UTF-8 by any later stage. Only lines with a \u escape can hold one.
                if "\\u" in s and SURROGATE.search(doc.text):
                    yield r.error_doc(n, "invalid_unicode", "text holds lone UTF-16 surrogates",
                                      SURROGATE.sub("\ufffd", doc.text), doc.id)
                    continue
                yield doc
        except CORRUPT_ERRORS as e:
            # only the part whose range holds the damage reports it (a whole read reports it once)
            if pos >= skip_to and (stop_at < 0 or pos < stop_at):
                yield r.error_doc(n + 1, "corrupt_file", f"{type(e).__name__}: {e}")
    if blank:
        log.debug("%s: skipped %d blank line(s)", r.path, blank)
        if r.skipped is not None:
            r.skipped["blank_line"] += blank
