"""Root-free tests of checkpointd/logfmt.py: one JSON object per line with the HA decision's
fields, a text format that keeps them, and ``configure`` as the CLI calls it."""

import io
import json
import logging
import re

import pytest

from checkpointd import logfmt


def record(msg="primary: acquired the leader key", args=(), level=logging.INFO, extra=None,
           exc_info=None, created=1714566896.789):
    rec = logging.getLogger("checkpointd").makeRecord(
        "checkpointd", level, __file__, 1, msg, args, exc_info, extra=extra)
    rec.created = created
    return rec


def test_json_line_has_the_base_fields():
    line = logfmt.JsonFormatter().format(record())
    assert "\n" not in line
    assert json.loads(line) == {"ts": "2024-05-01T12:34:56.789Z", "level": "info",
                                "logger": "checkpointd", "msg": "primary: acquired the leader key"}


def test_json_includes_reason_and_other_extra_fields():
    extra = {"role": "primary", "reason": "acquired the leader key", "epoch": 7, "conn": "c-1"}
    out = json.loads(logfmt.JsonFormatter().format(record(extra=extra)))
    for key, value in extra.items():
        assert out[key] == value


def test_json_message_arguments_and_unicode():
    out = json.loads(logfmt.JsonFormatter().format(record("fenced %d connections: %s", (3, "ä"))))
    assert out["msg"] == "fenced 3 connections: ä"


def test_json_never_fails_on_odd_extra_values_and_keeps_colliding_names():
    out = json.loads(logfmt.JsonFormatter().format(
        record(extra={"vips": {object()}, "level": "mine"})))
    assert out["vips"].startswith("{<object")
    assert out["level"] == "info" and out["extra_level"] == "mine"


def test_json_exception_is_one_field():
    try:
        raise ValueError("bad record")
    except ValueError:
        import sys
        rec = record("commit round failed", level=logging.ERROR, exc_info=sys.exc_info())
    line = logfmt.JsonFormatter().format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "error"
    assert "ValueError: bad record" in out["exc"] and "Traceback" in out["exc"]


@pytest.mark.parametrize("created,ts", [(0.0, "1970-01-01T00:00:00.000Z"),
                                        (1714566896.0009, "2024-05-01T12:34:56.000Z"),
                                        (1714566896.999, "2024-05-01T12:34:56.999Z")])
def test_rfc3339_utc_milliseconds(created, ts):
    assert logfmt.rfc3339(created) == ts
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)


def test_text_keeps_the_extra_fields():
    line = logfmt.TextFormatter().format(
        record(extra={"role": "standby", "reason": "another host holds the leader key"}))
    assert line == ('2024-05-01T12:34:56.789Z INFO checkpointd primary: acquired the leader key '
                    'role=standby reason="another host holds the leader key"')


def test_formatter_by_name():
    assert isinstance(logfmt.formatter("json"), logfmt.JsonFormatter)
    assert isinstance(logfmt.formatter("text"), logfmt.TextFormatter)
    with pytest.raises(ValueError):
        logfmt.formatter("xml")


@pytest.fixture
def root_logger():
    """configure() replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_json_replaces_handlers_and_sets_level(root_logger):
    out = io.StringIO()
    logfmt.configure("json", "warning", stream=out)
    logfmt.configure("json", "info", stream=out)        # twice: still one handler
    assert len(root_logger.handlers) == 1 and root_logger.level == logging.INFO
    log = logging.getLogger("checkpointd")
    log.debug("not shown")
    log.info("standby: leader is b", extra={"role": "standby", "reason": "leader is b"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["reason"] == "leader is b"


def test_configure_refuses_unknown_level_and_format(root_logger):
    with pytest.raises(ValueError):
        logfmt.configure("json", "chatty")
    with pytest.raises(ValueError):
        logfmt.configure("yaml", logging.INFO)
