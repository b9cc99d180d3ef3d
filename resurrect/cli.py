"""The ``resurrect`` operator command: what is protected, and the operator's requests.

Patroni's ``patronictl`` is the model operators know. ``list``, ``show``, ``verify`` and
``history`` only read etcd (and, for live figures, the local agent's REST API); ``pause``,
``resume``, ``switchover`` and ``failover`` write *control keys* that the agents act on,
as patronictl writes Patroni's ``/pause`` and ``/failover`` keys. This command never
touches a connection or the kernel itself, so it needs no privilege beyond reading the
configuration, the key file (to open records) and reaching etcd. docs/operations-cli.md
shows every command's output and what the agents do with each control key.

Records are judged exactly as a taking-over standby would judge them: opened with the
keyring (authentication bound to key name and epoch), the ICI decoded and validated, and
``decide.may_resurrect`` against the epoch a takeover would resurrect (the leader key's).
Key material and application state are never printed: ``show`` gives sizes only.

Exit codes: 0 done; 1 refused (a record fails ``verify``, a request that makes no sense
now, a declined confirmation); 2 cannot run (bad configuration, key file, unreachable
etcd, bad usage). Failures print one line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import http.client
import json
import os
import re
import socket
import struct
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

import click

from kernel.errors import ICIError
from kernel.ici import ICI, STATE_NAMES

DEFAULT_CONFIG = "/etc/tcpcp/checkpointd.toml"
DEFAULT_API_LISTEN = "127.0.0.1:8008"
#: The agent's API is on this host or next to it; a slow answer is no answer (live figures
#: are a convenience, the records in etcd are the truth).
API_TIMEOUT_S = 1.0
API_MAX_BYTES = 16 << 20   # a status with thousands of connections, not an endless stream
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")   # config rule R10 for cluster.host


def describe(ici: ICI) -> dict:
    """The decoded fields an operator reads; queue contents are summarised, not printed."""
    out = {}
    for f in dataclasses.fields(ici):
        value = getattr(ici, f.name)
        if isinstance(value, bytes):
            out[f.name + "_len"] = len(value)
        else:
            out[f.name] = str(value) if not isinstance(value, int) else value
    out["state_name"] = STATE_NAMES.get(ici.state, "?")
    out["options"] = [name for name, on in (("wscale", ici.wscale), ("sack", ici.sack),
                                            ("timestamps", ici.timestamps),
                                            ("window", ici.has_window)) if on]
    out["usec_timestamps"] = ici.usec_ts
    out["encoded_size"] = ici.size()
    return out


# -- errors: one line, an exit code, never a traceback ----------------------------------------

class CannotRun(click.ClickException):
    """Exit 2: the configuration, the key file or etcd keeps the command from running."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"resurrect: {self.format_message()}", err=True)


class Refused(CannotRun):
    """Exit 1: the command ran and the answer is no (a bad record, a pointless request)."""

    exit_code = 1


class _Group(click.Group):
    """Maps the project's errors from any subcommand to CannotRun (exit 2, one line)."""

    def invoke(self, ctx):
        from checkpointd.config import ConfigError
        from checkpointd.store.errors import KeyringError, StoreError

        try:
            return super().invoke(ctx)
        except (StoreError, ConfigError, KeyringError) as exc:
            raise CannotRun(str(exc)) from None


# -- where things come from: config, etcd, keys, the clock, the agent ------------------------

def _now_ns() -> int:
    """CLOCK_REALTIME, as the records' ``wall_ns`` (tests replace it)."""
    return time.time_ns()


def _store(config):
    """The etcd store for ``config``: ``store_from_config`` when the etcd backend has it
    (it knows TLS and authentication), else the plain-HTTP constructor."""
    from checkpointd.store import etcd

    make = getattr(etcd, "store_from_config", None)
    try:
        if make is not None:
            return make(config)
        return etcd.EtcdStore(config.etcd_endpoints, config.cluster_name,
                              timeout=config.retry_timeout)
    except (ValueError, OSError) as exc:
        raise CannotRun(f"etcd {', '.join(config.etcd_endpoints)}: {exc}") from None


