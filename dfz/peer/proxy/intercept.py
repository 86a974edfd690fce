"""HTTPS interception: TLS of chosen hosts is terminated by the proxy with certificates signed by the
operator's CA, so that the HTTP requests inside can be read and sent P2P by the proxy rules.

Theory of operation
    The operator gives a CA certificate and its private key (``proxy_ca_cert``, ``proxy_ca_key``, PEM)
    and the hosts to intercept (``proxy_intercept``, regular expressions matching the whole host name).
    Clients must trust that CA (``curl --cacert``, ``pip --cert``, the system store). For a ``CONNECT``
    to such a host the proxy answers ``200``, then plays the server side of TLS with a leaf certificate
    for the host (minted on first use, signed by the CA, kept in memory for the process's life, at most
    :data:`MAX_CACHED` hosts), and serves the HTTP/1.1 requests that follow over the decrypted stream as
    if they had come in absolute form with ``https://host[:port]`` in front: the same rules decide P2P
    or pass-through, and a pass-through request goes to the origin over a new TLS connection verified as
    the daemon's back-to-source client verifies (``http_ca_bundle``, ``http_insecure``).

    The leaf certificates share one ECDSA P-256 key made when the proxy starts; they are valid from one
    hour ago for :data:`LEAF_DAYS` days (never beyond the CA's own end), name the host as a DNS name or an
    IP address in subjectAltName, and are for server authentication only. A client that does not trust
    the CA fails its handshake; that is logged and the connection closed.

What goes wrong: a CA file that cannot be read, is not a CA, or whose key does not match raises
:class:`CAError` when the config is loaded (the daemon does not start).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_CACHED = 1024
"""Leaf certificates (one per host) kept in memory."""
LEAF_DAYS = 30
_CAKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


class CAError(ValueError):
    """The operator's CA certificate or key cannot be used; the message says which file and why."""


class CertificateAuthority:
    """The operator's CA (certificate and key), and the leaf certificates it signed for intercepted hosts."""

    def __init__(self, cert: x509.Certificate, key: _CAKey, cert_pem: bytes) -> None:
        self.cert = cert
        self.key = key
        self.cert_pem = cert_pem
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, cert_file: str | Path, key_file: str | Path) -> CertificateAuthority:
        """Read and check the CA: a certificate that may sign (basicConstraints CA), its own private key
        (unencrypted PEM). Raises :class:`CAError`."""
        try:
            cert_pem = Path(cert_file).read_bytes()
        except OSError as e:
            raise CAError(f"proxy_ca_cert: cannot read {cert_file}: {e.strerror or e}") from None
        try:
            key_pem = Path(key_file).read_bytes()
        except OSError as e:
            raise CAError(f"proxy_ca_key: cannot read {key_file}: {e.strerror or e}") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise CAError(f"proxy_ca_cert: {cert_file} is not a PEM certificate: {e}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise CAError(f"proxy_ca_key: {key_file} is not an unencrypted PEM private key: {e}") from None
        if not isinstance(
            key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
        ):
            raise CAError(f"proxy_ca_key: {key_file}: an RSA, EC or EdDSA key is needed, got {type(key).__name__}")
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
            serialization.Encoding.DER, public
        ):
            raise CAError(f"proxy_ca_key: {key_file} is not the key of the certificate {cert_file}")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CAError(f"proxy_ca_cert: {cert_file} is not a CA certificate (basicConstraints CA:TRUE is needed)")
        if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
            raise CAError(f"proxy_ca_cert: {cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return cls(cert, key, cert_pem)

    def server_context(self, host: str) -> ssl.SSLContext:
        """The server-side TLS context that presents a leaf certificate for ``host`` (minted on first use)."""
        with self._lock:
            found = self._contexts.get(host)
            if found is not None:
                self._contexts.move_to_end(host)
                return found
        context = self._context_for(host)
        with self._lock:
            self._contexts[host] = context
            while len(self._contexts) > MAX_CACHED:
                self._contexts.popitem(last=False)
        return context

    async def server_context_async(self, host: str) -> ssl.SSLContext:
        with self._lock:
            found = self._contexts.get(host)
        if found is not None:
            return found
        return await trio.to_thread.run_sync(self.server_context, host)

    def leaf(self, host: str) -> x509.Certificate:
        """A new leaf certificate for ``host`` signed by this CA."""
        now = datetime.datetime.now(datetime.UTC)
        end = min(now + datetime.timedelta(days=LEAF_DAYS), self.cert.not_valid_after_utc)
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(self.cert.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([name]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )
        algorithm = None if isinstance(self.key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
        return builder.sign(self.key, algorithm)

    def _context_for(self, host: str) -> ssl.SSLContext:
        cert = self.leaf(host)
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        # ssl loads certificates from files only: a private temporary directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="dfz-leaf-") as tmp:
            os.chmod(tmp, 0o700)
            cert_path, key_path = os.path.join(tmp, "leaf.pem"), os.path.join(tmp, "leaf.key")
            with open(cert_path, "wb") as f:
                f.write(chain)
            with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(self._leaf_key_pem)
            context.load_cert_chain(cert_path, key_path)
        return context


class PrefixedStream(trio.abc.Stream):
    """A stream that first hands out ``prefix`` (bytes already read from it), then reads from ``stream``."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()
