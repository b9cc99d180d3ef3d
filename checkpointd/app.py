"""The library an application embeds to have its connections protected. No privileges.

The application keeps serving its sockets itself; the local agent (checkpointd, which
holds CAP_NET_ADMIN) only needs to see each socket once and to hear the application's
commits. The flow, with the names of DESIGN.md and checkpointd/offsets.py:

- ``AgentClient(path)`` connects to the agent's Unix SOCK_SEQPACKET socket
  (checkpointd/protocol.py) and starts one reader thread that dispatches the agent's
  messages (and an idle one that sends commits deferred just after a resume).
- ``client.register(sock, state)`` hands the socket over (SCM_RIGHTS). The agent dumps the
  endpoint through TCP_REPAIR *while the call blocks* (a socket in repair mode fails the
  application's send/recv with EINVAL, so the application must not touch it meanwhile) and
  puts the connection behind the ACK gate. The call returns a ``Protected`` handle.
- The application reads and writes through the handle (``recv``/``send``/``sendall``),
  so the library knows R and W, the bytes read from and written into the socket, exactly:
  the agent derives every sequence number from them and the registration dump, without
  entering repair mode again.
- ``p.commit(state, input=I, output=O)`` says "this state reflects the input up to I and
  resumes its output at O". It returns at once; the agent answers ``durable`` once the
  checkpoint is in etcd, and only then lets the kernel acknowledge input up to I (so the
  peer keeps, and will resend, everything after I).
  **Commit every byte you have read before you wait for more**, keeping an unfinished
  message in the state: committing only at message boundaries can deadlock. A peer in loss
  recovery sends one segment and waits for its ACK; if that segment ends inside a
  message, the ACK gate holds the ACK (not committed) while the application waits for the
  rest of the message, which the peer sends only once the start is acknowledged. The
  drills saw peers retransmit one byte with backoff for a minute (checkpointd/apps/kv.py
  shows the pattern).
- Output is either *regenerable* from the state (a download: the state says what the bytes
  at any offset are) or not (replies computed from a state that has moved on). For the
  latter the library keeps the bytes written but not yet acknowledged by the peer (sized by
  ``ioctl(SIOCOUTQ)``, which needs no privilege) and sends them with each commit: after a
  crash the destination resends the ones the peer lacks. A regenerable application simply
  commits O = the offset it has generated up to (the agent anchors the record at what the
  peer acknowledged, and lowers O to it if needed).
- ``p.release()`` before closing: the ACK gate holds FIN and RST of guarded connections,
  so that a dying process cannot end a connection that the standby is about to resume.
- On the standby, ``client.resumed()`` yields the connections the agent resurrected as
  ``Protected`` handles, already registered, carrying the state of their last checkpoint.
  R restarts at I (the peer resends the input after it), W at P = O + D, the offset
  where the kept stream continues. The application resumes from that state exactly as on
  the origin, regenerating its output from O; the first
  ``discard`` bytes it regenerates are bytes the peer already has (or that the agent
  resent), and ``send`` swallows them transparently. The application code is the same on
  both hosts.

``Unprotected(sock)`` has the same interface and does nothing: for baseline measurements
and for running without an agent.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from typing import Iterator

from kernel.errors import TcpcpError

from . import protocol

log = logging.getLogger("checkpointd.app")

SIOCOUTQ = 0x5411          # linux/sockios.h: TIOCOUTQ; for TCP, write_seq - snd_una
HISTORY_TRIM = 1 << 20     # trim the unacknowledged-output copy through SIOCOUTQ past this
SWALLOW_KEEP = 32 << 20    # at most this much of the discarded bytes is kept (see _swallow)
DEFAULT_TIMEOUT = 10.0
RETRY_PERIOD = 0.002       # deferred commits are retried this often (see Protected.commit)
PHASE_POLL_MS = 50         # a handler waiting out a freeze it cannot join rechecks this often


class AppError(TcpcpError):
    """The agent is not there, went away, or refused a request; or the application
    misused the library (a commit that contradicts what was read and written)."""


class ConnectionPassed(AppError):
    """The connection now lives on another host (a switchover passed it, or the agent
    dropped it because another host took over). Its socket here is a silent, dead
    endpoint: stop serving it and close it; never ``release`` it (that would delete the
    record the other host may need)."""


# a connection's part in a switchover (``freeze``): serving, asked to stop at its next
# quiescent point, stopped there (the agent has its exact state), gone to another host
_LIVE, _ASKED, _FROZEN, _PASSED = "live", "asked", "frozen", "passed"


def outq(sock: socket.socket) -> int:
    """Bytes written into ``sock`` and not yet acknowledged by the peer (SIOCOUTQ)."""
    return struct.unpack("=i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]


def conn_key(sock: socket.socket) -> str:
    """The connection's name in the agent and in etcd: ``laddr:lport-raddr:rport``,
    IPv6 addresses in brackets (so that the last ``:`` always precedes the port)."""
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError as exc:
        raise AppError(f"socket is not a connected TCP socket: {exc}") from None

    def part(addr) -> str:
        host = addr[0].split("%", 1)[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return f"{part(local)}-{part(remote)}"


class _Waiter:
    """One blocking request (register, release): its reply, or the agent leaving."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue(maxsize=1)