class Session:
    """What a command needs, loaded on first use: decode needs none of it, pause needs no
    key file, and every error names the file or the endpoint it came from."""

    def __init__(self, config_path: str, explicit: bool):
        self.config_path = config_path
        self.explicit = explicit
        self._config = self._store_obj = self._keyring = None

    def config(self):
        from checkpointd import config as config_mod

        if self._config is None:
            try:
                self._config = config_mod.load(self.config_path)
            except config_mod.ConfigError as exc:
                # The default file is optional when the environment says everything.
                if exc.field != "file" or self.explicit or os.path.exists(self.config_path):
                    raise
                try:
                    self._config = config_mod.load(None)
                except config_mod.ConfigError:
                    raise exc from None
        return self._config

    def store(self):
        if self._store_obj is None:
            self._store_obj = _store(self.config())
        return self._store_obj

    def keyring(self):
        from checkpointd.store.keyring import Keyring

        if self._keyring is None:
            self._keyring = Keyring.from_file(self.config().key_file)
        return self._keyring

    @property
    def layout(self):
        return self.store().layout

    def close(self) -> None:
        if self._store_obj is not None:
            self._store_obj.close()


def _api_default(config) -> str:
    """http://<api.listen>, a wildcard listen address reached on loopback."""
    listen = getattr(config, "api_listen", None) or DEFAULT_API_LISTEN
    if "://" in listen:
        return listen.rstrip("/")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _api_url(session: Session, api: str | None) -> str | None:
    if api is None:
        return _api_default(session.config())
    if api == "off":
        return None
    if urlsplit(api).scheme not in ("http", "https"):
        raise click.BadParameter(f"{api!r}: want http://host:port or off", param_hint="--api")
    return api.rstrip("/")


@dataclass
class Live:
    """The agent's per-connection figures (GET /status), or why there are none."""

    conns: dict | None       # conn key -> {"bytes_since_checkpoint", "guarded", "unprotected"}
    note: str


def _live(url: str | None) -> Live:
    if url is None:
        return Live(None, "not asked (--api off)")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy
    try:
        with opener.open(url + "/status", timeout=API_TIMEOUT_S) as resp:
            status = json.loads(resp.read(API_MAX_BYTES))
    except urllib.error.HTTPError as exc:
        return Live(None, f"agent at {url}: HTTP {exc.code}")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        why = getattr(exc, "reason", None) or exc
        return Live(None, f"agent at {url} unreachable ({why})")
    who = f"agent at {url}"
    if isinstance(status, dict) and status.get("host"):
        who += f" ({status.get('host')}, {status.get('role', '?')})"
    conns = status.get("conns") if isinstance(status, dict) else None
    if not isinstance(conns, list):
        return Live(None, f"{who} gives no per-connection figures")
    return Live({c["key"]: c for c in conns if isinstance(c, dict) and isinstance(c.get("key"), str)},
                who)


# -- judging one record, as a taking-over standby would ---------------------------------------

#: may_resurrect's sentences, by the bound they name (the test pins every one).
_BOUND_CODES = (("failed authentication", "authentication"), ("belongs to epoch", "epoch"),
                ("in the future", "clock"), ("MSL", "stale"), ("2^31", "bytes"))


def _bound_code(why: str) -> str:
    return next((code for needle, code in _BOUND_CODES if needle in why), "bound")


#: The clear start of a sealed record (record.py): magic, version, epoch, key id length.
_SEALED_FIXED = struct.Struct(">4sHQB")


def _sealed_key_id(blob: bytes) -> str | None:
    """The *name* of the key that sealed a record (in its clear, authenticated header): an
    operator rotating keys wants to know which records still need the old one."""
    from checkpointd.store import record as records

    if len(blob) < _SEALED_FIXED.size or blob[:4] != records.SEAL_MAGIC:
        return None
    n = _SEALED_FIXED.unpack_from(blob)[3]
    return bytes(blob[_SEALED_FIXED.size:_SEALED_FIXED.size + n]).decode("ascii", "replace") or None


@dataclass
class Inspection:
    """One record: what could be read of it and every problem, in the order checked."""

    key: str
    sealed_bytes: int
    key_id: str | None
    record: object = None                  # CheckpointRecord when it opened
    ici: ICI | None = None
    problems: list = field(default_factory=list)   # [(reason, detail)]
    bound: str = ""                        # may_resurrect's sentence, when it ran

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "ok" if self.ok else self.problems[0][0]

    @property
    def detail(self) -> str:
        return self.bound if self.ok else self.problems[0][1]


