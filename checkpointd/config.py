"""checkpointd's configuration: one TOML file, environment overrides, rules checked at load.

A ``Config`` is frozen and always valid: its constructor checks every field and every
timing rule, so a bad value is refused where it is written, with the field named
(``ConfigError.field`` is the TOML name, ``"timing.lease_ttl"``), never discovered
later by a primary that fences too late.

Sources, later ones winning: the defaults below, the file, then the environment
``TCPCP_<SECTION>_<KEY>`` (``TCPCP_TIMING_LEASE_TTL=1``; lists are comma-separated,
``TCPCP_NETWORK_VIPS=192.0.2.10,2001:db8::10``; an empty value clears an optional
setting). A ``TCPCP_`` variable naming one of our sections but an unknown key is refused
(a typo must not silently leave a default in force); other ``TCPCP_`` variables are not
ours and are ignored.

Settings (section.key, unit, default)::

    cluster.name                 name of the HA pair; prefixes every etcd key     required
    cluster.host                 this host's name in the leader key                required
    etcd.endpoints               URLs, http:// or https://                         required
    etcd.cert / etcd.key         client certificate and its key (TLS), together    none
    etcd.ca                      CA bundle for https endpoints                     none
    etcd.user / etcd.password    etcd authentication, together                     none
    security.key_file            AEAD key for checkpoint records                   required
    network.vips                 virtual IPs, IPv4 and/or IPv6                      required
    network.interface            the interface that carries them                   required
    timing.lease_ttl             s, leader key lease TTL                           5
    timing.renew_interval        s, between lease renewals (Patroni's loop_wait)   1
    timing.retry_timeout         s, one etcd request may take this long            1
    timing.fence_margin          s, fence this long before the lease can expire    0.5
    timing.checkpoint_interval   s, between periodic checkpoints of a connection   10
    timing.commit_interval       s, group-commit batching (the ACK gate's delay)   0.01
    timing.msl                   s, maximum segment lifetime: oldest resurrectable 120
    timing.clock_skew            s, bound on wall-clock difference between hosts   0.1
    timing.unprotected_grace     s, etcd without quorum: hold the ACK gate this    10
                                 long, then release it (inf: never)
    bounds.checkpoint_bytes      bytes in either direction that force a checkpoint 2^29
    bounds.max_bytes             bytes in either direction after which output is   2^30
                                 held until a checkpoint is durable
    app.socket                   Unix socket the application library connects to   /run/tcpcp/app.sock
    api.listen                   REST API and /metrics: host:port or [v6]:port;    127.0.0.1:8008
                                 empty: no API
    api.partners                 the other agents' REST APIs (http://host:port), told   none
                                 when this host releases the leader key
    api.failsafe                 ask the partners for fail-safe when etcd is          true
                                 unreachable (docs/failover.md); false: fence
    log.format                   text or json (one JSON object per line)           text
    switchover.pass              a switchover passes connections live (the paper's   true
                                 Section 2: frozen application, whole queues) to the
                                 target's API; false: final checkpoint and resurrection
    switchover.freeze_timeout    s, how long a switchover waits for the applications 0.5
                                 to reach a quiescent point; the late ones go by
                                 checkpoint

Rules checked at load (timings in seconds; names as above, section omitted)::

    R1  every interval > 0; clock_skew >= 0; unprotected_grace >= 0
    R2  renew_interval + 2*retry_timeout <= lease_ttl
            Patroni's loop_wait + 2*retry_timeout <= ttl: a renewal that fails after a
            full retry_timeout can be retried once before the lease could lapse.
    R3  fence_margin >= 0.1
            the fencing deadline (last_renew + lease_ttl - fence_margin) is strictly before
            the earliest moment etcd can expire the lease (last_renew is when the
            successful keepalive was *sent*, so etcd's expiry is later still); the margin
            covers silencing the connections, scheduling delay and clock-rate drift.
    R4  renew_interval + 2*retry_timeout <= lease_ttl - fence_margin
            R2 again, against the fencing deadline instead of the expiry: one slow etcd
            request alone never makes a primary fence.
    R5  checkpoint_interval < msl / 2
    R6  checkpoint_interval + lease_ttl + clock_skew < msl
            when a standby can first resurrect (the lease has lapsed), the newest
            checkpoint is at most checkpoint_interval + lease_ttl old by the origin's clock,
            plus clock_skew by the standby's: it must still be within the MSL.
    R7  commit_interval <= checkpoint_interval and commit_interval < 0.2
            the ACK gate holds a peer's ACK up to one commit interval; beyond the peer's
            minimum RTO (Linux TCP_RTO_MIN, 200 ms) the peer retransmits for nothing.
    R8  0 < checkpoint_bytes < max_bytes < 2^31
            fewer than 2^31 bytes may move between checkpoints (the paper, 6.1): past it a
            32-bit sequence number no longer names one stream offset. A checkpoint is
            forced at checkpoint_bytes; max_bytes is where output stops until one is
            durable; the space between is the headroom for that commit.
    R9  etcd: https endpoints need etcd.ca; cert and key come together; user and
        password come together; every endpoint is an http(s)://host:port URL
    R10 cluster.name and cluster.host: 1-63 characters [A-Za-z0-9._-] (they are parts
        of etcd keys); network.interface: a Linux interface name (1-15 characters, no
        '/' or whitespace); network.vips: at least one, no duplicates; app.socket and
        every path: absolute; api.listen: empty, or host:port where host is an IPv4
        address, a host name or a bracketed IPv6 address and port is 0-65535 (0: any
        free port, logged at start); log.format: text or json
    R11 with api.partners and api.failsafe: renew_interval + 3*retry_timeout + 0.1 <= lease_ttl - fence_margin
            fail-safe must fit before the fencing deadline: a renewal that times out, then
            the question to the partner, which may first try etcd itself (one more
            retry_timeout), plus 0.1 s for the round trip and scheduling.

switchover.freeze_timeout needs no rule: while the applications freeze (they still
serve, unisolated) the wait is cut short at the fencing deadline of the newest renewal
less fence_margin, whatever the setting (checkpointd/switchover.py; the lease is renewed
meanwhile, Agent._renewing).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from kernel.errors import TcpcpError

BYTES_BOUND = 1 << 31            # the paper's bound: fewer than 2^31 bytes between checkpoints
TCP_RTO_MIN = 0.2                # s, include/net/tcp.h
MIN_FENCE_MARGIN = 0.1           # s
ENV_PREFIX = "TCPCP_"


class ConfigError(TcpcpError, ValueError):
    """A configuration that must not be used. ``field`` is the TOML name of the setting
    (``"timing.lease_ttl"``), or ``"file"`` for a file that cannot be read or parsed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"invalid configuration: {field}: {message}")
        self.field = field
        self.reason = message


