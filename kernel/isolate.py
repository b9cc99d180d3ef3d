"""Isolation: make an endpoint silent and deaf while it is being passed (paper, step 2).

The paper's patch used a per-socket filter; here it is one nftables table in the host's
network namespace with a set of isolated 4-tuples, and a drop rule in the input and
output hooks. Adding or removing a connection is a set element (the per-connection rule),
so isolating a thousand connections is one nft transaction, not a thousand rules.

Repair mode alone does not isolate: a socket in repair mode still processes incoming
segments and still transmits from its queues, so the rules are what freeze its state.

``nft`` runs in the network namespace of the calling thread (a forked child inherits the
thread's namespace), so callers enter the host's namespace first.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import subprocess
from typing import Iterable

from .errors import KernelError, PrivilegeError

TABLE = "tcpcp_isolate"

# Priority -300: before conntrack (-200) so an isolated flow leaves no conntrack trace.
_RULESET = f"""
table inet {TABLE} {{
    set v4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}
    set v6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}
    chain input {{
        type filter hook input priority -300; policy accept;
        ip daddr . tcp dport . ip saddr . tcp sport @v4 counter drop
        ip6 daddr . tcp dport . ip6 saddr . tcp sport @v6 counter drop
    }}
    chain output {{
        type filter hook output priority -300; policy accept;
        ip saddr . tcp sport . ip daddr . tcp dport @v4 counter drop
        ip6 saddr . tcp sport . ip6 daddr . tcp dport @v6 counter drop
    }}
}}
"""

Tuple4 = tuple[str, int, str, int]  # local address, local port, remote address, remote port


def nft(script: str, step: str) -> str:
    """Run an nft script atomically (one transaction); raise KernelError with nft's words."""
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script, text=True,
                              capture_output=True, timeout=30)
    except FileNotFoundError:
        raise KernelError(step, 2, "nft not found: install the nftables package") from None
    if done.returncode != 0:
        text = done.stderr.strip()
        if "Operation not permitted" in text:
            raise PrivilegeError(step, 1, "nftables needs CAP_NET_ADMIN")
        raise KernelError(step, 22, text)
    return done.stdout


def elements(tuples: Iterable[Tuple4]) -> tuple[list[str], list[str]]:
    """nft set elements for the v4 and v6 sets (pure: tested without root)."""
    v4, v6 = [], []
    for laddr, lport, raddr, rport in tuples:
        local, remote = _ip(str(laddr)), _ip(str(raddr))
        if local.version != remote.version:
            raise ValueError(f"mixed address families in {laddr} -> {raddr}")
        (v4 if local.version == 4 else v6).append(f"{local} . {int(lport)} . {remote} . {int(rport)}")
    return v4, v6


@functools.lru_cache(maxsize=4096)
def _ip(text: str):
    return ipaddress.ip_address(text)


def _element_script(verb: str, tuples: Iterable[Tuple4]) -> str:
    v4, v6 = elements(tuples)
    lines = []
    for name, items in (("v4", v4), ("v6", v6)):
        if items:
            lines.append(f"{verb} element inet {TABLE} {name} {{ {', '.join(items)} }}")
    return "\n".join(lines) + "\n" if lines else ""


class Isolation:
    """The isolated set of one host (one network namespace)."""

    def __init__(self):
        self._ready = False

    def ensure(self) -> None:
        """Create the table once; an existing table (and what it isolates) is kept."""
        if self._ready:
            return
        probe = subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True, text=True)
        if probe.returncode != 0:
            nft(_RULESET, "nft create isolation table")
        self._ready = True

    def isolate(self, tuples: Iterable[Tuple4]) -> None:
        """Drop everything to and from these connections, from now on."""
        script = _element_script("add", tuples)
        if script:
            self.ensure()
            nft(script, "isolate")

    def release(self, tuples: Iterable[Tuple4]) -> None:
        """Remove the per-connection rules (after the pass, or to undo a failed one).

        Idempotent: an undo path must be able to release what it may never have isolated.
        nft refuses a whole batch if one element is missing, so on failure each element is
        retried alone and "not there" is ignored.
        """
        tuples = list(tuples)
        script = _element_script("delete", tuples)
        if not script:
            return
        self.ensure()
        try:
            nft(script, "un-isolate")
        except KernelError:
            for one in tuples:
                try:
                    nft(_element_script("delete", [one]), "un-isolate")
                except KernelError as exc:
                    if "No such file or directory" not in str(exc):
                        raise

    def isolated(self) -> set[str]:
        """The set elements now present, as nft prints them (for tests and operators)."""
        out = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return set()
        found = set()
        for item in json.loads(out.stdout).get("nftables", []):
            for elem in item.get("set", {}).get("elem", []) or []:
                found.add(json.dumps(elem, sort_keys=True))
        return found

    def remove_table(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True)
        self._ready = False


def tuple_of(ici) -> Tuple4:
    return (str(ici.local_addr), ici.local_port, str(ici.remote_addr), ici.remote_port)
