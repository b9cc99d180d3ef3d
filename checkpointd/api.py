"""checkpointd's REST API, shaped like Patroni's so that the same load-balancer checks work.

Endpoints (every health endpoint answers with the status JSON as its body, as Patroni does,
so one request both checks and explains; HEAD answers the same code without the body)::

    GET /health                200 the HA loop is alive                              else 503
    GET /liveness              200 the HA loop is alive (probe-friendly name)        else 503
    GET /primary, /leader      200 alive, role primary and not fenced                else 503
    GET /standby, /replica     200 alive and role standby                            else 503
    GET /status                200 the status JSON                                   503 if unavailable
    GET /metrics               200 Prometheus text format 0.0.4
    POST /failsafe             200 the callback's JSON; 503 without a callback; 400 bad JSON
    POST /poke                 200: a partner released the leader key, look at etcd now
    POST /pass                 a switchover's sealed pass (agent to agent, binary, up to
                               1 GiB): 200 accepted, 409 refused (JSON says why), 500
    anything else              404

"Alive" means the HA loop ran within ``liveness_s``: the status dict's ``ha_loop_at`` (the
monotonic time of the HA loop's last cycle) when the agent provides it, else its
``clock``, compared with this server's clock. The role endpoints require it too: the role
of an agent whose HA loop has stopped is a stale claim (a stuck primary cannot fence
itself), and a load balancer must not send traffic on its word.

Which endpoint answers what is a pure function (``probe_code``), tested without sockets.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping
from urllib.parse import urlsplit

from .config import parse_listen
from .metrics import CONTENT_TYPE, AgentMetrics

log = logging.getLogger("checkpointd.api")

JSON_TYPE = "application/json"
MAX_BODY = 64 * 1024        # a failsafe request is a few hundred bytes
MAX_PASS_BODY = 1 << 30     # POST /pass: the queues of every passed connection
PRIMARY_PATHS = ("/primary", "/leader")
STANDBY_PATHS = ("/standby", "/replica")
ALIVE_PATHS = ("/health", "/liveness")


def loop_age(status: Mapping, now: float) -> float | None:
    """Seconds since the HA loop last ran, or None when the status does not say."""
    beat = status.get("ha_loop_at", status.get("clock"))
    if isinstance(beat, bool) or not isinstance(beat, (int, float)):
        return None
    return now - beat


def probe_code(path: str, status: Mapping | None, now: float, liveness_s: float) -> int:
    """The status code of a health endpoint (``path`` in ALIVE, PRIMARY or STANDBY_PATHS)
    for ``status`` (None: the agent could not say) at ``now``."""
    if status is None:
        return 503
    age = loop_age(status, now)
    if age is None or not age <= liveness_s:
        return 503
    role = status.get("role")
    if path in PRIMARY_PATHS:
        ok = role == "primary" and not status.get("fenced")
    elif path in STANDBY_PATHS:
        ok = role == "standby"
    else:
        ok = path in ALIVE_PATHS
    return 200 if ok else 503


class AgentAPI:
    """The HTTP server in a daemon thread. ``status`` is called once per request (it must
    be cheap and thread-safe, like ``Agent.status``); ``metrics`` is refreshed from it at
    every scrape; ``on_failsafe(body) -> dict`` answers ``POST /failsafe``."""

    def __init__(self, listen: str | tuple[str, int], status: Callable[[], dict],
                 metrics: AgentMetrics | None = None, *, liveness_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_failsafe: Callable[[dict], dict] | None = None,
                 on_poke: Callable[[dict], dict] | None = None,
                 on_pass: Callable[[bytes], dict] | None = None):
        self.host, self.port = parse_listen(listen) if isinstance(listen, str) else listen
        self.status, self.metrics = status, metrics
        self.liveness_s, self.clock = liveness_s, clock
        self.on_failsafe = on_failsafe
        self.on_pass = on_pass   # POST /pass: a switchover's pass (binary, sealed)
        self.on_poke = on_poke   # POST /poke: a partner released the leader key, look now
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port) (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("the API is already started")
        family, _, _, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        server_class = type("Server", (_Server,), {"address_family": family})
        server = server_class(addr, _Handler)
        server.api = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="checkpointd-api", daemon=True)
        self._thread.start()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the API is not started")
        host, port = self._server.server_address[:2]
        return host, port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(timeout)

    # -- answers: (code, content type, body) -------------------------------------------
    def _status(self) -> dict | None:
        try:
            return self.status()
        except Exception:  # the API must answer 503, not die with the agent's bug
            log.exception("status() failed")
            return None

    def answer_get(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            if self.metrics is None:
                return 503, JSON_TYPE, _json({"error": "no metrics"})
            status = self._status()
            if status is not None:
                self.metrics.update_from_status(status)
            return 200, CONTENT_TYPE, self.metrics.render().encode()
        if path == "/status":
            status = self._status()
            if status is None:
                return 503, JSON_TYPE, _json({"error": "status unavailable"})
            return 200, JSON_TYPE, _json(status)
        if path in ALIVE_PATHS + PRIMARY_PATHS + STANDBY_PATHS:
            status = self._status()
            code = probe_code(path, status, self.clock(), self.liveness_s)
            return code, JSON_TYPE, _json(status if status is not None
                                          else {"error": "status unavailable"})
        return 404, JSON_TYPE, _json({"error": f"no such endpoint: {path}"})

    def answer_post(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        if path == "/pass":
            if self.on_pass is None:
                return 503, JSON_TYPE, _json({"error": "pass is not available on this agent"})
            try:
                reply = self.on_pass(body)
            except Exception as exc:
                log.exception("/pass failed")
                return 500, JSON_TYPE, _json({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return (200 if reply.get("ok") else 409), JSON_TYPE, _json(reply)
        callback = {"/failsafe": self.on_failsafe, "/poke": self.on_poke}.get(path, False)
        if callback is False:
            return 404, JSON_TYPE, _json({"error": f"no such endpoint: {path}"})
        if callback is None:
            return 503, JSON_TYPE, _json({"error": f"{path[1:]} is not available on this agent"})
        try:
            request = json.loads(body or b"{}")
        except ValueError as exc:
            return 400, JSON_TYPE, _json({"error": f"body is not JSON: {exc}"})
        if not isinstance(request, dict):
            return 400, JSON_TYPE, _json({"error": "body must be a JSON object"})
        try:
            reply = callback(request)
        except Exception as exc:
            log.exception("%s callback failed", path)
            return 500, JSON_TYPE, _json({"error": f"{type(exc).__name__}: {exc}"})
        return 200, JSON_TYPE, _json(reply)


def _json(obj) -> bytes:
    return (json.dumps(obj, default=str) + "\n").encode()


class _Server(ThreadingHTTPServer):
    """Threads are daemons (ThreadingHTTPServer's default): a stuck client never blocks
    the agent's exit."""

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host's FQDN (reverse DNS): in a network
        # namespace without DNS that can take seconds, for a name nothing here uses
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    """One request; HTTP/1.0, so every connection closes after its answer and no idle
    keep-alive thread outlives ``stop``."""

    server_version = "checkpointd"
    timeout = 10  # s: a client that stops sending does not hold a thread forever

    def do_GET(self) -> None:
        self._reply(*self.server.api.answer_get(self._path()))

    def do_HEAD(self) -> None:
        self._reply(*self.server.api.answer_get(self._path()), body=False)

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        limit = MAX_PASS_BODY if self._path() == "/pass" else MAX_BODY
        if not 0 <= length <= limit:
            self._reply(413 if length > limit else 400, JSON_TYPE,
                        _json({"error": f"Content-Length must be 0..{limit}"}))
            return
        body = self.rfile.read(length)
        self._reply(*self.server.api.answer_post(self._path(), body))

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _reply(self, code: int, ctype: str, payload: bytes, body: bool = True) -> None:
        self.send_response(code, HTTPStatus(code).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)
