"""The one display module: HTML reprs of value objects and results (escaped, CSS once, text fallback).

Every value object's `_repr_mimebundle_` calls `repr_mimebundle(title, rows, text)`; the HTML
report uses the same CSS. The style block carries a fixed id and is emitted with every repr
(a notebook keeps the first; browsers de-duplicate identical rules), as xarray does.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

CSS = """
.wb-repr{font-family:var(--jp-content-font-family,system-ui,sans-serif);font-size:13px;margin:2px 0}
.wb-repr table{border-collapse:collapse}
.wb-repr td,.wb-repr th{padding:2px 8px;border-bottom:1px solid var(--jp-border-color2,#e0e0e0);text-align:left}
.wb-repr .wb-title{font-weight:600;margin-bottom:2px}
.wb-repr .wb-muted{color:var(--jp-ui-font-color2,#777)}
"""
STYLE = f"<style id='wb-repr-css'>{CSS}</style>"


def fmt(v: Any) -> str:
    """A short, readable rendering of a value (floats to 4 significant digits, None as 'auto')."""
    if v is None:
        return "auto"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def html_table(rows: Iterable[tuple[Any, Any]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><td>{html.escape(fmt(k))}</td><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{head}{body}</table>"


def repr_html(title: str, rows: Iterable[tuple[Any, Any]], note: str = "") -> str:
    extra = f"<div class='wb-muted'>{html.escape(note)}</div>" if note else ""
    return (f"{STYLE}<div class='wb-repr'><div class='wb-title'>{html.escape(title)}</div>"
            f"{html_table(rows)}{extra}</div>")


def repr_mimebundle(title: str, rows: Iterable[tuple[Any, Any]], text: str, note: str = "") -> dict[str, str]:
    """{'text/plain': text, 'text/html': escaped table} for Jupyter."""
    return {"text/plain": text, "text/html": repr_html(title, list(rows), note)}
