"""A strict-enough HTML check for the report tests: tags balance, nothing external, no script."""

from __future__ import annotations

from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: set[str] = set()
        self.tags: dict[str, int] = {}
        self.images = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"] or "")
        for k in ("src", "href"):
            v = a.get(k) or ""
            if v and not (v.startswith("data:image/png;base64,") or v.startswith("#")):
                self.errors.append(f"external reference {k}={v[:60]!r}")
        if tag == "img":
            self.images += 1
        if tag in ("script", "link", "iframe"):
            self.errors.append(f"<{tag}> is not allowed in a self-contained report")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
            if tag in self.stack:
                while self.stack and self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_html(page: str) -> StrictParser:
    p = StrictParser()
    p.feed(page)
    p.close()
    if p.stack:
        p.errors.append(f"unclosed tags: {p.stack}")
    return p
