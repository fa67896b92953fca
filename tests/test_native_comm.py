"""The native engine's collectives and pipeline transfers as events (workbench.runner.native_comm): the pairing
of c10d ops with their execution, real profiler records on a one-rank process group (gloo here, NCCL on a
GPU), and real dp=2 and tp=2 runs whose events carry FSDP's and DTensor's collectives into compare."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from workbench.runner.native_comm import GROUP_RANGE, CommSampler, Groups, Span, comm_events  # noqa: E402
from workbench.runner.telemetry import Recorder  # noqa: E402

LLAMA = "llama3-8b:layers=2,hidden=64,heads=4,kv_heads=2,head_dim=16,ffn=160,vocab=512,seq=32"


def _op(name: str, t: int, s: int, e: int, shapes: tuple = (), dtypes: tuple = (), inputs: tuple = (),
        corr: int = 0) -> Span:
    return Span(name, t, s, e, False, shapes, dtypes, inputs, corr, 0)


def test_c10d_ops_pair_with_their_gloo_spans_and_name_group_bytes_and_peer() -> None:
    spans = [
        _op("FSDP::all_gather (0)", 1, 100, 400),
        _op("c10d::_allgather_base_", 1, 110, 120, ([8], [4]), ("float", "float")),
        _op(GROUP_RANGE + "dp", 1, 500, 900),
        _op("c10d::allreduce_", 1, 510, 520, ([[10], [6]],), ("TensorList",)),
        _op("FSDP::post_backward_reduce (1)", 1, 950, 990),
        _op("c10d::allreduce_", 1, 960, 970, ([[64]],), ("TensorList",)),  # DTensor's, inside FSDP's hook
        _op("c10d::_reduce_scatter_base_", 1, 1000, 1010, ([3], [6]), ("c10::BFloat16", "c10::BFloat16")),
        _op("c10d::send", 1, 1100, 1110, ([[2, 5]],), ("TensorList",), (None, None, 1, 0)),
        _op("c10d::recv_", 1, 1200, 1210, ([[2, 5]],), ("TensorList",), (None, None, 0, 0)),
        # executions: gloo's worker spans (a reduce-scatter runs as an all-reduce of its input)
        _op("gloo:all_gather", 2, 130, 300, ([4],), ("float",)),
        _op("gloo:all_reduce", 3, 530, 800, ([16],), ("float",)),
        _op("gloo:all_reduce", 4, 962, 980, ([64],), ("float",)),
        _op("gloo:all_reduce", 2, 1020, 1090, ([6],), ("c10::BFloat16",)),
        _op("gloo:send", 1, 1105, 1150, ([2, 5],), ("float",)),
        _op("gloo:recv", 1, 1205, 1400, ([2, 5],), ("float",)),
    ]
    events, missed = comm_events(spans, Groups(dp=2, tp=2, pp=2, pp_ranks=(3, 7)))
    assert missed == 0
    got = [(e.kind, e.op, e.nbytes, e.group, e.peer, e.start, e.end) for e in events]
    assert got == [
        ("collective", "all_gather", 32, "dp", -1, 130, 300),  # under FSDP's range; the gathered output
        ("collective", "all_reduce", 64, "dp", -1, 530, 800),  # under the engine's own group range
        ("collective", "all_reduce", 256, "tp", -1, 962, 980),  # FSDP2 issues no all-reduce: DTensor's
        ("collective", "reduce_scatter", 12, "tp", -1, 1020, 1090),  # outside both: DTensor's; its bf16 input
        ("transfer", "send_recv", 40, "pp", 7, 1105, 1150),  # the peer's global rank
        ("transfer", "recv_wait", 40, "pp", 3, 1205, 1400),
    ]


def test_device_activities_time_the_op_they_were_launched_from() -> None:
    spans = [
        _op("c10d::_allgather_base_", 1, 100, 150, ([64], [32]), ("c10::BFloat16", "c10::BFloat16"), corr=7),
        _op("nccl:_all_gather_base", 1, 110, 140, corr=8),  # an op inside it launched the kernel
        Span("ncclDevKernel_AllGather_RING_LL", 9, 400, 900, True, linked=8),
        Span("gemm_kernel", 9, 950, 990, True, linked=99),  # launched by something else
        _op("c10d::allreduce_", 1, 200, 210, ([[4]],), ("TensorList",), corr=11),  # no kernel, no gloo span
    ]
    events, missed = comm_events(spans, Groups(tp=2))
    assert [(e.op, e.nbytes, e.start, e.end) for e in events] == [("all_gather", 128, 400, 900)]
    assert missed == 1


def test_nccl_records_as_torch_2_11_writes_them_on_an_h200() -> None:
    # the shape of the records `benchmarks/native_comm_check.py --backend nccl` read on one H200 (torch 2.11):
    # the device work is linked to an op inside the c10d op, TensorList shapes are not recorded, and NCCL's
    # own host span names the tensor
    spans = [
        _op("c10d::_allgather_base_", 1, 100, 4000, ([1 << 20], [1 << 20]), ("c10::BFloat16", "c10::BFloat16"),
            corr=1026),
        _op("record_param_comms", 1, 120, 3960, corr=1027),
        _op("nccl:_all_gather_base", 1, 3700, 3870, ([1 << 20],), ("c10::BFloat16",), corr=1028),
        Span("Memcpy DtoD (Device -> Device)", 1, 5000, 5014, True, linked=1027),
        _op("c10d::allreduce_", 1, 6000, 6120, ([], []), ("TensorList", ""), corr=1035),
        _op("nccl:all_reduce", 1, 6050, 6100, ([1 << 20],), ("float",), corr=1037),
        _op("aten::copy_", 1, 6101, 6110, corr=1040),
        Span("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 7, 7000, 9000, True, linked=1040),
    ]
    events, missed = comm_events(spans, Groups(tp=2))
    assert missed == 0
    assert [(e.op, e.nbytes, e.start, e.end, e.source) for e in events] == [
        ("all_gather", 2 << 20, 5000, 5014, "device"), ("all_reduce", 4 << 20, 7000, 9000, "device")]


def test_sampler_spreads_a_profiled_steps_measured_extra_time_within_its_budget() -> None:
    class Rec:
        enabled = True

    s = CommSampler(Rec(), Groups(), every=10, budget_pct=2.0)
    s._done(False, 5.0)  # the warm-up step
    assert s.due()  # the first step after it is sampled
    s._done(True, 0.19)  # a profiled step of 190 ms against 100 ms steps: 90 % extra
    for wall in (0.1, 0.12, 0.09):
        assert not s.due()
        s._done(False, wall)
    assert s.gaps == [45] and s.next == 1 + 45  # 90 % / 45 = 2 %
    cheap = CommSampler(Rec(), Groups(), every=10, budget_pct=2.0)
    cheap._done(False, 1.0)
    cheap._done(True, 1.01)
    for _ in range(3):
        cheap._done(False, 1.0)
    assert cheap.gaps == [10]  # never closer than `every`
    cheap.next = cheap.calls  # due now, but not while the recorder is off (the silent half of an A/B)
    assert cheap.due()
    Rec.enabled = False
    assert not cheap.due()


def test_nccl_batched_send_recv_take_the_grouped_kernel_of_their_batch() -> None:
    # pipelining's batch_isend_irecv on NCCL: the ops launch nothing; the batch's close launches one kernel
    spans = [
        _op("c10d::send", 1, 100, 110, ([[4, 8]],), ("TensorList",), (None, None, 1, 0)),
        _op("c10d::recv_", 1, 120, 130, ([[4, 8]],), ("TensorList",), (None, None, 1, 0)),
        _op("nccl:coalesced", 1, 140, 150),
        _op("c10d::send", 1, 300, 310, ([[4, 8]],), ("TensorList",), (None, None, 1, 0)),
        _op("nccl:coalesced", 1, 320, 330),
        Span("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 7, 500, 800, True),
        Span("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 7, 900, 950, True),
    ]
    events, missed = comm_events(spans, Groups(pp=2, pp_ranks=(0, 1)))
    assert missed == 0
    assert [(e.op, e.peer, e.start, e.end, e.source) for e in events] == [
        ("send_recv", 1, 500, 800, "device"), ("recv_wait", 1, 500, 800, "device"), ("send_recv", 1, 900, 950, "device")]
    # a count that does not agree (a kernel of some other batch is missing): nothing is guessed
    events, missed = comm_events(spans[:-1], Groups(pp=2, pp_ranks=(0, 1)))
    assert events == [] and missed == 3


def test_samples_without_shapes_take_bytes_and_peers_from_the_template() -> None:
    class Rec:
        enabled, step, cost_s = True, 0, 0.0
        rows: list[tuple] = []

        def add_event(self, *row: object) -> None:
            self.rows.append(row)

    def spans(shapes: bool, second: str = "c10d::recv_") -> list[Span]:
        sh = (lambda *a: a) if shapes else (lambda *a: ())
        return [_op("workbench::anchor", 1, 0, 1),
                _op("c10d::send", 1, 100, 110, sh([[2, 5]]), sh("TensorList"), sh(None, None, 1, 0)),
                _op(second, 1, 200, 210, sh([[2, 5]]), sh("TensorList"), sh(None, None, 1, 0)),
                _op("gloo:send", 1, 105, 150, sh([2, 5]), sh("float")),
                _op("gloo:recv" if second == "c10d::recv_" else "gloo:send", 1, 205, 400, sh([2, 5]), sh("float"))]

    rec = Rec()
    s = CommSampler(rec, Groups(pp=2, pp_ranks=(0, 4)))
    assert s.record(spans(True), 10.0, shapes=True) == 2
    assert s.record(spans(False), 20.0, shapes=False) == 2
    assert [r[:5] for r in rec.rows[2:]] == [r[:5] for r in rec.rows[:2]] == [
        ("transfer", "send_recv", 40, "pp", 4), ("transfer", "recv_wait", 40, "pp", 4)]
    assert rec.rows[3][5] == pytest.approx(20.0 + 204e-9)  # on the host clock through the anchor
    assert s.record(spans(False, "c10d::send"), 30.0, shapes=False) == 0  # other ops: dropped, learnt again
    assert s.template is None and s.dropped == 1 and s.light == 1 and len(rec.rows) == 4
    assert not CommSampler(rec, Groups(dp=2, tp=2)).light_ok  # gloo spans of two groups need their shapes


def _one_rank_step(backend: str, device: torch.device) -> tuple[list[tuple], CommSampler]:
    """Two steps of real collectives on a one-rank process group, the second under the sampler (FSDP2 and
    DTensor issue none on one rank, so the step calls c10d as they do: base all-gather and reduce-scatter,
    an all-reduce under the engine's group range, and a functional all-reduce as DTensor's)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.profiler import record_function

    extra = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **extra)
    try:
        rec = Recorder(0, cuda=device.type == "cuda")
        sampler = CommSampler(rec, Groups(dp=1, tp=1), every=1, cuda=device.type == "cuda")
        shard = torch.ones(300, dtype=torch.bfloat16, device=device)
        full = torch.empty(300, dtype=torch.bfloat16, device=device)
        grads = torch.ones(500, device=device)
        flat = torch.ones(1000, device=device)
        act = torch.ones(8, 16, device=device)

        def step(i: int) -> None:
            rec.step = i
            with record_function(GROUP_RANGE + "dp"):
                dist.all_gather_into_tensor(full, shard)
                dist.reduce_scatter_tensor(torch.empty(500, device=device), grads)
                dist.all_reduce(flat)
            funcol.all_reduce(act, "sum", dist.group.WORLD).wait()

        run = sampler.wrap(step)
        run(0)  # the warm-up step is not sampled
        run(1)  # profiled with shapes: its bytes and peers become the template
        run(2)  # profiled without shapes: the same ops, bytes and peers from the template
        if device.type == "cuda":
            torch.cuda.synchronize()
        return list(rec.take()["events"]), sampler
    finally:
        dist.destroy_process_group()


