"""Demo applications protected by checkpointd: the same code runs on both hosts."""

from __future__ import annotations

import socket
import threading

from checkpointd.app import AgentClient


def serve_forever(listen: str, agent: str, handle, resume) -> None:
    """Listen on ``listen`` (ADDR:PORT, usually the virtual IP, which may be on the other
    host: hence FREEBIND), register the port with the agent, run ``handle(client, sock)``
    for each accepted connection and ``resume(protected, state)`` for each connection the
    agent resurrects here, each in its own thread."""
    addr, port = listen.rsplit(":", 1)
    addr = addr.strip("[]")
    client = AgentClient(agent, ports=(int(port),))
    v6 = ":" in addr
    ls = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, 78 if v6 else 15, 1)
    ls.bind((addr, int(port)))
    ls.listen(1024)

    def resumer():
        for p, state in client.resumed():
            threading.Thread(target=resume, args=(p, state), daemon=True).start()
    threading.Thread(target=resumer, daemon=True).start()
    while True:
        sock, _ = ls.accept()
        threading.Thread(target=handle, args=(client, sock), daemon=True).start()
