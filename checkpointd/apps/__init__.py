"""Demo applications protected by checkpointd, and the server scaffolding they share.

Each application is a ``Server`` subclass with one method, ``serve_conn(p)``, that serves
one connection through its handle ``p`` (checkpointd/app.py) from the state in ``p.state``
and the offsets ``p.input`` / ``p.output``. The same method serves a freshly accepted
connection (state empty, offsets 0) and one the agent resurrected on the standby (state
and offsets of the last checkpoint): the application code is the same on both hosts.

Thread per connection, blocking sockets; the handlers wait for input with ``poll`` on the
socket and on the server's wake pipe, which ``stop`` and ``abandon`` make readable, so an
idle handler costs nothing until its peer sends (a thousand connections on two cores: no
periodic wake-ups), and ``stop`` and ``abandon`` are noticed at once. Paced senders
sleep with ``pause``, which ``stop`` and ``abandon`` interrupt the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from ..app import AgentClient, AppError, ConnectionPassed, Unprotected

log = logging.getLogger("checkpointd.apps")

IP_FREEBIND = 15
IPV6_FREEBIND = 78
POLL_MS = 50             # resume loop; and a handler that must ignore the wake pipe
IDLE_POLL_MS = 1000      # safety net only: stop and abandon wake the handlers at once


class Stopped(Exception):
    """The server is stopping (``stop``) or simulating a crash (``abandon``)."""


class Server:
    """Accepts connections, registers them with the agent, and serves each in a thread;
    serves the connections the agent resumes the same way.

    ``client`` None: unprotected (``Unprotected`` handles, no agent), for baselines.
    ``listener`` None: serve resumed connections only.
    """

    name = "app"
    regenerable = False          # the output mode the application registers with
    initial_state = b""          # state registered with a fresh connection

    def __init__(self, listener: socket.socket | None = None, client: AgentClient | None = None):
        self.listener, self.client = listener, client
        self.handles: dict[str, object] = {}       # conn key -> handle, live connections
        self.stats = {"accepted": 0, "resumed": 0, "completed": 0, "errors": 0, "abandoned": 0,
                      "passed": 0}
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._wake_r, self._wake_w = os.pipe()   # readable once stopping or abandoning
        os.set_blocking(self._wake_w, False)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- control --------------------------------------------------------------------------
    def start(self) -> "Server":
        if self.listener is not None:
            self._spawn(self._accept_loop, f"{self.name}-accept")
        if self.client is not None:
            self._spawn(self._resume_loop, f"{self.name}-resume")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; every handler ends its connection (release, close) at its next
        wait for input or chunk boundary."""
        self._stopping.set()
        self._wake()
        self._close_listener()
        self._join(timeout)

    def abandon(self, timeout: float = 10.0) -> None:
        """Simulate this application instance crashing: every handler stops touching its
        connection at its next point where all the input it read is committed, and drops
        its descriptor without commit, release or close (the agent's descriptor keeps the
        connection open, as after a host crash the peer's end stays open)."""
        self._abandon.set()
        self._stopping.set()
        self._wake()
        self._close_listener()
        self._join(timeout)

    def _wake(self) -> None:
        """Make the wake pipe readable for good: every handler's poll returns."""
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def check(self, quiescent: bool = True) -> None:
        """Raise Stopped if the server is stopping (at any point) or abandoning (only at
        a ``quiescent`` point: nothing read that the last commit does not reflect)."""
        if self._abandon.is_set():
            if quiescent:
                raise Stopped("abandoned")
        elif self._stopping.is_set():
            raise Stopped("stopping")

    def wait_readable(self, p, quiescent: bool = True, timeout: float | None = None) -> bool:
        """Wait until ``p`` has input (or EOF); Stopped when told to stop. False on
        ``timeout``."""
        poller = select.poll()
        fd = p.sock.fileno()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        poller.register(self._wake_r, select.POLLIN)
        waking, wait_ms = True, IDLE_POLL_MS
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.check(quiescent)
            if deadline is not None:
                wait_ms = max(0, min(wait_ms, int((deadline - time.monotonic()) * 1000) + 1))
            events = poller.poll(wait_ms)
            if any(f == fd for f, _ in events):
                return True
            if events and waking:
                # abandoning at a point that is not quiescent: check() did not raise, so
                # keep waiting for input (to reach a quiescent point) without the pipe,
                # which stays readable, polling for the flags as before
                poller.unregister(self._wake_r)
                waking, wait_ms = False, POLL_MS
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (a paced sender), or less when the server stops or abandons;
        the caller's next ``check`` raises then."""
        if seconds > 0:
            self._stopping.wait(seconds)

    def finish(self, p, timeout: float = 30.0) -> None:
        """End a connection on purpose: wait until the peer has acknowledged everything
        (SIOCOUTQ 0) or has closed, then release (the ACK gate lets FIN out) and close."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(p.sock.fileno(), select.POLLIN)
        while time.monotonic() < deadline:
            self.check()
            try:
                if p.unacked() <= 0:
                    break
            except OSError:
                break
            if poller.poll(5):
                try:
                    if not p.sock.recv(1, socket.MSG_PEEK):
                        break      # the peer closed: nothing more will be acknowledged
                except OSError:
                    break
                time.sleep(0.005)  # data we do not read: keep waiting for the ACKs
        p.close()

    # -- to implement -----------------------------------------------------------------------
    def serve_conn(self, p) -> None:
        raise NotImplementedError

    # -- internals ----------------------------------------------------------------------------
    def _spawn(self, target, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def _close_listener(self) -> None:
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.stats["accepted"] += 1
            self._spawn(self._run, f"{self.name}-conn", sock, None)

    def _resume_loop(self) -> None:
        client = self.client
        while not self._stopping.is_set() and client.connected:
            for p in client.resumed(timeout=POLL_MS / 1000):
                if self._stopping.is_set():
                    p.sock.close()
                    continue
                self.stats["resumed"] += 1
                self._spawn(self._run, f"{self.name}-resumed", None, p)

    def _run(self, sock: socket.socket | None, p) -> None:
        try:
            if p is None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.client is None:
                    p = Unprotected(sock, self.initial_state)
                else:
                    p = self.client.register(sock, self.initial_state, regenerable=self.regenerable)
            p.sock.setblocking(True)
        except (AppError, OSError) as exc:
            log.warning("%s: connection not served: %s", self.name, exc)
            self.stats["errors"] += 1
            if sock is not None:
                sock.close()
            return
        self.handles[p.conn] = p
        try:
            self.serve_conn(p)
            self.stats["completed"] += 1
        except ConnectionPassed as exc:
            # a switchover passed it (or another host took over): the socket here is a
            # silent endpoint in repair mode; closing it sends nothing, releasing it
            # would delete the record the other host may need
            log.info("%s: %s", self.name, exc)
            self.stats["passed"] += 1
            p.sock.close()
        except Stopped as exc:
            if str(exc) == "abandoned":
                self.stats["abandoned"] += 1
                p.sock.close()      # no release: the agent's descriptor keeps it alive
            else:
                self._close(p)
        except (AppError, OSError, ValueError) as exc:
            log.warning("%s: %s: %s", self.name, p.conn, exc)
            self.stats["errors"] += 1
            self._close(p)
        finally:
            self.handles.pop(p.conn, None)

    @staticmethod
    def _close(p) -> None:
        try:
            p.close()
        except (AppError, OSError):
            p.sock.close()


def listen(addr: str, port: int) -> socket.socket:
    """A listening socket on ``addr:port``, bound even if the (virtual) address is not on
    this host yet (FREEBIND): the standby's application listens before taking the VIP."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        ls.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    ls.bind((addr, port))
    ls.listen(1024)
    return ls


