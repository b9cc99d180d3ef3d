"""The operator's view of an ICI record (root-free)."""

import json
from pathlib import Path

from click.testing import CliRunner

from resurrect.cli import main

GOLDEN = Path(__file__).parent.parent / "golden"


def test_decode_prints_fields_without_queue_contents():
    result = CliRunner().invoke(main, ["decode", "--hex", str(GOLDEN / "v4_full.hex"), "--format", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["local_addr"] == "10.77.0.100" and info["remote_port"] == 40001
    assert info["recv_queue_len"] == 3 and info["unsent_queue_len"] == 6
    assert "recv_queue" not in info
    assert info["options"] == ["wscale", "sack", "timestamps", "window"]


def test_decode_refuses_a_damaged_record_naming_the_field(tmp_path):
    raw = bytearray(bytes.fromhex((GOLDEN / "v4_full.hex").read_text().replace("\n", "")))
    raw[5] = 9  # version 9
    bad = tmp_path / "bad.ici"
    bad.write_bytes(bytes(raw))
    result = CliRunner().invoke(main, ["decode", str(bad)])
    assert result.exit_code == 2
    assert "version" in result.output
