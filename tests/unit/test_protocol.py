"""The application-agent protocol: framing, validation, and fd passing over a socketpair."""

import os
import socket

import pytest

from checkpointd import protocol
from checkpointd.protocol import ProtocolError


def test_round_trip_with_and_without_fd():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        protocol.send(a, "register", b"state", fd=r, conn="k", input=0, output=0, read=0, write=0)
        msg = protocol.recv(b)
        assert msg.op == "register" and msg["conn"] == "k" and msg.payload == b"state"
        assert msg.fd is not None and os.fstat(msg.fd).st_ino == os.fstat(r).st_ino
        os.close(msg.fd)
        protocol.send(a, "durable", conn="k", seq=7)
        msg = protocol.recv(b)
        assert (msg.op, msg["seq"], msg.fd) == ("durable", 7, None)
        a.close()
        assert protocol.recv(b) is None
    finally:
        os.close(r)
        os.close(w)
        b.close()


@pytest.mark.parametrize("op,fields", [
    ("nope", {}),
    ("durable", {"conn": "k"}),                       # missing seq
    ("durable", {"conn": "k", "seq": 1, "x": 2}),     # extra field
    ("durable", {"conn": "", "seq": 1}),              # empty key
    ("durable", {"conn": "k", "seq": -1}),            # negative offset
    ("durable", {"conn": "k", "seq": True}),          # bool is not an offset
])
def test_encode_refuses_bad_messages(op, fields):
    with pytest.raises(ProtocolError):
        protocol.encode(op, **fields)


@pytest.mark.parametrize("data", [b"", b"\0\0\0\x09{}", b"\0\0\0\x02[]", b"\0\0\0\x05nojso"])
def test_decode_refuses_garbage(data):
    with pytest.raises(ProtocolError):
        protocol.decode(data)


def test_fd_must_match_the_op():
    raw = protocol.encode("released", conn="k")
    with pytest.raises(ProtocolError):
        protocol.decode(raw, fd=5)
    with pytest.raises(ProtocolError):
        protocol.decode(protocol.encode("resume", conn="k", input=0, output=0, discard=0,
                                        unacked_len=0))
