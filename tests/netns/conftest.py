"""Fixtures for the root-only suite: every host is a network namespace (kernel.topology).

Nothing here may outlive the test that made it: the ``topology`` fixture destroys its
namespaces whatever the test did, and the session ends by checking that no namespace this
process created is still there.
"""

import os

import pytest

from kernel import netns, topology as topology_mod
from kernel.topology import Topology


@pytest.fixture(autouse=True)
def _root_only():
    if os.geteuid() != 0:
        pytest.skip("the netns suite creates network namespaces: run it as root "
                    "(CAP_SYS_ADMIN and CAP_NET_ADMIN)")


@pytest.fixture
def topology():
    """A fresh peer/origin/destination network with IPv4 and IPv6, destroyed afterwards."""
    topo = Topology.create()
    try:
        yield topo
    finally:
        topo.destroy()


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left_behind():
    yield
    if os.geteuid() != 0:
        return
    leaked = [n for n in topology_mod.live() if netns.exists(n)]
    assert not leaked, f"network namespaces left behind: {leaked}"
