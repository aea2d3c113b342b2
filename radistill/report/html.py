"""Small HTML building blocks for one self-contained page (styles inline, images as base64 data URIs)."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.group td { background: #fafafa; font-weight: bold; text-align: left; }
tr.coverage td { font-weight: bold; }
.missing { color: #a33; font-style: italic; }
.note { color: #555; font-size: 0.9em; }
.headline { background: #f3f8ff; border-left: 4px solid #3a7bd5; padding: 0.6em 1em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.images img { max-width: 48%; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


LEFT = ' class="l"'


def page(title: str, body: list[str]) -> str:
    head = f'<head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>'
    return (f'<!DOCTYPE html>\n<html lang="en">{head}\n<body>\n<h1>{escape(title)}</h1>\n' + "\n".join(body)
            + "\n</body></html>\n")


def section(title: str, *parts: str) -> str:
    return f"<h2>{escape(title)}</h2>\n" + "\n".join(parts)


def para(text: str, cls: str | None = None) -> str:
    return f"<p{f' class={cls!r}' if cls else ''}>{escape(text)}</p>"


def missing(what: str, how: str) -> str:
    """The standard line for a part of the run that is not there yet."""
    return f"<p class=\"missing\">{escape(what)}: not run. {escape(how)}</p>"


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt=\"{escape(alt)}\" src=\"data:image/png;base64,{data}\">"


def table(header: list[str], rows: list[list[str] | tuple[str, list[str]]], left: int = 1) -> str:
    """A table; a row is a list of cells, or ``(css class, cells)``; the first ``left`` columns align left.

    A row with a single cell spans the whole table (a group heading).
    """
    def cells(values: list[str], tag: str) -> str:
        if len(values) == 1 and len(header) > 1:
            return f'<{tag} class="l" colspan="{len(header)}">{escape(values[0])}</{tag}>'
        return "".join(f"<{tag}{LEFT if i < left else ''}>{escape(str(v))}</{tag}>" for i, v in enumerate(values))

    out = ["<table>", f"<tr>{cells(header, 'th')}</tr>"]
    for row in rows:
        cls, values = row if isinstance(row, tuple) else (None, row)
        out.append(f"<tr{f' class={cls!r}' if cls else ''}>{cells(values, 'td')}</tr>")
    out.append("</table>")
    return "\n".join(out)


def pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"
