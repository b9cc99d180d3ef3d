"""The checkpoint store on etcd's v3 API (gRPC), through ``etcd-sdk-python`` (``pyetcd``).

Why this client, and the settings below, are explained in docs/store.md. In short:
- PyPI ``etcd3`` 0.12 does not import with protobuf >= 4; ``pyetcd`` is its maintained
  fork with the same API and current generated code.
- From pyetcd we take the endpoints (gRPC channels), the choice of a live member
  (``failover=True``) and the generated v3 messages and stubs (``etcdrpc``). Requests are
  built here: the fence compares the leader key's *lease*, a compare target pyetcd's
  helpers lack, and reads need the response header's revision, which they drop. One call
  path also means one place that maps every failure to our errors.
- ``Endpoint(time_retry=...)``: after one error pyetcd refuses to use a member for
  ``time_retry`` seconds (default 300: five minutes of errors after a blip). About a
  second here.
- gRPC's reconnect backoff grows to 120 s by default; capped at 1 s here, so the store is
  usable again about a second after etcd is.
- gRPC refuses responses over 4 MiB by default; ``get_all`` pages (at one revision) and the
  receive limit is sized to a page.
- Every call carries a deadline (``timeout``).
"""

from __future__ import annotations

from typing import Mapping, Sequence
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.utils import prefix_range_end

from . import base
from .base import CheckpointStore, LeaderState, Lease, Snapshot
from .errors import NotLeader, StoreError, StoreUnavailable
from .layout import Layout
from .record import MAX_RECORD_BYTES

DEFAULT_TIMEOUT = 2.0
DEFAULT_TIME_RETRY = 1.0
PAGE_SIZE = 32
_ATTEMPTS = 3


def _channel_options(page_size: int) -> list[tuple[str, int]]:
    return [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.max_receive_message_length", page_size * (MAX_RECORD_BYTES + 4096) + (1 << 20)),
    ]


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port``, ``http://host:port`` or ``[v6]:port`` -> (host for gRPC, port)."""
    parts = urlsplit(text if "//" in text else f"http://{text}")
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"etcd endpoint {text!r}: want http://host:port (TLS is not supported yet)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host, parts.port


# -- etcd v3 messages ----------------------------------------------------------------------
def _cmp(key: str, target: str, value) -> etcdrpc.Compare:
    """key's ``target`` (LEASE, VALUE, VERSION, MOD) == value. etcd compares a missing key
    as version 0, mod 0, lease 0; a VALUE compare on it is false."""
    field = {"LEASE": "lease", "VALUE": "value", "VERSION": "version", "MOD": "mod_revision"}[target]
    return etcdrpc.Compare(key=key.encode(), result=etcdrpc.Compare.EQUAL,
                           target=getattr(etcdrpc.Compare, target), **{field: value})


def _put(key: str, value: bytes, lease: int = 0) -> etcdrpc.RequestOp:
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease))


def _get(key: str) -> etcdrpc.RequestOp:
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key.encode()))


def _delete(key: str) -> etcdrpc.RequestOp:
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key.encode()))


class _Refused(StoreUnavailable):
    """The member refused the connection: another member may answer."""


