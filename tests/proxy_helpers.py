"""Helpers of the forward-proxy tests: certificate authorities made on the spot, and curl runs."""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CAFiles:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str, *, ca: bool = True) -> CAFiles:
    """A self-signed certificate (a CA when ``ca``) and its key, as PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = CAFiles(directory / f"{name}.pem", directory / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def make_leaf(ca: CAFiles, directory: Path, host: str = "127.0.0.1") -> CAFiles:
    """A server certificate for the IP address ``host`` signed by ``ca``, and its key, as PEM files."""
    import ipaddress

    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = CAFiles(directory / f"{host}.pem", directory / f"{host}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    files.key.chmod(0o644)  # nginx's workers read it
    return files


@dataclass(frozen=True)
class CurlResult:
    returncode: int
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str


def curl(url: str, *args: str, proxy: str = "", timeout: float = 30) -> CurlResult:
    """``curl`` (blocking: call through ``trio.to_thread``) with the final answer's status, headers (names
    lowercased, last value wins) and body."""
    command = ["curl", "-sS", "--noproxy", "", "-D", "-", "--max-time", str(timeout)]
    if proxy:
        command += ["--proxy", proxy]
    done = subprocess.run([*command, *args, url], capture_output=True, timeout=timeout + 5, check=False)
    raw = done.stdout
    status, body = 0, raw
    headers: dict[str, str] = {}
    # With a proxy CONNECT, curl prints the proxy's "200 Connection established" head first.
    while raw.startswith(b"HTTP/"):
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = raw
    return CurlResult(done.returncode, status, headers, body, done.stderr.decode(errors="replace"))
