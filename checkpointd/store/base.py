"""The checkpoint store: an abstract class whose docstrings are the contract.

Patroni's store (``patroni/dcs/__init__.py``) is the model: small primitives, each with its
atomicity stated, implemented once per backend (``memory.py`` for unit tests, ``etcd.py``
for real). Decisions (whether to take over, which records to restore) are not made here;
they are pure functions of what these primitives return.

The leader key is both the lock and the fence. Leadership is a lease (TTL, renewed by the
holder); the leader key is attached to it, so it vanishes when the holder stops renewing.
Every write that only a leader may make (``put_many``, ``delete``) is one transaction that
first compares the leader key with the caller's :class:`Lease`, so a primary that was
paused, partitioned or replaced cannot write, whatever it believes. Each acquisition
increments the epoch in the same transaction: records carry the epoch that wrote them.

Operator control keys (``put_control`` ...) and the leadership history (``append_history``)
are deliberately not fenced: the operator who asks for a pause or a switchover holds no
lease, and a leader's history entry is create-only instead.

Timing (checked, not hoped for: :func:`check_timing`): a leader renews every ``loop_wait``
seconds, each call may take ``timeout``; ``loop_wait + 2 * timeout <= ttl`` keeps a
healthy leader from losing its lease to a single slow call.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import Mapping

from .errors import BatchTooLarge, InvalidKey
from .layout import Layout

#: etcd's default --max-txn-ops: at most 128 operations in one transaction.
MAX_TXN_OPS = 128
#: etcd refuses requests over 1.5 MiB (--max-request-bytes 1572864); keys and values of
#: one ``put_many`` stay under this, leaving room for the transaction's own framing.
MAX_TXN_BYTES = 1_400_000


@dataclass(frozen=True)
class Lease:
    """Proof of leadership from :meth:`CheckpointStore.acquire_leader`.

    Pass it to every fenced write. ``epoch`` is the epoch this leadership began; records
    written under it carry it. ``ttl`` is what the store granted (etcd may round it up).
    """

    id: int
    name: str
    epoch: int
    ttl: int


@dataclass(frozen=True)
class LeaderState:
    """What the leader key said at store revision ``revision``.

    ``name`` is None when nobody holds it; ``epoch`` is then the epoch of the last leader
    (0 if there never was one), which is the epoch whose records a new leader restores.
    """

    name: str | None
    epoch: int
    lease_id: int
    revision: int

    @property
    def vacant(self) -> bool:
        return self.name is None


@dataclass(frozen=True)
class Snapshot:
    """Connection records as of one store revision: conn key -> sealed record."""

    revision: int
    items: Mapping[str, bytes]


def leader_value(name: str, epoch: int) -> bytes:
    """The leader key's value. Fenced writes compare it as well as the lease."""
    return json.dumps({"name": name, "epoch": epoch}, sort_keys=True, separators=(",", ":")).encode()


def parse_leader_value(value: bytes) -> tuple[str, int]:
    data = json.loads(value)
    return str(data["name"]), int(data["epoch"])


