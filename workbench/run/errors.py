"""Errors of a real run: a failed rank, with the partial results kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.result import Result


class RunFailed(RuntimeError):
    """A rank of a real run failed (exited, was killed, or stopped making progress).

    `rank` names the first rank that failed (None when the launcher itself gave up), `reason`
    says how, and `partial` holds the measured `Result` of everything received before the end.
    """

    def __init__(self, rank: int | None, reason: str, partial: Result | None = None, log: str = "") -> None:
        who = f"rank {rank}" if rank is not None else "the run"
        msg = f"{who} failed: {reason}"
        if log:
            msg += "\n--- last output of " + who + " ---\n" + log.rstrip()
        super().__init__(msg)
        self.rank = rank
        self.reason = reason
        self.partial = partial
        self.log = log
