"""The store against an etcd that demands TLS with client certificates, and one that demands
a user and password: what works, and that each wrong setting is refused quickly, with an
error that names what to fix (docs/security.md).

The certificates are made by the test (secure_etcd.py); every etcd runs on 127.0.0.1 on
free ports with its data in a pytest tmp dir and is stopped by its PID, on failure too.
"""

from __future__ import annotations

import time
import uuid

import pytest

from checkpointd.config import ConfigError, from_mapping
from checkpointd.store.errors import StoreError, StoreUnavailable
from checkpointd.store.etcd import EtcdStore, parse_endpoint, store_from_config

from etcdproc import start_etcd, wait_until
from secure_etcd import ROOT_PASSWORD, enable_auth, etcdctl, make_pki, start_tls_etcd

TIMEOUT = 1.0
#: A refusal must come well within the timeout: it is an answer, not a hang.
REFUSED_WITHIN_S = TIMEOUT + 0.5
PASSWORD = "s3cret-Pa55"
USERS = {"tcpcp": (PASSWORD, "/tcpcp/"), "other": ("other-pw", "/other/")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory, pki):
    server = start_tls_etcd(tmp_path_factory.mktemp("etcd-tls"), pki)
    try:
        yield server
    finally:
        server.stop()


def _auth_etcd(tmp_dir):
    server = start_etcd(tmp_dir)
    try:
        enable_auth(server, USERS)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    server = _auth_etcd(tmp_path_factory.mktemp("etcd-auth"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster():
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def stores():
    """Make stores that are closed at the end of the test whatever happens."""
    made = []

    def make(*args, **kwargs):
        made.append(EtcdStore(*args, timeout=TIMEOUT, **kwargs))
        return made[-1]
    yield make
    for s in made:
        s.close()


def tls_args(pki, *, ca=None, cert=True, other_client=False):
    args = {"ca_cert": (ca or pki.ca).read_bytes()}
    if cert:
        c, k = ((pki.other_client_cert, pki.other_client_key) if other_client
                else (pki.client_cert, pki.client_key))
        args.update(client_cert=c.read_bytes(), client_key=k.read_bytes())
    return args


def exercise(store):
    """What an agent does: lead, checkpoint, read back, renew, delete, resign."""
    lease = store.acquire_leader("host-a", 5)
    assert lease is not None and lease.epoch == 1
    revision = store.put_many({"10.0.0.1:80-10.0.0.2:5555": b"sealed", "c2": b"x"}, leader_lease=lease)
    snap = store.get_all()
    assert snap.items == {"10.0.0.1:80-10.0.0.2:5555": b"sealed", "c2": b"x"}
    assert snap.revision >= revision
    assert store.renew(lease) > 0
    assert store.lease_time_left(lease.id) is not None
    assert store.delete("c2", leader_lease=lease)
    store.resign(lease)
    assert store.leader().name is None


def refused(fn, *args, exc=StoreError):
    """Call ``fn``; return the StoreError it raised, checking it came at once."""
    start = time.monotonic()
    with pytest.raises(exc) as info:
        fn(*args)
    assert time.monotonic() - start < REFUSED_WITHIN_S, "a refusal took as long as an outage"
    return info.value


# -- TLS -------------------------------------------------------------------------------------
@pytest.mark.etcd
def test_store_works_over_mutual_tls(tls_etcd, pki, stores, cluster):
    assert tls_etcd.endpoint.startswith("https://")
    exercise(stores([tls_etcd.endpoint], cluster, **tls_args(pki)))


@pytest.mark.etcd
def test_wrong_ca_is_refused_naming_etcd_ca(tls_etcd, pki, stores, cluster):
    store = stores([tls_etcd.endpoint], cluster, **tls_args(pki, ca=pki.other_ca))
    err = refused(store.leader)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err) and "etcd.ca" in str(err)
    # Within the retry interval the member is skipped; the reason is still given.
    again = refused(store.acquire_leader, "host-a", 5)
    assert "etcd.ca" in str(again)


@pytest.mark.etcd
def test_no_client_certificate_is_refused(tls_etcd, pki, stores, cluster):
    store = stores([tls_etcd.endpoint], cluster, **tls_args(pki, cert=False))
    err = refused(store.leader)
    assert "client certificate" in str(err) and "etcd.cert" in str(err)


@pytest.mark.etcd
def test_client_certificate_of_another_ca_is_refused(tls_etcd, pki, stores, cluster):
    store = stores([tls_etcd.endpoint], cluster, **tls_args(pki, other_client=True))
    err = refused(store.leader)
    assert "client certificate" in str(err)


@pytest.mark.etcd
def test_certificate_must_name_the_endpoint(tls_etcd, pki, stores, cluster):
    """The server certificate names 127.0.0.1 only: dialled as localhost, it is refused."""
    store = stores([tls_etcd.endpoint.replace("127.0.0.1", "localhost")], cluster, **tls_args(pki))
    err = refused(store.leader)
    assert "does not name this endpoint" in str(err)


@pytest.mark.etcd
def test_tls_to_a_plain_etcd_is_refused(etcd_server, pki, stores, cluster):
    store = stores([etcd_server.endpoint.replace("http://", "https://")], cluster, **tls_args(pki))
    err = refused(store.leader)
    assert "TLS" in str(err)


@pytest.mark.etcd
def test_plain_client_gets_nothing_from_a_tls_etcd(tls_etcd, stores, cluster):
    """Bypassing the store's own check, a plain gRPC channel gets no answer either."""
    store = stores([tls_etcd.endpoint.replace("https://", "http://")], cluster)
    refused(store.leader, exc=StoreUnavailable)


@pytest.mark.parametrize("endpoint, tls, words", [
    ("https://127.0.0.1:2379", False, "etcd.ca"),
    ("http://127.0.0.1:2379", True, "every endpoint must be https"),
])
def test_scheme_must_agree_with_the_tls_settings(endpoint, tls, words):
    with pytest.raises(ValueError, match=words):
        parse_endpoint(endpoint, tls=tls)


def test_endpoint_forms_with_tls():
    assert parse_endpoint("https://127.0.0.1:2379", tls=True) == ("127.0.0.1", 2379)
    assert parse_endpoint("[::1]:2379", tls=True) == ("[::1]", 2379)
    assert parse_endpoint("etcd.example:2379", tls=True) == ("etcd.example", 2379)


def test_mixed_schemes_are_refused(pki):
    with pytest.raises(ValueError, match="plain http"):
        EtcdStore(["https://127.0.0.1:1", "http://127.0.0.1:2"], "c", ca_cert=pki.ca.read_bytes())


@pytest.mark.parametrize("kwargs, words", [
    ({"client_cert": b"c"}, "come together"),
    ({"client_cert": b"c", "client_key": b"k"}, "needs TLS"),
    ({"user": "u"}, "come together"),
    ({"user": "", "password": "p"}, "non-empty"),
])
def test_incomplete_security_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EtcdStore(["http://127.0.0.1:1"], "c", **kwargs)


# -- store_from_config ----------------------------------------------------------------------------
def config_for(endpoint, **etcd):
    return from_mapping({
        "cluster": {"name": "c1", "host": "host-a"},
        "etcd": {"endpoints": [endpoint], **etcd},
        "security": {"key_file": "/etc/tcpcp/keys"},
        "network": {"vips": ["192.0.2.10"], "interface": "eth0"},
        "timing": {"retry_timeout": TIMEOUT},
    }, env={})


def tls_settings(pki):
    return {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}


@pytest.mark.etcd
def test_store_from_config_over_tls(tls_etcd, pki):
    with store_from_config(config_for(tls_etcd.endpoint, **tls_settings(pki))) as store:
        assert store.timeout == TIMEOUT and store.tls and store.layout.cluster == "c1"
        assert store.leader().revision > 0


@pytest.mark.etcd
def test_store_from_config_with_a_user(auth_etcd):
    config = config_for(auth_etcd.endpoint, user="tcpcp", password=PASSWORD)
    with store_from_config(config) as store:
        assert store.user == "tcpcp"
        assert store.leader().revision > 0
        assert PASSWORD not in repr(store) and PASSWORD not in repr(config)


@pytest.mark.parametrize("setting", ["ca", "cert", "key"])
def test_unreadable_tls_file_names_its_setting(pki, tmp_path, setting):
    settings = {**tls_settings(pki), setting: str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError) as info:
        store_from_config(config_for("https://127.0.0.1:2379", **settings))
    assert info.value.field == f"etcd.{setting}" and "missing.pem" in str(info.value)


@pytest.mark.parametrize("setting", ["ca", "cert", "key"])
def test_tls_file_without_pem_names_its_setting(pki, tmp_path, setting):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    settings = {**tls_settings(pki), setting: str(junk)}
    with pytest.raises(ConfigError) as info:
        store_from_config(config_for("https://127.0.0.1:2379", **settings))
    assert info.value.field == f"etcd.{setting}" and "junk.pem" in str(info.value)


def test_key_of_another_certificate_is_refused(pki):
    settings = {**tls_settings(pki), "key": str(pki.other_client_key)}
    with pytest.raises(ConfigError, match="not the key of the certificate") as info:
        store_from_config(config_for("https://127.0.0.1:2379", **settings))
    assert info.value.field == "etcd.key"


def test_plain_endpoint_with_a_ca_is_refused(pki):
    with pytest.raises(ConfigError, match="every endpoint must be https") as info:
        store_from_config(config_for("http://127.0.0.1:2379", ca=str(pki.ca)))
    assert info.value.field == "etcd.endpoints"


def test_client_certificate_without_tls_is_refused(pki):
    settings = {"cert": str(pki.client_cert), "key": str(pki.client_key)}
    with pytest.raises(ConfigError) as info:
        store_from_config(config_for("http://127.0.0.1:2379", **settings))
    assert info.value.field == "etcd.ca"


# -- authentication ----------------------------------------------------------------------------------
@pytest.mark.etcd
def test_right_user_works(auth_etcd, stores, cluster):
    exercise(stores([auth_etcd.endpoint], cluster, user="tcpcp", password=PASSWORD))


@pytest.mark.etcd
def test_wrong_password_is_refused_at_once(auth_etcd, stores, cluster):
    store = stores([auth_etcd.endpoint], cluster, user="tcpcp", password="wrong-" + PASSWORD)
    err = refused(store.acquire_leader, "host-a", 5)
    assert err.code == "UNAUTHENTICATED" and not isinstance(err, StoreUnavailable)
    assert "'tcpcp'" in str(err) and "etcd.password" in str(err)
    assert PASSWORD not in str(err) and PASSWORD not in repr(store)


@pytest.mark.etcd
def test_unknown_user_is_refused(auth_etcd, stores, cluster):
    store = stores([auth_etcd.endpoint], cluster, user="nobody", password=PASSWORD)
    assert refused(store.leader).code == "UNAUTHENTICATED"


@pytest.mark.etcd
def test_user_without_permission_on_the_prefix_is_refused(auth_etcd, stores, cluster):
    """``other`` may write /other/ only: it can neither read nor take the leader key."""
    store = stores([auth_etcd.endpoint], cluster, user="other", password="other-pw")
    err = refused(store.acquire_leader, "host-a", 5)
    assert err.code == "PERMISSION_DENIED" and f"/tcpcp/{cluster}/" in str(err)
    assert refused(store.get_all).code == "PERMISSION_DENIED"
    # and nothing was written
    assert stores([auth_etcd.endpoint], cluster, user="tcpcp", password=PASSWORD).leader().epoch == 0


@pytest.mark.etcd
def test_no_credentials_against_an_authenticating_etcd(auth_etcd, stores, cluster):
    err = refused(stores([auth_etcd.endpoint], cluster).leader)
    assert "set etcd.user and etcd.password" in str(err)


@pytest.mark.etcd
def test_a_user_for_an_etcd_without_auth_is_refused(etcd_server, stores, cluster):
    """Fail closed: the operator believes etcd checks who writes; it does not."""
    err = refused(stores([etcd_server.endpoint], cluster, user="tcpcp", password=PASSWORD).leader)
    assert "does not authenticate" in str(err)


@pytest.mark.etcd
def test_a_token_etcd_does_not_know_is_replaced_once(auth_etcd, stores, cluster):
    store = stores([auth_etcd.endpoint], cluster, user="tcpcp", password=PASSWORD)
    lease = store.acquire_leader("host-a", 5)
    first = store._token
    store._token = "forged.1"                 # as after a restart: etcd forgets simple tokens
    store.put_many({"c": b"1"}, leader_lease=lease)
    assert store._token not in (None, "forged.1", first)
    assert store.get_all().items == {"c": b"1"}


@pytest.mark.etcd
def test_client_certificate_names_the_user_when_etcd_authenticates(tmp_path, pki, stores, cluster):
    """etcd with --client-cert-auth and auth on: a call without a token is made as the user
    named by the certificate's Common Name ("tcpcp-client"), no password needed."""
    server = start_tls_etcd(tmp_path, pki)
    try:
        enable_auth(server, {"tcpcp-client": ("unused-pw", "/tcpcp/")}, pki)
        exercise(stores([server.endpoint], cluster, **tls_args(pki)))
        # the same certificate gives no right outside the role's prefix
        with pytest.raises(RuntimeError, match="permission denied"):
            etcdctl(server, "put", "/elsewhere", "x", pki=pki)
    finally:
        server.stop()


@pytest.fixture
def own_auth_etcd(tmp_path):
    server = _auth_etcd(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.etcd
def test_the_same_store_authenticates_again_after_etcd_restarts(own_auth_etcd, stores, cluster):
    store = stores([own_auth_etcd.endpoint], cluster, user="tcpcp", password=PASSWORD)
    lease = store.acquire_leader("host-a", 30)
    store.put_many({"c": b"1"}, leader_lease=lease)
    token = store._token
    own_auth_etcd.stop()
    own_auth_etcd.start()

    def answers():
        try:
            return store.get_all().items
        except StoreUnavailable:
            return None                   # still reconnecting; any other StoreError fails
    assert wait_until(answers, 10.0, "answering after the restart") == {"c": b"1"}
    assert store._token != token
    store.put_many({"c": b"2"}, leader_lease=lease)


@pytest.mark.etcd
def test_root_sees_what_the_agent_wrote(auth_etcd, stores, cluster):
    """The test's users are what it says: root reads the agent's keys with etcdctl."""
    store = stores([auth_etcd.endpoint], cluster, user="tcpcp", password=PASSWORD)
    lease = store.acquire_leader("host-a", 5)
    store.put_many({"c": b"1"}, leader_lease=lease)
    out = etcdctl(auth_etcd, "get", "--prefix", "--keys-only", f"/tcpcp/{cluster}/",
                  user=f"root:{ROOT_PASSWORD}")
    assert f"/tcpcp/{cluster}/conn/c" in out.split()
    with pytest.raises(RuntimeError, match="user name is empty|permission denied"):
        etcdctl(auth_etcd, "get", "--prefix", f"/tcpcp/{cluster}/")
