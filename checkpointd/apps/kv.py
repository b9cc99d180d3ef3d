"""A stateful line protocol protected by checkpointd (the drill's (b)).

Requests, one per line (``\\n``-terminated, ASCII words)::

    SET k v    -> OK
    GET k      -> VALUE v   or NONE
    INCR k     -> INT n     (k's value + 1; a missing key counts as 0)
    SUM        -> INT n     (the sum of every integer value)
    anything else, or INCR of a non-integer -> ERR reason

Each connection has its own store, and every reply depends on all the earlier requests
of that connection: a request lost or applied twice, a reply lost or repeated, shows in
the client's model (peers/kv_client.py checks every reply).

Why its output is logged: a reply cannot be regenerated once the state has moved on, so
the connection registers with ``regenerable=False`` and the library keeps a copy of the
replies the peer has not acknowledged, sent along with each commit. After each batch of
requests (all the complete lines one ``recv`` brought) it writes the replies, then
commits (state, I = every byte read, O = W); the state carries the unfinished request
line, so that the ACK gate never waits for a request the peer will only finish once its
beginning is acknowledged. After a fail-over the
standby's copy loads the state, reads again from I (the peer resends everything after I:
the ACK gate never acknowledged it), and regenerates the replies; the library drops the
first D of them (the peer has them) and the agent resent the unacknowledged ones.

    python -m checkpointd.apps.kv --listen ADDR:PORT --agent /run/tcpcp/app.sock
    python -m checkpointd.apps.kv --listen ADDR:PORT --no-agent     (baseline)
"""

from __future__ import annotations

import json

from . import Server, main as _main

MAX_LINE = 4096


def apply(store: dict, line: str) -> str:
    """One request against ``store`` (str -> str), which it updates; the reply (pure)."""
    parts = line.split(" ")
    op = parts[0]
    if op == "SET" and len(parts) == 3 and parts[1] and parts[2]:
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


def encode_state(store: dict, requests: int, partial: bytes = b"") -> bytes:
    st = {"kv": store, "n": requests}
    if partial:
        st["partial"] = partial.decode("latin-1")
    return json.dumps(st, separators=(",", ":")).encode()


def decode_state(state: bytes) -> tuple[dict, int]:
    store, requests, _ = decode_full_state(state)
    return store, requests


def decode_full_state(state: bytes) -> tuple[dict, int, bytes]:
    """(store, requests answered, the unfinished request line read so far)."""
    if not state:
        return {}, 0, b""
    st = json.loads(state)
    return dict(st["kv"]), int(st["n"]), st.get("partial", "").encode("latin-1")


class KV(Server):
    """A stateful line protocol protected by checkpointd."""

    name = "kv"
    regenerable = False

    def serve_conn(self, p) -> None:
        """Every byte read is committed, the unfinished request line with the state.

        Committing only at request boundaries can deadlock with the ACK gate: a peer in
        loss recovery sends one segment and waits for its ACK; if that segment ends inside
        a request, the gate holds the ACK below it (not committed) while the application
        waits for the rest of the request (never sent). Seen in drills as a peer
        retransmitting the same byte with backoff for a minute."""
        store, requests, partial = decode_full_state(p.state)
        consumed, out = p.input, p.output     # the state's offsets: I and O
        buf = bytearray(partial)
        while True:
            self.wait_readable(p, quiescent=True)
            data = p.recv(65536)
            if not data:
                break
            buf += data
            consumed += len(data)
            replies = []
            start = 0
            while (nl := buf.find(b"\n", start)) >= 0:
                line = bytes(buf[start:nl]).decode("ascii", "replace").rstrip("\r")
                replies.append(apply(store, line) + "\n")
                start = nl + 1
            if start:
                del buf[:start]
                requests += len(replies)
                data = "".join(replies).encode()
                p.sendall(data)
                out += len(data)
            if len(buf) > MAX_LINE:
                raise ValueError(f"request line longer than {MAX_LINE} bytes")
            p.commit(encode_state(store, requests, bytes(buf)), input=consumed, output=out)
        self.finish(p)


def main(argv=None) -> int:
    return _main(KV, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
