"""HTML pages (``.html``, ``.htm``): the main text, extracted by trafilatura. `html_doc` is
also how `smelt.data.readers.warc` turns an HTML response into a document."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from smelt.data.document import Document
from smelt.data.readers.base import FileReader

# HTML -> text. datatrove's Trafilatura extractor (used for FineWeb, Penedo et al. 2024):
# favor_precision=True, include_comments=False; tables are kept (trafilatura's default, kept by
# FineWeb): specs, schedules and infobox facts are real content. We do NOT enable trafilatura's
# `deduplicate` (datatrove does): it is a process-wide LRU cache of seen text segments, so
# output would depend on which pages the same worker process extracted before, breaking
# reproducibility across worker counts and resume. Repeated boilerplate is the job of the
# dedup stage (`data.dedup.lines`).
_TRAFILATURA_OPTIONS: dict[str, Any] = dict(
    output_format="txt", favor_precision=True, include_comments=False, include_tables=True,
    include_images=False, include_links=False, include_formatting=False, deduplicate=False,
)
HTML_TYPES = ("text/html", "application/xhtml+xml")


def read(r: FileReader) -> Iterator[Document]:
    payload = r.read_whole()
    if isinstance(payload, Document):
        yield payload
        return
    yield html_doc(r, 1, payload, None, None, r.gen_id(1), {})


def charset(content_type: str | None) -> str | None:
    """The ``charset=`` of a Content-Type header, if any."""
    if content_type:
        m = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", content_type, re.I)
        if m:
            return m.group(1)
    return None


def _html_to_text(payload: bytes, charset: str | None, url: str | None) -> tuple[str | None, str | None]:
    """(main text, None), or (None, error) when trafilatura raised."""
    import trafilatura

    html: str | bytes = payload
    # Declared charset, then UTF-8 (most of the web); otherwise hand trafilatura the bytes and
    # let it detect the encoding (slower, so only as a fallback). Same order as datatrove.
    for enc in (charset, "utf-8"):
        if enc:
            try:
                html = payload.decode(enc)
                break
            except (UnicodeDecodeError, LookupError):
                continue
    try:
        return trafilatura.extract(html, url=url, **_TRAFILATURA_OPTIONS), None
    except Exception as e:  # noqa: BLE001 - lxml/trafilatura raise many kinds on bad HTML
        return None, f"{type(e).__name__}: {e}"


def html_doc(r: FileReader, n: int, payload: bytes, charset: str | None, url: str | None,
             doc_id: str, meta: dict[str, Any]) -> Document:
    """A document of the page's main text, or an ``html_*`` error document with the raw page."""
    text, err = _html_to_text(payload, charset, url)
    if err is not None or not text:
        try:
            raw = payload.decode(charset or "utf-8", "replace")
        except LookupError:  # unknown charset name
            raw = payload.decode("utf-8", "replace")
        doc = r.error_doc(n, "html_extraction_failed" if err else "html_no_text",
                          err or "no main text found", raw, doc_id)
        doc.meta.update({k: v for k, v in meta.items() if k not in doc.meta})
        return doc
    meta["source"] = f"{r.display}:{n}"
    return Document(id=doc_id, text=text, domain=r.domain, meta=meta)
