"""The key layout in etcd, in one place (documented in docs/store.md).

::

    /tcpcp/<cluster>/leader              JSON {"name", "epoch"}, attached to the leader's lease
    /tcpcp/<cluster>/epoch               decimal epoch counter; +1 on every acquisition
    /tcpcp/<cluster>/conn/<conn key>     one sealed checkpoint record per connection
    /tcpcp/<cluster>/control/switchover  JSON {"to", "from", "epoch", "requested_at"}: planned
                                         switchover; consumed by the next acquisition
    /tcpcp/<cluster>/control/failover    JSON {"to", "from", "epoch", "requested_at"}: written
                                         just before an operator revokes the leader's lease
    /tcpcp/<cluster>/control/pause       JSON {"paused_at", "by"}: no automatic fail-over
    /tcpcp/<cluster>/history/<epoch>     JSON {"epoch", "holder", "acquired_at", "reason"};
                                         epoch zero-padded to 20 digits; written once

A record is sealed with its full key name in the associated data, so the name is part of
the record's identity: a record copied to another connection or another cluster fails
authentication. Connection keys never contain ``/``, so a prefix of the ``conn/`` range
selects connection keys and nothing else; control and history keys live in ranges of their
own for the same reason (``get_all`` never sees them).

Control keys are the operator's requests (``resurrect pause``, ``switchover``, ``failover``),
as ``patronictl`` writes Patroni's ``/failover`` and ``/pause`` keys: the agents read them,
nobody is fenced for writing them. Their names are a closed set (:data:`CONTROLS`), so a typo
is refused instead of writing a key no agent reads. History keys are zero-padded so that
etcd's byte order of the keys is the numeric order of the epochs (2^64 has 20 digits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidKey

ROOT = "/tcpcp"
#: Operator control keys the agents read (docs/operations-cli.md says what each one asks).
CONTROL_SWITCHOVER = "switchover"
CONTROL_FAILOVER = "failover"
CONTROL_PAUSE = "pause"
CONTROLS = (CONTROL_SWITCHOVER, CONTROL_FAILOVER, CONTROL_PAUSE)
#: Digits of a history key's epoch: 2^64 - 1 has 20, so every u64 epoch sorts numerically.
HISTORY_DIGITS = 20
_CLUSTER = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CONN_KEY = re.compile(r"[A-Za-z0-9._:\[\]-]{1,200}")
_CONN_PREFIX = re.compile(r"[A-Za-z0-9._:\[\]-]{0,200}")


def check_conn_key(conn_key: str) -> str:
    """Return ``conn_key`` if the layout can hold it, else raise InvalidKey."""
    if not isinstance(conn_key, str) or not _CONN_KEY.fullmatch(conn_key):
        raise InvalidKey(f"connection key {conn_key!r}: want 1-200 of [A-Za-z0-9._:[]-]")
    return conn_key


@dataclass(frozen=True)
class Layout:
    """Key names of one cluster (one primary/standby group sharing a leader key)."""

    cluster: str

    def __post_init__(self):
        if not isinstance(self.cluster, str) or not _CLUSTER.fullmatch(self.cluster):
            raise InvalidKey(f"cluster name {self.cluster!r}: want 1-64 of [A-Za-z0-9._-]")

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.cluster}/"

    @property
    def leader(self) -> str:
        return self.base + "leader"

    @property
    def epoch(self) -> str:
        return self.base + "epoch"

    @property
    def conn_prefix(self) -> str:
        return self.base + "conn/"

    def conn(self, conn_key: str) -> str:
        """The key name a connection's record lives under (and is sealed to)."""
        return self.conn_prefix + check_conn_key(conn_key)

    def conn_range(self, prefix: str = "") -> str:
        """The key prefix selecting the connection keys that start with ``prefix``."""
        if not isinstance(prefix, str) or not _CONN_PREFIX.fullmatch(prefix):
            raise InvalidKey(f"connection key prefix {prefix!r}")
        return self.conn_prefix + prefix

    def conn_key_of(self, key_name: str) -> str:
        """Inverse of :meth:`conn`; raises InvalidKey for a name outside ``conn/``."""
        if not key_name.startswith(self.conn_prefix):
            raise InvalidKey(f"{key_name!r} is not under {self.conn_prefix}")
        return check_conn_key(key_name[len(self.conn_prefix):])

    # -- operator control keys and the leadership history ----------------------------------
    @property
    def control_prefix(self) -> str:
        return self.base + "control/"

    def control(self, name: str) -> str:
        """The key name of one operator control key; InvalidKey for a name not in CONTROLS."""
        if name not in CONTROLS:
            raise InvalidKey(f"control key {name!r}: want one of {', '.join(CONTROLS)}")
        return self.control_prefix + name

    @property
    def history_prefix(self) -> str:
        return self.base + "history/"

    def history(self, epoch: int) -> str:
        """The key name of the history entry of ``epoch`` (1 .. 2^64 - 1)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 < epoch < 1 << 64:
            raise InvalidKey(f"history epoch {epoch!r}: want 1 .. 2^64 - 1")
        return f"{self.history_prefix}{epoch:0{HISTORY_DIGITS}d}"

    def history_epoch_of(self, key_name: str) -> int:
        """Inverse of :meth:`history`; InvalidKey for a name that is not a history key."""
        digits = key_name[len(self.history_prefix):] if key_name.startswith(self.history_prefix) else ""
        if len(digits) != HISTORY_DIGITS or not digits.isdigit() or not digits.isascii():
            raise InvalidKey(f"{key_name!r} is not a history key under {self.history_prefix}")
        return int(digits)
