"""The one display module: HTML reprs of value objects and results (escaped, CSS-only, text fallback).

Every value object's `_repr_mimebundle_` returns `repr_mimebundle(title, rows, text, ...)`
(`Job`, `ModelSpec`, `Plan`, `Cluster`, `Result`); the HTML report (`workbench.report`)
builds its tables with the same functions and class names.

CSS is loaded once per page: the HTML report puts `STYLE` in its head and renders fragments
with `style=False`. In a notebook each output is its own fragment (a cleared or re-run cell
must not take the style of the others with it), so, as xarray's `formatting_html` does, every
repr carries the same small `<style>` block with a stable id; the rules are identical and
scoped to `.wb-repr`, so repeating them changes nothing. No JavaScript: the HTML is trusted
by Jupyter without a trust step, and every string is escaped here.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

STYLE_ID = "wb-repr-css"
CSS = """
.wb-repr{font-family:var(--jp-content-font-family,system-ui,sans-serif);font-size:13px;margin:2px 0;
 color:var(--jp-content-font-color1,inherit)}
.wb-repr .wb-title{font-weight:600;margin-bottom:2px}
.wb-repr .wb-muted,.wb-note{color:var(--jp-ui-font-color2,#666)}
.wb-repr table,table.wb-table{border-collapse:collapse;font-size:13px}
.wb-repr td,.wb-repr th,table.wb-table td,table.wb-table th{padding:2px 8px;text-align:left;
 border-bottom:1px solid var(--jp-border-color2,#e0e0e0)}
.wb-repr th,table.wb-table th{background:var(--jp-layout-color2,#f2f2f2);font-weight:600}
table.wb-table td.wb-num,table.wb-table th.wb-num,table.wb-frame td,table.wb-frame th{text-align:right}
table.wb-frame td:first-child,table.wb-frame th:first-child{text-align:left}
.wb-repr details>summary{cursor:pointer;font-weight:600}
"""
STYLE = f"<style id='{STYLE_ID}'>{CSS}</style>"
AUTO = "(chosen by the simulator)"


def esc(value: Any) -> str:
    """`value` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt(v: Any, none: str = "auto") -> str:
    """A short, readable rendering of a value: floats to 4 significant digits, None as `none`, bools as yes/no."""
    if v is None:
        return none
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def kv_table(rows: Iterable[tuple[Any, Any]], header: tuple[str, str] | None = None, none: str = "auto") -> str:
    """A two-column (name, value) table, every cell escaped."""
    head = f"<tr><th>{esc(header[0])}</th><th>{esc(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><td>{esc(fmt(k))}</td><td>{esc(fmt(v, none))}</td></tr>" for k, v in rows)
    return f"<table class='wb-table'>{head}{body}</table>"


def grid(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table with a header row; numbers right-aligned, every cell escaped."""
    def cell(tag: str, v: Any) -> str:
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f"<{tag}{' class=wb-num' if num else ''}>{esc(fmt(v))}</{tag}>"

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in rows)
    return f"<table class='wb-table'><tr>{head}</tr>{body}</table>"


def repr_html(title: str, rows: Iterable[tuple[Any, Any]] = (), note: str = "", *, body: str = "",
              none: str = "auto", style: bool = True) -> str:
    """A titled block: a (name, value) table, then trusted `body` HTML (e.g. a `grid`), then a muted note."""
    items = list(rows)
    table = kv_table(items, none=none) if items else ""
    extra = f"<div class='wb-muted'>{esc(note)}</div>" if note else ""
    return (f"{STYLE if style else ''}<div class='wb-repr'><div class='wb-title'>{esc(title)}</div>"
            f"{table}{body}{extra}</div>")


def text_block(title: str, rows: Iterable[tuple[Any, Any]] = (), note: str = "", none: str = "auto") -> str:
    """The plain-text fallback of `repr_html`: the title, then aligned `name  value` lines."""
    items = [(fmt(k), fmt(v, none)) for k, v in rows]
    width = max((len(k) for k, _ in items), default=0)
    lines = [title, *(f"  {k.ljust(width)}  {v}" for k, v in items)]
    return "\n".join(lines + ([f"  {note}"] if note else []))


def repr_mimebundle(title: str, rows: Iterable[tuple[Any, Any]] = (), text: str | None = None, note: str = "", *,
                    body: str = "", none: str = "auto") -> dict[str, str]:
    """{'text/plain': text (or `text_block`), 'text/html': `repr_html`} for Jupyter's `_repr_mimebundle_`."""
    items = list(rows)
    return {"text/plain": text if text is not None else text_block(title, items, note, none),
            "text/html": repr_html(title, items, note, body=body, none=none)}
