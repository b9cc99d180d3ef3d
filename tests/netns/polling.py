"""Waiting with a deadline, never a fixed sleep (shared by the namespace tests)."""

import time

import pytest


def until(check, timeout, what):
    """Poll ``check`` until it returns something truthy; fail saying ``what`` if not."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)