def inspect(layout, key: str, blob: bytes, keyring, config, *, epoch: int, now_ns: int) -> Inspection:
    """Authentication (and the record's format), the ICI, then the bounds for ``epoch``."""
    from checkpointd.decide import RecordMeta, may_resurrect
    from checkpointd.store import record as records
    from checkpointd.store.errors import InvalidKey, RecordError

    ins = Inspection(key, len(blob), _sealed_key_id(blob))
    try:
        rec = records.open_(blob, keyring, layout.conn(key))
    except RecordError as exc:
        ins.problems.append((exc.reason, exc.detail))
        return ins
    ins.record = rec
    try:
        ins.ici = ICI.decode(rec.ici)
    except ICIError as exc:
        ins.problems.append(("ici", str(exc)))
    else:
        try:
            own = records.conn_key(ins.ici.local, ins.ici.remote)
        except InvalidKey as exc:
            own = str(exc)
        if own != key:
            ins.problems.append(("ici", f"the ICI is the connection {own}, not {key}"))
    ok, why = may_resurrect(RecordMeta(epoch=rec.epoch, wall_ns=rec.wall_ns), now_ns, config,
                            epoch=epoch)
    ins.bound = why
    if not ok:
        ins.problems.append((_bound_code(why), why))
    return ins


def _inspect_all(session: Session):
    """(leader, snapshot, inspections sorted by conn key, now) for list and verify."""
    store, keyring, config = session.store(), session.keyring(), session.config()
    leader = store.leader()
    snap = store.get_all()
    now_ns = _now_ns()
    found = [inspect(store.layout, key, blob, keyring, config, epoch=leader.epoch, now_ns=now_ns)
             for key, blob in sorted(snap.items.items())]
    return leader, snap, found, now_ns


# -- output ------------------------------------------------------------------------------------

def _format_option(f):
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                        show_default=True, help="aligned columns for people, JSON for programs")(f)


def _api_option(f):
    return click.option("--api", default=None, metavar="URL|off",
                        help="the agent's REST API for live figures (default: "
                             f"http://<api.listen>, else http://{DEFAULT_API_LISTEN}); "
                             "off: do not ask")(f)


def _yes_option(f):
    return click.option("--force", "-y", "yes", is_flag=True, help="do not ask for confirmation")(f)


def _clean(value: object) -> str:
    """Text from etcd as printable text: a holder name or reason written by someone with
    etcd access must not drive the operator's terminal with escape sequences."""
    text = str(value)
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """Aligned columns with a rule under the headers; numbers (``right``) right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else _clean(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _pairs(items: dict, indent: str = "") -> str:
    width = max((len(k) for k in items), default=0)
    return "\n".join(f"{indent}{k:{width}}  {'-' if v is None else _clean(v)}" for k, v in items.items())


def _iso(ns: int | None) -> str | None:
    """Wall-clock nanoseconds as UTC with milliseconds; a time no calendar holds as is."""
    if ns is None:
        return None
    try:
        t = datetime.datetime.fromtimestamp(ns // 10**9, tz=datetime.timezone.utc)
    except (OverflowError, ValueError, OSError, TypeError):
        return str(ns)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ns % 10**9 // 10**6:03d}Z"


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj))


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _ends(ins: Inspection) -> tuple[str, str]:
    """(local addr:port, peer addr:port): from the ICI, else from the connection key."""
    if ins.ici is not None:
        return _endpoint(*ins.ici.local), _endpoint(*ins.ici.remote)
    local, _, peer = ins.key.partition("-")
    return local, peer or "?"


def _bytes_text(value) -> str | None:
    """The agent's bytes since the last checkpoint: a number, or in/out as ``n/n``."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = [value.get("in", "?"), value.get("out", "?")]
    if isinstance(value, (list, tuple)):
        return "/".join(map(str, value))
    return str(value)


def _live_text(fig: dict | None) -> str | None:
    if fig is None:
        return None
    if fig.get("unprotected"):
        return "unprotected"
    if "guarded" in fig:
        return "guarded" if fig.get("guarded") else "unguarded"
    return None


