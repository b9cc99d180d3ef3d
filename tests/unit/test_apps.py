"""The demo applications' pure parts: the download is the same whichever offset it is
regenerated from, and the KV server agrees with the unmodified client's model."""

import importlib.util
import random
from pathlib import Path

from checkpointd.apps import httpstream, kv

ROOT = Path(__file__).resolve().parent.parent.parent


def test_response_regenerates_identically_from_any_offset():
    req = {"len": 100_000, "seed": 42, "rate": 0}
    whole = httpstream.response(req, 0, 200_000)
    head = httpstream.headers(req["len"])
    assert whole.startswith(head) and len(whole) == len(head) + req["len"]
    rng = random.Random(1)
    for _ in range(50):
        off = rng.randrange(len(whole))
        n = rng.randrange(1, 10_000)
        assert httpstream.response(req, off, n) == whole[off:off + n]
    assert httpstream.body(42, 0, 100_000) == whole[len(head):]


def test_parse_request():
    req = httpstream.parse_request(b"GET /stream?len=10&seed=3&rate=5 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert req == {"len": 10, "seed": 3, "rate": 5}


def test_kv_server_agrees_with_the_clients_model():
    spec = importlib.util.spec_from_file_location("kv_client", ROOT / "peers" / "kv_client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    server_state, model_state = {}, {}
    gen = client.requests(random.Random(5))
    for _ in range(2000):
        line = next(gen)
        assert kv.apply(server_state, line) == client.model_apply(model_state, line)
    assert server_state == model_state
