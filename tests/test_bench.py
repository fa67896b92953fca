"""One benchmarks home: the machine record, the one result shape, and `workbench bench sim` writing it."""

from __future__ import annotations

import json

import pytest

from workbench.bench import record as rec
from workbench.bench.machine import machine
from workbench.errors import WorkbenchError


def test_machine_record_names_what_ran() -> None:
    m = machine("ci-box")
    assert m["name"] == "ci-box" and m["cpus"] >= 1 and 1 <= m["cpus_usable"] <= m["cpus"]
    assert m["python"].count(".") == 2 and m["cpu"] and isinstance(m["gpus"], list)
    assert machine()["name"]  # the host name when none is given


def test_record_has_one_shape_and_plain_json(tmp_path) -> None:
    np = pytest.importorskip("numpy")
    r = rec.record("demo", [{"bytes": np.int64(4096), "GBps": np.float64(1.5), "lanes": (1, 2)}],
                   {"GBps": np.float32(1.5), "nan_is_null": float("nan")}, "workbench bench demo", machine="m1")
    assert list(r) == list(rec.KEYS) and r["machine"]["name"] == "m1"
    assert r["rows"] == [{"bytes": 4096, "GBps": 1.5, "lanes": [1, 2]}] and r["summary"]["nan_is_null"] is None
    path = rec.write(r, tmp_path / "demo.json")
    assert rec.load(path) == json.loads(path.read_text()) == r


@pytest.mark.parametrize("bad, field", [
    ({"benchmark": "x"}, "missing machine"),
    ({**dict.fromkeys(rec.KEYS, None), "benchmark": "x", "machine": {"name": "m"}, "summary": {"a": [1]}, "rows": []},
     "summary.a"),
    ({"benchmark": "x", "machine": {"name": "m"}, "command": "c", "date": "d", "summary": {}, "rows": [1]}, "rows"),
    ({"benchmark": "", "machine": {"name": "m"}, "command": "c", "date": "d", "summary": {}, "rows": []}, "benchmark"),
])
def test_a_record_of_another_shape_is_refused_naming_the_field(bad: dict, field: str) -> None:
    with pytest.raises(WorkbenchError, match=field):
        rec.check(bad)


def test_write_and_load_name_the_bad_path(tmp_path) -> None:
    good = rec.record("demo", [], {}, "c", machine="m")
    with pytest.raises(WorkbenchError, match="--out"):
        rec.write(good, tmp_path / "no-such-folder" / "r.json")
    (tmp_path / "old.json").write_text(json.dumps({"meta": {}, "rows": []}))
    with pytest.raises(WorkbenchError, match="missing benchmark"):
        rec.load(tmp_path / "old.json")


@pytest.mark.slow
def test_bench_sim_writes_the_one_shape(cli, tmp_path) -> None:
    out = tmp_path / "sim.json"
    code, stdout, stderr = cli("bench", "sim", "--only", "collective_closed_form", "--json", "--out", str(out),
                               "--machine", "test-box")
    assert code == 0, stderr
    printed, saved = json.loads(stdout), rec.load(out)
    assert printed["summary"] == saved["summary"] and saved["benchmark"] == "sim"
    assert saved["machine"]["name"] == "test-box"
    assert saved["command"] == "workbench bench sim --only collective_closed_form"
    s = saved["summary"]
    assert 0 < s["collective_closed_form_memo_hit_us"] < s["collective_closed_form_us"]  # the baseline, same run
    groups = {r["group"] for r in saved["rows"] if not r["memo_hit"]}
    assert groups == {"tp8", "dp128", "all1024"} and {r["bench"] for r in saved["rows"]} == {"collective_closed_form"}


def test_bench_sim_bad_input_exits_2(cli, tmp_path) -> None:
    code, _, err = cli("bench", "sim", "--only", "nope")
    assert code == 2 and "--only" in err and "collective_closed_form" in err
    code, _, err = cli("bench", "sim", "--only", "train", "--out", str(tmp_path / "missing" / "x.json"))
    assert code == 2 and "--out" in err


def test_old_registration_path_still_registers() -> None:
    from workbench.bench.sim import BENCHES
    from workbench.sim import bench as old

    assert old.register is not None and old.BENCHES is BENCHES


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_dashboard_runs_in_a_real_kernel_and_writes_the_one_shape(cli, tmp_path) -> None:
    pytest.importorskip("jupyter_client")
    pytest.importorskip("ipywidgets")
    out = tmp_path / "dash.json"
    code, _, err = cli("bench", "dashboard", "--rate", "20", "--seconds", "1", "--steps", "2", "--out", str(out))
    assert code == 0, err
    saved = rec.load(out)
    assert saved["benchmark"] == "dashboard" and saved["command"].startswith("workbench bench dashboard --rate 20")
    s = saved["summary"]
    assert s["stream_updates_per_s"] > 0 and s["redraw_ms_at_240_events"] > 0
    resp = [r for r in saved["rows"] if r["bench"] == "responsiveness"]
    assert [r["dashboard"] for r in resp] == [False, True]  # the baseline run, then the run with a dashboard
    code, _, err = cli("bench", "dashboard", "--rate", "0")
    assert code == 2 and "--rate" in err
