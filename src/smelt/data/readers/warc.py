"""WARC (``.warc``, ``.warc.gz``): HTML responses (main text by trafilatura); WET
(``.warc.wet.gz``): CommonCrawl's extracted text records."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from smelt.data.document import Document
from smelt.data.fs import CORRUPT_ERRORS, open_input
from smelt.data.readers.base import FileReader
from smelt.data.readers.html import HTML_TYPES, charset, html_doc


def read(r: FileReader) -> Iterator[Document]:
    """id = WARC-Record-ID, meta url (WARC-Target-URI) and date (WARC-Date); n counts all WARC
    records of the file (requests and metadata included), so it is stable. Records that are
    not documents (warcinfo, requests, metadata, non-HTML or non-2xx responses) are skipped
    and counted.
    """
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    with open_input(r.path) as stream:
        # `open_input` decompresses gzip itself: warcio would end a truncated .warc.gz silently.
        reads = _ShortReads(stream)
        archive = ArchiveIterator(reads)
        it = iter(archive)
        n = 0
        record = None
        end = 0  # where the last complete record ends, in (decompressed) stream bytes
        while True:
            try:
                nxt = next(it, None)  # also drains the previous record: damage may show here
            except (ArchiveLoadFailed, ValueError, *CORRUPT_ERRORS) as e:
                yield r.error_doc(n + 1, "corrupt_file", f"{type(e).__name__}: {e}")
                return
            if nxt is None:
                break
            record = nxt
            n += 1
            try:
                doc = _record(r, n, record)
                end = archive.get_record_offset() + archive.get_record_length()
            except (ArchiveLoadFailed, ValueError, *CORRUPT_ERRORS) as e:
                yield r.error_doc(n, "corrupt_file", f"{type(e).__name__}: {e}")
                return
            if doc is not None:
                yield doc
        # Truncation that gzip can't see (an uncompressed .warc): the last record has fewer
        # bytes than its Content-Length, or a cut header follows it, which warcio takes for
        # the end of the archive. Records are separated by CRLF CRLF: allow a little slack.
        if record is not None and getattr(record.raw_stream, "limit", 0) > 0:
            yield r.error_doc(n, "corrupt_file", "WARC record shorter than its Content-Length")
        elif reads.tell() - end > 16:
            yield r.error_doc(n + 1, "corrupt_file",
                              f"{reads.tell() - end} bytes after the last record are not a complete record")


class _ShortReads:
    """``read(n)`` as ``read1(n)``: at most one underlying read per call.

    `io.BufferedReader.read(n)` gathers several reads and throws them all away if one raises;
    warcio reads in 16 KiB blocks, so the records before a damaged spot would be lost.
    """

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self._s = stream
        self._pos = 0  # decompressed streams can't tell(); warcio asks for record offsets

    def read(self, n: int = -1) -> bytes:
        data = self._s.read1(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._s.close()


def _record(r: FileReader, n: int, record: Any) -> Document | None:
    headers = record.rec_headers
    kind = record.rec_type
    url = headers.get_header("WARC-Target-URI")
    date = headers.get_header("WARC-Date")
    rid = headers.get_header("WARC-Record-ID") or r.gen_id(n)
    if kind == "conversion":  # WET: text extracted by CommonCrawl
        payload = record.content_stream().read()
        text = payload.decode("utf-8", "replace")
        return Document(id=rid, text=text, domain=r.domain,
                        meta={"url": url, "date": date, "source": f"{r.display}:{n}"})
    if kind == "response" and record.http_headers is not None:
        status = record.http_headers.get_statuscode()
        if not status.startswith("2"):
            r.skip("warc_non_2xx", n, f"HTTP status {status}")
            return None
        content_type = record.http_headers.get_header("Content-Type") or ""
    elif kind == "resource":
        content_type = headers.get_header("Content-Type") or ""
    else:
        r.skip(f"warc_{kind}", n, f"{kind} record")
        return None
    # CommonCrawl's detected type (WARC-Identified-Payload-Type) beats the server's header.
    mime = (headers.get_header("WARC-Identified-Payload-Type") or content_type).split(";")[0].strip().lower()
    if mime not in HTML_TYPES:
        r.skip("warc_non_html", n, f"{kind} of type {mime or 'unknown'}")
        return None
    payload = record.content_stream().read()
    return html_doc(r, n, payload, charset(content_type), url, rid, {"url": url, "date": date})
