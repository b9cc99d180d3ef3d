"""Network namespaces as hosts: enter one, run a command in one, set a sysctl in one.

In tests and demos every host (origin, destination, peer) is a named network namespace
(``/run/netns/NAME``, as ``ip netns add`` makes them). The rest of tcpcp creates its
sockets and netlink handles *inside* a host by entering its namespace for the duration of
the ``socket()`` call: a socket belongs for life to the namespace it was created in, so it
keeps working there after the thread has moved back.

``setns(CLONE_NEWNET)`` moves only the calling thread, not the process. What follows the
thread, measured on 6.18:

- sockets (including netlink) created by the thread;
- ``/proc/sys/net/...`` opened by the thread (the sysctl tree is looked up in the opening
  thread's namespace), which is why :func:`sysctl` needs no subprocess;
- ``/proc/thread-self/net/...``, but *not* ``/proc/self/net`` (``/proc/net``), which shows
  the namespace of the thread-group leader;
- children forked by the thread (``subprocess`` started inside :func:`enter`).

``/sys/class/net`` does not follow: it shows the namespace of whoever mounted that sysfs.
Ask netlink or an ioctl instead.

Python 3.11 has no ``os.setns``, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
from typing import Iterator, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import TcpcpError

CLONE_NEWNET = 0x40000000  # linux/sched.h
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add` bind-mounts named namespaces
DEFAULT_TIMEOUT = 30.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)

_ROOT_HINT = "needs root (CAP_SYS_ADMIN to enter a namespace, CAP_NET_ADMIN to configure it)"


class CommandError(TcpcpError, subprocess.CalledProcessError):
    """A command run in a host failed; the message carries its stderr and the namespace."""

    def __init__(self, ns: str | None, argv: Sequence[str], returncode: int,
                 stdout: str, stderr: str):
        subprocess.CalledProcessError.__init__(self, returncode, list(argv), stdout, stderr)
        self.ns = ns

    def __str__(self) -> str:
        where = f"in network namespace {self.ns!r}" if self.ns else "in this namespace"
        text = (self.stderr or "").strip() or "(no stderr)"
        return f"{' '.join(self.cmd)!r} {where} exited {self.returncode}: {text}"


def path(name: str) -> str:
    """The bind mount that names namespace ``name``; a plain name, never a path."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def names() -> list[str]:
    """Named namespaces, as ``ip netns list`` shows them."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        text = f"setns({what}): {os.strerror(err)}"
        if err == errno.EPERM:
            text += "; entering a network namespace needs root (CAP_SYS_ADMIN)"
        raise OSError(err, text)


def _open_ns(name: str) -> int:
    try:
        return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no network namespace named {name!r}",
                                path(name)) from None
    except PermissionError:
        raise PermissionError(errno.EACCES, f"cannot open network namespace {name!r}: "
                              f"{_ROOT_HINT}", path(name)) from None


@contextlib.contextmanager
def enter(name: str) -> Iterator[None]:
    """Move the calling thread into namespace ``name``; move it back on exit, always.

    The namespace the thread came from is held by an fd opened *before* leaving, so the
    way back does not depend on any name still existing. If the way back fails the thread
    is stranded in the wrong namespace; that raises rather than carrying on silently.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = _open_ns(name)
        try:
            _setns(target, name)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home, "back to the original namespace")
    finally:
        os.close(home)


@contextlib.contextmanager
def iproute(ns: str | None, what: str) -> Iterator[IPRoute]:
    """A pyroute2 IPRoute bound to ``ns`` (``None``: the caller's), closed on exit.

    The netlink socket belongs to the namespace it is opened in, so only its creation
    needs :func:`enter`. A ``NetlinkError`` escaping the body becomes an ``OSError``
    (``PermissionError`` for EPERM) whose text says ``what`` was being done, and where.
    """
    with within(ns):
        ipr = IPRoute()
    try:
        yield ipr
    except NetlinkError as e:
        where = f" in network namespace {ns!r}" if ns else ""
        text = f"{what}{where}: {os.strerror(e.code)}"
        if e.code == errno.EPERM:
            text += "; needs CAP_NET_ADMIN in that namespace (run as root)"
        raise OSError(e.code, text) from None
    finally:
        ipr.close()


def within(ns: str | None) -> contextlib.AbstractContextManager:
    """:func:`enter` ``ns``, or stay where the thread is when ``ns`` is None (production:
    the agent already runs in its host's namespace)."""
    return enter(ns) if ns is not None else contextlib.nullcontext()


def current() -> int:
    """Inode of the calling thread's network namespace (to compare namespaces)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def inode(name: str) -> int:
    """Inode of the named namespace; equal to :func:`current` while entered in it."""
    return os.stat(path(name)).st_ino


def _argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    argv = [str(a) for a in argv]
    if ns is None:
        return argv
    path(ns)  # validate the name before handing it to ip
    return ["ip", "netns", "exec", ns, *argv]


def run(ns: str | None, argv: Sequence[str], check: bool = True, input: str | None = None,
        timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``argv`` in namespace ``ns`` (``None``: where the caller is) and wait for it.

    Output is captured as text. A failure raises :class:`CommandError` with the command's
    stderr, or ``PermissionError`` when the kernel refused for want of privilege.
    """
    full = _argv(ns, argv)
    try:
        done = subprocess.run(full, input=input, capture_output=True, text=True,
                              timeout=timeout)
    except FileNotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, f"{full[0]} not found (is iproute2 "
                                "installed?)", full[0]) from e
    if check and done.returncode != 0:
        refused = ("Operation not permitted", "Permission denied")
        if os.geteuid() != 0 and any(r in done.stderr for r in refused):
            raise PermissionError(errno.EPERM, f"{' '.join(full)!r}: {_ROOT_HINT}: "
                                  f"{done.stderr.strip()}")
        raise CommandError(ns, full, done.returncode, done.stdout, done.stderr)
    return done


def popen(ns: str | None, argv: Sequence[str], **kw) -> subprocess.Popen:
    """Start ``argv`` in namespace ``ns`` without waiting; ``kw`` go to ``Popen``."""
    return subprocess.Popen(_argv(ns, argv), **kw)


def _sysctl_path(key: str) -> str:
    # "net.ipv6.conf.all.accept_dad" or "net/ipv6/conf/eth0.100/accept_dad" (the slash
    # form is needed when a component, such as a VLAN interface name, holds a dot).
    rel = key if "/" in key else key.replace(".", "/")
    rel = rel.strip("/")
    if ".." in rel.split("/"):
        raise ValueError(f"bad sysctl key {key!r}")
    return os.path.join("/proc/sys", rel)


def sysctl(ns: str | None, key: str, value: object = None) -> str:
    """Write ``value`` (unless ``None``) to sysctl ``key`` in ``ns`` and return its value.

    ``/proc/sys/net`` resolves in the namespace of the *thread* that opens it, so entering
    is enough; no process is started.
    """
    p = _sysctl_path(key)
    where = f" in network namespace {ns!r}" if ns else ""
    with within(ns):
        try:
            if value is not None:
                with open(p, "w") as f:
                    f.write(str(value))
            with open(p) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no sysctl {key!r}{where}", p) from None
        except PermissionError:
            raise PermissionError(errno.EACCES, f"cannot write sysctl {key!r}{where}: "
                                  "needs root", p) from None
        except OSError as e:
            raise OSError(e.errno, f"sysctl {key}={value!r}{where}: {e.strerror}",
                          p) from None