def check_leader_name(name: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 256 or not name.isprintable():
        raise InvalidKey(f"leader name {name!r}: want 1-256 printable characters")
    return name


# -- operator control and history values ---------------------------------------------------
# One place for their shape, so that the operator command that writes them and the agents
# that read them cannot disagree (docs/operations-cli.md, "Control keys"). Values are compact
# JSON objects; readers tolerate fields they do not know (a newer writer may add some) and
# refuse missing or mistyped ones. Times are wall-clock nanoseconds (CLOCK_REALTIME): they
# are compared across hosts only against bounds that allow for clock skew.

#: Largest value of a control or history key. They are small JSON objects; the bound keeps a
#: mistaken write from filling etcd, and every agent's reads, with megabytes.
MAX_CONTROL_BYTES = 4096

_CONTROL_FIELDS = {
    # a planned switchover of the leader ``from`` (holding ``epoch``) to the host ``to``
    "switchover": {"to": str, "from": str, "epoch": int, "requested_at": int},
    # a forced fail-over: the lease of ``from``/``epoch`` is being revoked; ``to`` or None
    "failover": {"to": (str, type(None)), "from": str, "epoch": int, "requested_at": int},
    # no automatic fail-over since ``paused_at``, asked by ``by`` (user@host)
    "pause": {"paused_at": int, "by": str},
}
_HISTORY_FIELDS = {"epoch": int, "holder": str, "acquired_at": int, "reason": str}


def _compact(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _checked(what: str, data: dict, fields: Mapping[str, type | tuple]) -> dict:
    for name, kind in fields.items():
        if name not in data:
            raise ValueError(f"{what}: field {name!r} missing")
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{what}: field {name!r} is {type(value).__name__}")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{what}: field {name!r} is negative")
    return data


def control_value(name: str, **fields) -> bytes:
    """The value of control key ``name`` (``to``/``from``/... as keyword arguments; ``from``
    is a keyword, so pass ``from_``). Raises ValueError for a missing or mistyped field."""
    if name not in _CONTROL_FIELDS:
        raise InvalidKey(f"control key {name!r}: want one of {', '.join(_CONTROL_FIELDS)}")
    data = {key.rstrip("_"): value for key, value in fields.items()}
    return check_control_value(_compact(_checked(f"control {name}", data, _CONTROL_FIELDS[name])))


def parse_control_value(name: str, value: bytes) -> dict:
    """Decode and check a control key's value; ValueError names what is wrong with it."""
    if name not in _CONTROL_FIELDS:
        raise InvalidKey(f"control key {name!r}: want one of {', '.join(_CONTROL_FIELDS)}")
    return _checked(f"control {name}", _json_object(f"control {name}", value), _CONTROL_FIELDS[name])


def history_value(*, epoch: int, holder: str, acquired_at: int, reason: str) -> bytes:
    """The value of the history entry written when ``holder`` acquired ``epoch``."""
    data = {"epoch": epoch, "holder": holder, "acquired_at": acquired_at, "reason": reason}
    return check_control_value(_compact(_checked("history", data, _HISTORY_FIELDS)))


def parse_history_value(value: bytes) -> dict:
    return _checked("history", _json_object("history", value), _HISTORY_FIELDS)


def _json_object(what: str, value: bytes) -> dict:
    try:
        data = json.loads(bytes(value))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: not a JSON object")
    return data


def check_control_value(value: bytes) -> bytes:
    """Control and history values are bytes of at most MAX_CONTROL_BYTES (ValueError)."""
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"a control value is bytes, not {type(value).__name__}")
    if len(value) > MAX_CONTROL_BYTES:
        raise ValueError(f"a control value of {len(value)} bytes exceeds {MAX_CONTROL_BYTES}")
    return bytes(value)


def check_batch(layout: Layout, items: Mapping[str, bytes]) -> dict[str, bytes]:
    """Map conn keys to key names and enforce the transaction bounds before sending.

    Pure. Raises InvalidKey or BatchTooLarge; the caller splits a batch that is too large.
    """
    if len(items) > MAX_TXN_OPS:
        raise BatchTooLarge("ops", len(items), MAX_TXN_OPS)
    named = {layout.conn(key): bytes(value) for key, value in items.items()}
    size = sum(len(name) + len(value) for name, value in named.items())
    if size > MAX_TXN_BYTES:
        raise BatchTooLarge("bytes", size, MAX_TXN_BYTES)
    return named


def check_timing(*, ttl: float, loop_wait: float, timeout: float) -> None:
    """Patroni's rule: a leader that renews every ``loop_wait`` with calls that may each
    take ``timeout`` must not lose a ``ttl`` lease to one slow call. Raises ValueError."""
    if loop_wait + 2 * timeout > ttl:
        raise ValueError(f"loop_wait ({loop_wait:g} s) + 2 * timeout ({timeout:g} s) "
                         f"exceeds the leader TTL ({ttl:g} s): a single slow call would "
                         "cost the leader its lease")


