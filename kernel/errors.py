"""One error hierarchy for tcpcp.

Callers branch on data, not on message text: an invalid ICI names the field, a kernel
failure carries the errno and the step of the dump or restore that failed, a bound
carries the bound. (pyroute2's NetlinkError(code) is the model.)
"""

from __future__ import annotations

import errno as _errno
import os


class TcpcpError(Exception):
    """Base of every error tcpcp raises on purpose."""


class ICIError(TcpcpError, ValueError):
    """An ICI that cannot be decoded or must not be used.

    ``field`` names the offending field (``"snd_una"``, ``"version"``, ``"length"``...),
    so that an operator sees what was wrong and tests can assert exactly which check fired.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"invalid ICI: {field}: {message}")
        self.field = field
        self.reason = message


class KernelError(TcpcpError, OSError):
    """A syscall failed during a dump, restore, isolation or activation.

    ``step`` says which step of the documented order failed (see docs/repair-order.md);
    ``errno`` is the kernel's answer.
    """

    def __init__(self, step: str, err: int, detail: str = ""):
        text = f"{step}: {os.strerror(err)} (errno {err})"
        if detail:
            text += f": {detail}"
        if err == _errno.EPERM and step.startswith("TCP_REPAIR"):
            text += "; TCP_REPAIR needs CAP_NET_ADMIN in the socket's network namespace"
        OSError.__init__(self, err, text)
        self.step = step

    def __str__(self) -> str:  # OSError's default repeats the errno oddly
        return self.strerror or super().__str__()


class PrivilegeError(KernelError):
    """CAP_NET_ADMIN (or root) is missing for an operation that needs it."""


class AddressError(TcpcpError):
    """The ICI's local address is not one this host can use."""


class InconsistentSnapshot(TcpcpError):
    """Queues kept moving during a live dump; the snapshot could not be made consistent."""


class PassingError(TcpcpError):
    """A connection pass failed; the origin's connection was left intact (see ``undone``)."""

    def __init__(self, message: str, undone: bool):
        super().__init__(message)
        self.undone = undone
