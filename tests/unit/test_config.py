"""Root-free tests of checkpointd's configuration: every error names its field, the
environment overrides the file, the timing rules are enforced at load."""

import dataclasses
import math
import re
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from checkpointd import config as cfg
from checkpointd.config import BYTES_BOUND, Config, ConfigError, from_mapping, load, loads
from kernel.errors import TcpcpError

DOCS = Path(__file__).parent.parent.parent / "docs" / "failover.md"

MINIMAL = {
    "cluster": {"name": "pair-1", "host": "host-a"},
    "etcd": {"endpoints": ["http://10.0.0.1:2379"]},
    "security": {"key_file": "/etc/tcpcp/checkpoint.key"},
    "network": {"vips": ["192.0.2.10"], "interface": "eth0"},
}


def mapping(**sections):
    """MINIMAL with some settings replaced (``timing={"lease_ttl": 3}``) or removed (None)."""
    out = {section: dict(table) for section, table in MINIMAL.items()}
    for section, table in sections.items():
        out.setdefault(section, {})
        for key, value in table.items():
            if value is None:
                out[section].pop(key, None)
            else:
                out[section][key] = value
    return out


def refused(data, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_mapping(data, env=env or {})
    return info.value


# -- valid input ----------------------------------------------------------------------------

def test_minimal_file_takes_the_documented_defaults():
    c = from_mapping(MINIMAL, env={})
    assert c.cluster_name == "pair-1" and c.host_name == "host-a"
    assert c.etcd_endpoints == ("http://10.0.0.1:2379",)
    assert c.vips == (IPv4Address("192.0.2.10"),)
    assert (c.lease_ttl, c.renew_interval, c.retry_timeout, c.fence_margin) == (5.0, 1.0, 1.0, 0.5)
    assert c.msl == 120.0
    assert c.max_bytes == 1 << 30 and c.checkpoint_bytes == 1 << 29
    assert c.max_bytes < BYTES_BOUND
    assert c.etcd_ca is None and c.etcd_user is None and c.etcd_password is None


def test_the_example_in_docs_is_valid():
    """docs/failover.md's example configuration loads as it stands."""
    text = DOCS.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks, "docs/failover.md has no ```toml example"
    for block in blocks:
        c = loads(block, env={})
        assert c.fence_deadline(0.0) < c.lease_ttl


def test_file_on_disk(tmp_path):
    path = tmp_path / "tcpcp.toml"
    path.write_text(
        '[cluster]\nname = "pair-1"\nhost = "host-b"\n'
        '[etcd]\nendpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]\n'
        'ca = "/etc/tcpcp/ca.pem"\ncert = "/etc/tcpcp/c.pem"\nkey = "/etc/tcpcp/c.key"\n'
        '[security]\nkey_file = "/etc/tcpcp/k"\n'
        '[network]\nvips = ["192.0.2.10", "2001:db8::10"]\ninterface = "br-ha"\n'
        '[timing]\nlease_ttl = 1\nrenew_interval = 0.2\nretry_timeout = 0.25\nfence_margin = 0.25\n')
    c = load(path, env={})
    assert c.host_name == "host-b"
    assert c.vips == (IPv4Address("192.0.2.10"), IPv6Address("2001:db8::10"))
    assert c.lease_ttl == 1.0 and isinstance(c.lease_ttl, float)
    assert c.etcd_cert == "/etc/tcpcp/c.pem"


def test_round_trip_through_the_file_form():
    c = from_mapping(mapping(etcd={"user": "tcpcp", "password": "s3cret"}), env={})
    again = from_mapping(c.as_toml_dict(), env={"TCPCP_ETCD_PASSWORD": "s3cret"})
    assert again == c


def test_password_never_printed():
    c = from_mapping(mapping(etcd={"user": "tcpcp", "password": "s3cret"}), env={})
    assert "s3cret" not in repr(c)
    assert "password" not in c.as_toml_dict()["etcd"]


def test_config_is_frozen_and_replace_checks_again():
    c = from_mapping(MINIMAL, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lease_ttl = 1.0
    assert c.replace(lease_ttl=6.0).lease_ttl == 6.0
    with pytest.raises(ConfigError) as info:
        c.replace(lease_ttl=2.0)
    assert info.value.field == "timing.lease_ttl"


def test_error_is_one_of_ours():
    err = refused(mapping(timing={"lease_ttl": "five"}))
    assert isinstance(err, TcpcpError) and isinstance(err, ValueError)
    assert str(err).startswith("invalid configuration: timing.lease_ttl:")
    assert err.reason in str(err)


def test_fence_deadline():
    c = from_mapping(MINIMAL, env={})
    assert c.fence_deadline(100.0) == 100.0 + 5.0 - 0.5


def test_setting_and_env_names():
    assert Config.setting_name("lease_ttl") == "timing.lease_ttl"
    assert Config.env_name("lease_ttl") == "TCPCP_TIMING_LEASE_TTL"
    assert Config.env_name("key_file") == "TCPCP_SECURITY_KEY_FILE"
    assert Config.env_name("app_socket") == "TCPCP_APP_SOCKET"


# -- environment overrides ------------------------------------------------------------------

def test_env_overrides_the_file():
    c = from_mapping(mapping(timing={"lease_ttl": 5}),
                     env={"TCPCP_TIMING_LEASE_TTL": "7.5", "TCPCP_CLUSTER_HOST": "host-b"})
    assert c.lease_ttl == 7.5 and c.host_name == "host-b"


def test_env_lists_ints_and_optional_values():
    c = from_mapping(mapping(etcd={"user": "u", "password": "p"}), env={
        "TCPCP_NETWORK_VIPS": "192.0.2.10, 2001:db8::10",
        "TCPCP_ETCD_ENDPOINTS": "http://a:2379,http://b:2379",
        "TCPCP_BOUNDS_MAX_BYTES": "0x40000000",
        "TCPCP_BOUNDS_CHECKPOINT_BYTES": "268_435_456",
        "TCPCP_ETCD_USER": "", "TCPCP_ETCD_PASSWORD": "",   # empty clears an optional setting
    })
    assert c.vips == (IPv4Address("192.0.2.10"), IPv6Address("2001:db8::10"))
    assert c.etcd_endpoints == ("http://a:2379", "http://b:2379")
    assert c.max_bytes == 1 << 30 and c.checkpoint_bytes == 1 << 28
    assert c.etcd_user is None and c.etcd_password is None


def test_env_alone_can_supply_everything():
    env = {"TCPCP_CLUSTER_NAME": "p", "TCPCP_CLUSTER_HOST": "h",
           "TCPCP_ETCD_ENDPOINTS": "http://127.0.0.1:2379", "TCPCP_SECURITY_KEY_FILE": "/k",
           "TCPCP_NETWORK_VIPS": "10.0.0.1", "TCPCP_NETWORK_INTERFACE": "eth0"}
    c = load(None, env=env)
    assert c.cluster_name == "p" and c.interface == "eth0"


def test_env_bad_number_names_field_and_variable():
    err = refused(MINIMAL, env={"TCPCP_TIMING_LEASE_TTL": "soon"})
    assert err.field == "timing.lease_ttl"
    assert "TCPCP_TIMING_LEASE_TTL" in err.reason


def test_env_unknown_key_in_our_section_refused():
    err = refused(MINIMAL, env={"TCPCP_TIMING_LEASE_TLL": "5"})
    assert err.field == "timing.lease_tll"
    assert "TCPCP_TIMING_LEASE_TLL" in err.reason


def test_env_other_tcpcp_variables_ignored():
    c = from_mapping(MINIMAL, env={"TCPCP_TAG": "x", "TCPCP_DRILL_SEED": "3", "PATH": "/bin"})
    assert c == from_mapping(MINIMAL, env={})


def test_env_override_is_checked_like_the_file():
    err = refused(MINIMAL, env={"TCPCP_TIMING_LEASE_TTL": "2"})
    assert err.field == "timing.lease_ttl"


def test_os_environ_is_the_default(monkeypatch):
    monkeypatch.setenv("TCPCP_TIMING_MSL", "100")
    assert from_mapping(MINIMAL).msl == 100.0


# -- errors name the field ------------------------------------------------------------------

@pytest.mark.parametrize("section,key", [
    ("cluster", "name"), ("cluster", "host"), ("etcd", "endpoints"),
    ("security", "key_file"), ("network", "vips"), ("network", "interface")])
def test_required_setting_missing(section, key):
    err = refused(mapping(**{section: {key: None}}))
    assert err.field == f"{section}.{key}"
    assert f"TCPCP_{section.upper()}_{key.upper()}" in err.reason


BAD_VALUES = [
    ("cluster", "name", "pair 1"),
    ("cluster", "name", ""),
    ("cluster", "host", "a/b"),
    ("cluster", "host", 7),
    ("etcd", "endpoints", "http://10.0.0.1:2379"),     # a string, not a list
    ("etcd", "endpoints", []),
    ("etcd", "endpoints", ["ftp://10.0.0.1:2379"]),
    ("etcd", "endpoints", ["http://10.0.0.1"]),       # no port
    ("etcd", "endpoints", ["http://10.0.0.1:2379/v3"]),
    ("etcd", "endpoints", ["http://a:1", "http://a:1"]),
    ("etcd", "user", ""),
    ("etcd", "cert", "certs/client.pem"),
    ("security", "key_file", "checkpoint.key"),
    ("network", "vips", ["192.0.2.300"]),
    ("network", "vips", []),
    ("network", "vips", ["192.0.2.10", "192.0.2.10"]),
    ("network", "interface", "eth0/1"),
    ("network", "interface", "a-very-long-interface-name"),
    ("network", "interface", ""),
    ("timing", "lease_ttl", "5"),
    ("timing", "lease_ttl", True),
    ("timing", "lease_ttl", 0),
    ("timing", "lease_ttl", math.inf),
    ("timing", "msl", math.nan),
    ("timing", "renew_interval", -1),
    ("timing", "retry_timeout", 0.0),
    ("timing", "checkpoint_interval", 0),
    ("timing", "commit_interval", 0),
    ("timing", "clock_skew", -0.001),
    ("timing", "unprotected_grace", -1),
    ("bounds", "max_bytes", 1.5),
    ("bounds", "checkpoint_bytes", 0),
    ("app", "socket", "app.sock"),
]


@pytest.mark.parametrize("section,key,value", BAD_VALUES)
def test_bad_value_names_its_field(section, key, value):
    err = refused(mapping(**{section: {key: value}}))
    assert err.field == f"{section}.{key}"


def test_unknown_setting_and_section():
    assert refused(mapping(timing={"lease_tll": 5})).field == "timing.lease_tll"
    assert refused({**MINIMAL, "etc": {"x": 1}}).field == "etc"
    assert refused({**MINIMAL, "timing": 5}).field == "timing"


def test_unreadable_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.toml", env={})
    assert info.value.field == "file"
    bad = tmp_path / "bad.toml"
    bad.write_text("[timing\nlease_ttl = 5\n")
    with pytest.raises(ConfigError) as info:
        load(bad, env={})
    assert info.value.field == "file" and "TOML" in info.value.reason


def test_unprotected_grace_may_be_infinite():
    c = from_mapping(mapping(timing={"unprotected_grace": math.inf}), env={})
    assert c.unprotected_grace == math.inf


# -- the timing rules (R2..R9) --------------------------------------------------------------

def timing(**values):
    return mapping(timing=values)


def test_patroni_rule_renew_plus_two_retries_within_ttl():
    # R2: renew_interval + 2*retry_timeout <= lease_ttl
    err = refused(timing(lease_ttl=4, renew_interval=1, retry_timeout=2, fence_margin=0.5))
    assert err.field == "timing.lease_ttl"
    assert "renew_interval + 2*retry_timeout" in err.reason


def test_fencing_deadline_needs_a_margin():
    # R3: the deadline lies strictly before the expiry, by at least 0.1 s
    err = refused(timing(fence_margin=0.05))
    assert err.field == "timing.fence_margin"


def test_fencing_deadline_after_two_attempts():
    # R4: renew_interval + 2*retry_timeout <= lease_ttl - fence_margin
    err = refused(timing(lease_ttl=4, renew_interval=1, retry_timeout=1.5, fence_margin=0.5))
    assert err.field == "timing.fence_margin"
    # exactly on the boundary is accepted (binary-exact values)
    c = from_mapping(timing(lease_ttl=4, renew_interval=1, retry_timeout=1.25, fence_margin=0.5), env={})
    assert c.renew_interval + 2 * c.retry_timeout == c.lease_ttl - c.fence_margin


def test_checkpoint_interval_below_half_the_msl():
    # R5
    err = refused(timing(msl=20, checkpoint_interval=10))
    assert err.field == "timing.checkpoint_interval"
    from_mapping(timing(msl=20, checkpoint_interval=9.5, lease_ttl=5), env={})


def test_newest_checkpoint_still_young_when_the_lease_lapses():
    # R6: checkpoint_interval + lease_ttl + clock_skew < msl
    err = refused(timing(msl=20, checkpoint_interval=9, lease_ttl=10, renew_interval=1,
                         retry_timeout=1, clock_skew=1))
    assert err.field == "timing.msl"


def test_commit_interval_rules():
    # R7
    assert refused(timing(commit_interval=0.2)).field == "timing.commit_interval"
    assert refused(timing(commit_interval=0.1, checkpoint_interval=0.05)).field == "timing.commit_interval"
    from_mapping(timing(commit_interval=0.19), env={})


@pytest.mark.parametrize("max_bytes,ok", [(BYTES_BOUND - 1, True), (BYTES_BOUND, False), (1 << 40, False)])
def test_max_bytes_below_two_to_the_31(max_bytes, ok):
    # R8
    data = mapping(bounds={"max_bytes": max_bytes})
    if ok:
        assert from_mapping(data, env={}).max_bytes == max_bytes
    else:
        assert refused(data).field == "bounds.max_bytes"


def test_checkpoint_bytes_below_max_bytes():
    err = refused(mapping(bounds={"checkpoint_bytes": 1 << 30, "max_bytes": 1 << 30}))
    assert err.field == "bounds.checkpoint_bytes"


def test_etcd_tls_and_auth_rules():
    # R9
    assert refused(mapping(etcd={"endpoints": ["https://10.0.0.1:2379"]})).field == "etcd.ca"
    assert refused(mapping(etcd={"cert": "/c.pem"})).field == "etcd.key"
    assert refused(mapping(etcd={"key": "/c.key"})).field == "etcd.cert"
    assert refused(mapping(etcd={"user": "u"})).field == "etcd.password"
    assert refused(mapping(etcd={"password": "p"})).field == "etcd.user"


def test_rules_are_written_in_the_module_docstring():
    for rule in ("R2", "R3", "R4", "R5", "R6", "R7", "R8", "R9", "loop_wait + 2*retry_timeout"):
        assert rule in cfg.__doc__


def test_the_drill_overrides_in_docs_are_valid():
    """docs/failover.md's `export TCPCP_...` lines, applied to its example file."""
    text = DOCS.read_text()
    toml = re.findall(r"```toml\n(.*?)```", text, re.S)[0]
    env = dict(re.findall(r"^export (TCPCP_\w+)=(\S*)$", text, re.M))
    assert env, "docs/failover.md has no export TCPCP_... lines"
    c = loads(toml, env=env)
    assert c.lease_ttl == 1.0 and c.fence_deadline(0.0) == 0.75


# -- api.listen and log.format ----------------------------------------------------------------

def test_api_and_log_defaults():
    c = from_mapping(MINIMAL, env={})
    assert c.api_listen == "127.0.0.1:8008" and c.log_format == "text"
    assert Config.setting_name("api_listen") == "api.listen"
    assert Config.env_name("api_listen") == "TCPCP_API_LISTEN"
    assert Config.env_name("log_format") == "TCPCP_LOG_FORMAT"


@pytest.mark.parametrize("listen", ["0.0.0.0:8008", "[::]:8008", "[2001:db8::1]:9000",
                                    "localhost:8008", "agent-a.example.net:1", "127.0.0.1:0", ""])
def test_api_listen_accepted(listen):
    c = from_mapping(mapping(api={"listen": listen}, log={"format": "json"}), env={})
    assert c.api_listen == listen and c.log_format == "json"


@pytest.mark.parametrize("listen", ["127.0.0.1", "8008", ":8008", "::1:8008", "[::1]", "[nope]:80",
                                    "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:http",
                                    "300.0.0.1:80", "a b:80", 8008, ["127.0.0.1:8008"]])
def test_api_listen_refused_names_the_field(listen):
    assert refused(mapping(api={"listen": listen})).field == "api.listen"


@pytest.mark.parametrize("fmt", ["xml", "JSON", "", 1])
def test_log_format_refused_names_the_field(fmt):
    assert refused(mapping(log={"format": fmt})).field == "log.format"


def test_api_and_log_from_the_environment():
    c = from_mapping(mapping(api={"listen": "0.0.0.0:8008"}),
                     env={"TCPCP_API_LISTEN": "[::1]:9100", "TCPCP_LOG_FORMAT": "json"})
    assert c.api_listen == "[::1]:9100" and c.log_format == "json"
    # an empty value disables the API (it is not "unset": the default would enable it)
    assert from_mapping(MINIMAL, env={"TCPCP_API_LISTEN": ""}).api_listen == ""
    assert refused(MINIMAL, env={"TCPCP_API_LISTEN": "nowhere"}).field == "api.listen"
    assert refused(MINIMAL, env={"TCPCP_LOG_FORMAT": "yaml"}).field == "log.format"
    assert refused(MINIMAL, env={"TCPCP_API_LISTN": "x"}).field == "api.listn"


def test_api_and_log_round_trip_and_are_documented():
    c = from_mapping(mapping(api={"listen": ""}, log={"format": "json"}), env={})
    assert c.as_toml_dict()["api"] == {"listen": "", "partners": [], "failsafe": True} and c.as_toml_dict()["log"] == {"format": "json"}
    assert from_mapping(c.as_toml_dict(), env={}) == c
    for name in ("api.listen", "log.format"):
        assert name in cfg.__doc__


def test_parse_listen():
    assert cfg.parse_listen("127.0.0.1:8008") == ("127.0.0.1", 8008)
    assert cfg.parse_listen("[::1]:0") == ("::1", 0)
    assert cfg.parse_listen("[2001:DB8::1]:80") == ("2001:db8::1", 80)
    with pytest.raises(ValueError):
        cfg.parse_listen("::1:8008")


def test_fail_safe_must_fit_before_the_fencing_deadline():
    """R11: with partners, a timed-out renewal and the partner's own etcd attempt must
    both fit before lease_ttl - fence_margin."""
    with pytest.raises(ConfigError) as err:
        from_mapping(mapping(api={"partners": ["http://10.0.0.2:8008"]},
                             timing={"lease_ttl": 1, "renew_interval": 0.1, "retry_timeout": 0.25,
                                     "fence_margin": 0.3, "checkpoint_interval": 5,
                                     "commit_interval": 0.005}), env={})
    assert err.value.field == "api.partners"
    ok = from_mapping(mapping(api={"partners": ["http://10.0.0.2:8008"]},
                              timing={"lease_ttl": 2, "renew_interval": 0.1, "retry_timeout": 0.25,
                                      "fence_margin": 0.3, "checkpoint_interval": 5,
                                      "commit_interval": 0.005}), env={})
    assert ok.api_partners == ("http://10.0.0.2:8008",)



def test_failsafe_off_lifts_r11_and_reads_from_the_environment():
    timing = {"lease_ttl": 1, "renew_interval": 0.1, "retry_timeout": 0.25, "fence_margin": 0.3,
              "checkpoint_interval": 5, "commit_interval": 0.005}
    c = from_mapping(mapping(api={"partners": ["http://10.0.0.2:8008"], "failsafe": False},
                             timing=timing), env={})
    assert c.api_partners and c.api_failsafe is False
    c = from_mapping(mapping(api={"partners": ["http://10.0.0.2:8008"]}, timing=timing),
                     env={"TCPCP_API_FAILSAFE": "false"})
    assert c.api_failsafe is False
    with pytest.raises(ConfigError) as err:
        from_mapping(mapping(api={"failsafe": "yes"}), env={})
    assert err.value.field == "api.failsafe"
