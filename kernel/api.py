"""The paper's API (Section 3): get, size, create, activate; plus release and undo.

Origin::

    ici = get(sock, isolation)      # isolate, enter repair mode, dump
    ...send ici.encode() and the application state to the destination...
    release(sock, ici, isolation)   # after the destination is active: close silently
    # or, if the destination failed:
    undo(sock, ici, isolation)      # leave repair mode, lift isolation: sock is usable again

Destination::

    restored = create(ici)          # socket in repair mode, same port (or ANY, or bound)
    ...move traffic (VIP, gratuitous ARP)...
    activate(restored)              # leave repair mode, window probe, write unsent bytes

The three local-port choices of Section 2.1 are ``create(ici)`` (the ICI's port),
``create(ici, port=ANY)`` (port cleared: any free port) and ``create(ici, sock=bound)``
(a socket the caller already bound).
"""

from __future__ import annotations

import errno
import socket

from . import repair
from .errors import AddressError, KernelError, TcpcpError
from .ici import ICI, OVERHEAD
from .isolate import Isolation, tuple_of
from .repair import Restored

ANY = 0  # port choice: let the kernel take any free port


def size(sock: socket.socket) -> int:
    """Upper bound of the encoded ICI of ``sock`` now (the paper's ``tcpcp_size``).

    Read with SIOCINQ/SIOCOUTQ, which need no repair mode, so the application can size a
    buffer while the connection keeps running.
    """
    inq = repair._ioctl(sock, repair.C.SIOCINQ, "SIOCINQ")
    outq = repair._ioctl(sock, repair.C.SIOCOUTQ, "SIOCOUTQ")
    return OVERHEAD + inq + outq


def get(sock: socket.socket, isolation: Isolation | None) -> ICI:
    """Isolate the endpoint and return its ICI. The socket stays open, isolated, in repair mode.

    On failure the endpoint is returned to normal operation before the error propagates.
    """
    ident = _tuple_of_socket(sock)
    if isolation is not None:
        isolation.isolate([ident])
    try:
        repair.repair_on(sock)
        try:
            return repair.dump(sock)
        except BaseException:
            repair.repair_off(sock, window_probe=True)
            raise
    except BaseException:
        if isolation is not None:
            isolation.release([ident])
        raise


def create(ici: ICI, *, port: int | None = None, sock: socket.socket | None = None,
           freebind: bool = False, peer_acked: int | None = None) -> Restored:
    """A socket in repair mode from ``ici``; it sends nothing until ``activate``.

    The ICI is validated first, so an invalid one touches nothing in the kernel. Without
    ``freebind`` the local address must be one this host owns.
    """
    ici.validate()
    try:
        return repair.restore(ici, sock=sock, port=port, freebind=freebind, peer_acked=peer_acked)
    except KernelError as exc:
        if exc.step == "bind" and exc.errno == errno.EADDRNOTAVAIL:
            raise AddressError(f"this host does not own {ici.local_addr}: cannot create the "
                               f"endpoint (move the address here first, or use freebind)") from None
        raise


def activate(restored: Restored, *, window_probe: bool = True) -> socket.socket:
    """Bring the endpoint to life; returns the now ordinary socket."""
    repair.activate(restored, window_probe=window_probe)
    return restored.sock


def release(sock: socket.socket, ici: ICI, isolation: Isolation | None) -> None:
    """The origin's last step: close without FIN or RST, then drop the isolation rule."""
    repair.close_silently(sock)
    if isolation is not None:
        isolation.release([tuple_of(ici)])


def undo(sock: socket.socket, ici: ICI, isolation: Isolation | None) -> None:
    """Abandon a pass at the origin: the connection carries on as if nothing happened.

    Leaving repair mode with a window probe makes the peer re-announce its state at once;
    whatever it sent while isolated it retransmits.
    """
    try:
        repair.repair_off(sock, window_probe=True)
    finally:
        if isolation is not None:
            isolation.release([tuple_of(ici)])


def _tuple_of_socket(sock: socket.socket):
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError as exc:
        raise TcpcpError(f"not a connected TCP socket: {exc}") from None
    return (local[0].split("%")[0], local[1], remote[0].split("%")[0], remote[1])