class EtcdStore(CheckpointStore):
    """One agent's connection to an etcd cluster (one or more members, failing over)."""

    def __init__(self, endpoints: Sequence[str], cluster: str, *, timeout: float = DEFAULT_TIMEOUT,
                 time_retry: float = DEFAULT_TIME_RETRY, page_size: int = PAGE_SIZE):
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        if timeout <= 0 or page_size < 1:
            raise ValueError("timeout must be positive and page_size at least 1")
        self.layout = Layout(cluster)
        self.endpoints = tuple(endpoints)
        self.timeout = float(timeout)
        self.page_size = page_size
        opts = _channel_options(page_size)
        eps = [pyetcd.Endpoint(*parse_endpoint(e), secure=False, time_retry=time_retry, opts=opts)
               for e in self.endpoints]
        self._client = pyetcd.MultiEndpointEtcd3Client(endpoints=eps, timeout=self.timeout, failover=True)

    def __repr__(self) -> str:
        return f"EtcdStore({list(self.endpoints)!r}, cluster={self.layout.cluster!r})"

    def close(self) -> None:
        self._client.close()

    # -- calls: every one bounded by the timeout, every failure mapped to our errors ---------
    def _call(self, what: str, service: str, method: str, request, ok_codes=()):
        """One RPC; if the member refused the connection, once more on each other member.

        A timeout is not retried: the time is spent and a write's outcome is unknown.
        Returns None for a status in ``ok_codes``.
        """
        for attempt in range(len(self.endpoints)):
            try:
                return self._call_once(what, service, method, request, ok_codes)
            except _Refused:
                if attempt == len(self.endpoints) - 1:
                    raise

    def _call_once(self, what, service, method, request, ok_codes):
        where = f"etcd {','.join(self.endpoints)}: {what}"
        client = self._client
        try:
            # A stub per call, on the channel of a member not marked failed (pyetcd's choice).
            rpc = getattr(getattr(etcdrpc, f"{service}Stub")(client.channel), method)
            if method == "LeaseKeepAlive":     # a stream: send one request, read one answer
                answers = rpc(iter([request]), self.timeout, credentials=client.call_credentials,
                              metadata=client.metadata)
                try:
                    return next(answers, None)
                finally:
                    answers.cancel()
            return rpc(request, self.timeout, credentials=client.call_credentials, metadata=client.metadata)
        except etcd_exc.NoServerAvailableError:
            raise StoreUnavailable(f"{where}: every member failed within the last retry interval") from None
        except grpc.RpcError as exc:
            code = exc.code()
            if code in ok_codes:
                return None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.INTERNAL):
                client.endpoint_in_use.fail()   # as pyetcd does: the next call goes elsewhere
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise StoreUnavailable(f"{where}: no answer within {self.timeout:g} s") from None
                raise _Refused(f"{where}: {code.name}: {exc.details()}") from None
            raise StoreError(f"{where}: {code.name}: {exc.details()}", code.name) from None

    def _txn(self, what: str, compare: list, success: list) -> etcdrpc.TxnResponse:
        return self._call(what, "KV", "Txn", etcdrpc.TxnRequest(compare=compare, success=success))

    def _read_leader(self):
        """(revision, leader kv or None, epoch kv or None) read in one transaction."""
        resp = self._txn("read leader", [], [_get(self.layout.leader), _get(self.layout.epoch)])
        leader_kvs = resp.responses[0].response_range.kvs
        epoch_kvs = resp.responses[1].response_range.kvs
        return (resp.header.revision, leader_kvs[0] if leader_kvs else None,
                epoch_kvs[0] if epoch_kvs else None)

    def _fence(self, lease: Lease) -> list:
        return [_cmp(self.layout.leader, "LEASE", lease.id),
                _cmp(self.layout.leader, "VALUE", base.leader_value(lease.name, lease.epoch))]

    def _not_leader(self, lease: Lease) -> NotLeader:
        return NotLeader(f"lease {lease.id:x} of {lease.name!r} (epoch {lease.epoch}) no longer "
                         "holds the leader key: nothing written")

    def _revoke(self, what: str, lease_id: int) -> None:
        self._call(what, "Lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id),
                   ok_codes=(grpc.StatusCode.NOT_FOUND,))

    # -- leadership --------------------------------------------------------------------------
    def acquire_leader(self, name: str, ttl: int) -> Lease | None:
        base.check_leader_name(name)
        granted = None
        for _ in range(_ATTEMPTS):
            _, leader_kv, epoch_kv = self._read_leader()
            if leader_kv is not None:
                break
            epoch = int(epoch_kv.value) + 1 if epoch_kv else 1
            if granted is None:
                # If a later call fails, the lease is left to expire: nobody renews it.
                granted = self._call("grant lease", "Lease", "LeaseGrant",
                                     etcdrpc.LeaseGrantRequest(TTL=int(ttl)))
            resp = self._txn("acquire leader", [
                _cmp(self.layout.leader, "VERSION", 0),
                _cmp(self.layout.epoch, "MOD", epoch_kv.mod_revision if epoch_kv else 0),
            ], [
                _put(self.layout.leader, base.leader_value(name, epoch), granted.ID),
                _put(self.layout.epoch, str(epoch).encode()),
            ])
            if resp.succeeded:
                return Lease(granted.ID, name, epoch, int(granted.TTL))
        if granted is not None:
            try:
                self._revoke("revoke unused lease", granted.ID)
            except StoreError:
                pass   # it expires on its own
        return None

    def renew(self, lease: Lease) -> int:
        answer = self._call("renew lease", "Lease", "LeaseKeepAlive",
                            etcdrpc.LeaseKeepAliveRequest(ID=lease.id))
        if answer is None or answer.TTL <= 0:
            raise NotLeader(f"lease {lease.id:x} of {lease.name!r} expired")
        return int(answer.TTL)

    def resign(self, lease: Lease) -> None:
        # Revoking deletes the keys attached to the lease: the leader key if still ours.
        self._revoke("resign", lease.id)

    def leader(self) -> LeaderState:
        revision, leader_kv, epoch_kv = self._read_leader()
        epoch = int(epoch_kv.value) if epoch_kv else 0
        if leader_kv is None:
            return LeaderState(None, epoch, 0, revision)
        name, held_epoch = base.parse_leader_value(leader_kv.value)
        return LeaderState(name, held_epoch, leader_kv.lease, revision)

    def leader_changed(self, since_revision: int) -> bool:
        revision, leader_kv, epoch_kv = self._read_leader()
        if epoch_kv is not None and epoch_kv.mod_revision > since_revision:
            return True                      # an acquisition
        if leader_kv is not None:
            return leader_kv.mod_revision > since_revision
        if since_revision <= 0 or since_revision >= revision:
            return False                     # (revision 0 would mean "latest" to etcd)
        try:
            then = self._call("leader history", "KV", "Range",
                              etcdrpc.RangeRequest(key=self.layout.leader.encode(), revision=since_revision))
        except StoreError as exc:
            if exc.code == "OUT_OF_RANGE":
                return True                  # compacted: cannot tell, so say changed
            raise
        return then.count > 0                # held then, vacant now: resigned or expired

    # -- records -------------------------------------------------------------------------------
    def put_many(self, items: Mapping[str, bytes], *, leader_lease: Lease) -> int:
        named = base.check_batch(self.layout, items)
        resp = self._txn("put_many", self._fence(leader_lease), [_put(k, v) for k, v in named.items()])
        if not resp.succeeded:
            raise self._not_leader(leader_lease)
        return resp.header.revision

    def delete(self, conn_key: str, *, leader_lease: Lease) -> bool:
        name = self.layout.conn(conn_key)
        resp = self._txn("delete", self._fence(leader_lease), [_delete(name)])
        if not resp.succeeded:
            raise self._not_leader(leader_lease)
        return resp.responses[0].response_delete_range.deleted > 0

    def get_all(self, prefix: str = "", *, revision: int | None = None) -> Snapshot:
        for _ in range(_ATTEMPTS):
            try:
                return self._pages(prefix, revision)
            except StoreError as exc:
                # Compacted while paging at the revision we chose: start again at the latest.
                if revision is not None or exc.code != "OUT_OF_RANGE":
                    raise
        raise StoreError(f"etcd {','.join(self.endpoints)}: get_all: history compacted "
                         "under every attempt", "OUT_OF_RANGE")

    def _pages(self, prefix: str, revision: int | None) -> Snapshot:
        start = self.layout.conn_range(prefix).encode()
        end = prefix_range_end(start)
        rev, items, key = revision or 0, {}, start
        while True:
            # Every page after the first reads at the first page's revision: one snapshot.
            page = self._call("get_all", "KV", "Range", etcdrpc.RangeRequest(
                key=key, range_end=end, limit=self.page_size, revision=rev))
            rev = rev or page.header.revision
            for kv in page.kvs:
                items[self.layout.conn_key_of(kv.key.decode())] = kv.value
            if not page.more or not page.kvs:
                return Snapshot(rev, items)
            key = page.kvs[-1].key + b"\0"
