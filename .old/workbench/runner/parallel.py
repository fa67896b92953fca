"""Tensor, pipeline and data parallelism with explicit torch.distributed calls, all timed.

- **TP** (Megatron): attention heads and the MLP's inner dimension are split over the
  `tp` ranks; the QKV and fc1 projections are column-parallel, proj and fc2 row-parallel
  followed by an all-reduce of the activations (forward), and the input of each pair goes
  through an identity whose backward all-reduces the gradient.
- **PP**: the blocks are split into `pp` contiguous stages (embedding on the first, final
  LayerNorm, head and loss on the last); a GPipe schedule runs every micro-batch forward,
  then every micro-batch backward, with activations and their gradients sent between
  neighbouring stages as one-sided writes through the `transport` engine (tcp backend) on
  CPU ranks (`p2p="auto"`/`"transport"`), or `torch.distributed.send/recv` (NCCL on GPUs,
  or `p2p="dist"`).
- **DP**: gradients are all-reduced (averaged) over the `dp` replicas after the last
  micro-batch; with `zero=1` they are instead reduced, each replica updates its own shard
  of the optimizer state and parameters, and the parameters are all-gathered (ZeRO-1).

Ranks are laid out in the one rank order of `workbench.core.layout.RankLayout`: TP fastest, then DP,
then PP: rank = (p * dp + d) * tp + t — the same order the simulator, dashboard and compare use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workbench.core.layout import RankLayout, stage_layers
from workbench.runner.gpt import GPT, GPTConfig, attention
from workbench.runner.telemetry import Recorder


@dataclass(frozen=True)
class Layout:
    """Where one rank sits in the job's `RankLayout` (tp fastest, then dp, then pp; cp = 1 here)."""

    dp: int
    tp: int
    pp: int
    rank: int

    @property
    def grid(self) -> RankLayout:
        return RankLayout(tp=self.tp, dp=self.dp, pp=self.pp)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def t(self) -> int:
        return self.grid.coords(self.rank)["tp"]

    @property
    def p(self) -> int:
        return self.grid.coords(self.rank)["pp"]

    @property
    def d(self) -> int:
        return self.grid.coords(self.rank)["dp"]

    def rank_of(self, d: int, p: int, t: int) -> int:
        return self.grid.rank_of(tp=t, dp=d, pp=p)

    def tp_ranks(self, d: int, p: int) -> list[int]:
        return [self.rank_of(d, p, t) for t in range(self.tp)]

    def dp_ranks(self, p: int, t: int) -> list[int]:
        return [self.rank_of(d, p, t) for d in range(self.dp)]

    def stage_layers(self, layers: int) -> range:
        return stage_layers(layers, self.pp, self.p)


class Comm:
    """The process groups of one rank and timed collectives/transfers on them."""

    def __init__(self, lay: Layout, rec: Recorder, device: torch.device) -> None:
        self.lay, self.rec, self.device = lay, rec, device
        self.tp_group: Any = None
        self.dp_group: Any = None
        self.tp_peers: list[int] = []
        self.dp_peers: list[int] = []
        if lay.world > 1:  # every rank creates every group, in the same order
            for d in range(lay.dp):
                for p in range(lay.pp):
                    ranks = lay.tp_ranks(d, p)
                    g = dist.new_group(ranks) if lay.tp > 1 else None
                    if lay.rank in ranks:
                        self.tp_group, self.tp_peers = g, ranks
            for p in range(lay.pp):
                for t in range(lay.tp):
                    ranks = lay.dp_ranks(p, t)
                    g = dist.new_group(ranks) if lay.dp > 1 else None
                    if lay.rank in ranks:
                        self.dp_group, self.dp_peers = g, ranks

    def all_reduce(self, x: torch.Tensor, group: str, op: str = "all_reduce") -> torch.Tensor:
        g = self.tp_group if group == "tp" else self.dp_group
        with self.rec.comm("collective", op, x.numel() * x.element_size(), group):
            dist.all_reduce(x, group=g)
        return x

    def all_gather(self, out: torch.Tensor, x: torch.Tensor, group: str) -> None:
        g = self.tp_group if group == "tp" else self.dp_group
        with self.rec.comm("collective", "all_gather", out.numel() * out.element_size(), group):
            if out.is_cuda:
                dist.all_gather_into_tensor(out, x, group=g)
            else:  # gloo: the list form
                dist.all_gather(list(out.chunk(len(self.dp_peers if group == "dp" else self.tp_peers))), x, group=g)

    p2p: TransportP2P | None = None  # set by the Trainer when pipeline traffic goes through `transport`

    def send(self, x: torch.Tensor, dst: int, op: str, micro: int = 0) -> None:
        with self.rec.comm("transfer", op, x.numel() * x.element_size(), "pp", dst):
            if self.p2p is not None:
                self.p2p.send(x, dst, "grad" if "gradient" in op else "act", self.rec.step, micro)
            else:
                dist.send(x.contiguous(), dst)

    def recv(self, shape: tuple[int, ...], src: int, op: str, micro: int = 0) -> torch.Tensor:
        nbytes = 4
        for d in shape:
            nbytes *= d
        with self.rec.comm("transfer", op, nbytes, "pp", src):
            if self.p2p is not None:
                return self.p2p.recv(shape, "grad" if "gradient" in op else "act", self.rec.step, micro)
            x = torch.empty(shape, device=self.device)
            dist.recv(x, src)
        return x