def _check_one_rank(events: list[tuple], sampler: CommSampler, expected: list[tuple]) -> None:
    assert sampler.sampled == [1, 2] and sampler.light == 1 and sampler.dropped == 0
    for step in (1, 2):
        got = sorted((e[1], e[2], e[3]) for e in events if e[0] == "collective" and e[7] == step)
        assert got == expected, step
    assert all(e[6] > e[5] for e in events)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_profiled_step_on_a_one_rank_gloo_group_gives_events() -> None:
    events, sampler = _one_rank_step("gloo", torch.device("cpu"))
    _check_one_rank(events, sampler, [("all_gather", 600, "dp"), ("all_reduce", 512, "tp"),
                                      ("all_reduce", 4000, "dp"), ("reduce_scatter", 2000, "dp")])
    assert sampler.sources == {"gloo": 8} and sampler.missed == 0


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_profiled_step_on_a_one_rank_nccl_group_times_the_device_work() -> None:
    events, sampler = _one_rank_step("nccl", torch.device("cuda", 0))
    # on one rank NCCL copies for all-gather and reduce-scatter and launches nothing for an in-place all-reduce
    _check_one_rank(events, sampler, [("all_gather", 600, "dp"), ("reduce_scatter", 2000, "dp")])
    assert sampler.sources == {"device": 4} and sampler.missed == 4


