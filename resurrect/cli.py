"""The ``resurrect`` operator command.

Today: inspect ICI records (as written by ``ICI.encode`` or carried in a passing record).
Checkpoint listing, verification and switch-over arrive with the operator issue.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from kernel.errors import ICIError
from kernel.ici import ICI, STATE_NAMES


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


@click.group()
def main() -> None:
    """Inspect and (later) resurrect tcpcp connections."""


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


if __name__ == "__main__":
    main()
