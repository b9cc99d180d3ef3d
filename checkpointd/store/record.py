"""Checkpoint records: plain data, a versioned encoding, and sealing. Root-free, no I/O.

A record is what the destination needs to resurrect one connection (DESIGN.md, "The
exactly-once contract"): the ICI, the application state, the stream offsets that state
corresponds to, the clocks, and the leader epoch that wrote it.

Sealed form (version 1), stored as the value of ``/tcpcp/<cluster>/conn/<conn key>``::

    "TCPS" | u16 version | u64 epoch | u8 n | key id (n bytes) | salt (16) | nonce (12)
    | AES-256-GCM ciphertext of the encoded record | tag (16)

    associated data = everything before the ciphertext + the store key name

The header travels in the clear but is authenticated, so: a record copied under another
key name fails authentication; an honest record of another epoch authenticates and is then
refused as ``epoch``; a record whose clear epoch was edited fails authentication.

Each record is encrypted under its own subkey, HKDF-SHA256(key, salt). AES-GCM with random
96-bit nonces allows about 2^32 messages per key; 1000 connections checkpointed every 20 ms
reach that in a day. With a random 128-bit salt per record the bound is gone.

Refusals raise :class:`RecordError` with ``reason`` in ``errors.REASONS``; the order of the
checks is size, format, version, authentication, then the contents (format, version),
then epoch. Staleness depends on ``now`` and is a separate pure check (:func:`check_fresh`).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import InvalidKey, RecordError
from .keyring import Keyring
from .layout import check_conn_key

# --- bounds ----------------------------------------------------------------------------
#: Largest sealed record. etcd refuses requests over 1.5 MiB (--max-request-bytes), and
#: one record must fit in one transaction with room to spare.
MAX_RECORD_BYTES = 1 << 20
#: Default maximum segment lifetime (DESIGN.md, "Bounds"): older records are not restored.
DEFAULT_MSL_S = 120.0
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1

# --- the record, encoded (inside the encryption) -----------------------------------------
RECORD_MAGIC = b"TCPK"
RECORD_VERSION = 1
# magic, version, header length, epoch, seq, input_offset, output_offset, write_offset,
# ts_val, wall_ns, conn_key length, ici length, app_state length, unacked length
_RECORD_V1 = struct.Struct(">4sHHQQQQQIQHIII")
# header extension 1, present when the header is long enough: acked_input
_EXT1 = struct.Struct(">Q")

# --- the sealed blob ------------------------------------------------------------------------
SEAL_MAGIC = b"TCPS"
SEAL_VERSION = 1
_SEAL_FIXED = struct.Struct(">4sHQB")       # magic, version, epoch, key id length
SALT_BYTES, NONCE_BYTES, TAG_BYTES = 16, 12, 16
_HKDF_INFO = b"tcpcp checkpoint record v1"


@dataclass(frozen=True)
class CheckpointRecord:
    """One connection's checkpoint. Offsets are stream bytes since the connection began.

    ``input_offset`` is the commit offset I: the application state includes every input
    byte before it, and the peer was never acknowledged beyond it. ``output_offset`` is O:
    the output the state corresponds to. ``write_offset`` is how far the application had
    written into the socket when the checkpoint was taken (>= what the peer can have
    acknowledged). ``unacked`` holds logged output for applications that cannot regenerate
    it (empty otherwise). ``ts_val`` and ``wall_ns`` are the TCP timestamp clock and
    CLOCK_REALTIME at the checkpoint. ``epoch`` is the leader epoch that wrote it, ``seq``
    increases with every checkpoint of this connection. ``acked_input`` (header extension
    1, optional) is the input offset the ACK gate had acknowledged to the peer when the
    record was sealed (<= ``input_offset``).
    """

    conn_key: str
    ici: bytes
    app_state: bytes
    input_offset: int
    output_offset: int
    write_offset: int
    ts_val: int
    wall_ns: int
    epoch: int
    seq: int
    unacked: bytes = b""
    acked_input: int | None = None

    @property
    def peer_acked_from(self) -> int:
        """The lowest input offset the peer can still be waiting to hear acknowledged:
        the ACK gate's commit when this record was sealed (``acked_input``). The gate is
        raised only after the record is durable, so a host that dies in between leaves
        the peer's snd_una there, below ``input_offset``; a resurrection nudges both."""
        return self.input_offset if self.acked_input is None else self.acked_input

    def replace(self, **changes) -> "CheckpointRecord":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "CheckpointRecord":
        """Raise RecordError("format") naming the first field out of its range."""
        try:
            check_conn_key(self.conn_key)
        except InvalidKey as exc:
            raise RecordError("format", str(exc)) from None
        for name in ("input_offset", "output_offset", "write_offset", "wall_ns", "epoch", "seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= _U64:
                raise RecordError("format", f"{name} {value!r} is not a 64-bit unsigned value")
        if self.acked_input is not None and (not isinstance(self.acked_input, int)
                                             or not 0 <= self.acked_input <= self.input_offset):
            raise RecordError("format", f"acked_input {self.acked_input!r} is not within "
                                        f"[0, input_offset {self.input_offset}]")
        if not isinstance(self.ts_val, int) or not 0 <= self.ts_val <= _U32:
            raise RecordError("format", f"ts_val {self.ts_val!r} is not a 32-bit value")
        for name in ("ici", "app_state", "unacked"):
            if not isinstance(getattr(self, name), (bytes, bytearray)):
                raise RecordError("format", f"{name} is not bytes")
        return self

    def encode(self) -> bytes:
        self.validate()
        key = self.conn_key.encode("ascii")
        header = _RECORD_V1.pack(
            RECORD_MAGIC, RECORD_VERSION, _RECORD_V1.size, self.epoch, self.seq,
            self.input_offset, self.output_offset, self.write_offset, self.ts_val,
            self.wall_ns, len(key), len(self.ici), len(self.app_state), len(self.unacked))
        if self.acked_input is not None:   # extension 1: the header grows, v1 readers skip it
            header = header[:6] + struct.pack(">H", _RECORD_V1.size + _EXT1.size) + header[8:] \
                + _EXT1.pack(self.acked_input)
        return b"".join((header, key, self.ici, self.app_state, self.unacked))

    @classmethod
    def decode(cls, data: bytes) -> "CheckpointRecord":
        """Parse an encoded record; a longer header from a newer writer is skipped."""
        data = memoryview(data).cast("B")
        if len(data) < 8:
            raise RecordError("format", f"record truncated: {len(data)} bytes")
        magic, version, header_len = struct.unpack_from(">4sHH", data)
        if magic != RECORD_MAGIC:
            raise RecordError("format", f"record magic {bytes(magic)!r} is not {RECORD_MAGIC!r}")
        if version != RECORD_VERSION:
            raise RecordError("version", f"record version {version}; this code reads {RECORD_VERSION}")
        if header_len < _RECORD_V1.size or len(data) < header_len:
            raise RecordError("format", f"record header of {header_len} bytes in {len(data)}")
        (_, _, _, epoch, seq, i_off, o_off, w_off, ts_val, wall_ns,
         key_len, ici_len, app_len, unacked_len) = _RECORD_V1.unpack_from(data)
        if len(data) != header_len + key_len + ici_len + app_len + unacked_len:
            raise RecordError("format", "record length disagrees with its field lengths")
        acked_input = None
        if header_len >= _RECORD_V1.size + _EXT1.size:
            acked_input, = _EXT1.unpack_from(data, _RECORD_V1.size)
        parts, pos = [], header_len
        for length in (key_len, ici_len, app_len, unacked_len):
            parts.append(bytes(data[pos:pos + length]))
            pos += length
        try:
            conn_key = parts[0].decode("ascii")
        except UnicodeDecodeError:
            raise RecordError("format", "connection key is not ASCII") from None
        return cls(conn_key=conn_key, ici=parts[1], app_state=parts[2], input_offset=i_off,
                   output_offset=o_off, write_offset=w_off, ts_val=ts_val, wall_ns=wall_ns,
                   epoch=epoch, seq=seq, unacked=parts[3], acked_input=acked_input).validate()


def conn_key(local: tuple[str, int], remote: tuple[str, int]) -> str:
    """A stable connection key from the 4-tuple (``ICI.local``, ``ICI.remote``).

    ``10.0.0.1:80-10.0.0.2:5555``; IPv6 addresses in brackets. Only characters the key
    layout accepts, and no ``/``.
    """
    def part(addr: str, port: int) -> str:
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    return check_conn_key(f"{part(*local)}-{part(*remote)}")


# --- sealing --------------------------------------------------------------------------------
def _subkey(key: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt, _HKDF_INFO).derive(key))


