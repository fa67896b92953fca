"""`RankLayout`: the one rank order of the house (Megatron's: tp fastest, then cp, dp, pp).

The simulator, the runner, the dashboard and compare all place ranks with this object, so a
measured rank and its predicted twin always sit in the same stage and the same groups:

    rank = ((pp_i · dp + dp_i) · cp + cp_i) · tp + tp_i

Expert parallelism shares the data-parallel ranks: an ep group is `ep` consecutive dp indices
of one (tp, cp, pp) position; the expert-data-parallel group strides over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from workbench.errors import WorkbenchError

AXES = ("tp", "cp", "dp", "pp")  # fastest-varying first


@dataclass(frozen=True)
class RankLayout:
    """The dp × pp × cp × tp grid of a job's ranks (and the ep split of dp)."""

    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for axis in (*AXES, "ep"):
            v = getattr(self, axis)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise WorkbenchError(f"plan.{axis}: must be a whole number ≥ 1, got {v!r}")
        if self.dp * self.cp % self.ep:
            raise WorkbenchError(f"plan.ep: {self.ep} must divide dp × cp = {self.dp * self.cp}")

    @classmethod
    def of(cls, plan: object) -> RankLayout:
        """The layout of any plan-like object with tp/cp/dp/pp/ep attributes (None counts as 1)."""
        return cls(**{a: int(getattr(plan, a, None) or 1) for a in (*AXES, "ep")})

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @cached_property
    def _strides(self) -> dict[str, int]:
        s, out = 1, {}
        for a in AXES:
            out[a] = s
            s *= getattr(self, a)
        return out

    def coords(self, rank: int) -> dict[str, int]:
        """{tp, cp, dp, pp} indices of `rank`."""
        if not 0 <= rank < self.world:
            raise WorkbenchError(f"rank: {rank} is outside 0..{self.world - 1}")
        return {a: (rank // self._strides[a]) % getattr(self, a) for a in AXES}

    def rank_of(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        idx = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
        return sum(idx[a] * self._strides[a] for a in AXES)

    def stage_of(self, rank: int) -> int:
        return self.coords(rank)["pp"]

    def first_rank(self, stage: int) -> int:
        """The representative rank of a pipeline stage (its tp=cp=dp=0 rank)."""
        return self.rank_of(pp=stage)

    def group(self, axis: str, rank: int) -> tuple[int, ...]:
        """The ranks that share every coordinate of `rank` but `axis` (`dp` here means dp × cp:
        the ranks that hold replicas of the same parameters); `ep` and `edp` for experts."""
        c = self.coords(rank)
        if axis in AXES and axis != "dp":
            return tuple(self.rank_of(**(c | {axis: i})) for i in range(getattr(self, axis)))
        replicas = [self.rank_of(**(c | {"cp": ci, "dp": di})) for di in range(self.dp) for ci in range(self.cp)]
        if axis == "dp":
            return tuple(replicas)
        pos = c["dp"] * self.cp + c["cp"]
        if axis == "ep":
            start = pos - pos % self.ep
            return tuple(replicas[start:start + self.ep])
        if axis == "edp":
            return tuple(replicas[pos % self.ep::self.ep])
        raise WorkbenchError(f"axis: {axis!r} is not one of tp, cp, dp, pp, ep, edp")

    def groups(self, axis: str) -> list[tuple[int, ...]]:
        """Every distinct group along `axis`, in rank order (each rank creates them in this order)."""
        seen: dict[tuple[int, ...], None] = {}
        for r in range(self.world):
            seen.setdefault(self.group(axis, r), None)
        return list(seen)

    def frame(self) -> object:
        """A DataFrame of every rank's coordinates (rank, tp, cp, dp, pp, stage)."""
        import pandas as pd

        return pd.DataFrame([{"rank": r, **self.coords(r), "stage": self.stage_of(r)} for r in range(self.world)])


def split_layers(layers: int, parts: int) -> list[int]:
    """Layers per pipeline chunk, as even as possible (the first chunks take the remainder)."""
    if parts < 1 or layers < parts:
        raise WorkbenchError(f"plan.pp: {layers} layers cannot be split into {parts} stages/chunks "
                             f"(use pp × vpp ≤ model.layers)")
    base, extra = divmod(layers, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def stage_layers(layers: int, pp: int, stage: int) -> range:
    """The global layer indices stage `stage` holds (no interleaving)."""
    counts = split_layers(layers, pp)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])
