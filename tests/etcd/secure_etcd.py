"""etcd with TLS or with authentication, for the store's security tests.

Certificates are made here with ``cryptography`` (no openssl command, no fixed files that
expire): a CA, a server certificate for 127.0.0.1 (an IP SAN: gRPC checks the address it
dialled against it), a client certificate, and a second, unrelated CA to play the wrong
one. Users and roles are created with ``etcdctl`` against the test's own etcd, before
``auth enable``, the order etcd requires (it refuses to enable auth without a root user).

Like etcdproc.py, a module of its own name so that test modules import it directly.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdproc import EtcdServer, start_etcd

ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
ETCDCTL_TIMEOUT_S = 30.0
ROOT_PASSWORD = "root-pw"


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files one test etcd and its clients use."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path           # a CA that signed nothing etcd presents or trusts
    other_client_cert: Path  # a client certificate signed by other_ca
    other_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _issue(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
           ip: str | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(directory: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(name, key, name, key, ca=True)
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and another CA with
    a client certificate of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key = _ca(directory, "test-ca")
    other_ca, other_key = _ca(directory, "other-ca")
    files = {}
    for role, usage, ip, issuer, issuer_key in (
            ("server", ExtendedKeyUsageOID.SERVER_AUTH, "127.0.0.1", "test-ca", ca_key),
            ("client", ExtendedKeyUsageOID.CLIENT_AUTH, None, "test-ca", ca_key),
            ("other_client", ExtendedKeyUsageOID.CLIENT_AUTH, None, "other-ca", other_key)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"tcpcp-{role}", key, issuer, issuer_key, ip=ip, usage=usage)
        files[f"{role}_cert"] = directory / f"{role}.pem"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = directory / f"{role}-key.pem"
        _write_key(files[f"{role}_key"], key)
    return Pki(ca=ca_path, other_ca=other_ca, **files)


def start_tls_etcd(tmp_dir: Path, pki: Pki) -> EtcdServer:
    """etcd serving clients over TLS only, and only to clients with a certificate our CA
    signed (``--client-cert-auth``). Peers stay plain: one member, nobody to talk to."""
    return start_etcd(tmp_dir, scheme="https", extra_args=[
        "--cert-file", pki.server_cert, "--key-file", pki.server_key,
        "--trusted-ca-file", pki.ca, "--client-cert-auth"])


def etcdctl(server: EtcdServer, *args: str, user: str | None = None, pki: Pki | None = None) -> str:
    """Run etcdctl against ``server`` (over TLS with our client certificate when ``pki`` is
    given); raise with its output if it fails."""
    cmd = [ETCDCTL, f"--endpoints={server.endpoint}", "--dial-timeout=5s", "--command-timeout=10s"]
    if user is not None:
        cmd.append(f"--user={user}")
    if pki is not None:
        cmd += [f"--cacert={pki.ca}", f"--cert={pki.client_cert}", f"--key={pki.client_key}"]
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=ETCDCTL_TIMEOUT_S,
                         env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
    if res.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)}: {res.stdout}{res.stderr}")
    return res.stdout


def enable_auth(server: EtcdServer, users: dict[str, tuple[str, str]], pki: Pki | None = None) -> None:
    """Create ``root`` and each ``name: (password, prefix)`` with a role granted readwrite
    on that key prefix only, then turn authentication on."""
    def ctl(*args):
        return etcdctl(server, *args, pki=pki)
    ctl("user", "add", f"root:{ROOT_PASSWORD}", "--interactive=false")
    ctl("user", "grant-role", "root", "root")
    for name, (password, prefix) in users.items():
        role = f"{name}-role"
        ctl("role", "add", role)
        ctl("role", "grant-permission", role, "--prefix=true", "readwrite", prefix)
        ctl("user", "add", f"{name}:{password}", "--interactive=false")
        ctl("user", "grant-role", name, role)
    ctl("auth", "enable")