def _controls(store) -> dict:
    """The pending operator requests, decoded (a malformed one is shown, not fatal)."""
    from checkpointd.store import base
    from checkpointd.store.layout import CONTROLS

    out = {}
    for name in CONTROLS:
        raw = store.get_control(name)
        if raw is None:
            out[name] = None
            continue
        try:
            out[name] = base.parse_control_value(name, raw)
        except ValueError as exc:
            out[name] = {"malformed": str(exc)}
    return out


def _control_lines(controls: dict) -> list[str]:
    lines = []
    pause = controls.get("pause")
    if pause:
        lines.append(f"Fail-over paused since {_iso(pause.get('paused_at'))} by {pause.get('by')}"
                     if "malformed" not in pause else f"Pause key malformed: {pause['malformed']}")
    for name in ("switchover", "failover"):
        req = controls.get(name)
        if req:
            lines.append(f"{name.capitalize()} to {req.get('to') or 'any standby'} requested at "
                         f"{_iso(req.get('requested_at'))} (from {req.get('from')}, epoch {req.get('epoch')})"
                         if "malformed" not in req else f"{name.capitalize()} key malformed: {req['malformed']}")
    return lines


def _leader_text(leader) -> str:
    if leader.vacant:
        return f"no leader (last epoch {leader.epoch})"
    return f"leader {leader.name} (epoch {leader.epoch})"


# -- the commands --------------------------------------------------------------------------------

@click.group(cls=_Group)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=DEFAULT_CONFIG,
              show_default=True,
              help="checkpointd's TOML configuration (TCPCP_* environment variables override it)")
@click.pass_context
def main(ctx: click.Context, config_path: str) -> None:
    """Inspect protected tcpcp connections and ask the agents for pause, switchover, fail-over."""
    explicit = ctx.get_parameter_source("config_path") is not click.core.ParameterSource.DEFAULT
    ctx.obj = Session(config_path, explicit)
    ctx.call_on_close(ctx.obj.close)


@main.command("decode")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--hex", "is_hex", is_flag=True, help="the file holds hex text, not bytes")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def decode(path: str, is_hex: bool, fmt: str) -> None:
    """Decode and validate one ICI record; a defect is reported with the field it is in."""
    raw = click.open_file(path, "rb").read()
    if is_hex:
        raw = bytes.fromhex(raw.decode().replace("\n", "").strip())
    try:
        ici = ICI.decode(raw)
    except ICIError as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(2)
    info = describe(ici)
    if fmt == "json":
        click.echo(json.dumps(info))
    else:
        for key, value in info.items():
            click.echo(f"{key:16} {value}")


@main.command("list")
@_api_option
@_format_option
@click.pass_obj
def list_(session: Session, api: str | None, fmt: str) -> None:
    """Every protected connection: its tuple, owner, checkpoint age, bytes since the last
    checkpoint (from the agent, when it answers) and whether it may be resurrected now."""
    url = _api_url(session, api)
    leader, snap, found, now_ns = _inspect_all(session)
    controls = _controls(session.store())
    live = _live(url)
    rows, figures = [], []
    for ins in found:
        local, peer = _ends(ins)
        rec = ins.record
        fig = (live.conns or {}).get(ins.key)
        figures.append(fig)
        rows.append({
            "conn_key": ins.key, "local": local, "peer": peer,
            "owner": leader.name, "leader_epoch": leader.epoch,
            "record_epoch": rec.epoch if rec else None, "seq": rec.seq if rec else None,
            "wall_ns": rec.wall_ns if rec else None,
            "checkpoint_age_s": round((now_ns - rec.wall_ns) / 1e9, 3) if rec else None,
            "bytes_since_checkpoint": fig.get("bytes_since_checkpoint") if fig else None,
            "guarded": fig.get("guarded") if fig else None,
            "unprotected": fig.get("unprotected") if fig else None,
            "bound": ins.status, "bound_reason": ins.detail,
        })
    if fmt == "json":
        _emit_json({"cluster": session.layout.cluster, "revision": snap.revision,
                    "leader": {"name": leader.name, "epoch": leader.epoch},
                    **{name: value for name, value in controls.items()},
                    "api": live.note, "connections": rows})
        return
    click.echo(f"Cluster {session.layout.cluster}: {_leader_text(leader)}; "
               f"{len(rows)} protected connection{'s' if len(rows) != 1 else ''}")
    for line in _control_lines(controls):
        click.echo(_clean(line))
    click.echo(_clean(f"Live figures: {live.note}"))
    if not rows:
        return
    click.echo("")
    table = []
    for r, fig in zip(rows, figures):
        epoch = r["record_epoch"]
        if epoch is not None and epoch != r["leader_epoch"]:
            epoch = f"{epoch} (leader {r['leader_epoch']})"
        table.append([f"{r['local']} -> {r['peer']}", r["owner"], epoch,
                      None if r["checkpoint_age_s"] is None else f"{r['checkpoint_age_s']:.1f} s",
                      _bytes_text(r["bytes_since_checkpoint"]), _live_text(fig), r["bound"]])
    click.echo(_table(["Connection (local -> peer)", "Owner", "Epoch", "Age", "Since checkpoint",
                       "Live", "Bound"], table, right=(2, 3, 4)))


