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
- Every call carries a deadline (``timeout``), and the whole call is bounded by it: a try
  on another member after a refused connection, or a re-authentication, spends what is
  left of the same timeout, never a new one.

TLS and authentication (docs/security.md): whoever can write to etcd can move the leader
key past the fence and put back an older record of a connection, so the channel is
protected, not only the records.
- ``https://`` endpoints: channels built by pyetcd's ``Endpoint(secure=True, creds=...)``
  from ``grpc.ssl_channel_credentials``, with the CA bundle and, for etcd's
  ``--client-cert-auth``, a client certificate and key. PEM bytes are passed in, read once
  at start by :func:`store_from_config`, which names the setting whose file is unreadable
  (pyetcd's ``get_secure_creds`` would fail with a bare ``OSError`` instead). gRPC checks
  that the server certificate names the host or address dialled. One store never mixes
  ``http://`` and ``https://`` members: the fence would travel in the clear to some.
- User and password: etcd's ``Auth.Authenticate`` gives a token, sent as gRPC metadata
  ``token`` on every call. pyetcd's ``user=``/``password=`` are not used: it authenticates
  once, in its constructor (a network call on a random member, outside our timeout and
  failover, whose failure is a raw gRPC error) and never again. etcd forgets its simple
  tokens when it restarts and after ``--auth-token-ttl`` idle seconds (default 300), and
  may refuse a token older than a change to its users or roles; so a call refused for its
  token ("invalid auth token", "revision of auth store is old") authenticates again once
  and is repeated. The token is fetched on the first call, not in the constructor, so
  building a store never waits for etcd. The password is kept only for that; it is not
  in ``repr``, logs or errors.
- Failures say what to check: a TLS handshake failure names etcd.ca / etcd.cert / etcd.key,
  a refused password etcd.user / etcd.password, a permission refusal the key prefix the
  user needs.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Mapping, Sequence
from urllib.parse import urlsplit

import grpc
import pyetcd
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.utils import prefix_range_end

from ..config import Config, ConfigError
from . import base
from .base import CheckpointStore, LeaderState, Lease, Snapshot
from .errors import BatchTooLarge, NotLeader, StoreError, StoreUnavailable
from .layout import CONTROLS, Layout
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


def parse_endpoint(text: str, *, tls: bool = False) -> tuple[str, int]:
    """``host:port``, ``http(s)://host:port`` or ``[v6]:port`` -> (host for gRPC, port).

    The scheme must agree with ``tls`` (whether the store has a CA bundle): an ``https://``
    endpoint without one, or an ``http://`` one beside one, is refused rather than quietly
    spoken to in the clear. A bare ``host:port`` takes the store's scheme.
    """
    want = "https" if tls else "http"
    parts = urlsplit(text if "//" in text else f"{want}://{text}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise ValueError(f"etcd endpoint {text!r}: want {want}://host:port")
    if parts.scheme != want:
        raise ValueError(f"etcd endpoint {text!r}: https needs a CA bundle (etcd.ca)" if not tls else
                         f"etcd endpoint {text!r} is plain http, but TLS is configured (etcd.ca): "
                         "every endpoint must be https://")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host, port


def store_from_config(config: Config) -> EtcdStore:
    """The agent's store, built from its configuration (``checkpointd.config.Config``).

    ``timing.retry_timeout`` bounds every call. The TLS files are read here, once, at start,
    and checked (a PEM certificate in etcd.ca and etcd.cert, an unencrypted key in etcd.key
    that belongs to that certificate): a bad file is refused now with a ``ConfigError``
    naming the setting, rather than found later as a TLS handshake failing on every call.
    Endpoints whose scheme disagrees with the TLS settings are refused the same way.
    """
    def read(attr: str) -> bytes | None:
        path = getattr(config, attr)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(Config.setting_name(attr), f"cannot read {path}: {exc.strerror}") from None

    ca, cert, key = read("etcd_ca"), read("etcd_cert"), read("etcd_key")
    if cert is not None and ca is None:
        raise ConfigError("etcd.ca", "a client certificate (etcd.cert) is only used over TLS: "
                                     "set etcd.ca and https:// endpoints")
    certs = {}
    for attr, data in (("etcd_ca", ca), ("etcd_cert", cert)):
        if data is not None:
            try:
                certs[attr] = x509.load_pem_x509_certificates(data)
            except ValueError:
                raise ConfigError(Config.setting_name(attr),
                                  f"{getattr(config, attr)} holds no PEM certificate") from None
    if key is not None:
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:   # TypeError: encrypted, and no password
            raise ConfigError("etcd.key", f"{config.etcd_key} is not an unencrypted PEM private key "
                                          f"({type(exc).__name__})") from None
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if certs["etcd_cert"][0].public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
            raise ConfigError("etcd.key", f"{config.etcd_key} is not the key of the certificate "
                                          f"in etcd.cert ({config.etcd_cert})")
    try:
        return EtcdStore(config.etcd_endpoints, config.cluster_name, timeout=config.retry_timeout,
                         ca_cert=ca, client_cert=cert, client_key=key,
                         user=config.etcd_user, password=config.etcd_password)
    except ValueError as exc:
        raise ConfigError("etcd.endpoints", str(exc)) from None


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
                 time_retry: float = DEFAULT_TIME_RETRY, page_size: int = PAGE_SIZE,
                 ca_cert: bytes | None = None, client_cert: bytes | None = None,
                 client_key: bytes | None = None, user: str | None = None,
                 password: str | None = None):
        """``ca_cert`` (PEM bytes) turns TLS on, and every endpoint must then be https.
        ``client_cert`` and ``client_key`` (PEM, together, only with TLS) answer etcd's
        ``--client-cert-auth``. ``user`` and ``password`` (together) authenticate on the
        first call. Nothing here talks to etcd: a store is built even while etcd is down.
        """
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        if timeout <= 0 or page_size < 1:
            raise ValueError("timeout must be positive and page_size at least 1")
        if (client_cert is None) != (client_key is None):
            raise ValueError("a client certificate and its key come together")
        if client_cert is not None and ca_cert is None:
            raise ValueError("a client certificate needs TLS: give the CA bundle (etcd.ca) too")
        if (user is None) != (password is None):
            raise ValueError("etcd user and password come together")
        if user is not None and not (isinstance(user, str) and user and isinstance(password, str)):
            raise ValueError("etcd user must be a non-empty string and password a string")
        self.layout = Layout(cluster)
        self.endpoints = tuple(endpoints)
        self.timeout = float(timeout)
        self.page_size = page_size
        self.tls = ca_cert is not None
        self.user = user
        self._password = password            # only to authenticate; never printed
        self._token: str | None = None       # etcd's auth token, fetched on the first call
        self._auth_lock = threading.Lock()   # one Authenticate at a time, shared by threads
        self._last_failure: str | None = None
        opts = _channel_options(page_size)
        creds = grpc.ssl_channel_credentials(ca_cert, client_key, client_cert) if self.tls else None
        eps = [pyetcd.Endpoint(*parse_endpoint(e, tls=self.tls), secure=self.tls, creds=creds,
                               time_retry=time_retry, opts=opts)
               for e in self.endpoints]
        self._client = pyetcd.MultiEndpointEtcd3Client(endpoints=eps, timeout=self.timeout, failover=True)

    def __repr__(self) -> str:
        return f"EtcdStore({list(self.endpoints)!r}, cluster={self.layout.cluster!r})"

    def close(self) -> None:
        self._client.close()

    # -- calls: every one bounded by the timeout, every failure mapped to our errors ---------
    def _call(self, what: str, service: str, method: str, request, ok_codes=()):
        """One RPC; if the member refused the connection, once more on each other member.

        A timeout is not retried: the time is spent and a write's outcome is unknown. The
        tries on other members share the one timeout. Returns None for a status in
        ``ok_codes``.
        """
        deadline = time.monotonic() + self.timeout
        for attempt in range(len(self.endpoints)):
            try:
                return self._call_once(what, service, method, request, ok_codes, deadline)
            except _Refused:
                if attempt == len(self.endpoints) - 1:
                    raise

    def _call_once(self, what, service, method, request, ok_codes, deadline=None, reauth=True):
        """One RPC on pyetcd's current member, with the auth token when a user is set.

        A call refused for its token (etcd restarted, the token expired, users or roles
        changed since) authenticates again and is repeated once: etcd refused it before
        applying anything, so repeating a write is safe.
        """
        where = f"etcd {','.join(self.endpoints)}: {what}"
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        client = self._client
        token = None
        if self.user is not None and method != "Authenticate":
            token = self._auth_token(where, deadline)
        metadata = (("token", token),) if token is not None else None
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailable(f"{where}: no answer within {self.timeout:g} s")
            # A stub per call, on the channel of a member not marked failed (pyetcd's choice).
            rpc = getattr(getattr(etcdrpc, f"{service}Stub")(client.channel), method)
            if method == "LeaseKeepAlive":     # a stream: send one request, read one answer
                answers = rpc(iter([request]), left, metadata=metadata)
                try:
                    return next(answers, None)
                finally:
                    answers.cancel()
            return rpc(request, left, metadata=metadata)
        except etcd_exc.NoServerAvailableError:
            last = f" (last: {self._last_failure})" if self._last_failure else ""
            raise StoreUnavailable(f"{where}: every member failed within the last retry "
                                   f"interval{last}") from None
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code in ok_codes:
                return None
            if token is not None and reauth and (code == grpc.StatusCode.UNAUTHENTICATED
                                                 or "auth store is old" in details):
                if self._token == token:       # not already replaced by another thread
                    self._token = None
                return self._call_once(what, service, method, request, ok_codes, deadline, reauth=False)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.INTERNAL):
                client.endpoint_in_use.fail()   # as pyetcd does: the next call goes elsewhere
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._last_failure = f"no answer within {self.timeout:g} s"
                    raise StoreUnavailable(f"{where}: no answer within {self.timeout:g} s") from None
                hint = ""
                if self.tls and re.search(r"handshake|TSI_|SSL|certificate|verification", details, re.I):
                    # gRPC's texts for each case, as seen with grpcio 1.85 and etcd 3.4
                    hint = next((h for pattern, h in (
                        ("CERTIFICATE_VERIFY_FAILED", "etcd's certificate is not signed by a CA in etcd.ca"),
                        ("Hostname Verification", "etcd's certificate does not name this endpoint's "
                                                  "host or address"),
                        ("TSI_DATA_CORRUPTED|BAD_CERTIFICATE|CERTIFICATE_REQUIRED",
                         "etcd refused our client certificate: none given (etcd.cert, etcd.key) "
                         "or not signed by a CA etcd trusts (--trusted-ca-file)"),
                        ("Handshake read failed", "etcd closed the connection in the handshake: "
                                                  "does it serve TLS on this port?"))
                        if re.search(pattern, details)), "check etcd.ca, etcd.cert and etcd.key")
                    hint = f"; TLS failed: {hint}"
                self._last_failure = f"{code.name}: {details}{hint}"
                raise _Refused(f"{where}: {code.name}: {details}{hint}") from None
            if method == "Authenticate" and code == grpc.StatusCode.INVALID_ARGUMENT:
                raise StoreError(f"{where}: etcd refused user {self.user!r}: {details}; check "
                                 "etcd.user and etcd.password", "UNAUTHENTICATED") from None
            if method == "Authenticate" and code == grpc.StatusCode.FAILED_PRECONDITION:
                raise StoreError(f"{where}: etcd.user is set but this etcd does not authenticate "
                                 f"({details}): run etcdctl auth enable, or unset etcd.user",
                                 code.name) from None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                details += (f"; user {self.user!r} needs readwrite on the prefix {self.layout.base}"
                            if self.user is not None else "")
            elif "user name is empty" in details:
                details += "; etcd requires authentication: set etcd.user and etcd.password"
            raise StoreError(f"{where}: {code.name}: {details}", code.name) from None

    def _auth_token(self, where: str, deadline: float) -> str:
        """The token every call carries; one Authenticate for every thread, within the
        calling RPC's deadline."""
        if not self._auth_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise StoreUnavailable(f"{where}: no answer within {self.timeout:g} s (authenticating)")
        try:
            if self._token is None:
                answer = self._call_once("authenticate", "Auth", "Authenticate",
                                         etcdrpc.AuthenticateRequest(name=self.user, password=self._password),
                                         (), deadline)
                self._token = answer.token
            return self._token
        finally:
            self._auth_lock.release()

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
        if answer is None:   # the stream ended unanswered (a member without quorum)
            raise StoreUnavailable(f"etcd {','.join(self.endpoints)}: renew lease: the "
                                   "keepalive stream ended without an answer")
        if answer.TTL <= 0:  # etcd's answer for a lease it no longer has
            raise NotLeader(f"lease {lease.id:x} of {lease.name!r} expired")
        return int(answer.TTL)

    def resign(self, lease: Lease) -> None:
        # Revoking deletes the keys attached to the lease: the leader key if still ours.
        self._revoke("resign", lease.id)

    def lease_time_left(self, lease_id: int) -> tuple[int, int] | None:
        answer = self._call("lease time to live", "Lease", "LeaseTimeToLive",
                            etcdrpc.LeaseTimeToLiveRequest(ID=lease_id),
                            ok_codes=(grpc.StatusCode.NOT_FOUND,))
        if answer is None or answer.TTL == -1:
            return None
        return int(answer.TTL), int(answer.grantedTTL)

    def revoke_lapsed(self, lease_id: int) -> bool:
        answer = self._call("revoke lapsed lease", "Lease", "LeaseRevoke",
                            etcdrpc.LeaseRevokeRequest(ID=lease_id),
                            ok_codes=(grpc.StatusCode.NOT_FOUND,))
        return answer is not None

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

    def delete_many(self, conn_keys: list[str], *, leader_lease: Lease) -> int:
        names = [self.layout.conn(k) for k in conn_keys]
        if len(names) > base.MAX_TXN_OPS:
            raise BatchTooLarge("ops", len(names), base.MAX_TXN_OPS)
        resp = self._txn("delete_many", self._fence(leader_lease), [_delete(n) for n in names])
        if not resp.succeeded:
            raise self._not_leader(leader_lease)
        return sum(r.response_delete_range.deleted for r in resp.responses)

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

    # -- operator control keys and the leadership history (contract: base.py) -----------------
    # Plain puts, reads and deletes: nothing here is fenced (the operator holds no lease).
    def put_control(self, name: str, value: bytes) -> int:
        key, value = self.layout.control(name), base.check_control_value(value)
        return self._txn(f"put control {name}", [], [_put(key, value)]).header.revision

    def get_control(self, name: str) -> bytes | None:
        key = self.layout.control(name)
        resp = self._call(f"get control {name}", "KV", "Range", etcdrpc.RangeRequest(key=key.encode()))
        return resp.kvs[0].value if resp.kvs else None

    def get_controls(self) -> dict[str, bytes]:
        start = self.layout.control_prefix.encode()
        resp = self._call("get controls", "KV", "Range",
                          etcdrpc.RangeRequest(key=start, range_end=prefix_range_end(start)))
        names = {self.layout.control(n): n for n in CONTROLS}
        return {names[kv.key.decode()]: kv.value for kv in resp.kvs if kv.key.decode() in names}

    def delete_control(self, name: str) -> bool:
        key = self.layout.control(name)
        resp = self._txn(f"delete control {name}", [], [_delete(key)])
        return resp.responses[0].response_delete_range.deleted > 0

    def append_history(self, epoch: int, value: bytes) -> bool:
        key, value = self.layout.history(epoch), base.check_control_value(value)
        # create-only: a missing key compares as version 0
        return self._txn("append history", [_cmp(key, "VERSION", 0)], [_put(key, value)]).succeeded

    def history(self) -> list[tuple[int, bytes]]:
        start = self.layout.history_prefix.encode()
        end = prefix_range_end(start)
        for _ in range(_ATTEMPTS):
            rev, out, key = 0, [], start
            try:
                while True:
                    # later pages at the first page's revision, as in get_all; etcd returns
                    # keys in byte order, which zero-padding makes the order of the epochs
                    page = self._call("history", "KV", "Range", etcdrpc.RangeRequest(
                        key=key, range_end=end, limit=self.page_size, revision=rev))
                    rev = rev or page.header.revision
                    out.extend((self.layout.history_epoch_of(kv.key.decode()), kv.value)
                               for kv in page.kvs)
                    if not page.more or not page.kvs:
                        return out
                    key = page.kvs[-1].key + b"\0"
            except StoreError as exc:
                if exc.code != "OUT_OF_RANGE":   # compacted between pages: start again
                    raise
        raise StoreError(f"etcd {','.join(self.endpoints)}: history: compacted under every "
                         "attempt", "OUT_OF_RANGE")

    def revoke_leader(self, *, lease_id: int | None = None) -> bool:
        _, leader_kv, _ = self._read_leader()
        if leader_kv is None or (lease_id is not None and leader_kv.lease != lease_id):
            return False
        # the lease read above, not "whoever leads now": a newer leader's lease is never hit
        answer = self._call("revoke leader", "Lease", "LeaseRevoke",
                            etcdrpc.LeaseRevokeRequest(ID=leader_kv.lease),
                            ok_codes=(grpc.StatusCode.NOT_FOUND,))
        return answer is not None
