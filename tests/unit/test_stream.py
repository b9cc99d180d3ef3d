"""The verified byte stream: word format, Verifier accounting, peer/server agreement, and
the stream application on loopback (no root needed).

The Verifier is what turns "the peer did not notice" into numbers, so its counts are
tested exactly against damage crafted with a known size: a skipped range must count as
lost bytes, a repeated range as duplicated bytes, a flipped byte as one corrupt byte,
whatever the alignment and however the bytes are chunked.
"""

import ast
import importlib.util
import json
import pathlib
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from kernel import streamapp as app
from kernel.streamapp import (StreamServer, StreamState, StreamStateError, Verifier,
                              decode, generate, word)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PEER = ROOT / 'peers' / 'stream_peer.py'


def _load_peer():
    spec = importlib.util.spec_from_file_location('stream_peer', PEER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


peer = _load_peer()

conn_ids = st.integers(0, app.MAX_CONN_ID)
directions = st.sampled_from([app.TO_SERVER, app.TO_PEER])


def chunked(data, cuts):
    """Split data at the given cut points (any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    out, last = [], 0
    for c in points + [len(data)]:
        out.append(data[last:c])
        last = c
    return out


def verify(data, cuts=(), conn_id=3, direction=app.TO_SERVER, module=app):
    v = module.Verifier(conn_id, direction)
    for piece in chunked(data, cuts):
        v.feed(piece)
    v.feed(b'', final=True)
    return v


def counts(v):
    return dict(verified=v.verified, lost=v.lost, duplicated=v.duplicated,
                corrupt=v.corrupt)


# --- word format

@given(conn_ids, directions, st.integers(0, app.K_MASK))
def test_word_round_trip(conn_id, direction, k):
    assert decode(word(conn_id, direction, k).to_bytes(8, 'big')) == (direction, conn_id, k)


@given(conn_ids, directions, st.integers(0, app.K_MASK), st.integers(0, 7),
       st.integers(1, 255))
def test_damaged_word_never_passes_as_itself(conn_id, direction, k, pos, delta):
    w = bytearray(word(conn_id, direction, k).to_bytes(8, 'big'))
    w[pos] ^= delta
    assert decode(bytes(w)) != (direction, conn_id, k)
    if pos >= 2:                                  # check or offset byte: check fails
        assert decode(bytes(w)) is None


def test_blank_words_are_invalid():
    assert decode(bytes(8)) is None
    assert decode(b'\xff' * 8) is None


@given(conn_ids, directions, st.integers(0, 1 << 24), st.integers(0, 40000))
@settings(max_examples=50)
def test_generate_is_the_word_sequence(conn_id, direction, offset, length):
    k0, k1 = offset // 8, (offset + length) // 8 + 1
    ref = b''.join(word(conn_id, direction, k).to_bytes(8, 'big') for k in range(k0, k1))
    start = offset - 8 * k0
    assert generate(conn_id, direction, offset, length) == ref[start:start + length]


def test_streams_differ_by_connection_and_direction():
    a = generate(1, 0, 0, 64)
    assert a != generate(2, 0, 0, 64) and a != generate(1, 1, 0, 64)


# --- Verifier accounting

STREAM = generate(3, app.TO_SERVER, 0, 20000)
cuts = st.lists(st.integers(0, 30000), max_size=12)


@given(cuts)
def test_clean_stream_any_chunking(cs):
    assert counts(verify(STREAM, cs)) == dict(verified=len(STREAM), lost=0, duplicated=0,
                                              corrupt=0)


@given(st.integers(0, 15000), st.integers(1, 4000), cuts)
def test_skipped_range_counts_as_lost(at, skip, cs):
    data = STREAM[:at] + STREAM[at + skip:]
    assert counts(verify(data, cs)) == dict(verified=len(data), lost=skip, duplicated=0,
                                            corrupt=0)


@given(st.integers(1, 15000), st.integers(1, 4000), cuts)
def test_repeated_range_counts_as_duplicated(at, back, cs):
    back = min(back, at)
    data = STREAM[:at] + STREAM[at - back:]
    assert counts(verify(data, cs)) == dict(verified=len(data), lost=0, duplicated=back,
                                            corrupt=0)


@given(st.integers(0, len(STREAM) - 1), st.integers(1, 255), cuts)
def test_flipped_byte_counts_as_one_corrupt_byte(at, delta, cs):
    data = bytearray(STREAM)
    data[at] ^= delta
    assert counts(verify(bytes(data), cs)) == dict(verified=len(data) - 1, lost=0,
                                                   duplicated=0, corrupt=1)


@given(st.integers(0, 15000), st.integers(1, 3000), cuts)
def test_other_connections_bytes_count_as_corrupt(at, length, cs):
    foreign = generate(4, app.TO_SERVER, at, length)
    data = STREAM[:at] + foreign + STREAM[at + length:]
    differing = sum(x != y for x, y in zip(foreign, STREAM[at:at + length]))
    assert counts(verify(data, cs)) == dict(verified=len(data) - differing, lost=0,
                                            duplicated=0, corrupt=differing)


def test_skip_then_repeat_are_both_counted():
    data = STREAM[:1000] + STREAM[1333:5000] + STREAM[4000:]
    assert counts(verify(data)) == dict(verified=len(data), lost=333, duplicated=1000,
                                        corrupt=0)


def test_stream_cut_short_is_not_an_error_but_truncated_word_damage_is():
    assert counts(verify(STREAM[:1001])) == dict(verified=1001, lost=0, duplicated=0,
                                                 corrupt=0)
    tail = bytearray(STREAM[:1001])
    tail[-3] ^= 1                                 # within the last, short lookahead
    assert verify(bytes(tail)).corrupt == 1


@given(st.integers(0, 15000), st.integers(1, 4000), st.integers(0, 19000), cuts)
@settings(max_examples=50)
def test_state_resume_gives_the_same_counts(at, skip, split, cs):
    """A verifier rebuilt from StreamState fields mid-stream counts like one that never
    stopped: this is what continues on the destination after a pass."""
    data = STREAM[:at] + STREAM[at + skip:]
    whole = verify(data, cs)
    first = Verifier(3, app.TO_SERVER)
    for piece in chunked(data[:split], cs):
        first.feed(piece)
    received = len(data[:split])
    state = StreamState(3, 0, received, first.verified, first.lost, first.duplicated,
                        first.corrupt, first.pending)
    assert len(first.pending) <= Verifier.MAX_PENDING
    state = StreamState.from_bytes(state.to_bytes())
    assert state.verify_at == first.offset
    second = Verifier(3, app.TO_SERVER, state.verify_at, state.pending)
    second.verified, second.lost, second.duplicated, second.corrupt = (
        state.verified, state.lost, state.duplicated, state.corrupt)
    for piece in chunked(data[split:], cs):
        second.feed(piece)
    second.feed(b'', final=True)
    assert counts(second) == counts(whole)


# --- the peer's copy of the format agrees

@given(conn_ids, directions, st.integers(0, 1 << 30), st.integers(0, 20000))
@settings(max_examples=50)
def test_peer_and_server_generate_the_same_bytes(conn_id, direction, offset, length):
    assert peer.generate(conn_id, direction, offset, length) == generate(
        conn_id, direction, offset, length)


def test_peer_and_server_share_constants():
    for name in ('HELLO_MAGIC', 'MASK', 'K_BITS', 'CONN_BITS', 'TO_SERVER', 'TO_PEER'):
        assert getattr(peer, name) == getattr(app, name), name
    assert peer.HELLO.format == app.HELLO.format


@given(st.integers(0, 15000), st.integers(1, 4000), st.integers(0, 19000),
       st.integers(1, 255), cuts)
@settings(max_examples=50)
def test_peer_and_server_verifiers_agree(at, skip, flip, delta, cs):
    data = bytearray(STREAM[:at] + STREAM[at + skip:])
    data[flip % len(data)] ^= delta
    assert counts(verify(bytes(data), cs, module=peer)) == counts(verify(bytes(data), cs))


def test_peer_imports_the_standard_library_only():
    imported = set()
    for node in ast.walk(ast.parse(PEER.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or '.').split('.')[0])
    assert imported and imported <= set(sys.stdlib_module_names), imported


# --- StreamState

def test_state_round_trip():
    s = StreamState(7, sent=1 << 40, received=12345, verified=12000, lost=8,
                    duplicated=16, corrupt=3, pending=b'abc', peer_eof=True)
    assert StreamState.from_bytes(s.to_bytes()) == s
    assert len(s.to_bytes()) == StreamState.SIZE
    fresh = StreamState(None, pending=b'TCPCP')
    assert StreamState.from_bytes(fresh.to_bytes()) == fresh


@pytest.mark.parametrize('bad, field', [
    (dict(conn_id=app.MAX_CONN_ID + 1), 'conn_id'),
    (dict(conn_id=1, received=100, pending=b'x' * (Verifier.MAX_PENDING + 1)), 'pending'),
    (dict(conn_id=1, received=1, pending=b'xy'), 'pending'),
    (dict(conn_id=None, pending=b'x' * 16), 'conn_id'),
    (dict(conn_id=None, sent=5), 'conn_id'),
    (dict(conn_id=1, sent=-1), 'counters'),
])
def test_state_rejects_impossible_values(bad, field):
    with pytest.raises(StreamStateError) as exc:
        StreamState(**bad)
    assert exc.value.field == field


@pytest.mark.parametrize('mangle, field', [
    (lambda b: b[:-1], 'length'),
    (lambda b: b'XXXX' + b[4:], 'version'),
    (lambda b: b[:4] + b'\x02' + b[5:], 'version'),
    (lambda b: b[:5] + b'\x81' + b[6:], 'flags'),
    (lambda b: b[:58] + b'\x19' + b[59:], 'pending'),
])
def test_state_rejects_foreign_bytes(mangle, field):
    with pytest.raises(StreamStateError) as exc:
        StreamState.from_bytes(mangle(StreamState(1).to_bytes()))
    assert exc.value.field == field


# --- loopback: StreamServer against the real peer program

def _listener():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    sock.listen(128)
    return sock


def _run_peer(port, *args):
    return subprocess.Popen(
        [sys.executable, str(PEER), '--connect', f'127.0.0.1:{port}', '--json', *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    assert out, err
    return proc.returncode, json.loads(out)


def _wait_for(cond, timeout=10.0, what='condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f'timed out waiting for {what}')


def _assert_clean(rep):
    for key in ('lost_bytes', 'duplicated_bytes', 'corrupt_bytes', 'resets',
                'early_fins', 'connect_failures', 'errors', 'unclosed'):
        assert rep[key] == 0, (key, rep)


def test_loopback_peer_and_server():
    listener = _listener()
    server = StreamServer(listener).start()
    try:
        rc, rep = _result(_run_peer(listener.getsockname()[1], '--connections', '5',
                                    '--seconds', '2'))
        _assert_clean(rep)
        assert rc == 0 and rep['ok'] and rep['connections'] == 5
        assert rep['bytes_sent'] > 0 and rep['bytes_verified'] == rep['bytes_received'] > 0
        _wait_for(lambda: server.stats()['closed'] == 5, what='server to close all')
        stats = server.stats()
        assert stats['bytes_verified'] == stats['bytes_received'] == rep['bytes_sent']
        assert stats['bytes_sent'] == rep['bytes_received']
        assert stats['lost_bytes'] == stats['duplicated_bytes'] == stats['corrupt_bytes'] == 0
        assert stats['resets'] == stats['errors'] == stats['protocol_errors'] == 0
    finally:
        server.stop()
        listener.close()


def test_detach_and_attach_to_another_server_continues_the_stream(tmp_path):
    """The same-host rehearsal of a pass: pause, detach every connection with its state,
    carry the state as bytes, attach to a second server, resume. The peer must see one
    continuous stream."""
    listener = _listener()
    origin = StreamServer(listener).start()
    destination = StreamServer().start()
    progress = tmp_path / 'progress.json'
    stop = tmp_path / 'stop'
    proc = _run_peer(listener.getsockname()[1], '--connections', '3', '--seconds', '30',
                     '--until-file', str(stop), '--progress-file', str(progress),
                     '--per-connection')
    try:
        def flowing():
            try:
                status = json.loads(progress.read_text())
            except (OSError, ValueError):
                return False
            return len(status['received']) == 3 and min(status['received']) > 100000
        _wait_for(flowing, what='traffic on all connections')
        _wait_for(lambda: len(origin.conn_ids()) == 3, what='three hellos')

        origin.pause()
        before = origin.stats()
        time.sleep(0.2)
        assert origin.stats() == before           # paused: nobody touches the sockets
        moved = []
        for cid in origin.conn_ids():
            sock, state = origin.detach(cid)
            assert state.conn_id == cid and state.sent > 0 and state.received > 0
            moved.append((sock, StreamState.from_bytes(state.to_bytes())))
        origin.resume()
        assert origin.stats()['connections'] == 0
        for sock, state in moved:
            destination.attach(sock, state)

        _wait_for(lambda: destination.stats()['bytes_sent'] > sum(
            s.sent for _, s in moved) + 100000, what='destination to send')
        stop.touch()
        rc, rep = _result(proc)
        _assert_clean(rep)
        assert rc == 0 and rep['ok']
        _wait_for(lambda: destination.stats()['closed'] == 3, what='destination to close')
        stats = destination.stats()
        assert stats['lost_bytes'] == stats['duplicated_bytes'] == stats['corrupt_bytes'] == 0
        assert stats['bytes_verified'] == stats['bytes_received'] == rep['bytes_sent']
        assert stats['bytes_sent'] == rep['bytes_received']
        assert stats['bytes_received'] > sum(s.received for _, s in moved)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        origin.stop()
        destination.stop()
        listener.close()


def test_peer_reports_reset_and_early_fin():
    """The peer's failure path: an RST and a FIN in mid-stream are both noticed."""
    listener = _listener()
    server = StreamServer(listener).start()
    proc = _run_peer(listener.getsockname()[1], '--connections', '2', '--seconds', '30')
    kept = []
    try:
        _wait_for(lambda: len(server.conn_ids()) == 2, what='two hellos')
        time.sleep(0.2)
        rst, _ = server.detach(0)
        rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        rst.close()
        fin, _ = server.detach(1)
        fin.shutdown(socket.SHUT_WR)
        kept.append(fin)
        rc, rep = _result(proc)
        assert rc == 1 and not rep['ok']
        assert rep['resets'] == 1 and rep['early_fins'] == 1
        assert rep['lost_bytes'] == rep['duplicated_bytes'] == rep['corrupt_bytes'] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for sock in kept:
            sock.close()
        server.stop()
        listener.close()


def test_partial_hello_travels_in_the_state_and_eof_closes_after_flush():
    listener = _listener()
    origin = StreamServer(listener).start()
    destination = StreamServer().start()
    client = socket.create_connection(listener.getsockname())
    try:
        hello = app.HELLO.pack(app.HELLO_MAGIC, 9)
        client.sendall(hello[:10])
        _wait_for(lambda: origin.stats()['accepted'] == 1, what='accept')
        server_side = next(iter(origin._conns))
        _wait_for(lambda: origin.state(server_side).pending == hello[:10], what='10 bytes')
        sock, state = origin.detach(server_side)
        assert state.conn_id is None and state.pending == hello[:10]
        destination.attach(sock, StreamState.from_bytes(state.to_bytes()))
        client.sendall(hello[10:] + generate(9, app.TO_SERVER, 0, 1000))
        client.shutdown(socket.SHUT_WR)
        v = Verifier(9, app.TO_PEER)
        client.settimeout(10)
        while data := client.recv(65536):         # the server closes once flushed
            v.feed(data)
        v.feed(b'', final=True)
        assert v.verified > 0 and v.lost == v.duplicated == v.corrupt == 0
        _wait_for(lambda: destination.stats()['closed'] == 1, what='close')
        stats = destination.stats()
        assert stats['bytes_verified'] == stats['bytes_received'] == 1000
        assert stats['bytes_sent'] == v.verified
    finally:
        client.close()
        origin.stop()
        destination.stop()
        listener.close()