@main.command("show")
@click.argument("conn")
@_api_option
@_format_option
@click.pass_obj
def show(session: Session, conn: str, api: str | None, fmt: str) -> None:
    """One connection's decoded ICI and record: offsets, epoch, seq, sizes. Never key
    material, never application state (its size only). CONN: its key
    (10.0.0.1:80-10.0.0.2:5555), '10.0.0.1:80 -> 10.0.0.2:5555', or a unique prefix."""
    from checkpointd.store.errors import InvalidKey

    url = _api_url(session, api)
    wanted = re.sub(r"\s*->\s*", "-", conn.strip())
    store, keyring, config = session.store(), session.keyring(), session.config()
    try:
        store.layout.conn_range(wanted)
    except InvalidKey:
        raise click.BadParameter(f"{conn!r} is not a connection key such as "
                                 "10.0.0.1:80-10.0.0.2:5555", param_hint="CONN") from None
    leader = store.leader()
    snap = store.get_all(wanted)
    if wanted in snap.items:
        key = wanted
    elif len(snap.items) == 1:
        (key,) = snap.items
    elif snap.items:
        names = sorted(snap.items)
        raise Refused(f"{conn!r} names {len(names)} connections: {', '.join(names[:5])}"
                      + (", ..." if len(names) > 5 else ""))
    else:
        raise Refused(f"no checkpoint record for {conn!r} in cluster {store.layout.cluster}")
    now_ns = _now_ns()
    ins = inspect(store.layout, key, snap.items[key], keyring, config, epoch=leader.epoch, now_ns=now_ns)
    live = _live(url)
    fig = (live.conns or {}).get(key)
    rec = ins.record
    record = {"conn_key": key, "sealed_bytes": ins.sealed_bytes, "sealed_with_key": ins.key_id}
    if rec is not None:
        record.update({
            "epoch": rec.epoch, "seq": rec.seq, "input_offset": rec.input_offset,
            "output_offset": rec.output_offset, "write_offset": rec.write_offset,
            "ts_val": rec.ts_val, "wall_ns": rec.wall_ns, "wall_time": _iso(rec.wall_ns),
            "checkpoint_age_s": round((now_ns - rec.wall_ns) / 1e9, 3),
            "app_state_bytes": len(rec.app_state), "unacked_bytes": len(rec.unacked),
            "ici_bytes": len(rec.ici)})
    out = {"conn_key": key, "owner": leader.name, "leader_epoch": leader.epoch,
           "bound": ins.status, "bound_reason": ins.detail,
           "problems": [{"reason": r, "detail": d} for r, d in ins.problems],
           "record": record, "ici": describe(ins.ici) if ins.ici is not None else None,
           "live": None if fig is None else {k: fig.get(k) for k in
                                             ("bytes_since_checkpoint", "guarded", "unprotected")},
           "api": live.note}
    if fmt == "json":
        _emit_json(out)
    else:
        local, peer = _ends(ins)
        click.echo(_pairs({"connection": f"{local} -> {peer}",
                           "owner": f"{_leader_text(leader)}",
                           "bound": f"{ins.status}: {ins.detail}",
                           **{f"problem ({r})": d for r, d in ins.problems[1:]},
                           "live": (f"{_bytes_text(fig.get('bytes_since_checkpoint'))} bytes since "
                                    f"the last checkpoint, {_live_text(fig) or '?'}"
                                    if fig else live.note)}))
        click.echo("\nrecord")
        click.echo(_pairs(record, "  "))
        if ins.ici is not None:
            click.echo("\nICI")
            click.echo(_pairs(describe(ins.ici), "  "))
    if not ins.ok:
        sys.exit(1)


