"""SQuAD-style ``.json`` (CMRC 2018, DRCD): one document per ``data[].paragraphs[].context``.

``.json`` is ambiguous: `detect` sniffs the head of the file and sends JSON lines (dolma's
``*.json.gz`` document files) to the ``jsonl`` reader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from smelt.data.document import Document
from smelt.data.errors import DataInputError
from smelt.data.fs import CORRUPT_ERRORS, open_input
from smelt.data.readers.base import FileReader

_SNIFF_BYTES = 1 << 16      # bytes of a .json file examined to tell SQuAD from JSON lines
_SQUAD_HINT = re.compile(rb'"data"\s*:\s*\[')


def detect(path: str) -> str:
    """``json-squad`` or ``jsonl`` for a ``.json`` file; `DataInputError` for anything else."""
    sniffed = _sniff(path)
    if sniffed is None:
        raise DataInputError(
            f"{path}: a .json input must be SQuAD-style (data[].paragraphs[].context) or JSON "
            "lines (one object per line); set `format:` on the input to read it otherwise")
    return sniffed


def _sniff(path: str) -> str | None:
    parts: list[bytes] = []
    size = 0
    with open_input(path) as stream:
        try:
            while size < _SNIFF_BYTES and (part := stream.read1(_SNIFF_BYTES - size)):
                parts.append(part)
                size += len(part)
        except CORRUPT_ERRORS:
            # Damaged compressed file: judge by what could be read. If nothing could, call it
            # JSON lines, so the reader turns the damage into a counted corrupt_file document
            # (as for .jsonl.gz) instead of failing the whole run here.
            if not size:
                return "jsonl"
    head = b"".join(parts).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"{"):
        return None
    first, nl, rest = head.partition(b"\n")
    if nl or size < _SNIFF_BYTES:  # the first line is complete inside the window
        try:
            obj = json.loads(first)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if _is_squad(obj):
                return "json-squad"
            rest = rest.lstrip()
            if not rest or rest.startswith(b"{"):
                return "jsonl"
    # A pretty-printed or single-line SQuAD file larger than the window (cmrc2018, DRCD).
    if _SQUAD_HINT.search(head) and b'"paragraphs"' in head:
        return "json-squad"
    return None


def _is_squad(obj: dict) -> bool:
    data = obj.get("data")
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
            and isinstance(data[0].get("paragraphs"), list))


def read(r: FileReader) -> Iterator[Document]:
    """The file is parsed whole: SQuAD files are evaluation-sized (a few MB) and JSON offers no
    record boundaries to stream on. ``qas`` (questions and answers) are not copied into meta:
    they are bulky, and they are evaluation material that the corpus should not carry along.
    """
    data = r.read_whole()
    if isinstance(data, Document):
        yield data
        return
    try:
        obj = json.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError as e:
        yield r.error_doc(1, "invalid_utf8", f"invalid UTF-8 at byte {e.start}", "")
        return
    except (ValueError, RecursionError) as e:
        yield r.error_doc(1, "corrupt_file", f"not valid JSON: {e}")
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        yield r.error_doc(1, "not_squad_layout", "expected an object with a `data` list")
        return
    n = 0
    for article in obj["data"]:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            n += 1
            yield r.error_doc(n, "not_squad_layout", "a data[] entry without a `paragraphs` list",
                              json.dumps(article, ensure_ascii=False)[:10_000])
            continue
        title = article.get("title")
        for para in paragraphs:
            n += 1
            ctx = para.get("context") if isinstance(para, dict) else None
            pid = para.get(r.id_field) if isinstance(para, dict) else None
            pid = str(pid) if pid not in (None, "") else None
            if type(ctx) is not str:
                reason = "missing_text" if ctx is None else "non_string_text"
                yield r.error_doc(n, reason, "paragraph without a string `context`",
                                  json.dumps(para, ensure_ascii=False)[:10_000], pid)
                continue
            meta: dict[str, Any] = {"title": title} if isinstance(title, str) else {}
            meta["source"] = f"{r.display}:{n}"
            yield Document(id=pid or r.gen_id(n), text=ctx, domain=r.domain, meta=meta)
