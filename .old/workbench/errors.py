"""Errors a user can act on.

Every bad input raises `WorkbenchError` (a `ValueError`) whose message names the field
and says what is allowed; the CLI prints it and exits 2 instead of showing a traceback.
"""

from __future__ import annotations


class WorkbenchError(ValueError):
    """Bad input or an unusable setting, with a message that names the field and the fix.

    The message is bounded (`MAX_MESSAGE` characters, cut in the middle), so a huge bad value is never
    echoed whole."""

    MAX_MESSAGE = 2000

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if len(text) > self.MAX_MESSAGE:
            half = self.MAX_MESSAGE // 2 - 2
            text = f"{text[:half]} … {text[-half:]}"
        super().__init__(text)


class ExtraMissing(ImportError):
    """An optional extra (notebook, gpu-cu12, rdma, …) is needed but not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed; install the '{extra}' extra: pip install 'workbench[{extra}]'"
        )


def require(module: str, extra: str):  # type: ignore[no-untyped-def]
    """Import an optional module, or raise `ExtraMissing` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExtraMissing(module.split(".")[0], extra) from exc


class RunFailed(RuntimeError):
    """A rank or worker of a real run failed (exited, was killed, or stopped making progress).

    `rank` names the first rank that failed (None when the launcher itself gave up), `reason`
    says how, and `partial` holds the measured `Result` of everything received before the end.
    """

    def __init__(self, rank: int | None, reason: str, partial: object = None, log: str = "") -> None:
        who = f"rank {rank}" if rank is not None else "the run"
        msg = f"{who} failed: {reason}"
        if log:
            msg += "\n--- last output of " + who + " ---\n" + log.rstrip()
        super().__init__(msg)
        self.rank = rank
        self.reason = reason
        self.partial = partial
        self.log = log
