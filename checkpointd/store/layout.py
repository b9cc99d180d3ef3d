"""The key layout in etcd, in one place (documented in docs/store.md).

::

    /tcpcp/<cluster>/leader            JSON {"name", "epoch"}, attached to the leader's lease
    /tcpcp/<cluster>/epoch             decimal epoch counter; +1 on every acquisition
    /tcpcp/<cluster>/conn/<conn key>   one sealed checkpoint record per connection

A record is sealed with its full key name in the associated data, so the name is part of
the record's identity: a record copied to another connection or another cluster fails
authentication. Connection keys never contain ``/``, so a prefix of the ``conn/`` range
selects connection keys and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidKey

ROOT = "/tcpcp"
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