def _sharded_bytes(spec: str, dp: int) -> list[int]:
    """Per FSDP unit (each block, then the root's remaining parameters): dp × its padded fp32 shards."""
    from workbench.models.presets import load_model
    from workbench.runner.llama import build

    m = build(load_model(spec), seed=0)

    def unit(params: list[torch.Tensor]) -> int:
        return sum(-(-p.shape[0] // dp) * dp * (p.numel() // p.shape[0]) * 4 for p in params)

    blocks = [unit(list(b.parameters())) for b in m.layers.values()]
    inner = {id(p) for b in m.layers.values() for p in b.parameters()}
    return [*blocks, unit([p for p in m.parameters() if id(p) not in inner])]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dp2_run_has_fsdp_gathers_and_reduce_scatters_of_the_sharded_parameters() -> None:
    from workbench.runner import run_train

    r = run_train(model=LLAMA, plan="dp=2,zero=1,mbs=1,gbs=4", steps=3, timeout=200)
    ev = r.events
    comm = ev[ev["kind"] != "compute"]
    assert set(comm["group"]) == {"dp"} and set(comm["step"]) == {1} and (comm["end"] > comm["start"]).all()
    units = _sharded_bytes(LLAMA, 2)
    for rank in (0, 1):
        mine = comm[comm["rank"] == rank]
        gathers = mine[mine["op"] == "all_gather"]["bytes"]
        assert len(gathers) > 0 and set(gathers) == set(units)
        # gradients reduce-scattered once per unit per step (synced on the last micro-batch only)
        assert sorted(mine[mine["op"] == "reduce_scatter"]["bytes"]) == sorted(units)
    assert len(r.links) > 0 and set(r.links["op"]) >= {"all_gather", "reduce_scatter"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tp2_run_has_tp_events_and_compare_shows_its_comm_rows() -> None:
    import workbench as wb
    from workbench.runner import run_train

    r = run_train(model=LLAMA, plan="tp=2,mbs=2,gbs=4", steps=3, timeout=200)
    ev = r.events
    comm = ev[ev["kind"] == "collective"]
    assert set(comm["group"]) == {"tp"} and set(comm["rank"]) == {0, 1} and (comm["bytes"] > 0).all()
    assert {"all_gather", "reduce_scatter"} <= set(comm["op"])  # sequence parallelism's pair
    t = wb.compare(wb.simulate(r.job), r).set_index(["kind", "op"])
    for op in ("all_gather", "reduce_scatter"):
        row = t.loc[("collective", op)]
        assert row["measured_seconds"] > 0 and row["sim_seconds"] > 0 and row["measured_count"] >= 1
    # per step: the one sampled step's collectives, not diluted by the steps that were not sampled
    gathers = comm[comm["op"] == "all_gather"].groupby("rank").size()
    assert t.loc[("collective", "all_gather"), "measured_count"] == pytest.approx(gathers.mean())
    # the dashboard's data model: the comm ops reach its latency panel and the links its link panel
    from workbench.live import LiveData

    live = LiveData(None, 10_000)
    live.add(r.events, r.memory, r.links)
    ops, p50, _ = live.latency()
    assert {"all_gather", "reduce_scatter"} <= set(ops) and (p50 > 0).all()
    assert len(live.busiest_links(2)) == 2  # each rank's link to the host
    # calibration: the sampled comm spans (gloo's, with the waiting in them) show where time went but
    # are not fitted as the link's rate; the fit equals that of the same run without them
    import dataclasses

    from workbench.calibration.run import from_run

    bare = dataclasses.replace(r, events=ev[ev["kind"] == "compute"])
    fitted = from_run(r.job.cluster, r)
    assert fitted.nodes[0].specs == from_run(r.job.cluster, bare).nodes[0].specs
    assert dict(fitted.nodes[0].specs).get("link_GBps") == dict(r.job.cluster.nodes[0].specs).get("link_GBps")
