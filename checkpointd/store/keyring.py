"""The record keys: a small key file the operator provides, checked before use.

Format: one key per line, ``name:base64key``, 32-byte keys (AES-256). Blank lines and
lines starting with ``#`` are ignored. The *first* key is the current one: every record is
sealed with it. The others only open records, which is how keys rotate without a gap::

    1. prepend the new key on every host    (new:..., old:...)  new records use "new",
                                                                 old ones still open
    2. wait until every record was rewritten (one MSL: older records are refused anyway)
    3. drop the old key                      (new:...)

A key file readable or writable by group or others is refused (like ssh with private
keys): whoever reads the key can forge connection state (DESIGN.md, "Security").
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
from dataclasses import dataclass

from .errors import KeyringError

KEY_BYTES = 32
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, repr=False)
class Keyring:
    """Named record keys; ``keys[0]`` seals, all of them open."""

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self):
        if not self.keys:
            raise ValueError("a keyring needs at least one key")
        ids = [key_id for key_id, _ in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate key names in {ids}")
        for key_id, key in self.keys:
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"key name {key_id!r}: want 1-64 of [A-Za-z0-9._-]")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} has {len(key)} bytes, want {KEY_BYTES}")

    def __repr__(self) -> str:  # never print key material
        return f"Keyring(current={self.current_id!r}, ids={[k for k, _ in self.keys]!r})"

    @property
    def current_id(self) -> str:
        return self.keys[0][0]

    @property
    def current(self) -> tuple[str, bytes]:
        return self.keys[0]

    def get(self, key_id: str) -> bytes | None:
        for name, key in self.keys:
            if name == key_id:
                return key
        return None

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> "Keyring":
        """Parse key-file text; errors name the source and line, never the key."""
        keys = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key_id, sep, encoded = line.partition(":")
            if not sep:
                raise KeyringError(source, f"line {number}: want name:base64key")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(source, f"line {number}: key {key_id!r} is not valid base64") from None
            keys.append((key_id.strip(), key))
        if not keys:
            raise KeyringError(source, "no key in the file")
        try:
            return cls(tuple(keys))
        except ValueError as exc:
            raise KeyringError(source, str(exc)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Keyring":
        """Load a key file, refusing one that group or others may access.

        The mode is checked on the opened descriptor (fstat), so the file that is read is
        the file that was checked.
        """
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KeyringError(path, f"cannot open: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyringError(path, "not a regular file", stat.S_IMODE(st.st_mode))
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyringError(
                    path, f"mode {mode:04o} lets group or others access the record keys; "
                          f"run: chmod 600 {path}", mode)
            data = f.read(1 << 20)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise KeyringError(path, "not ASCII text") from None
        return cls.parse(text, source=path)


def new_key_line(key_id: str) -> str:
    """A fresh ``name:base64key`` line for the operator's key file (rotation step 1)."""
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"key name {key_id!r}: want 1-64 of [A-Za-z0-9._-]")
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"
