"""The checkpoint store (issue 4): records, their sealing, and where they live.

- ``record``  CheckpointRecord, seal/open_, check_fresh, open_many (pure, root-free)
- ``keyring`` the operator's key file, with rotation and a permission check
- ``layout``  etcd key names
- ``base``    CheckpointStore, the abstract store whose docstrings are the contract
- ``memory``  the in-memory backend for unit tests (injectable clock)
- ``etcd``    the etcd v3 backend (imported on demand: it loads gRPC)

See docs/store.md.
"""

from .base import CheckpointStore, LeaderState, Lease, Snapshot, check_timing
from .errors import (REASONS, BatchTooLarge, InvalidKey, KeyringError, NotLeader, RecordError,
                     StoreError, StoreUnavailable)
from .keyring import Keyring, new_key_line
from .layout import Layout
from .record import CheckpointRecord, Opened, check_fresh, conn_key, open_, open_many, seal

__all__ = [
    "REASONS", "BatchTooLarge", "CheckpointRecord", "CheckpointStore", "InvalidKey", "Keyring",
    "KeyringError", "Layout", "LeaderState", "Lease", "NotLeader", "Opened", "RecordError",
    "Snapshot", "StoreError", "StoreUnavailable", "check_fresh", "check_timing", "conn_key",
    "new_key_line", "open_", "open_many", "seal",
]
