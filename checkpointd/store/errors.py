"""Errors of the checkpoint store and of checkpoint records.

Callers branch on data, not on text (see kernel/errors.py): a refused record carries a
``reason`` from a fixed set so that refusals are counted by reason; a batch over a bound
carries the bound, the value and the limit; an unreachable store is its own class because
the agent's answer to it (hold the ACK gate, keep serving, retry) differs from its answer to
being fenced (stop checkpointing, demote).
"""

from __future__ import annotations

from kernel.errors import TcpcpError

#: Why a record was refused. Counters and tests use these strings; never add one without
#: documenting it in docs/store.md.
REASONS = ("authentication", "epoch", "stale", "format", "version", "size")


class RecordError(TcpcpError, ValueError):
    """A checkpoint record that cannot be sealed or must not be restored.

    ``reason`` is one of :data:`REASONS`; ``key_name`` is the store key the record was read
    from (or was to be written to) when known.
    """

    def __init__(self, reason: str, message: str, key_name: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        where = f" ({key_name})" if key_name else ""
        super().__init__(f"checkpoint record refused{where}: {reason}: {message}")
        self.reason = reason
        self.key_name = key_name
        self.detail = message


class KeyringError(TcpcpError):
    """The key file is missing, unsafe or malformed. Names the path, never the key bytes."""

    def __init__(self, path: str, message: str, mode: int | None = None):
        super().__init__(f"key file {path}: {message}")
        self.path = path
        self.mode = mode


class StoreError(TcpcpError):
    """Base of every checkpoint-store failure.

    ``code`` is the backend's status name when it gave one (gRPC's ``"OUT_OF_RANGE"`` for a
    compacted revision, ``"INVALID_ARGUMENT"`` for a request etcd refuses), else None.
    """

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError):
    """The store did not answer within the timeout, or refused the connection.

    After a write raises this, the write may or may not have been applied: checkpoint
    writes are idempotent, so callers treat it as *not* committed (the ACK gate stays
    where it was) and retry. Treating an applied checkpoint as missing is safe; the reverse
    is not.
    """


class NotLeader(StoreError):
    """A fenced operation was refused: the caller's lease expired or another leader holds
    the leader key. Nothing was written. The caller must stop acting as the leader."""


class BatchTooLarge(StoreError):
    """A write exceeds a bound of the store (operations or bytes per transaction).

    ``bound`` names it (``"ops"`` or ``"bytes"``), ``value`` and ``limit`` are numbers, so
    the caller can split the batch. Raised before anything is sent; nothing was written.
    """

    def __init__(self, bound: str, value: int, limit: int):
        super().__init__(f"transaction too large: {bound} {value} exceeds the limit of {limit}")
        self.bound = bound
        self.value = value
        self.limit = limit


class InvalidKey(StoreError, ValueError):
    """A cluster name, connection key or leader name that the key layout cannot hold."""
