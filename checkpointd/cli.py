"""The ``checkpointd`` command.

Today it carries the live-passing demonstration (the project's main job until the
fail-over drill lands); the agent itself arrives with the fail-over issue.
"""

from __future__ import annotations

import json
import resource
import sys

import click


def _raise_fd_limit() -> None:
    """A thousand connections on both hosts plus the peer's need more than 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


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

    _raise_fd_limit()
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


if __name__ == "__main__":
    main()