def _own_address() -> str:
    """This rank's address on the interface that reaches MASTER_ADDR (loopback for local runs)."""
    import os
    import socket

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(master), 9))
        return str(s.getsockname()[0])


class TransportP2P:
    """Pipeline activations and gradients through the `transport` engine (tcp backend).

    Each rank registers a receive buffer per direction (a slot per micro-batch) and a send
    staging buffer; descriptors are exchanged once with `all_gather_object`. A send is a
    one-sided WRITE into the neighbour's slot with an immediate naming (step, direction,
    micro-batch); the receiver waits for that immediate (`expect`), so completion never
    depends on message order. A slot is rewritten only a step later, after the receiver's
    reply proved it was consumed.
    """

    def __init__(self, lay: Layout, micro: int, shape: tuple[int, ...], timeout: float) -> None:
        import os
        import secrets

        from transport import Engine, MemoryDescriptor

        secret = os.environ.get("WORKBENCH_TRANSPORT_SECRET")
        if secret is None:  # one secret for the job, from rank 0 over the process group
            box = [secrets.token_hex(16) if lay.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            secret = str(box[0])
        self.micro, self.timeout = micro, timeout
        self.numel = 1
        for d in shape:
            self.numel *= d
        self.chunk = self.numel * 4
        self.eng = Engine("tcp", lanes=1, host=_own_address(), secret=secret)
        self.rx = {k: torch.zeros(micro, self.numel) for k in ("act", "grad")}
        self.tx = {k: torch.zeros(micro, self.numel) for k in ("act", "grad")}
        self.rx_reg = {k: self.eng.register(v) for k, v in self.rx.items()}
        self.tx_reg = {k: self.eng.register(v) for k, v in self.tx.items()}
        mine = {k: r.descriptor.to_bytes() for k, r in self.rx_reg.items()}
        everyone: list[Any] = [None] * lay.world
        dist.all_gather_object(everyone, mine)
        self.peers = [{k: MemoryDescriptor.from_bytes(v) for k, v in d.items()} for d in everyone]

    def _imm(self, kind: str, step: int, micro: int) -> int:
        return ((step % 100_000) * 2 + (kind == "grad")) * self.micro + micro + 1

    def send(self, x: torch.Tensor, dst: int, kind: str, step: int, micro: int) -> None:
        self.tx[kind][micro].copy_(x.reshape(-1))
        off = micro * self.chunk
        t = self.eng.write(self.tx_reg[kind], self.peers[dst][kind], self.chunk, src_offset=off, dst_offset=off,
                           imm=self._imm(kind, step, micro), timeout=self.timeout)
        t.result(timeout=self.timeout)

    def recv(self, shape: tuple[int, ...], kind: str, step: int, micro: int) -> torch.Tensor:
        self.eng.expect(self._imm(kind, step, micro), 1, timeout=self.timeout).result(timeout=self.timeout)
        return self.rx[kind][micro].view(shape).clone()

    def close(self) -> None:
        self.eng.close()


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over the TP group backward (Megatron's f)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce(g.contiguous(), "tp"), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce over the TP group forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        return comm.all_reduce(x.contiguous(), "tp")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def shard(name: str, full: torch.Tensor, t: int, tp: int, heads: int) -> torch.Tensor:
    """TP rank `t`'s slice of reference parameter `name` (a full copy when the parameter is replicated)."""
    if tp == 1:
        return full.clone()
    leaf = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    if leaf in ("qkv.weight", "qkv.bias"):
        hp = heads // tp
        v = full.view(3, heads, -1, *full.shape[1:])[:, t * hp:(t + 1) * hp]
        return v.reshape(-1, *full.shape[1:]).clone()
    if leaf in ("fc1.weight", "fc1.bias"):
        return full.chunk(tp, 0)[t].clone()
    if leaf == "proj.weight":
        return full.chunk(tp, 1)[t].clone()
    if leaf == "fc2.weight":
        return full.chunk(tp, 1)[t].clone()
    return full.clone()


class StageBlock(nn.Module):
    """One transformer block holding this TP rank's shard."""

    def __init__(self, c: GPTConfig, tp: int) -> None:
        super().__init__()
        h, f = c.hidden, c.ffn_size
        self.heads = c.heads // tp
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h // tp)
        self.proj = nn.Linear(h // tp, h)  # bias is added once, after the all-reduce
        self.ln2 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, f // tp)
        self.fc2 = nn.Linear(f // tp, h)

    def forward(self, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        tp = comm.lay.tp > 1
        a = self.ln1(x)
        if tp:
            a = _CopyToTP.apply(a, comm)
        a = F.linear(attention(self.qkv(a), self.heads), self.proj.weight)
        if tp:
            a = _ReduceFromTP.apply(a, comm)
        x = x + a + self.proj.bias
        m = self.ln2(x)
        if tp:
            m = _CopyToTP.apply(m, comm)
        m = F.linear(F.gelu(self.fc1(m)), self.fc2.weight)
        if tp:
            m = _ReduceFromTP.apply(m, comm)
        return x + m + self.fc2.bias


class Stage(nn.Module):
    """This rank's pipeline stage: its blocks (TP shards), plus embedding (first) or head (last)."""

    def __init__(self, c: GPTConfig, lay: Layout) -> None:
        super().__init__()
        self.config, self.lay = c, lay
        self.first, self.last = lay.p == 0, lay.p == lay.pp - 1
        self.layer_ids = list(lay.stage_layers(c.layers))
        if self.first:
            self.tok = nn.Embedding(c.vocab, c.hidden)
            self.pos = nn.Parameter(torch.zeros(c.seq, c.hidden))
        self.blocks = nn.ModuleList(StageBlock(c, lay.tp) for _ in self.layer_ids)
        if self.last:
            self.ln_f = nn.LayerNorm(c.hidden)
            self.head = nn.Linear(c.hidden, c.vocab, bias=False)

    def reference_names(self) -> dict[str, str]:
        """This stage's parameter names → the reference model's names."""
        out = {}
        for name, _ in self.named_parameters():
            if name.startswith("blocks."):
                _, i, rest = name.split(".", 2)
                out[name] = f"blocks.{self.layer_ids[int(i)]}.{rest}"
            else:
                out[name] = name
        return out

    def load_from(self, ref: GPT) -> None:
        full = dict(ref.named_parameters())
        with torch.no_grad():
            for name, p in self.named_parameters():
                rname = self.reference_names()[name]
                p.copy_(shard(rname, full[rname].detach(), self.lay.t, self.lay.tp, self.config.heads))

    def forward(self, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        if self.first:
            x = self.tok(x) + self.pos[: x.shape[1]]
        for blk in self.blocks:
            x = blk(x, comm)
        if self.last:
            x = self.head(self.ln_f(x))
        return x

    def flops(self, tokens: int) -> float:
        """Forward FLOPs of this stage's shard for `tokens` tokens."""
        c = self.config
        f = len(self.layer_ids) * c.layer_flops(tokens) / self.lay.tp
        return f + (c.head_flops(tokens) if self.last else 0.0)


class Trainer:
    """One rank's training loop: GPipe over micro-batches, TP inside the stage, DP (or ZeRO-1) at the end."""

    def __init__(self, c: GPTConfig, lay: Layout, comm: Comm, rec: Recorder, device: torch.device,
                 gbs: int, mbs: int, zero: int = 0, optimizer: str = "adamw", lr: float = 1e-3,
                 seed: int = 0, p2p: str = "auto", p2p_timeout: float = 120.0) -> None:
        from workbench.runner.gpt import init_gpt, make_optimizer

        self.c, self.lay, self.comm, self.rec, self.device = c, lay, comm, rec, device
        self.gbs, self.mbs, self.zero, self.seed = gbs, mbs, zero, seed
        self.micro = gbs // (lay.dp * mbs)
        torch.manual_seed(seed)
        self.stage = Stage(c, lay)
        self.stage.load_from(init_gpt(c, seed))
        self.stage.to(device)
        self.params = [p for p in self.stage.parameters()]
        self.numel = sum(p.numel() for p in self.params)
        if zero and lay.dp > 1:  # ZeRO-1: this replica owns a contiguous shard of the flat parameters
            self.shard_size = -(-self.numel // lay.dp)
            self.flat_master = torch.zeros(self.shard_size * lay.dp, device=device)
            self.master = nn.Parameter(self._flat_params()[lay.d * self.shard_size:(lay.d + 1) * self.shard_size].clone())
            self.opt = make_optimizer([self.master], optimizer, lr)
        else:
            self.opt = make_optimizer(self.params, optimizer, lr)
        rec.set_memory("weights", self.numel * 4)
        self._act_bytes = 0
        self._saved_per_micro: int | None = None  # activation bytes one micro-batch's forward saves
        self.p2p_mode = "dist"
        if lay.pp > 1 and p2p in ("auto", "transport") and device.type == "cpu":
            try:
                comm.p2p = TransportP2P(lay, self.micro, (mbs, c.seq, c.hidden), p2p_timeout)
                self.p2p_mode = "transport-tcp"
            except ImportError:
                if p2p == "transport":
                    raise

    def close(self) -> None:
        if self.comm.p2p is not None:
            self.comm.p2p.close()

    def _flat_params(self) -> torch.Tensor:
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        pad = getattr(self, "shard_size", 0) * self.lay.dp - flat.numel()
        return F.pad(flat, (0, max(pad, 0)))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._act_bytes += t.numel() * t.element_size()
        self.rec.set_memory("activations", self._act_bytes)
        return t

    def step(self, step: int) -> float | None:
        """One training step; returns this rank's mean loss on the last stage (None elsewhere)."""
        c, lay, comm, rec = self.c, self.lay, self.comm, self.rec
        rec.step = step
        with rec.compute("data"):  # the synthetic batch (not in the simulator's model of a step)
            x_all, y_all = batch_for(c, step, self.gbs, self.seed)
        per_dp = self.gbs // lay.dp
        x_all = x_all[lay.d * per_dp:(lay.d + 1) * per_dp]
        y_all = y_all[lay.d * per_dp:(lay.d + 1) * per_dp]
        shape = (self.mbs, c.seq, c.hidden)
        prev = lay.rank_of(lay.d, lay.p - 1, lay.t) if not self.stage.first else None
        nxt = lay.rank_of(lay.d, lay.p + 1, lay.t) if not self.stage.last else None
        tokens = self.mbs * c.seq
        fl = self.stage.flops(tokens)
        inputs: list[torch.Tensor | None] = []
        outputs: list[torch.Tensor] = []
        losses: list[float] = []
        self._act_bytes = 0
        # what a micro-batch's forward saves is the same every time (fixed shapes): the hooks count it once,
        # in the first recording step's first micro-batch (a Python call per saved tensor is costly on GPUs)
        count = rec.enabled and self._saved_per_micro is None
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t) if count else None
        # ---- forward of every micro-batch (GPipe) ----
        for m in range(self.micro):
            if self.stage.first:
                inp: torch.Tensor = x_all[m * self.mbs:(m + 1) * self.mbs].to(self.device)
                inputs.append(None)
            else:
                inp = comm.recv(shape, prev, "recv_activation", m).requires_grad_(True)  # type: ignore[arg-type]
                inputs.append(inp)
            with rec.compute("forward", fl):
                if hooks is not None and m == 0:
                    with hooks:
                        out = self.stage(inp, comm)
                    self._saved_per_micro = self._act_bytes
                else:
                    out = self.stage(inp, comm)
                    if rec.enabled and self._saved_per_micro is not None:
                        self._act_bytes += self._saved_per_micro
                        rec.set_memory("activations", self._act_bytes)
                if self.stage.last:
                    y = y_all[m * self.mbs:(m + 1) * self.mbs].to(self.device)
                    out = F.cross_entropy(out.flatten(0, 1), y.flatten()) / self.micro
            if self.stage.last:
                losses.append(float(out.detach()) * self.micro)
            else:
                comm.send(out.detach(), nxt, "send_activation", m)  # type: ignore[arg-type]
            outputs.append(out)
        # ---- backward of every micro-batch ----
        for m in range(self.micro):
            out = outputs[m]
            if self.stage.last:
                with rec.compute("backward", 2 * fl):
                    out.backward()
            else:
                g = comm.recv(shape, nxt, "recv_gradient", m)  # type: ignore[arg-type]
                with rec.compute("backward", 2 * fl):
                    out.backward(g)
            inp_m = inputs[m]
            if inp_m is not None:
                comm.send(inp_m.grad, prev, "send_gradient", m)  # type: ignore[arg-type]
            outputs[m] = None  # type: ignore[call-overload]
            self._act_bytes = self._act_bytes * (self.micro - m - 1) // max(self.micro - m, 1)
            rec.set_memory("activations", self._act_bytes)
        rec.set_memory("gradients", self.numel * 4)
        rec.set_memory("buffers", int(shape[0] * shape[1] * shape[2] * 4 * (2 if lay.pp > 1 else 0)))
        # ---- data parallel: average the gradients, then update ----
        if self.zero and lay.dp > 1:
            self._zero1_update()
        else:
            if lay.dp > 1:
                with rec.compute("grad_copy"):  # pack the gradients into one buffer
                    flat = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
                comm.all_reduce(flat, "dp")
                with rec.compute("grad_copy"):
                    flat /= lay.dp
                    off = 0
                    for p in self.params:
                        n = p.numel()
                        p.grad.copy_(flat[off:off + n].view_as(p))  # type: ignore[union-attr]
                        off += n
            with rec.compute("optimizer", 0.0):
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            rec.set_memory("optimizer", _state_bytes(self.opt))
        rec.set_memory("gradients", 0)
        return sum(losses) / len(losses) if losses else None

    def _zero1_update(self) -> None:
        lay, comm = self.lay, self.comm
        with self.rec.compute("grad_copy"):
            flat = F.pad(torch.cat([p.grad.reshape(-1) for p in self.params]),  # type: ignore[union-attr]
                         (0, self.shard_size * lay.dp - self.numel))
        comm.all_reduce(flat, "dp")  # gloo has no reduce-scatter: an all-reduce (named as such), keep our shard
        lo = lay.d * self.shard_size
        self.master.grad = flat[lo:lo + self.shard_size] / lay.dp
        with self.rec.compute("optimizer", 0.0):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        comm.all_gather(self.flat_master, self.master.detach(), "dp")
        off = 0
        with torch.no_grad(), self.rec.compute("grad_copy"):
            for p in self.params:
                n = p.numel()
                p.copy_(self.flat_master[off:off + n].view_as(p))
                p.grad = None
                off += n
        self.rec.set_memory("optimizer", _state_bytes(self.opt))

    def reference_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under their reference names (TP shards as sliced by `shard`)."""
        names = self.stage.reference_names()
        return {names[n]: p.detach().cpu().clone() for n, p in self.stage.named_parameters()}


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def batch_for(c: GPTConfig, step: int, gbs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from workbench.runner.gpt import batch

    return batch(c, step, gbs, seed)
