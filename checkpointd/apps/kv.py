"""A stateful line protocol, protected by checkpointd (the drill's (b)).

Requests, one per line: ``SET k v``, ``GET k``, ``INCR k``, ``SUM``. Replies: ``OK``,
``VALUE v`` (or ``NONE``), ``INT n``, ``INT sum-of-integer-values``. Every reply depends on
all earlier requests of the connection, so a request lost or applied twice shows in the
client's model (peers/kv_client.py). The replies cannot be regenerated once the state has
moved on, so they are logged: each commit carries the unacknowledged ones.

    python -m checkpointd.apps.kv --listen ADDR:PORT --agent /run/tcpcp/app.sock
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from checkpointd.app import AgentClient
from checkpointd.apps import serve_forever


def apply(store: dict, line: str) -> str:
    """One request against the state (pure)."""
    parts = line.split(" ")
    op = parts[0]
    if op == "SET" and len(parts) == 3:
        store[parts[1]] = parts[2]
        return "OK"
    if op == "GET" and len(parts) == 2:
        return f"VALUE {store[parts[1]]}" if parts[1] in store else "NONE"
    if op == "INCR" and len(parts) == 2:
        try:
            n = int(store.get(parts[1], "0")) + 1
        except ValueError:
            return "ERR not an integer"
        store[parts[1]] = str(n)
        return f"INT {n}"
    if op == "SUM" and len(parts) == 1:
        total = 0
        for v in store.values():
            try:
                total += int(v)
            except ValueError:
                pass
        return f"INT {total}"
    return "ERR bad request"


def serve(p, store: dict, consumed: int, output: int) -> None:
    buf = b""
    while True:
        data = p.recv(65536)
        if not data:
            break
        buf += data
        replies = []
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            consumed += len(line) + 1
            replies.append(apply(store, line.decode()) + "\n")
        if replies:
            out = "".join(replies).encode()
            p.sendall(out)
            output = p.write
            p.commit(json.dumps(store, separators=(",", ":")).encode(), input=consumed, output=output)
    p.commit(json.dumps(store, separators=(",", ":")).encode(), input=consumed + 1, output=output)
    p.release()
    p.sock.close()


def handle(client: AgentClient, sock: socket.socket) -> None:
    p = client.register(sock, b"{}", regenerable=False)
    serve(p, {}, 0, 0)


def resume(p, state: bytes) -> None:
    p.regenerable = False
    store = json.loads(state)
    consumed, output, _discard = p.resumed
    serve(p, store, consumed, output)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="ADDR:PORT (the virtual IP)")
    ap.add_argument("--agent", required=True, help="the agent's application socket")
    args = ap.parse_args(argv)
    serve_forever(args.listen, args.agent, handle, resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
