"""Transport errors: every failure of a transfer is one of these, raised or passed to an error callback.

A transfer is never reported done unless every byte of it landed in the target buffer. The
package imports nothing from `workbench`; the workbench CLI turns a `TransportError` into a
clean `error: …` line.
"""

from __future__ import annotations


class TransportError(RuntimeError):
    """Base of every transport failure."""


class UnknownDescriptor(TransportError):
    """The target region is not (or no longer) registered at the peer."""


class OutOfRange(TransportError, ValueError):
    """A write would fall outside the registered range (source or destination)."""


class PeerGone(TransportError, ConnectionError):
    """The peer closed, crashed or became unreachable before the transfer completed."""


class TransferTimeout(TransportError, TimeoutError):
    """The transfer (or wait) did not complete within its timeout."""


class Cancelled(TransportError):
    """The transfer was cancelled before it completed."""


class AuthError(TransportError, PermissionError):
    """A peer failed the shared-secret challenge–response."""


class InvalidArgument(TransportError, TypeError, ValueError):
    """A call's argument has the wrong type or value (raised before anything is queued)."""


class ProtocolError(TransportError):
    """A peer sent a message that breaks the wire protocol or its limits; its link is dropped."""


class BackendUnavailable(TransportError):
    """The requested backend cannot run here (missing package, no GPU, …); the message says what to do."""


# Codes carried in acknowledgements on the wire.
STATUS_OK = 0
STATUS_UNKNOWN_REGION = 1
STATUS_OUT_OF_RANGE = 2
STATUS_ABORTED = 3
STATUS_FAILED = 4


def error_for_status(status: int, what: str) -> TransportError:
    """The exception a peer's acknowledgement `status` stands for."""
    if status == STATUS_UNKNOWN_REGION:
        return UnknownDescriptor(f"{what}: the peer has no such registered region (deregistered or never registered)")
    if status == STATUS_OUT_OF_RANGE:
        return OutOfRange(f"{what}: the peer rejected the write as outside the registered region")
    if status == STATUS_ABORTED:
        return Cancelled(f"{what}: aborted")
    return TransportError(f"{what}: the peer reported failure (status {status})")
