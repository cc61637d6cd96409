"""TLS against a real server: mutual TLS with a throwaway CA (the server checks the client's
certificate, the backend checks the server's, host name included)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hicache_valkey.devserver import DevServer, free_port
from hicache_valkey.testing import PAGE_BYTES, fast_options, make_backend

from hicache.errors import BackendUnavailableError
from hicache.storage import PageStatus
from hicache.testing import kit_key, page_pattern

StartServer = Callable[..., DevServer]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def _issue(
    tmp: Path, name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca[0].subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca[1] if ca else key, hashes.SHA256())
    cert_path = _write(tmp / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
    key_path = _write(
        tmp / f"{name}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return cert, key, cert_path, key_path


def test_mutual_tls_roundtrip(server_factory: StartServer, tmp_path: Path) -> None:
    ca_cert, ca_key, ca_path, _ = _issue(tmp_path, "ca", None)
    _, _, server_cert, server_key = _issue(tmp_path, "server", (ca_cert, ca_key))
    _, _, client_cert, client_key = _issue(tmp_path, "client", (ca_cert, ca_key))
    tls_port = free_port()
    server_factory(
        extra=[
            ("tls-port", str(tls_port)),
            ("tls-cert-file", server_cert),
            ("tls-key-file", server_key),
            ("tls-ca-cert-file", ca_path),
            ("tls-auth-clients", "yes"),
        ]
    )
    tls = fast_options(
        tls_port,
        tls=True,
        tls_ca_file=ca_path,
        tls_cert_file=client_cert,
        tls_key_file=client_key,
    )
    keys = [kit_key(i, "tls") for i in range(3)]
    with make_backend(tls) as backend:
        pages = [memoryview(page_pattern(k, PAGE_BYTES)) for k in keys]
        assert backend.put(keys, pages) == [PageStatus.OK] * 3
        bufs = [bytearray(PAGE_BYTES) for _ in keys]
        assert backend.get_into(keys, [memoryview(b) for b in bufs]) == [PageStatus.OK] * 3
        assert [bytes(b) for b in bufs] == [bytes(p) for p in pages]
    # without a client certificate the server refuses; plain text is refused too: errors, no hang
    for refused in (
        fast_options(tls_port, tls=True, tls_ca_file=ca_path),
        fast_options(tls_port, socket_timeout_s=1.0),
    ):
        with pytest.raises(BackendUnavailableError):
            make_backend(refused).open()