@main.command("verify")
@_format_option
@click.pass_obj
def verify(session: Session, fmt: str) -> None:
    """Check every record as a takeover would: authentication, format, the ICI, the epoch,
    the clock, the MSL and byte bounds. Exit 1 naming each failure, 0 if all pass."""
    leader, snap, found, _ = _inspect_all(session)
    failed = [ins for ins in found if not ins.ok]
    counts = Counter(ins.status for ins in failed)
    summary = (f"{len(found)} record{'s' if len(found) != 1 else ''} at revision {snap.revision}, "
               f"judged for a takeover of epoch {leader.epoch}: {len(found) - len(failed)} ok, "
               f"{len(failed)} refused")
    if counts:
        summary += " (" + ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) + ")"
    if fmt == "json":
        _emit_json({"cluster": session.layout.cluster, "revision": snap.revision,
                    "epoch": leader.epoch, "records": len(found), "ok": len(found) - len(failed),
                    "refused": len(failed), "counts": dict(counts),
                    "failures": [{"conn_key": ins.key, "reason": ins.status, "detail": ins.detail,
                                  "problems": [{"reason": r, "detail": d} for r, d in ins.problems]}
                                 for ins in failed]})
    else:
        if failed:
            click.echo(_table(["Connection", "Reason", "Detail"],
                              [[ins.key, r, d] for ins in failed for r, d in ins.problems]))
            click.echo("")
        click.echo(summary)
    sys.exit(1 if failed else 0)


@main.command("history")
@_format_option
@click.pass_obj
def history(session: Session, fmt: str) -> None:
    """Every leader epoch: who acquired it, when, and why (written by the agents)."""
    from checkpointd.store import base

    store = session.store()
    leader = store.leader()
    entries = []
    for epoch, raw in store.history():
        try:
            data = base.parse_history_value(raw)
            entry = {"epoch": epoch, "holder": data["holder"], "acquired_at": data["acquired_at"],
                     "reason": data["reason"]}
        except ValueError as exc:
            entry = {"epoch": epoch, "holder": None, "acquired_at": None,
                     "reason": f"malformed entry: {exc}"}
        entry["current"] = not leader.vacant and epoch == leader.epoch
        entries.append(entry)
    if fmt == "json":
        _emit_json({"cluster": store.layout.cluster,
                    "leader": {"name": leader.name, "epoch": leader.epoch}, "history": entries})
        return
    click.echo(f"Cluster {store.layout.cluster}: {_leader_text(leader)}")
    if not entries:
        click.echo("No history entries (the agents write one on every acquisition).")
        return
    click.echo("")
    click.echo(_table(["Epoch", "Holder", "Acquired (UTC)", "Reason", "Current"],
                      [[e["epoch"], e["holder"], _iso(e["acquired_at"]), e["reason"],
                        "*" if e["current"] else ""] for e in entries], right=(0,)))


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@main.command("pause")
@click.pass_obj
def pause(session: Session) -> None:
    """No automatic fail-over: a standby does not take over when the leader's lease lapses.
    The primary keeps serving and checkpointing; fencing is never paused."""
    from checkpointd.store import base

    store = session.store()
    current = store.get_control("pause")
    if current is not None:
        (line,) = _control_lines({"pause": _parsed("pause", current)})
        click.echo(_clean(f"Fail-over is already paused: {line}"))
        return
    store.put_control("pause", base.control_value("pause", paused_at=_now_ns(), by=_operator()))
    click.echo(f"Paused fail-over of cluster {store.layout.cluster}: no standby takes over until "
               "`resurrect resume`; checkpoints continue.")


