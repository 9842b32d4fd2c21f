"""One self-contained HTML page: inline CSS, figures as base64 PNG, no script, no fetches."""

from __future__ import annotations

import base64
import html
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       margin: 0; background: #fafafa; }
main { max-width: 1220px; margin: 0 auto; padding: 12px 20px 40px; background: #fff; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
figure { margin: 10px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 12px; color: #555; margin-top: 2px; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
nav a { margin-right: 14px; }
.note { background: #fff6e0; border-left: 3px solid #f0b400; padding: 4px 10px; margin: 6px 0; }
details { margin: 6px 0 12px; }
summary { cursor: pointer; color: #1f5fa8; }
code { font-size: 12px; }
"""


@dataclass
class Picture:
    """One figure: its PNG, where it goes in --png DIR, and its caption."""

    slug: str  # file stem, e.g. "layer-003-backbone.1-conv1.0"
    title: str
    png: bytes
    caption: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the PNG header."""
        return struct.unpack(">II", self.png[16:24])


@dataclass
class Section:
    id: str
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, already escaped


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80] or "figure"


def figure(picture: Picture) -> str:
    width, height = picture.size
    data = base64.b64encode(picture.png).decode("ascii")
    caption = f"<figcaption>{picture.caption}</figcaption>" if picture.caption else ""
    return (
        f'<figure id="{esc(picture.slug)}"><img src="data:image/png;base64,{data}" '
        f'width="{width}" height="{height}" alt="{esc(picture.title)}">{caption}</figure>'
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table; cells that are numbers are right-aligned, text is escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, int | float) or (
                isinstance(cell, str) and re.fullmatch(r"[-+]?[\d,.]+[%x]?( ms)?", cell)
            )
            cells.append(f'<td class="n">{esc(cell)}</td>' if numeric else f"<td>{esc(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def details(summary: str, inner: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{inner}</details>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def page(title: str, header: str, sections: Sequence[Section]) -> str:
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{"".join(s.parts)}</section>'
        for s in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main><h1>{esc(title)}</h1>{header}<nav>{nav}</nav>{body}</main></body></html>\n"
    )