def _last_segment(key_name: str) -> str:
    return key_name.rsplit("/", 1)[-1]


def seal(record: CheckpointRecord, keyring: Keyring, key_name: str, *,
         max_size: int = MAX_RECORD_BYTES) -> bytes:
    """Encrypt and authenticate ``record`` for storage under ``key_name``.

    Uses the keyring's current key. Raises RecordError("size") when the sealed record would
    exceed ``max_size`` (the caller checkpoints smaller queues instead), ("format") when the
    key name does not end in the record's connection key.
    """
    plain = record.encode()
    if _last_segment(key_name) != record.conn_key:
        raise RecordError("format", f"key name does not end in {record.conn_key!r}", key_name)
    key_id, key = keyring.current
    kid = key_id.encode("ascii")
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    header = _SEAL_FIXED.pack(SEAL_MAGIC, SEAL_VERSION, record.epoch, len(kid)) + kid + salt + nonce
    size = len(header) + len(plain) + TAG_BYTES
    if size > max_size:
        raise RecordError("size", f"sealed record of {size} bytes exceeds {max_size}", key_name)
    return header + _subkey(key, salt).encrypt(nonce, plain, header + key_name.encode())


def open_(blob: bytes, keyring: Keyring, expected_key_name: str,
          expected_epoch: int | None = None, *, max_size: int = MAX_RECORD_BYTES) -> CheckpointRecord:
    """Authenticate, decrypt and check a sealed record read from ``expected_key_name``.

    ``expected_epoch`` is the epoch whose records may be restored (at a takeover: the epoch
    of the leader being replaced); None skips that check. Raises RecordError with a reason.
    """
    name = expected_key_name
    if len(blob) > max_size:
        raise RecordError("size", f"{len(blob)} bytes exceeds {max_size}", name)
    if len(blob) < _SEAL_FIXED.size:
        raise RecordError("format", f"truncated: {len(blob)} bytes", name)
    magic, version, epoch, kid_len = _SEAL_FIXED.unpack_from(blob)
    if magic != SEAL_MAGIC:
        raise RecordError("format", f"magic {magic!r} is not {SEAL_MAGIC!r}", name)
    if version != SEAL_VERSION:
        raise RecordError("version", f"sealed version {version}; this code reads {SEAL_VERSION}", name)
    header_len = _SEAL_FIXED.size + kid_len + SALT_BYTES + NONCE_BYTES
    if len(blob) < header_len + TAG_BYTES:
        raise RecordError("format", f"truncated: {len(blob)} bytes", name)
    kid = bytes(blob[_SEAL_FIXED.size:_SEAL_FIXED.size + kid_len])
    salt = bytes(blob[header_len - SALT_BYTES - NONCE_BYTES:header_len - NONCE_BYTES])
    nonce = bytes(blob[header_len - NONCE_BYTES:header_len])
    key = keyring.get(kid.decode("ascii", "replace"))
    if key is None:
        raise RecordError("authentication", f"sealed with key {kid.decode('ascii', 'replace')!r}, "
                                            f"not in the keyring {keyring!r}", name)
    header = bytes(blob[:header_len])
    try:
        plain = _subkey(key, salt).decrypt(nonce, bytes(blob[header_len:]), header + name.encode())
    except InvalidTag:
        raise RecordError("authentication", "tag mismatch: tampered, moved from another key "
                                            "name, or sealed with another key", name) from None
    try:
        record = CheckpointRecord.decode(plain)
    except RecordError as exc:
        raise RecordError(exc.reason, exc.detail, name) from None
    if record.epoch != epoch:
        raise RecordError("format", f"record epoch {record.epoch} differs from its header's {epoch}", name)
    if _last_segment(name) != record.conn_key:
        raise RecordError("format", f"holds connection {record.conn_key!r}", name)
    if expected_epoch is not None and epoch != expected_epoch:
        raise RecordError("epoch", f"written in epoch {epoch}, expected {expected_epoch}", name)
    return record


