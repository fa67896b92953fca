"""The native engine's collectives and pipeline transfers as events, read from `torch.profiler`.

FSDP2, DTensor and `torch.distributed.pipelining` call `torch.distributed` themselves, asynchronously
and on their own threads (gloo) or streams (NCCL), so the recorder's host-side spans cannot time
them. PyTorch's profiler sees each of them twice: the `c10d::` op where an engine issued it (on
the calling thread, with its tensors' shapes, its peer for send/recv, and the profiler ranges it
was issued under, e.g. FSDP's `FSDP::all_gather`), and its execution — on CPU the gloo worker's
span (`gloo:all_gather`, from the moment a worker takes it until it completes, waiting for the
peers included, which is what the hand-written engine's spans measure too), on CUDA the device
activity the op launched (`ncclDevKernel_*` kernels or copies, linked to the op by the profiler's
correlation ids), whose start and end are GPU clock readings mapped onto the host clock by the
profiler. `comm_events` pairs the two and names each in the house vocabulary (`all_gather`,
`reduce_scatter`, `all_reduce`, `broadcast`, `all_to_all`, `send_recv`, `recv_wait`) with its bytes
in nccl-tests' convention (`workbench.core.ops`), its group and, for transfers, the peer's global
rank.

Why the profiler and not hooks: FSDP2 and DTensor expose no timing hooks for their collectives
(FSDP2's custom-collective hooks replace the collective rather than observe it), DTensor's go
through functional collectives below Python, and wrapping `torch.distributed` functions would time
the enqueue, not the transfer. The profiler is what the field uses (torchtitan, HTA, Kineto
traces), works the same on gloo and NCCL, and costs nothing on steps it does not record.

The group of an op: one issued under a range `workbench.group:NAME` (the native engine's ZeRO-0
gradient all-reduce) belongs to that group; an all-gather or reduce-scatter issued under FSDP's
profiler ranges (`FSDP::…`) to dp (FSDP2 without HSDP issues nothing else: an all-reduce inside
its hooks is DTensor reducing a tensor-parallel gradient); send/recv to the pipeline (pp); any
other collective is DTensor's tensor parallelism (tp), the only other engine that issues
collectives inside a step.

`CommSampler` records the first step after the warm-up, then at most one step in `every`, further
apart when the measured extra time of a profiled step would exceed its budget; the ops' shapes
(bytes, peers), which double to quadruple the profiler's cost, are recorded on the first sample and reused while
the same ops come in the same order. `compare` averages each event kind over the steps that recorded
it. The events overlap the compute spans they run beside (the comm is asynchronous), unlike the
hand-written engine's, which are split out of them.

Not seen yet (one GPU here): NCCL's batched send/recv (pipelining's `batch_isend_irecv`) launch one
grouped kernel when the batch closes, outside every `c10d::send`/`recv_`; `_batched_p2p` gives the
k-th batch the k-th such kernel when their counts agree, else those ops are counted in `missed`.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

# c10d op -> the house op name; the ops every engine's collectives and p2p reach the process group by
C10D_OPS: dict[str, str] = {
    "c10d::_allgather_base_": "all_gather", "c10d::allgather_": "all_gather",
    "c10d::allgather_into_tensor_coalesced_": "all_gather", "c10d::allgather_coalesced_": "all_gather",
    "c10d::_reduce_scatter_base_": "reduce_scatter", "c10d::reduce_scatter_": "reduce_scatter",
    "c10d::reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "c10d::allreduce_": "all_reduce", "c10d::allreduce_coalesced_": "all_reduce",
    "c10d::broadcast_": "broadcast", "c10d::alltoall_": "all_to_all", "c10d::alltoall_base_": "all_to_all",
    "c10d::send": "send_recv", "c10d::recv_": "recv_wait", "c10d::recv_any_source_": "recv_wait",
}
P2P = ("send_recv", "recv_wait")
GROUP_RANGE = "workbench.group:"  # a profiler range naming the group of the collectives inside it

# the profiler's dtype names -> bytes per element
DTYPE_BYTES: dict[str, int] = {
    "float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "short int": 2,
    "signed char": 1, "unsigned char": 1, "bool": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1,
    "c10::complex<float>": 8, "c10::complex<double>": 16,
}


@dataclass(frozen=True)
class Span:
    """One profiler record, reduced to what the mapping needs (times in the profiler's ns clock)."""

    name: str
    thread: int
    start: int
    end: int
    device: bool = False  # a device activity (kernel, copy) rather than a host op
    shapes: tuple[Any, ...] = ()  # per input: a shape, or (TensorList) a list of shapes
    dtypes: tuple[str, ...] = ()
    inputs: tuple[Any, ...] = ()  # concrete scalar inputs (peer ranks of send/recv)
    corr: int = 0  # correlation id (host ops)
    linked: int = 0  # the host op a device activity was launched from


@dataclass(frozen=True)
class Groups:
    """This rank's parallel groups: their sizes and the pipeline group's global ranks in group order."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    pp_ranks: tuple[int, ...] = ()

    def size(self, group: str) -> int:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp}.get(group, 1)


@dataclass(frozen=True)
class CommEvent:
    """A collective or transfer in Result-schema terms (times in the profiler's ns clock)."""

    kind: str
    op: str
    nbytes: int
    group: str
    peer: int
    start: int
    end: int
    source: str = "gloo"  # what timed it: gloo's span, or the device activities it launched ("device")


def spans_from_profiler(results: Any) -> list[Span]:
    """The records of a finished `torch.profiler.profile` (`prof.profiler.kineto_results`) as `Span`s: the
    c10d ops, the ranges that name their group, gloo's and NCCL's own spans, the device activities launched
    from a host op and those host ops, and the anchor."""
    from torch.autograd import DeviceType

    events = results.events()
    linked = [e.linked_correlation_id() for e in events]
    device = {i for i, k in enumerate(linked) if k > 0 and events[i].device_type() != DeviceType.CPU}
    launchers = {linked[i] for i in device}
    out = []
    for i, e in enumerate(events):
        name = e.name()
        dev = i in device or (linked[i] <= 0 and "SendRecv" in name and e.device_type() != DeviceType.CPU)
        if dev:
            pass  # work on the device (NCCL's grouped send/recv kernel may be linked to no op)
        elif linked[i] > 0:
            continue  # host-side runtime calls (cudaLaunchKernel …): the device activity is what counts
        elif not (name in C10D_OPS or name.startswith(_HOST_NAMES) or (launchers and e.correlation_id() in launchers)):
            continue
        elif e.device_type() != DeviceType.CPU:
            continue  # annotations on the device timeline, not work
        shapes: tuple[Any, ...] = ()
        dtypes: tuple[str, ...] = ()
        inputs: tuple[Any, ...] = ()
        if not dev and (name in C10D_OPS or name.startswith(("gloo:", "nccl:"))):
            shapes = tuple(_structured(e))
            dtypes = tuple(e.dtypes())
            inputs = tuple(_concrete(e))
        out.append(Span(name, int(e.start_thread_id()), int(e.start_ns()), int(e.end_ns()), dev, shapes, dtypes,
                        inputs, int(e.correlation_id()), int(linked[i])))
    return out


_HOST_NAMES = ("gloo:", "nccl:", "FSDP::", GROUP_RANGE, "workbench::")


def _concrete(e: Any) -> list[Any]:
    try:
        return list(e.concrete_inputs())
    except (AttributeError, RuntimeError):
        return []


def _structured(e: Any) -> list[Any]:
    try:
        return list(e.structured_input_shapes())  # TensorList inputs carry their shapes here
    except (AttributeError, RuntimeError):
        return list(e.shapes())


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _tensor(span: Span, i: int) -> tuple[int, str] | None:
    """(numel, dtype) of input `i` of a span: a tensor, or the sum over a TensorList."""
    if i >= len(span.shapes):
        return None
    s = span.shapes[i]
    dt = span.dtypes[i] if i < len(span.dtypes) else ""
    if isinstance(s, (list, tuple)) and s and isinstance(s[0], (list, tuple)):  # a TensorList
        return sum(_numel(t) for t in s), dt
    if isinstance(s, (list, tuple)) and s:
        return _numel(s), dt
    return None


def _bytes_of(op: str, req: Span, exe: Span | None, groups: Groups, group: str) -> int:
    """nccl-tests' size of the op: all-gather its gathered output, reduce-scatter its input, else the tensor."""
    base = req.name in ("c10d::_allgather_base_", "c10d::_reduce_scatter_base_")
    # the base ops take (output, input); the rest take the tensor (list) first
    t = _tensor(req, 0 if op == "all_gather" or not base else 1)
    dt = t[1] if t else ""
    if (t is None or dt not in DTYPE_BYTES) and exe is not None:
        e = _tensor(exe, 0)  # gloo's and NCCL's spans name the tensor they move, with its dtype
        if e is not None:
            if t is None:
                t = (e[0] * (groups.size(group) if op == "all_gather" else 1), e[1])
            dt = e[1]
    if t is None:
        return 0
    return t[0] * DTYPE_BYTES.get(dt, 0)  # 0: the records name no dtype (NCCL's batched send/recv)


def _group_of(op: str, tags: list[str], groups: Groups) -> str:
    if op in P2P:
        return "pp"
    for tag in reversed(tags):  # the innermost range that names a group
        if tag.startswith(GROUP_RANGE):
            return tag[len(GROUP_RANGE):]
        if tag.startswith("FSDP::") and op in ("all_gather", "reduce_scatter"):
            return "dp"  # FSDP2 (without HSDP) issues only these; others in its hooks are DTensor's
    return "tp" if groups.tp > 1 or groups.dp == 1 else "dp"


def _requests(spans: list[Span]) -> list[tuple[Span, list[str], Span | None]]:
    """The c10d ops in start order, each with the group-naming ranges it was issued under (same thread) and
    NCCL's host span inside it (which names the tensor where the op's own record lists none)."""
    by_thread: dict[int, list[Span]] = {}
    for s in spans:
        if not s.device and (s.name in C10D_OPS or s.name.startswith(("FSDP::", GROUP_RANGE, "nccl:"))):
            by_thread.setdefault(s.thread, []).append(s)
    out: list[tuple[Span, list[str], Span | None]] = []
    for items in by_thread.values():
        items.sort(key=lambda s: (s.start, -s.end))
        stack: list[Span] = []
        tags: dict[int, list[str]] = {}
        inner: dict[int, Span] = {}
        for s in items:
            while stack and stack[-1].end <= s.start:
                stack.pop()
            if s.name.startswith("nccl:"):
                owner = next((a for a in reversed(stack) if a.name in C10D_OPS), None)
                if owner is not None:
                    inner.setdefault(id(owner), s)
                continue
            if s.name in C10D_OPS:
                tags[id(s)] = [a.name for a in stack]
            stack.append(s)
        out.extend((s, tags[id(s)], inner.get(id(s))) for s in items if s.name in C10D_OPS)
    out.sort(key=lambda r: r[0].start)
    return out


def comm_events(spans: Iterable[Span], groups: Groups) -> tuple[list[CommEvent], int]:
    """Pair each c10d op with its execution (gloo span or device activity); returns (events, unpaired ops)."""
    spans = list(spans)
    reqs = _requests(spans)
    gloo = sorted((s for s in spans if not s.device and s.name.startswith("gloo:")), key=lambda s: s.start)
    device = [s for s in spans if s.device]
    # device activities -> the c10d op they were launched from (its correlation id, or an op it encloses)
    host = {s.corr: s for s in spans if not s.device and s.corr}
    by_thread: dict[int, list[Span]] = {}
    for r, _, _ in reqs:
        by_thread.setdefault(r.thread, []).append(r)
    starts = {t: [r.start for r in rs] for t, rs in by_thread.items()}
    launched: dict[int, list[Span]] = {}
    for d in device:
        h = host.get(d.linked)
        if h is None or h.thread not in by_thread:
            continue
        rs = by_thread[h.thread]
        i = bisect.bisect_right(starts[h.thread], h.start) - 1
        while i >= 0 and not rs[i].start <= h.start <= rs[i].end:
            i -= 1
        if i >= 0:
            launched.setdefault(id(rs[i]), []).append(d)
    _batched_p2p(reqs, launched, spans)
    used = [False] * len(gloo)
    gloo_starts = [g.start for g in gloo]
    events: list[CommEvent] = []
    missed = 0
    for req, tags, nccl in reqs:
        op = C10D_OPS[req.name]
        group = _group_of(op, tags, groups)
        acts = launched.get(id(req))
        if acts:
            exe, source = nccl, "device"
            start, end = min(a.start for a in acts), max(a.end for a in acts)
        else:
            exe, source = _pair_gloo(req, op, gloo, gloo_starts, used), "gloo"
            if exe is None:
                missed += 1  # e.g. NCCL on one rank: an in-place all-reduce launches nothing to time
                continue
            start, end = exe.start, exe.end
        peer = -1
        if op in P2P and len(req.inputs) > 2 and isinstance(req.inputs[2], int):
            local = int(req.inputs[2])  # the peer's rank in the process group
            peer = groups.pp_ranks[local] if 0 <= local < len(groups.pp_ranks) else -1
        kind = "transfer" if op in P2P else "collective"
        events.append(CommEvent(kind, op, _bytes_of(op, req, exe, groups, group), group, peer, start, end, source))
    return events, missed


def _batched_p2p(reqs: list[tuple[Span, list[str], Span | None]], launched: dict[int, list[Span]],
                 spans: list[Span]) -> None:
    """NCCL's batched send/recv (`batch_isend_irecv`, what pipelining uses on GPUs) run as one grouped
    kernel launched when the batch closes (a `nccl:coalesced` host span), after its `c10d::send`/`recv_`
    ops: the k-th batch of p2p ops with no device work of their own takes the k-th `SendRecv` kernel
    that no op launched. Only when the counts agree; otherwise the ops stay unmatched."""
    taken = {id(d) for acts in launched.values() for d in acts}
    kernels = sorted((s for s in spans if s.device and "SendRecv" in s.name and id(s) not in taken),
                     key=lambda s: s.start)
    if not kernels:
        return
    pending = [r for r, _, _ in reqs if C10D_OPS[r.name] in P2P and id(r) not in launched]
    batches: list[list[Span]] = []
    for mark in sorted((s for s in spans if not s.device and s.name == "nccl:coalesced"), key=lambda s: s.start):
        batch = [r for r in pending if r.thread == mark.thread and r.start < mark.start]
        if batch:
            batches.append(batch)
            pending = [r for r in pending if r not in batch]
    if len(batches) != len(kernels):
        return
    for batch, k in zip(batches, kernels):
        for r in batch:
            launched[id(r)] = [k]


def _pair_gloo(req: Span, op: str, gloo: list[Span], starts: list[int], used: list[bool]) -> Span | None:
    """The first unused gloo span that started after `req`, moves the same number of elements, and is of
    the same family (send, recv, or a collective: gloo runs reduce-scatter as an all-reduce)."""
    family = {"send_recv": "gloo:send", "recv_wait": "gloo:recv"}.get(op)
    want = None
    if req.name in ("c10d::_allgather_base_", "c10d::_reduce_scatter_base_"):
        t = _tensor(req, 1)  # gloo's span names the input
        want = t[0] if t else None
    elif req.name in ("c10d::allreduce_", "c10d::broadcast_", "c10d::send", "c10d::recv_"):
        t = _tensor(req, 0)
        want = t[0] if t else None
    lo = bisect.bisect_left(starts, req.start)
    for i in range(lo, len(gloo)):
        g = gloo[i]
        if used[i]:
            continue
        if family is not None and g.name != family or family is None and g.name in ("gloo:send", "gloo:recv"):
            continue
        got = _tensor(g, 0)
        if want is not None and got is not None and got[0] != want:
            continue
        used[i] = True
        return g
    return None


class CommSampler:
    """Runs sampled steps under `torch.profiler` and hands their collectives and transfers to the recorder.

    The first step after the warm-up is sampled, then one in `every` at most; with `budget_pct` > 0 the gap
    also grows so that a profiled step's extra time, spread over the gap, stays within `budget_pct` of a
    step (the extra time is measured: the sampled step's wall time against the median of the next three
    steps). `wrap(step)` returns the step function to run; a sampled step's profiler work (start, stop,
    pairing) is counted in the recorder's `cost_s`. Nothing is recorded while the recorder is off (A/B
    steps) or while another profiler runs (`WORKBENCH_PROFILE`).
    """

    def __init__(self, rec: Any, groups: Groups, every: int = 10, cuda: bool = False, budget_pct: float = 2.0,
                 reuse_shapes: bool = True) -> None:
        self.rec, self.groups, self.every, self.cuda = rec, groups, max(int(every), 1), cuda
        self.budget = max(float(budget_pct), 0.0) / 100
        self.calls = 0
        self.next = 1  # the first step after the warm-up
        self.sampled: list[int] = []  # the steps recorded
        self.gaps: list[int] = []  # steps from each sample to the next
        self.missed = 0  # c10d ops with no execution found
        self.sources: dict[str, int] = {}  # events per timing source (gloo, device)
        # bytes and peers need the ops' shapes, which triple the profiler's cost: recorded on the first
        # sample and reused while the ops repeat (gloo spans are then paired by order alone, so not when
        # two collective groups share the step on CPU ranks)
        self.template: list[tuple[str, str, str, int, int]] | None = None
        self.light_ok = reuse_shapes and (cuda or not (groups.dp > 1 and groups.tp > 1))
        self.light = 0  # samples taken without shapes
        self.dropped = 0  # samples whose ops did not match the template
        self._last = -1  # the call index of the last sample
        self._sample_s = 0.0  # its wall time
        self._after: list[float] = []  # wall times of the steps after it

    def due(self) -> bool:
        import torch

        return bool(self.rec.enabled) and self.calls >= self.next and not torch.autograd._profiler_enabled()

    def wrap(self, step: Callable[[int], Any]) -> Callable[[int], Any]:
        def run(i: int) -> Any:
            sample = self.due()
            t0 = time.perf_counter()
            try:
                return self._profiled(step, i) if sample else step(i)
            finally:
                if self.cuda:  # the step loop waits for the device after each step anyway
                    import torch

                    torch.cuda.synchronize()
                self._done(sample, time.perf_counter() - t0)

        return run

    def _done(self, sample: bool, wall: float) -> None:
        if sample:
            self._last, self._sample_s, self._after = self.calls, wall, []
            self.next = self.calls + self.every
            self.gaps.append(self.every)
        elif self._last >= 0 and len(self._after) < 3:
            self._after.append(wall)
            if len(self._after) == 3 and self.budget > 0:  # spread the measured extra time within the budget
                base = sorted(self._after)[1]
                gap = math.ceil(max(self._sample_s - base, 0.0) / (self.budget * base)) if base > 0 else self.every
                self.gaps[-1] = max(self.every, gap)
                self.next = self._last + self.gaps[-1]
        self.calls += 1

    def _profiled(self, step: Callable[[int], Any], i: int) -> Any:
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function

        c0 = time.perf_counter()
        shapes = self.template is None or not self.light_ok
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        prof = profile(activities=acts, record_shapes=shapes)
        prof.__enter__()
        try:
            host = time.perf_counter()
            with record_function("workbench::anchor"):
                pass
            self.rec.cost_s += host - c0
            out = step(i)
        finally:
            c1 = time.perf_counter()
            if self.cuda:
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
        spans = spans_from_profiler(prof.profiler.kineto_results)  # type: ignore[union-attr]
        self.record(spans, host, shapes)
        self.rec.cost_s += time.perf_counter() - c1
        return out

    def record(self, spans: list[Span], host_anchor: float, shapes: bool = True) -> int:
        """Map the spans' events onto the host clock (the anchor range started at `host_anchor`) and
        add them to the recorder; returns how many.

        A step profiled with shapes (the first, and any after a mismatch) keeps its events' bytes and
        peers as the template; a step profiled without them (a quarter to a half of the cost) takes
        them from the template when its ops come in the same order, else it is dropped and the next
        sample records shapes again."""
        anchor = next((s.start for s in spans if s.name == "workbench::anchor"), None)
        if anchor is None:
            return 0
        events, missed = comm_events(spans, self.groups)
        if shapes:
            self.template = [(e.kind, e.op, e.group, e.nbytes, e.peer) for e in events]
        else:
            tpl = self.template or []
            if [(e.kind, e.op, e.group) for e in events] != [t[:3] for t in tpl]:
                self.template = None  # the step's ops differ from the template's: learn them again
                self.dropped += 1
                return 0
            events = [replace(e, nbytes=t[3], peer=t[4]) for e, t in zip(events, tpl)]
            self.light += 1
        self.missed += missed
        step = self.rec.step
        self.sampled.append(step)
        for ev in events:
            self.sources[ev.source] = self.sources.get(ev.source, 0) + 1
            self.rec.add_event(ev.kind, ev.op, ev.nbytes, ev.group, ev.peer, host_anchor + (ev.start - anchor) * 1e-9,
                               host_anchor + (ev.end - anchor) * 1e-9, step)
        return len(events)