def _parsed(name: str, raw: bytes) -> dict:
    from checkpointd.store import base

    try:
        return base.parse_control_value(name, raw)
    except ValueError as exc:
        return {"malformed": str(exc)}


@main.command("resume")
@click.pass_obj
def resume(session: Session) -> None:
    """Resume automatic fail-over (delete the pause key)."""
    store = session.store()
    if store.delete_control("pause"):
        click.echo(f"Resumed fail-over of cluster {store.layout.cluster}.")
    else:
        click.echo(f"Fail-over of cluster {store.layout.cluster} was not paused.")


def _target(host: str | None) -> str | None:
    if host is not None and not _HOST_NAME.fullmatch(host):
        raise click.BadParameter(f"{host!r}: a host name is 1-63 of [A-Za-z0-9._-]",
                                 param_hint="--to")
    return host


@main.command("switchover")
@click.option("--to", "host", required=True, help="the standby that takes the connections")
@_yes_option
@click.pass_obj
def switchover(session: Session, host: str, yes: bool) -> None:
    """Planned: the primary freezes its applications, isolates every connection and passes
    it live to HOST with its queues and the application's exact state (a connection that
    cannot go live gets a final checkpoint instead), then releases the leader key; HOST
    takes it at once (even while fail-over is paused) and activates them."""
    from checkpointd.store import base

    host = _target(host)
    store = session.store()
    leader = store.leader()
    if leader.vacant:
        raise Refused(f"cluster {store.layout.cluster} has {_leader_text(leader)}: nothing to "
                      "switch over from (use `resurrect failover --to HOST` to choose who takes over)")
    if leader.name == host:
        raise Refused(f"{host} is already the primary (epoch {leader.epoch})")
    pending = _controls(store)
    if not yes:
        for line in _control_lines({"switchover": pending["switchover"]}):
            click.echo(_clean(f"Replacing: {line}"))
        click.confirm(f"Switch over cluster {store.layout.cluster} from {leader.name} "
                      f"(epoch {leader.epoch}) to {host}?", abort=True)
    store.put_control("switchover", base.control_value(
        "switchover", to=host, from_=leader.name, epoch=leader.epoch, requested_at=_now_ns()))
    click.echo(f"Switchover to {host} requested: {leader.name} passes its connections and "
               f"releases the leader key; {host} takes it and deletes the request.")


@main.command("failover")
@click.option("--to", "host", default=None, help="the standby that must take over (default: any)")
@_yes_option
@click.pass_obj
def failover(session: Session, host: str | None, yes: bool) -> None:
    """Forced: revoke the primary's lease so its leader key vanishes now. The old primary
    fences; a standby (HOST, if given) resurrects the connections from their checkpoints."""
    from checkpointd.store import base

    host = _target(host)
    store = session.store()
    leader = store.leader()
    if leader.vacant:
        raise Refused(f"cluster {store.layout.cluster} has {_leader_text(leader)}: nothing to "
                      "fail over from; a standby takes the key on its own unless fail-over is "
                      "paused (`resurrect resume`)")
    if leader.name == host:
        raise Refused(f"{host} is already the primary (epoch {leader.epoch})")
    if host is None and store.get_control("pause") is not None:
        raise Refused("fail-over is paused: no standby would take the leader key; name one "
                      "with --to HOST, or `resurrect resume` first")
    if not yes:
        click.confirm(f"Fail over cluster {store.layout.cluster} by force: revoke the lease of "
                      f"{leader.name} (epoch {leader.epoch}) and let {host or 'a standby'} "
                      "resurrect its connections from their checkpoints?", abort=True)
    store.put_control("failover", base.control_value(
        "failover", to=host, from_=leader.name, epoch=leader.epoch, requested_at=_now_ns()))
    if not store.revoke_leader(lease_id=leader.lease_id):
        store.delete_control("failover")
        raise Refused(f"the leader key changed since it was read ({leader.name}, epoch "
                      f"{leader.epoch}): nothing revoked; look again with `resurrect list`")
    click.echo(f"Revoked the lease of {leader.name} (epoch {leader.epoch}): its leader key is gone; "
               f"{leader.name} fences its connections, {host or 'a standby'} takes over.")


if __name__ == "__main__":
    main()
