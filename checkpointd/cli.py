"""The ``checkpointd`` command: the agent (``run``), the drill, and the passing demo."""

from __future__ import annotations

import json
import os
import sys

import click

from .cluster import raise_fd_limit


@click.group()
def main() -> None:
    """tcpcp agent commands."""


@main.command("passing-demo")
@click.option("--connections", default=100, show_default=True, help="connections to pass")
@click.option("--ipv6", is_flag=True, help="use the IPv6 virtual IP")
@click.option("--rate-mbps", type=float, default=200.0, show_default=True,
              help="the peer's total send rate (the server sends as fast as it can)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def passing_demo(connections: int, ipv6: bool, rate_mbps: float, as_json: bool) -> None:
    """Pass N live connections from host A to host B in namespaces; the peer checks every byte."""
    from kernel import livepass

    raise_fd_limit()
    log = (lambda m: click.echo(f"# {m}", err=True))
    result = livepass.run(connections, family=6 if ipv6 else 4, rate_mbps=rate_mbps, log=log)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key in ("connections", "passed", "bytes_verified", "lost_bytes", "duplicated_bytes",
                    "resets", "max_stall_ms", "pass_ms", "dump_us_median", "restore_us_median",
                    "reconnect_us_median"):
            click.echo(f"{key:22} {result[key]}")
    ok = (result["passed"] == connections and not result["lost_bytes"]
          and not result["duplicated_bytes"] and not result["resets"])
    sys.exit(0 if ok else 1)


@main.command("drill")
@click.option("--connections", default=20, show_default=True, help="half curl downloads, half KV sessions")
@click.option("--seed", default=1, show_default=True, help="chooses the crash moment and the streams")
@click.option("--lease-ttl", default=1.0, show_default=True, help="seconds")
@click.option("--duration", default=4.0, show_default=True, help="seconds of traffic per connection")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="draw the fail-over (bytes against time, events marked) into this PNG")
@click.option("--fault", type=click.Choice(["crash", "mid-commit", "etcd-partition", "etcd-outage", "switchover"]),
              default="crash", show_default=True,
              help="crash: link down then kill; mid-commit: the same, between a durable etcd "
                   "write and the ACK gate's raise; etcd-partition: cut off from etcd, alive; "
                   "etcd-outage: etcd loses quorum, a keeps serving (fail-safe), then crashes")
@click.option("--pcap", type=click.Path(dir_okay=False), default=None,
              help="capture the peer's packets (headers) into this file")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="copy every process's log and the agents' status into this directory")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def drill(connections: int, seed: int, lease_ttl: float, duration: float, plot: str | None,
          fault: str, pcap: str | None, keep: str | None, as_json: bool) -> None:
    """Kill the primary under load in namespaces and check every byte at the peers."""
    from . import drill as drill_mod

    raise_fd_limit()
    result = drill_mod.run(connections, seed=seed, lease_ttl=lease_ttl, duration=duration,
                           plot=plot, fault=fault, pcap=pcap, keep=keep, progress=lambda m: click.echo(f"# {m}", err=True))
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key in ("connections", "resurrected", "bytes_verified", "lost_bytes", "duplicated_bytes",
                    "resets", "max_gap_ms", "detection_ms", "takeover_ms", "restore_ms"):
            click.echo(f"{key:18} {result.get(key)}")
    ok = (not result["lost_bytes"] and not result["duplicated_bytes"] and not result["resets"]
          and result["resurrected"] == connections)
    sys.exit(0 if ok else 1)


@main.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML configuration (TCPCP_* environment variables override it)")
@click.option("--no-gate", is_flag=True, help="run without the ACK gate (unprotected input)")
@click.option("--status", "status_path", type=click.Path(dir_okay=False), default=None,
              help="rewrite this JSON file with the agent's status every 100 ms")
@click.option("--fault-point", type=click.Choice(["after-write"]), default=None, hidden=True,
              help="drills: on SIGUSR1, stop the committer after its next etcd write, "
                   "before the ACK gates are raised")
@click.option("--verbose", "-v", is_flag=True)
def run(config_path: str | None, no_gate: bool, status_path: str | None, fault_point: str | None,
        verbose: bool) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    import logging
    import signal
    import threading

    from kernel import ackgate

    from . import logfmt
    from .agent import Agent
    from .api import AgentAPI
    from .metrics import AgentMetrics
    from .config import ConfigError, load
    from .store.errors import KeyringError
    from .store.etcd import store_from_config
    from .store.keyring import Keyring

    try:
        config = load(config_path)
        keyring = Keyring.from_file(config.key_file)
    except (ConfigError, KeyringError, OSError) as exc:
        click.echo(f"checkpointd: {exc}", err=True)
        sys.exit(2)
    logfmt.configure(config.log_format, logging.DEBUG if verbose else logging.INFO)
    raise_fd_limit()
    try:
        store = store_from_config(config)
    except (ConfigError, OSError, ValueError) as exc:
        click.echo(f"checkpointd: {exc}", err=True)
        sys.exit(2)
    gate = None if no_gate else ackgate.Gate.open([config.interface])
    metrics = AgentMetrics()
    agent = Agent(config, store, keyring, gate=gate, metrics=metrics)
    api = None
    if config.api_listen:
        api = AgentAPI(config.api_listen, lambda: {**agent.status(), "conns": agent.connections()},
                       metrics, on_failsafe=agent.on_failsafe, on_poke=agent.on_poke,
                       on_pass=agent.on_pass,
                       liveness_s=max(1.0, 3 * config.renew_interval))
    if fault_point:
        agent.fault_point = fault_point
        signal.signal(signal.SIGUSR1, lambda *_: agent.fault_armed.set())
    agent.start()
    if api is not None:
        try:
            api.start()
        except OSError as exc:
            click.echo(f"checkpointd: REST API on {config.api_listen}: {exc}", err=True)
            agent.stop()
            sys.exit(2)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    click.echo(f"checkpointd: {config.host_name} in cluster {config.cluster_name}, "
               f"applications at {config.app_socket}", err=True)
    while not done.wait(0.1):
        if status_path:
            tmp = status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(agent.status(), f)
            os.replace(tmp, status_path)
    if api is not None:
        api.stop()
    agent.stop()
    if gate is not None:
        gate.close(detach=True)
    store.close()


if __name__ == "__main__":
    main()
