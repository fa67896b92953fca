"""The one display module: every value object renders through it (escaped, the same CSS, a text fallback)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from workbench.display import STYLE_ID, grid, kv_table, repr_mimebundle, text_block


def test_every_string_is_escaped_and_the_text_fallback_is_aligned() -> None:
    b = repr_mimebundle("<script>x</script>", [("a&b", "<b>bold</b>"), ("n", 0.123456789), ("auto", None)],
                        note="<i>note</i>")
    h = b["text/html"]
    assert "<script>" not in h and "&lt;script&gt;" in h and "&lt;b&gt;bold&lt;/b&gt;" in h and "a&amp;b" in h
    assert "0.1235" in h and ">auto<" in h and "&lt;i&gt;note&lt;/i&gt;" in h
    assert h.count(f"id='{STYLE_ID}'") == 1 and "<script" not in h.replace("&lt;script", "")
    assert b["text/plain"].splitlines() == ["<script>x</script>", "  a&b   <b>bold</b>", "  n     0.1235",
                                            "  auto  auto", "  <i>note</i>"]
    assert text_block("T") == "T"


def test_tables() -> None:
    assert kv_table([("k", True)], header=("name", "value")).count("<th>") == 2
    g = grid(("a", "b"), [("x<", 1.5), ("y", 2)])
    assert "x&lt;" in g and g.count("class=wb-num") == 2


def test_value_objects_render_through_the_display_module() -> None:
    import workbench as wb
    from workbench.plan import parse_plan
    from workbench.result import Result

    cluster = wb.load_cluster("aws-p5:nodes=2")
    model = wb.load_model("llama3-8b")
    evil = replace(cluster, name="<img src=x onerror=alert(1)>")
    objects = [cluster, evil, model, parse_plan("tp=8,dp=2"), Result(metrics={"step_seconds": 1.5, "note": "<b>"})]
    for obj in objects:
        b = obj._repr_mimebundle_()
        assert set(b) == {"text/plain", "text/html"} and b["text/plain"]
        assert f"id='{STYLE_ID}'" in b["text/html"] and "class='wb-repr'" in b["text/html"], type(obj)
        assert "<img" not in b["text/html"]
    assert "&lt;img src=x" in evil._repr_mimebundle_()["text/html"]
    assert "&lt;b&gt;" in objects[-1]._repr_mimebundle_()["text/html"]
    assert "(chosen by the simulator)" in parse_plan("tp=8")._repr_mimebundle_()["text/html"]


def test_the_report_loads_the_css_once(tmp_path) -> None:
    pytest.importorskip("plotly")
    from workbench.report import cluster_sections, metrics_section, render_report

    page = render_report([*cluster_sections("mixed"), metrics_section("m", {"x": 1.0, "<y>": None})])
    assert page.count(f"id='{STYLE_ID}'") == 1 and "&lt;y&gt;" in page