def main(cls: type[Server], argv=None, doc: str | None = None) -> int:
    """``python -m checkpointd.apps.NAME --listen ADDR:PORT (--agent PATH | --no-agent)``.
    Prints ``listening on ADDR:PORT`` (the real port when PORT is 0) once ready."""
    ap = argparse.ArgumentParser(prog=f"python -m checkpointd.apps.{cls.name}",
                                 description=(doc or cls.__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--listen", required=True, metavar="ADDR:PORT",
                    help="address (the virtual IP) and port; IPv6 in brackets")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--agent", metavar="PATH", help="the local checkpointd agent's application socket")
    who.add_argument("--no-agent", action="store_true", help="serve unprotected (baseline measurements)")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    addr, _, port = args.listen.rpartition(":")
    if not addr or not port.isdigit():
        ap.error(f"--listen {args.listen!r}: want ADDR:PORT")
    addr = addr.strip("[]")
    ls = listen(addr, int(port))
    bound = ls.getsockname()[1]
    client = None
    if not args.no_agent:
        try:
            client = AgentClient(args.agent, ports=(bound,), regenerable=cls.regenerable)
        except AppError as exc:
            print(f"{cls.name}: {exc}", file=sys.stderr)
            return 2
    server = cls(ls, client).start()
    print(f"listening on {addr}:{bound}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        if client is not None and not client.connected:
            print(f"{cls.name}: the agent went away; serving new connections unprotected",
                  file=sys.stderr)
            client = server.client = None
    server.stop(timeout=2)
    return 0
