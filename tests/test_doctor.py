"""`workbench doctor`: every check is reported with a verdict, and a problem comes with a fix."""

from __future__ import annotations

import json

from workbench.commands.doctor import checks


def test_checks_cover_the_stack_and_give_fixes() -> None:
    rows = checks()
    names = {r["check"] for r in rows}
    assert {"torch", "gloo", "gpus", "nccl", "efa", "aws-ofi-nccl", "nixl", "cuda_ipc", "transport-tcp"} <= names
    for r in rows:
        assert r["ok"] in (True, False, None) and r["detail"]
        if r["ok"] is False:
            assert r["fix"], f"{r['check']} is a problem but says no fix"
    assert next(r for r in rows if r["check"] == "gloo")["ok"] is True


def test_cli_json(cli) -> None:
    code, out, err = cli("doctor", "--json")
    assert code == 0, err
    assert {r["check"] for r in json.loads(out)} >= {"gpus", "efa"}