def check_fresh(record: CheckpointRecord, *, now_ns: int, msl_s: float = DEFAULT_MSL_S) -> CheckpointRecord:
    """Refuse (RecordError "stale") a record whose wall clock is more than one MSL before
    ``now_ns``: the peer may have given up on the connection, and sequence numbers from it
    may have been reused (DESIGN.md, "Bounds"). Pure: the caller passes the clock."""
    age_ns = now_ns - record.wall_ns
    if age_ns > msl_s * 1e9:
        raise RecordError("stale", f"{age_ns / 1e9:.1f} s old, the MSL is {msl_s:g} s")
    return record


@dataclass(frozen=True)
class Opened:
    """The outcome of opening a snapshot: what may be restored, and what was refused why."""

    records: Mapping[str, CheckpointRecord]      # conn key -> record
    refused: Mapping[str, RecordError]           # conn key -> why

    @property
    def counts(self) -> Counter:
        """Refusals by reason, for the operator's counters."""
        return Counter(err.reason for err in self.refused.values())


def open_many(blobs: Mapping[str, bytes], keyring: Keyring, key_name_of: Callable[[str], str], *,
              expected_epoch: int | None, now_ns: int, msl_s: float = DEFAULT_MSL_S,
              max_size: int = MAX_RECORD_BYTES) -> Opened:
    """Open every record of a snapshot (conn key -> blob); never raises for a bad record.

    ``key_name_of`` maps a conn key to its store key name (``Layout.conn``).
    """
    records, refused = {}, {}
    for key, blob in blobs.items():
        name = key_name_of(key)
        try:
            record = open_(blob, keyring, name, expected_epoch, max_size=max_size)
            check_fresh(record, now_ns=now_ns, msl_s=msl_s)
        except RecordError as exc:
            refused[key] = exc if exc.key_name else RecordError(exc.reason, exc.detail, name)
            continue
        records[key] = record
    return Opened(records, refused)