class AgentClient:
    """The application's channel to its host's agent. Thread-safe.

    ``ports``: the local ports this application serves (``serve``): the agent hands the
    connections it resurrects on those ports to this client. ``regenerable``: the output
    mode of resumed connections (and the default of ``register``): True when the
    application can regenerate its output from its state at any offset (nothing is
    logged), False when the library must keep a copy of the unacknowledged output.
    """

    def __init__(self, path: str, *, ports: tuple[int, ...] | list[int] = (),
                 regenerable: bool = False, timeout: float = DEFAULT_TIMEOUT):
        self.path = path
        self.regenerable = regenerable
        self.timeout = timeout
        chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            chan.connect(path)
        except OSError as exc:
            chan.close()
            raise AppError(f"no checkpointd agent at {path} ({exc.strerror or exc}): is the "
                           "agent running, and may this user open its application socket?") from None
        self._chan = chan
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiters: dict[tuple[str, str], _Waiter] = {}   # (reply op, conn) -> waiter
        self._conns: dict[str, Protected] = {}
        self._resumed: queue.Queue = queue.Queue()
        self._closed: str | None = None                      # why the channel is gone
        self._deferred: set[Protected] = set()
        self._retry = threading.Condition(self._lock)
        # readable while a freeze is asked: wakes handlers parked in recv/send (_park)
        self._freeze_r, self._freeze_w = os.pipe()
        os.set_blocking(self._freeze_r, False)
        os.set_blocking(self._freeze_w, False)
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="tcpcp-app-reader")
        self._reader.start()
        self._retrier = threading.Thread(target=self._retry_loop, daemon=True, name="tcpcp-app-retry")
        self._retrier.start()
        for port in ports:
            self.serve(port)

    # -- requests ---------------------------------------------------------------------------
    def serve(self, port: int) -> None:
        """Ask for the connections the agent resurrects on local ``port``."""
        self._send("serve", port=port)

    def register(self, sock: socket.socket, state: bytes = b"", *, input: int = 0, output: int = 0,
                 read: int = 0, write: int = 0, conn: str | None = None,
                 regenerable: bool | None = None, timeout: float | None = None) -> "Protected":
        """Hand ``sock`` to the agent and return its ``Protected`` handle once the agent
        has dumped it and guards it. Do not use the socket during the call (the agent has
        it in repair mode). ``state``, ``input`` (I) and ``output`` (O): the first
        checkpoint. ``read``/``write``: bytes already read from / written into the socket
        before registration (0 for a freshly accepted socket). ``conn``: the key, by
        default derived from the 4-tuple (``conn_key``). Raises AppError if the agent
        refuses or does not answer within ``timeout``."""
        key = conn or conn_key(sock)
        regen = self.regenerable if regenerable is None else regenerable
        if input > read or output > write:
            raise AppError(f"register {key}: input {input} > read {read} or output {output} > write {write}")
        with self._lock:
            if key in self._conns:
                raise AppError(f"register {key}: already registered on this channel")
        waiter = self._expect("registered", key)
        try:
            self._send("register", bytes(state), fd=sock.fileno(), conn=key, input=input,
                       output=output, read=read, write=write)
        except BaseException:
            with self._lock:
                self._waiters.pop(("registered", key), None)
            raise
        self._wait(waiter, f"register {key}", timeout)
        p = Protected(self, sock, key, state=bytes(state), input=input, output=output,
                      read=read, write=write, regenerable=regen)
        with self._lock:
            self._conns[key] = p
        return p

    def resumed(self, timeout: float | None = None) -> Iterator["Protected"]:
        """The connections the agent resurrected and handed to this application, as
        they arrive: ``Protected`` handles already registered, with ``state``, ``input``
        (I: R starts here, the peer resends the rest), ``output`` (O: where the state's
        output starts) and ``discard_remaining`` (D: the first D bytes sent are
        swallowed). Ends when the agent goes away, or after ``timeout`` seconds
        without one."""
        while True:
            try:
                p = self._resumed.get(timeout=timeout)
            except queue.Empty:
                return
            if p is None:
                self._resumed.put(None)  # other iterators end too
                return
            yield p

    def close(self) -> None:
        """Close the channel. The agent keeps guarding registered connections."""
        try:
            self._chan.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self._chan.close()
        for fd in (self._freeze_r, self._freeze_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._closed is None

    # -- plumbing ---------------------------------------------------------------------------
    def _send(self, op: str, payload: bytes = b"", fd: int | None = None, **fields) -> None:
        if self._closed is not None:
            raise AppError(f"{op}: the agent channel is closed ({self._closed})")
        try:
            with self._send_lock:
                protocol.send(self._chan, op, payload, fd=fd, **fields)
        except protocol.ProtocolError as exc:
            raise AppError(f"{op}: {exc}") from None
        except OSError as exc:
            raise AppError(f"{op}: cannot reach the agent: {exc}") from None

    def _expect(self, op: str, key: str) -> _Waiter:
        waiter = _Waiter()
        with self._lock:
            if self._closed is not None:
                raise AppError(f"{op} {key}: the agent channel is closed ({self._closed})")
            if (op, key) in self._waiters:
                raise AppError(f"{op} {key}: another request for this connection is waiting")
            self._waiters[(op, key)] = waiter
        return waiter

    def _wait(self, waiter: _Waiter, what: str, timeout: float | None) -> protocol.Message:
        timeout = self.timeout if timeout is None else timeout
        try:
            msg = waiter.q.get(timeout=timeout)
        except queue.Empty:
            with self._lock:
                for k, w in list(self._waiters.items()):
                    if w is waiter:
                        del self._waiters[k]
            raise AppError(f"{what}: no answer from the agent within {timeout} s") from None
        if msg is None:
            raise AppError(f"{what}: the agent went away ({self._closed})")
        if msg.op == "error":
            raise AppError(f"{what}: the agent refused: {msg['reason']}")
        return msg

    def _read_loop(self) -> None:
        why = "the agent closed the channel"
        try:
            while True:
                try:
                    msg = protocol.recv(self._chan)
                except protocol.ProtocolError as exc:
                    why = f"malformed message from the agent: {exc}"
                    break
                except OSError as exc:
                    why = f"channel error: {exc}"
                    break
                if msg is None:
                    break
                try:
                    self._dispatch(msg)
                except Exception:  # one bad message must not stop the reader
                    log.exception("agent message %s not handled", msg.op)
        finally:
            with self._lock:
                self._closed = why
                waiters, self._waiters = list(self._waiters.values()), {}
                conns = list(self._conns.values())
                self._retry.notify_all()
            for w in waiters:
                w.q.put(None)
            for p in conns:
                p._agent_gone(why)
            self._resumed.put(None)

    def _dispatch(self, msg: protocol.Message) -> None:
        key = msg.fields.get("conn")
        if msg.op == "resume":
            self._on_resume(msg)
        elif msg.op in ("registered", "released", "error"):
            # an error answers whichever request of that connection is waiting
            ops = ("registered", "released") if msg.op == "error" else (msg.op,)
            with self._lock:
                waiter = None
                for op in ops:
                    waiter = self._waiters.pop((op, key), None)
                    if waiter is not None:
                        break
                p = self._conns.get(key)
            if waiter is not None:
                waiter.q.put(msg)
            elif msg.op == "error" and p is not None:
                p._on_error(msg["reason"])
            else:
                log.warning("unexpected %s from the agent for %s", msg.op, key)
        elif msg.op == "durable":
            with self._lock:
                p = self._conns.get(key)
            if p is not None:
                p._on_durable(msg["seq"])
        elif msg.op == "freeze":
            self._on_freeze()
        elif msg.op == "passed":
            with self._lock:
                p = self._conns.pop(key, None)
                if p is not None:
                    self._deferred.discard(p)
            if p is not None:
                p._on_passed(msg["reason"])
        elif msg.op == "thaw":
            self._on_thaw()
        else:
            log.warning("unexpected %s from the agent", msg.op)

    def _on_freeze(self) -> None:
        """The agent passes this host's connections (switchover): each one stops at its
        next quiescent point. Those already there (a handler parked in recv or send, or
        not in the library at all) stop now; the pipe wakes the parked handlers."""
        with self._lock:
            conns = list(self._conns.values())
        batch: list = []
        for p in conns:
            p._ask_freeze(batch)
        try:   # after the phases moved: a woken handler must see "asked"
            os.write(self._freeze_w, b"F")
        except OSError:
            pass
        for i in range(0, len(batch), 256):   # well within the message size
            part = batch[i:i + 256]
            try:
                self._send("frozen_many", protocol.encode_frozen_many([(f, st) for _, f, st in part]),
                           count=len(part))
            except AppError as exc:
                log.warning("freeze of %d connections not reported: %s", len(part), exc)
                for p, _, _ in part:
                    p._thaw()

    def _on_thaw(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
        try:
            while os.read(self._freeze_r, 4096):
                pass
        except OSError:
            pass
        for p in conns:
            p._thaw()

    def _freezing(self) -> bool:
        try:
            return bool(select.select([self._freeze_r], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _on_resume(self, msg: protocol.Message) -> None:
        try:
            sock = socket.socket(fileno=msg.fd)
        except OSError as exc:
            socket.close(msg.fd)
            log.warning("resume %s: bad descriptor: %s", msg["conn"], exc)
            return
        I, O, D = msg["input"], msg["output"], msg["discard"]
        n = msg["unacked_len"]
        state, unacked = (msg.payload[:-n], msg.payload[-n:]) if n else (msg.payload, b"")
        # R restarts at I (the receive side was restored there and the peer resends the
        # rest, or, after a switchover, the passed receive queue holds it); the kept
        # output stream continues at P = O + D, which is what the agent anchored this
        # connection's write side at.
        p = Protected(self, sock, msg["conn"], state=state, input=I, output=O, read=I,
                      write=O + D, regenerable=self.regenerable, discard=D, resumed=True)
        if unacked and not self.regenerable and not D:
            p._history += unacked     # the passed send queue: [P - len, P)
        with self._lock:
            old = self._conns.get(p.conn)
            self._conns[p.conn] = p
        if old is not None:
            old._agent_gone("resumed again by the agent")
        self._resumed.put(p)

    def _forget(self, p: "Protected") -> None:
        with self._lock:
            if self._conns.get(p.conn) is p:
                del self._conns[p.conn]
            self._deferred.discard(p)

    def _defer(self, p: "Protected") -> None:
        with self._lock:
            self._deferred.add(p)
            self._retry.notify_all()

    def _retry_loop(self) -> None:
        """Send deferred commits once they can be sent (Protected.commit explains)."""
        while True:
            with self._lock:
                while not self._deferred and self._closed is None:
                    self._retry.wait()
                if self._closed is not None:
                    return
                pending, self._deferred = self._deferred, set()
            for p in pending:
                try:
                    done = p._flush()
                except AppError as exc:
                    log.warning("deferred commit of %s dropped: %s", p.conn, exc)
                    done = True
                if not done:
                    with self._lock:
                        self._deferred.add(p)
            time.sleep(RETRY_PERIOD)


class Protected:
    """One protected connection: counted I/O, commits, release.

    Attributes: ``sock``; ``conn`` (the key); ``read`` (R) and ``write`` (W): stream
    offsets of the bytes read from and written into the socket; ``state``, ``input`` and
    ``output``: what the connection was registered or resumed with; ``resumed``: True on
    the host that took the connection over; ``discard_remaining``: regenerated bytes
    ``send`` still swallows, ``discarded``: those swallowed so far; ``seq`` (last commit)
    and ``durable_seq`` (last commit the agent has in etcd); ``error``: what the agent
    reported for this connection, if anything.

    Thread safety: ``send`` and ``commit`` exclude each other (a commit must see W, the
    output copy and SIOCOUTQ agree), so a blocking ``send`` delays a commit made from
    another thread; ``recv`` runs unlocked (one reading thread per connection).
    """

    def __init__(self, client: AgentClient, sock: socket.socket, conn: str, *, state: bytes,
                 input: int, output: int, read: int, write: int, regenerable: bool,
                 discard: int = 0, resumed: bool = False):
        self.client, self.sock, self.conn = client, sock, conn
        self.state, self.input, self.output = state, input, output
        self.read, self.write = read, write
        self.regenerable = regenerable
        self.resumed = resumed
        self.discard_remaining = discard
        self.discarded = 0
        self.seq = 0
        self.durable_seq = 0
        self.error: str | None = None
        self.released = False
        self._history = bytearray()   # output [write - len, write) (logged mode only)
        self._swallowed = bytearray()  # regenerated output [output, ...) while discarding
        self._pending: tuple | None = None   # a deferred commit: (seq, state, input, output)
        self._io = threading.RLock()    # W, the history and commits move together
        self._cv = threading.Condition()
        # switchover (``freeze``): the phase, the threads inside a data-moving syscall,
        # and the last commit's (state, I, O), which is what a frozen connection passes
        self._phase = _LIVE
        self._in_io = 0
        self._committed = (bytes(state), input, output)
        self.passed: str | None = None      # why the connection left this host

    # -- counted I/O -------------------------------------------------------------------------
    def recv(self, n: int, flags: int = 0) -> bytes:
        """``sock.recv``, counted into R. Returns what the socket returned (b"" at EOF);
        BlockingIOError and timeouts propagate unchanged. Raises ConnectionPassed once a
        switchover has passed the connection to another host.

        A blocking recv waits in ``poll`` (on the socket and the freeze pipe), not in
        the kernel, so that a switchover can freeze the connection while its handler
        waits for input: the bytes then stay in the receive queue, which is passed. It
        tries first and polls only when nothing is there (one syscall when busy), except
        on a socket with a timeout, where CPython itself would wait inside the call."""
        if flags & socket.MSG_PEEK:
            return self.sock.recv(n, flags)
        timeout = self.sock.gettimeout()
        blocking = timeout != 0.0
        while True:
            if timeout:
                self._park(select.POLLIN)
            self._io_enter()
            try:
                data = self.sock.recv(n, flags | socket.MSG_DONTWAIT)
                self.read += len(data)
                return data
            except (BlockingIOError, InterruptedError):
                if not blocking:
                    raise
            finally:
                self._io_leave()
            if timeout is None:
                self._park(select.POLLIN)

    def send(self, data) -> int:
        """``sock.send``, counted into W; returns how many bytes of ``data`` were taken.

        After a resume the first ``discard_remaining`` bytes are swallowed (counted in
        ``discarded``, not written, not in W): they are the regenerated copy of bytes the
        peer already has. Swallowed bytes count as taken, so a return value larger than
        what the socket accepted is normal then. BlockingIOError propagates only when
        nothing at all was taken. Raises ConnectionPassed after a switchover passed the
        connection. A blocking send waits for room in ``poll``, like ``recv``.
        """
        view = memoryview(data).cast("B")
        with self._io:
            taken = self._swallow(view) if self.discard_remaining else 0
            rest = view[taken:]
            if not rest:
                return taken
            timeout = self.sock.gettimeout()
            blocking = timeout != 0.0
            while True:
                if timeout:   # CPython would wait inside the call: poll first
                    try:
                        self._park(select.POLLOUT)
                    except TimeoutError:
                        if taken:
                            return taken
                        raise
                self._io_enter()
                try:
                    n = self.sock.send(rest, socket.MSG_DONTWAIT)
                    self._wrote(rest[:n])
                    return taken + n
                except (BlockingIOError, InterruptedError):
                    if taken:
                        return taken
                    if not blocking:
                        raise
                finally:
                    self._io_leave()
                if timeout is None:
                    self._park(select.POLLOUT)

    # -- switchover: freezing at a quiescent point ---------------------------------------------
    def _park(self, events: int) -> None:
        """Wait (outside the kernel's recv/send) until the socket is ready for
        ``events``; the socket's timeout applies (TimeoutError). While a freeze is asked
        the freeze pipe is readable and wakes the wait, so that ``_io_enter`` can stop
        this handler."""
        timeout = self.sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        poller.register(self.client._freeze_r, select.POLLIN)
        watching = True
        while True:
            if self._phase in (_FROZEN, _PASSED):
                return                   # _io_enter waits or raises
            wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            if not watching:             # the freeze pipe is off: look at the phase often
                wait = PHASE_POLL_MS if wait < 0 else min(wait, PHASE_POLL_MS)
            ready = poller.poll(wait)
            fds = {fd for fd, _ in ready}
            if self.sock.fileno() in fds:
                return
            if fds:                      # the freeze pipe
                with self._cv:
                    if self._phase in (_FROZEN, _PASSED) or (self._phase == _ASKED and self._quiescent()):
                        return          # _io_enter stops here
                # asked, but this handler has not reached a quiescent point: carry on
                # without the pipe (it stays readable while the freeze lasts), checking the
                # phase every PHASE_POLL_MS (another thread may commit, then it is frozen
                # or passed, and nothing else would wake a wait for room to write)
                poller.unregister(self.client._freeze_r)
                watching = False
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("timed out")

    def _quiescent(self) -> bool:
        """The last commit reflects every byte read (and, for logged output, written):
        the state the agent passes is exact. Call with ``_cv`` held."""
        _, inp, out = self._committed
        return inp == self.read and (self.regenerable or out == self.write)

    def _io_enter(self) -> None:
        with self._cv:
            while True:
                if self._phase == _ASKED and self._in_io == 0 and self._quiescent():
                    self._freeze_now()
                if self._phase == _FROZEN:
                    self._cv.wait()
                    continue
                if self._phase == _PASSED:
                    raise ConnectionPassed(f"{self.conn}: {self.passed}")
                self._in_io += 1
                return

    def _io_leave(self) -> None:
        """R or W has moved: a regenerable connection that read nothing uncommitted is
        quiescent again at once (a paced download freezes right after its send)."""
        with self._cv:
            self._in_io -= 1
            if self._phase == _ASKED and self._in_io == 0 and self._quiescent():
                self._freeze_now()

    def _ask_freeze(self, batch: list) -> None:
        """Frozen at once if quiescent and no thread is inside a recv or send: then its
        report joins ``batch`` (sent by the caller, as one message)."""
        with self._cv:
            if self._phase == _LIVE and not self.released:
                self._phase = _ASKED
                if self._in_io == 0 and self._quiescent():
                    state, inp, out = self._committed
                    batch.append((self, self._frozen_fields(inp, out), state))
                    self._phase = _FROZEN

    def _frozen_fields(self, inp: int, out: int) -> dict:
        return dict(conn=self.conn, input=inp, output=out, read=self.read, write=self.write,
                    regenerable=int(self.regenerable))

    def _freeze_now(self) -> None:
        """Stop here and give the agent the exact state (``_cv`` held)."""
        state, inp, out = self._committed
        try:
            self.client._send("frozen", state, **self._frozen_fields(inp, out))
        except AppError as exc:
            log.warning("freeze of %s not reported: %s", self.conn, exc)
            self._phase = _LIVE
            return
        self._phase = _FROZEN

    def _thaw(self) -> None:
        with self._cv:
            if self._phase in (_ASKED, _FROZEN):
                self._phase = _LIVE
            self._cv.notify_all()

    def _on_passed(self, reason: str) -> None:
        with self._cv:
            self._phase = _PASSED
            self.passed = reason
            if self.error is None:
                self.error = f"passed: {reason}"
            self._cv.notify_all()

    def sendall(self, data) -> None:
        """Send all of ``data``: ``send`` in a loop, so the discard and the counting apply.
        On a socket with a timeout (or non-blocking) the timeout (BlockingIOError)
        propagates as from ``socket.sendall``; ``write`` and ``discarded`` then say how
        far it got."""
        view = memoryview(data).cast("B")
        while view:
            view = view[self.send(view):]

    def _swallow(self, view: memoryview) -> int:
        n = min(self.discard_remaining, len(view))
        self.discard_remaining -= n
        self.discarded += n
        if not self.regenerable:
            # The swallowed bytes are the stream's bytes [P - D, P): once the discard is
            # over they are the newest output, and what a commit may need to log.
            self._swallowed += view[:n]
            if len(self._swallowed) > SWALLOW_KEEP:
                del self._swallowed[:len(self._swallowed) - SWALLOW_KEEP]
            if not self.discard_remaining:
                self._history, self._swallowed = self._swallowed, bytearray()
        return n

    def _wrote(self, chunk: memoryview) -> None:
        self.write += len(chunk)
        if self.regenerable:
            return
        self._history += chunk
        if len(self._history) > HISTORY_TRIM:
            try:
                keep = outq(self.sock)
            except OSError:
                return
            if keep < len(self._history):
                del self._history[:len(self._history) - keep]

    # -- commits ------------------------------------------------------------------------------
    def commit(self, state: bytes, *, input: int, output: int) -> int:
        """Checkpoint ``state``: it reflects the input up to stream offset ``input`` (I)
        and regenerates the output from offset ``output`` (O) on. Returns the commit's
        sequence number at once; ``wait_durable`` waits for etcd. Raises AppError when
        the offsets contradict what was read and written (I > R, O > W), when the agent
        reported an error for this connection, or when it is gone.

        Logged output (``regenerable`` False): the payload carries the unacknowledged
        output, the last SIOCOUTQ bytes written. Right after a resume those bytes may
        include some the agent resent and the library never saw; a commit that needs them
        is deferred (not lost) and sent by a background thread as soon as the peer has
        acknowledged enough of them (usually within one round trip) or the discard is over.
        """
        if self.passed is not None:
            raise ConnectionPassed(f"commit {self.conn}: {self.passed}")
        if self.error is not None:
            raise AppError(f"commit {self.conn}: the agent reported: {self.error}")
        if self.released:
            raise AppError(f"commit {self.conn}: the connection was released")
        with self._io:
            if input > self.read:
                raise AppError(f"commit {self.conn}: input offset {input} is beyond the {self.read} "
                               "bytes read (the state cannot reflect input it has not seen)")
            if output > self.write:
                raise AppError(f"commit {self.conn}: output offset {output} is beyond the "
                               f"{self.write} bytes written")
            if input < 0 or output < 0:
                raise AppError(f"commit {self.conn}: negative offset")
            self.seq += 1
            self._pending = (self.seq, bytes(state), input, output)
            seq = self.seq
            sent = self._flush()
            with self._cv:
                self._committed = (bytes(state), input, output)
                if self._phase == _ASKED and self._in_io == 0 and self._quiescent():
                    self._freeze_now()
        if not sent:
            self.client._defer(self)
        return seq

    def _flush(self) -> bool:
        """Send the pending commit if it can be made correct now; True when nothing is
        left pending."""
        with self._io:
            if self._pending is None:
                return True
            if self.error is not None or self.released or not self.client.connected:
                self._pending = None
                return True
            seq, state, input, output = self._pending
            unacked = self._unacked(output)
            if unacked is None:
                return False
            self._pending = None
            payload = state + unacked
            if len(payload) > protocol.MAX_MESSAGE - 4096:
                raise AppError(f"commit {self.conn}: {len(payload)} bytes of state and unacknowledged "
                               f"output exceed the protocol's {protocol.MAX_MESSAGE}-byte message")
            self.client._send("commit", payload, conn=self.conn, seq=seq, input=input, output=output,
                              read=self.read, write=self.write, unacked_len=len(unacked))
            return True

    def _unacked(self, output: int) -> bytes | None:
        """The output bytes the checkpoint must carry, or None if it cannot be made yet.

        The peer lacks at most the last SIOCOUTQ bytes written, [W - q, W). Those that
        lie at or after O are regenerated from the state; the others must be logged. If
        the copy reaches back to W - q, send the q bytes (the agent anchors the record's
        send queue at W). If nothing before O is unacknowledged, send none (the agent then
        anchors at the peer's acknowledged position, at or after W - q, hence at or after
        O). Otherwise (just after a resume, the resent bytes still in flight) wait.
        """
        if self.regenerable:
            return b""
        try:
            q = outq(self.sock)
        except OSError:
            q = 0
        una = self.write - q
        have = 0 if self.discard_remaining else len(self._history)
        if q <= have:
            if q < len(self._history):
                del self._history[:len(self._history) - q]
            return bytes(self._history) if q else b""
        if output <= una:
            return b""
        return None

    def _on_durable(self, seq: int) -> None:
        with self._cv:
            if seq > self.durable_seq:
                self.durable_seq = seq
            self._cv.notify_all()

    def _on_error(self, reason: str) -> None:
        with self._cv:
            self.error = reason
            self._cv.notify_all()

    def _agent_gone(self, why: str) -> None:
        with self._cv:
            if self.error is None and not self.released:
                self.error = why
            if self._phase in (_ASKED, _FROZEN):   # no pass without the agent
                self._phase = _LIVE
            self._cv.notify_all()

    def wait_durable(self, seq: int | None = None, timeout: float | None = None) -> bool:
        """Wait until commit ``seq`` (default: the last one) is in etcd. False on timeout;
        AppError if the agent reported an error for this connection or went away."""
        seq = self.seq if seq is None else seq
        with self._cv:
            done = self._cv.wait_for(lambda: self.durable_seq >= seq or self.error is not None, timeout)
            if self.durable_seq >= seq:
                return True
            if self.error is not None:
                raise AppError(f"commit {self.conn} #{seq} not durable: {self.error}")
            return done

    # -- the end ---------------------------------------------------------------------------------
    def release(self, timeout: float | None = None) -> None:
        """End the protection: the agent stops guarding the connection (its FIN and RST may
        leave again) and deletes its checkpoint. Call it before closing the socket, after
        the peer has what it needs. Idempotent."""
        if self.released:
            return
        with self._io:
            self._pending = None
        if self.client.connected:
            waiter = self.client._expect("released", self.conn)
            self.client._send("release", conn=self.conn)
            self.client._wait(waiter, f"release {self.conn}", timeout)
        self.released = True
        self.client._forget(self)

    def close(self) -> None:
        """``release`` (if the agent is still there) and close the socket."""
        try:
            if self.client.connected and self.error is None and self.passed is None:
                self.release()
        finally:
            self.sock.close()

    def unacked(self) -> int:
        """SIOCOUTQ: bytes written and not yet acknowledged by the peer."""
        return outq(self.sock)

    def __repr__(self) -> str:
        return (f"<Protected {self.conn} R={self.read} W={self.write} seq={self.seq} "
                f"durable={self.durable_seq} discard={self.discard_remaining}>")


class Unprotected:
    """The ``Protected`` interface without an agent: counts R and W and does nothing
    else (commits are durable at once). For baselines and agent-less runs."""

    resumed = False
    regenerable = True
    discard_remaining = 0
    discarded = 0
    error = None

    def __init__(self, sock: socket.socket, state: bytes = b""):
        self.sock, self.state = sock, state
        try:
            self.conn = conn_key(sock)
        except AppError:
            self.conn = "unconnected"
        self.input = self.output = self.read = self.write = 0
        self.seq = self.durable_seq = 0
        self.released = False

    def recv(self, n: int, flags: int = 0) -> bytes:
        data = self.sock.recv(n, flags)
        if not flags & socket.MSG_PEEK:
            self.read += len(data)
        return data

    def send(self, data) -> int:
        n = self.sock.send(data)
        self.write += n
        return n

    def sendall(self, data) -> None:
        self.sock.sendall(data)
        self.write += len(memoryview(data).cast("B"))

    def commit(self, state: bytes, *, input: int, output: int) -> int:
        self.seq += 1
        self.durable_seq = self.seq
        return self.seq

    def wait_durable(self, seq: int | None = None, timeout: float | None = None) -> bool:
        return True

    def release(self, timeout: float | None = None) -> None:
        self.released = True

    def close(self) -> None:
        self.released = True
        self.sock.close()

    def unacked(self) -> int:
        return outq(self.sock)
