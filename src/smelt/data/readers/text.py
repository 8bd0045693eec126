"""Plain text (``.txt``, ``.md``): one document per file, or per blank-line-separated block
(``txt_split: paragraph``; ``n`` is then the block's first line number)."""

from __future__ import annotations

from collections.abc import Iterator

from smelt.data.document import Document
from smelt.data.fs import CORRUPT_ERRORS, open_input
from smelt.data.readers.base import FileReader


def read(r: FileReader) -> Iterator[Document]:
    if r.src is not None and r.src.txt_split == "paragraph":
        return read_paragraphs(r)
    return read_file(r)


def read_file(r: FileReader) -> Iterator[Document]:
    data = r.read_whole()
    if isinstance(data, Document):
        yield data
        return
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield r.error_doc(1, "invalid_utf8", f"invalid UTF-8 at line {line}, byte {e.start}",
                          data.decode("utf-8", "replace"))
        return
    yield Document(id=r.gen_id(1), text=text, domain=r.domain, meta={"source": f"{r.display}:1"})


def read_paragraphs(r: FileReader) -> Iterator[Document]:
    """One document per block of non-blank lines; n = the block's first line number."""
    block: list[bytes] = []
    start = 0
    n = 0

    def emit() -> Document:
        data = b"".join(block).rstrip(b"\r\n")
        if start == 1:
            data = data.removeprefix(b"\xef\xbb\xbf")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = start + data.count(b"\n", 0, e.start)
            return r.error_doc(start, "invalid_utf8", f"invalid UTF-8 at line {line}",
                               data.decode("utf-8", "replace"))
        return Document(id=r.gen_id(start), text=text, domain=r.domain,
                        meta={"source": f"{r.display}:{start}"})

    with open_input(r.path) as stream:
        try:
            for n, line in enumerate(stream, 1):  # noqa: B007
                if line.isspace():
                    if block:
                        yield emit()
                        block = []
                    continue
                if not block:
                    start = n
                block.append(line)
        except CORRUPT_ERRORS as e:
            # The block in progress may be cut anywhere: report it as part of the damage.
            yield r.error_doc(start if block else n + 1, "corrupt_file", f"{type(e).__name__}: {e}")
            return
    if block:
        yield emit()