# -- the schema ------------------------------------------------------------------------
# Each Config field carries its section, its key and its kind in its metadata; the
# loader, the environment names and the error messages all come from there.

def _setting(section: str, key: str, kind: str, default: Any = dataclasses.MISSING):
    meta = {"section": section, "key": key, "kind": kind}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


_NAME = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
LOG_FORMATS = ("text", "json")


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8008"`` -> ``("127.0.0.1", 8008)``; ``"[::1]:8008"`` -> ``("::1", 8008)``.

    The host is an IPv4 address, a host name, or an IPv6 address in brackets (a bare one
    is refused: ``::1:8008`` does not say where the address ends). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (port 0-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    if ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [{host}]:{port}")
    if not _HOSTNAME.match(host) or (re.fullmatch(r"[0-9.]+", host) and not _is_ipv4(host)):
        raise ValueError(f"{text!r}: {host!r} is not an IPv4 address or a host name")
    return host, int(port)


@dataclass(frozen=True)
class Config:
    """Everything checkpointd needs to know, valid by construction (see the module doc)."""

    cluster_name: str = _setting("cluster", "name", "name")
    host_name: str = _setting("cluster", "host", "name")
    etcd_endpoints: tuple[str, ...] = _setting("etcd", "endpoints", "urls")
    key_file: str = _setting("security", "key_file", "path")
    vips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = _setting("network", "vips", "ips")
    interface: str = _setting("network", "interface", "ifname")
    etcd_cert: str | None = _setting("etcd", "cert", "path?", None)
    etcd_key: str | None = _setting("etcd", "key", "path?", None)
    etcd_ca: str | None = _setting("etcd", "ca", "path?", None)
    etcd_user: str | None = _setting("etcd", "user", "str?", None)
    etcd_password: str | None = field(default=None, repr=False,   # never printed
                                      metadata={"section": "etcd", "key": "password", "kind": "str?"})
    lease_ttl: float = _setting("timing", "lease_ttl", "seconds", 5.0)
    renew_interval: float = _setting("timing", "renew_interval", "seconds", 1.0)
    retry_timeout: float = _setting("timing", "retry_timeout", "seconds", 1.0)
    fence_margin: float = _setting("timing", "fence_margin", "seconds", 0.5)
    checkpoint_interval: float = _setting("timing", "checkpoint_interval", "seconds", 10.0)
    commit_interval: float = _setting("timing", "commit_interval", "seconds", 0.01)
    msl: float = _setting("timing", "msl", "seconds", 120.0)
    clock_skew: float = _setting("timing", "clock_skew", "seconds", 0.1)
    unprotected_grace: float = _setting("timing", "unprotected_grace", "seconds", 10.0)
    checkpoint_bytes: int = _setting("bounds", "checkpoint_bytes", "bytes", 1 << 29)
    max_bytes: int = _setting("bounds", "max_bytes", "bytes", 1 << 30)
    app_socket: str = _setting("app", "socket", "path", "/run/tcpcp/app.sock")
    api_listen: str = _setting("api", "listen", "listen", "127.0.0.1:8008")
    api_partners: tuple[str, ...] = _setting("api", "partners", "urls", ())
    api_failsafe: bool = _setting("api", "failsafe", "bool", True)
    log_format: str = _setting("log", "format", "logformat", "text")
    switchover_pass: bool = _setting("switchover", "pass", "bool", True)
    freeze_timeout: float = _setting("switchover", "freeze_timeout", "seconds", 0.5)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_kind(f, getattr(self, f.name)))
        _check_rules(self)

    # -- derived values used by the decisions ----------------------------------------
    def fence_deadline(self, last_renew: float) -> float:
        """When a primary whose last successful renewal was *sent* at ``last_renew`` must
        have silenced its connections (R3: strictly before etcd can expire the lease)."""
        return last_renew + self.lease_ttl - self.fence_margin

    def replace(self, **changes) -> "Config":
        """A copy with ``changes``, checked like any other Config."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def setting_name(attr: str) -> str:
        """``"lease_ttl"`` -> ``"timing.lease_ttl"``: how the file and errors name it."""
        f = _FIELDS[attr]
        return f"{f.metadata['section']}.{f.metadata['key']}"

    @staticmethod
    def env_name(attr: str) -> str:
        f = _FIELDS[attr]
        return f"{ENV_PREFIX}{f.metadata['section'].upper()}_{f.metadata['key'].upper()}"

    def as_toml_dict(self) -> dict[str, dict[str, Any]]:
        """The settings by section, as a file would hold them (password left out)."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "etcd_password":
                continue
            if f.metadata["kind"] == "ips":
                value = [str(v) for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            out.setdefault(f.metadata["section"], {})[f.metadata["key"]] = value
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_BY_KEY = {(f.metadata["section"], f.metadata["key"]): f for f in _FIELDS.values()}
SECTIONS = tuple(dict.fromkeys(f.metadata["section"] for f in _FIELDS.values()))


def _name(f: dataclasses.Field) -> str:
    return f"{f.metadata['section']}.{f.metadata['key']}"


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _check_kind(f: dataclasses.Field, value: Any) -> Any:
    """Type and range of one field; returns the normalised value."""
    name, kind = _name(f), f.metadata["kind"]
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind in ("name", "ifname", "path", "str"):
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, not {type(value).__name__}")
        if kind == "name" and not _NAME.match(value):
            raise ConfigError(name, f"{value!r} must be 1-63 characters of A-Z a-z 0-9 . _ -")
        if kind == "ifname" and not (0 < len(value) < 16 and not re.search(r"[/\s]", value)
                                     and value not in (".", "..")):
            raise ConfigError(name, f"{value!r} is not a Linux interface name (1-15 characters, no '/' or space)")
        if kind == "path" and not os.path.isabs(value):
            raise ConfigError(name, f"{value!r} must be an absolute path")
        if kind == "str" and not value:
            raise ConfigError(name, "must not be empty (leave it out instead)")
        return value
    if kind in ("listen", "logformat"):
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, not {type(value).__name__}")
        if kind == "logformat" and value not in LOG_FORMATS:
            raise ConfigError(name, f"{value!r} must be one of {', '.join(LOG_FORMATS)}")
        if kind == "listen" and value:   # empty: the API is disabled
            try:
                parse_listen(value)
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, not {value!r}")
        return value
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number of seconds, not {type(value).__name__}")
        if math.isnan(value):
            raise ConfigError(name, "must be a number of seconds, not NaN")
        if math.isinf(value) and f.name != "unprotected_grace":
            raise ConfigError(name, "must be finite")
        return float(value)
    if kind == "bytes":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be a whole number of bytes, not {type(value).__name__}")
        return value
    if kind in ("urls", "ips"):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"must be a list, not {type(value).__name__}")
        if not value and f.default != ():
            raise ConfigError(name, "must not be empty")
        items = []
        for item in value:
            if kind == "ips":
                if isinstance(item, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                    items.append(item)
                    continue
                try:
                    items.append(ipaddress.ip_address(item))
                except (ValueError, TypeError):
                    raise ConfigError(name, f"{item!r} is not an IPv4 or IPv6 address") from None
            else:
                if not isinstance(item, str):
                    raise ConfigError(name, f"{item!r} is not a URL")
                url = urlsplit(item)
                try:
                    port = url.port
                except ValueError:
                    port = None
                if url.scheme not in ("http", "https") or not url.hostname or not port \
                        or url.path not in ("", "/"):
                    raise ConfigError(name, f"{item!r} is not an http(s)://host:port URL")
                items.append(item)
        if len(set(items)) != len(items):
            raise ConfigError(name, "lists a value twice")
        return tuple(items)
    raise AssertionError(f"unknown kind {kind}")  # pragma: no cover


def _check_rules(c: Config) -> None:
    """R1..R11 of the module docstring, in that order; the first broken one raises."""
    for attr in ("lease_ttl", "renew_interval", "retry_timeout", "fence_margin",
                 "checkpoint_interval", "commit_interval", "msl"):
        if not getattr(c, attr) > 0:
            raise ConfigError(Config.setting_name(attr), f"must be > 0, not {getattr(c, attr)}")
    for attr in ("clock_skew", "unprotected_grace", "freeze_timeout"):
        if getattr(c, attr) < 0:
            raise ConfigError(Config.setting_name(attr), f"must be >= 0, not {getattr(c, attr)}")
    attempts = c.renew_interval + 2 * c.retry_timeout
    if attempts > c.lease_ttl:
        raise ConfigError("timing.lease_ttl", (
            f"{c.lease_ttl:g} s is shorter than renew_interval + 2*retry_timeout = "
            f"{c.renew_interval:g} + 2*{c.retry_timeout:g} = {attempts:g} s: "
            "a primary could not retry one failed renewal before its lease lapses"))
    if c.fence_margin < MIN_FENCE_MARGIN:
        raise ConfigError("timing.fence_margin", (
            f"{c.fence_margin:g} s is below {MIN_FENCE_MARGIN:g} s: the fencing deadline must "
            "leave time to silence the connections before etcd can expire the lease"))
    if attempts > c.lease_ttl - c.fence_margin:
        raise ConfigError("timing.fence_margin", (
            f"{c.fence_margin:g} s leaves {c.lease_ttl - c.fence_margin:g} s before the fencing "
            f"deadline, less than renew_interval + 2*retry_timeout = {attempts:g} s: "
            "one slow etcd request would make the primary fence"))
    failsafe = c.renew_interval + 3 * c.retry_timeout + 0.1
    if c.api_partners and c.api_failsafe and failsafe > c.lease_ttl - c.fence_margin:
        raise ConfigError("api.partners", (
            f"fail-safe needs renew_interval + 3*retry_timeout + 0.1 = {failsafe:g} s before the "
            f"fencing deadline, but lease_ttl - fence_margin is {c.lease_ttl - c.fence_margin:g} s: "
            "raise timing.lease_ttl or lower timing.retry_timeout, or set api.failsafe = false"))
    if not c.checkpoint_interval < c.msl / 2:
        raise ConfigError("timing.checkpoint_interval", (
            f"{c.checkpoint_interval:g} s must be below msl/2 = {c.msl / 2:g} s"))
    oldest = c.checkpoint_interval + c.lease_ttl + c.clock_skew
    if not oldest < c.msl:
        raise ConfigError("timing.msl", (
            f"{c.msl:g} s: checkpoint_interval + lease_ttl + clock_skew = {oldest:g} s is not "
            "below it, so the newest checkpoint could be too old to resurrect by the time "
            "the lease lapses"))
    if c.commit_interval > c.checkpoint_interval:
        raise ConfigError("timing.commit_interval", (
            f"{c.commit_interval:g} s exceeds checkpoint_interval {c.checkpoint_interval:g} s"))
    if not c.commit_interval < TCP_RTO_MIN:
        raise ConfigError("timing.commit_interval", (
            f"{c.commit_interval:g} s: the ACK gate would hold ACKs past the peer's minimum "
            f"RTO ({TCP_RTO_MIN:g} s) and the peer would retransmit for nothing"))
    if not c.checkpoint_bytes > 0:
        raise ConfigError("bounds.checkpoint_bytes", f"must be > 0, not {c.checkpoint_bytes}")
    if not c.checkpoint_bytes < c.max_bytes:
        raise ConfigError("bounds.checkpoint_bytes", (
            f"{c.checkpoint_bytes} must be below bounds.max_bytes {c.max_bytes}: "
            "the difference is the headroom for the forced checkpoint to become durable"))
    if not c.max_bytes < BYTES_BOUND:
        raise ConfigError("bounds.max_bytes", (
            f"{c.max_bytes} must be below 2^31 = {BYTES_BOUND}: beyond it a sequence number "
            "no longer names one stream offset"))
    if any(e.startswith("https://") for e in c.etcd_endpoints) and c.etcd_ca is None:
        raise ConfigError("etcd.ca", "https endpoints need a CA bundle")
    if (c.etcd_cert is None) != (c.etcd_key is None):
        missing = "etcd.key" if c.etcd_key is None else "etcd.cert"
        raise ConfigError(missing, "a client certificate and its key come together")
    if (c.etcd_user is None) != (c.etcd_password is None):
        missing = "etcd.password" if c.etcd_password is None else "etcd.user"
        raise ConfigError(missing, "etcd user and password come together")


# -- loading ----------------------------------------------------------------------------

def load(path: str | os.PathLike | None = None, *,
         env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (TOML; None: defaults and environment only), apply ``env``
    (None: ``os.environ``) and check everything."""
    data: Mapping[str, Any] = {}
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError("file", f"cannot read {os.fspath(path)}: {exc.strerror}") from None
        data = _parse(raw.decode("utf-8", errors="replace"), os.fspath(path))
    return from_mapping(data, env=env)


def loads(text: str, *, env: Mapping[str, str] | None = None) -> Config:
    """Like ``load`` for TOML text."""
    return from_mapping(_parse(text, "<string>"), env=env)


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"{where} is not valid TOML: {exc}") from None


def from_mapping(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from ``{section: {key: value}}`` plus environment overrides."""
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(str(section), f"unknown section; known: {', '.join(SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(section, "must be a table ([section])")
        for key, value in table.items():
            f = _BY_KEY.get((section, key))
            if f is None:
                raise ConfigError(f"{section}.{key}", "unknown setting")
            values[f.name] = value
    values.update(_from_env(os.environ if env is None else env))
    missing = [f for f in _FIELDS.values()
               if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        f = missing[0]
        raise ConfigError(_name(f), f"required (in the file or {Config.env_name(f.name)})")
    return Config(**values)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # some other TCPCP_ variable, not a setting
        key = rest[len(section) + 1:]
        f = _BY_KEY.get((section, key))
        if f is None:
            raise ConfigError(f"{section}.{key}", f"unknown setting (from {var})")
        out[f.name] = _env_value(f, var, text)
    return out


def _env_value(f: dataclasses.Field, var: str, text: str) -> Any:
    kind = f.metadata["kind"]
    text = text.strip()
    if kind.endswith("?"):
        return text or None
    if kind in ("urls", "ips"):
        return [item.strip() for item in text.split(",") if item.strip()]
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(_name(f), f"{var}={text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    if kind == "seconds":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(_name(f), f"{var}={text!r} is not a number of seconds") from None
    if kind == "bytes":
        try:
            return int(text, 0)
        except ValueError:
            raise ConfigError(_name(f), f"{var}={text!r} is not a whole number of bytes") from None
    return text