class CheckpointStore(abc.ABC):
    """Where checkpoints and the leader key live. One instance per agent process.

    Every method either completes or raises; none blocks longer than the store's timeout
    (plus, for the reads that page, one timeout per page). Errors:
    :class:`~.errors.StoreUnavailable` when the store does not answer (a write's outcome is
    then unknown, see its docstring), :class:`~.errors.NotLeader` when a fenced operation
    is refused, :class:`~.errors.BatchTooLarge` / :class:`~.errors.InvalidKey` before
    anything is sent.
    """

    layout: Layout

    # -- leadership -----------------------------------------------------------------------
    @abc.abstractmethod
    def acquire_leader(self, name: str, ttl: int) -> Lease | None:
        """Take the leader key if nobody holds it; return the new Lease, or None.

        Atomic: in one transaction, only if the leader key is absent and the epoch counter
        is unchanged since it was read, the leader key is created (attached to a fresh
        lease of ``ttl`` seconds) and the epoch counter is incremented. So two contenders
        never both succeed, and every successful acquisition, including the same name's
        after its lease expired, has its own epoch: the first is 1. Returns None, without
        creating a lease, when the key is held (by anyone, this name included).
        """

    @abc.abstractmethod
    def renew(self, lease: Lease) -> int:
        """Refresh the lease once; return the TTL it now has (seconds).

        Raises NotLeader if the lease has already expired: the leader key is gone with it
        and may be someone else's. Renewal does not check the leader key itself; the fenced
        writes do.
        """

    @abc.abstractmethod
    def resign(self, lease: Lease) -> None:
        """Give up leadership: delete the leader key if it is still this lease's, revoke
        the lease. Idempotent; a lease that already expired is not an error. The epoch is
        not changed: the next acquisition increments it."""

    @abc.abstractmethod
    def lease_time_left(self, lease_id: int) -> tuple[int, int] | None:
        """(seconds left, granted TTL) of a lease by the store's own clock, or None if it
        no longer exists. Seconds are whole and truncated toward zero, as etcd reports
        them: a lease with 0.9 s left, or one 0.9 s past its expiry that the store has not
        swept yet, both read 0. Read from the store's leader (etcd forwards it there),
        whose clock alone decides expiry."""

    @abc.abstractmethod
    def revoke_lapsed(self, lease_id: int) -> bool:
        """Revoke a lease that the caller has established is past its logical TTL (see
        ``decide.lease_lapsed``): the keys attached to it, the leader key among them,
        are deleted at once instead of at the store's next expiry sweep. Returns whether
        the lease still existed. Idempotent."""

    @abc.abstractmethod
    def leader(self) -> LeaderState:
        """The leader key and the epoch counter, read together at one revision."""

    @abc.abstractmethod
    def leader_changed(self, since_revision: int) -> bool:
        """Whether the leader key was acquired, deleted or expired after store revision
        ``since_revision`` (take it from :attr:`LeaderState.revision`).

        A cheap poll for the HA loop. It may answer True spuriously (for instance when the
        store no longer keeps the history needed to tell); it never misses a change that it
        can see. On True, read :meth:`leader` again.
        """

    # -- records ---------------------------------------------------------------------------
    @abc.abstractmethod
    def put_many(self, items: Mapping[str, bytes], *, leader_lease: Lease) -> int:
        """Write sealed records (conn key -> blob) all or nothing; return the revision.

        Atomic and fenced: one transaction that compares the leader key's lease and value
        with ``leader_lease`` and writes every record only if both match; otherwise
        nothing is written and NotLeader is raised. An empty ``items`` is a fenced no-op
        that checks leadership. Bounded by MAX_TXN_OPS records and MAX_TXN_BYTES bytes
        (BatchTooLarge before sending). On StoreUnavailable the transaction may or may not
        have been applied: it is idempotent, and the caller treats it as not committed.
        Records are not attached to the lease: they outlive the leader that wrote them.
        """

    @abc.abstractmethod
    def delete(self, conn_key: str, *, leader_lease: Lease) -> bool:
        """Remove one connection's record (the connection closed); fenced like put_many.

        Returns whether a record was there. Raises NotLeader without deleting anything if
        ``leader_lease`` no longer holds the leader key.
        """

    @abc.abstractmethod
    def delete_many(self, conn_keys: list[str], *, leader_lease: Lease) -> int:
        """Remove several connections' records in one fenced transaction (at most
        MAX_TXN_OPS keys); return how many were there. All or nothing, like put_many:
        NotLeader and nothing deleted if ``leader_lease`` no longer holds the key. A
        thousand connections that end together must not cost a thousand round trips
        while their records wait to be resurrected by mistake."""

    @abc.abstractmethod
    def get_all(self, prefix: str = "", *, revision: int | None = None) -> Snapshot:
        """Every record whose conn key starts with ``prefix``, as of a single revision.

        Consistent: all records are as of ``Snapshot.revision`` (the latest, or
        ``revision`` if given), even if the backend reads them in several pages while
        writers continue. Not fenced: a standby reads while the leader writes.
        """

    # -- operator control keys and the leadership history ---------------------------------
    # Not fenced: the operator who writes a control key holds no lease, and a history entry
    # is written by a leader about its own acquisition, which nobody else can write for it
    # (the key is create-only). Names: layout.CONTROLS; values: control_value/history_value.
    @abc.abstractmethod
    def put_control(self, name: str, value: bytes) -> int:
        """Write control key ``name`` (replacing any value it had); return the revision.

        One unconditional put, not fenced: the operator is not the leader. A request that
        replaces a pending one of the same name wins (the agents read the newest). On
        StoreUnavailable the write may or may not have landed: read it back
        (:meth:`get_control`) before writing it again. InvalidKey for an unknown name,
        ValueError for a value over MAX_CONTROL_BYTES, both before anything is sent.
        """

    @abc.abstractmethod
    def get_control(self, name: str) -> bytes | None:
        """The value of control key ``name``, or None when it is absent. One read."""

    def get_controls(self) -> dict[str, bytes]:
        """Every control key present (name -> value), as of one revision where the backend
        can (etcd: one range read of the control prefix). The agent reads them on every
        HA cycle, which must stay short enough to renew in time."""
        from .layout import CONTROLS
        return {n: v for n in CONTROLS if (v := self.get_control(n)) is not None}

    @abc.abstractmethod
    def delete_control(self, name: str) -> bool:
        """Delete control key ``name``; return whether it existed. One delete, not fenced
        (``resurrect resume`` deletes the pause key; the new primary consumes a switchover
        key). Idempotent."""

    @abc.abstractmethod
    def append_history(self, epoch: int, value: bytes) -> bool:
        """Record who acquired ``epoch`` and why; return whether this call wrote it.

        Create-only: one transaction that writes the entry only if its key is absent, so an
        epoch's entry is written once and never rewritten (a retry after StoreUnavailable
        returns False if the first attempt landed). Not fenced: only the holder of
        ``epoch`` knows it acquired it, and the key is never attached to a lease, so the
        history outlives every leader.
        """

    @abc.abstractmethod
    def history(self) -> list[tuple[int, bytes]]:
        """Every history entry as (epoch, value), oldest epoch first, read at one revision
        (pages at the first page's revision, like ``get_all``)."""

    @abc.abstractmethod
    def revoke_leader(self, *, lease_id: int | None = None) -> bool:
        """Forced fail-over: revoke the lease the leader key is attached to, so the key
        vanishes at once. Returns whether a lease was revoked.

        Reads the leader key, then revokes the lease it names: a lease that another host
        acquired between the two is never touched (revoking the read lease, gone or not,
        cannot remove a newer key). With ``lease_id``, revokes only if the leader key is
        still attached to that lease (the one the operator confirmed); False otherwise and
        when nobody holds the key. The epoch counter is not changed. The old primary
        learns at its next renewal ("lease not found") and must fence at once; standbys
        must not resurrect before it can have done so (docs/operations-cli.md, "failover").
        """

    def close(self) -> None:
        """Release connections. The store must not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
