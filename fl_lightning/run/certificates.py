"""Throwaway TLS certificates and SuperNode keys for a local deployment (`deploy-local`).

A real deployment uses certificates from the organisation's own CA (docs/deployment.md);
these exist so a one-machine demo and its test run with TLS and SuperNode authentication on.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_VALID_FOR = datetime.timedelta(days=1)


@dataclass(frozen=True)
class ServerCredentials:
    """PEM files of a CA and of a SuperLink certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's EC key pair in OpenSSH format (what `flwr supernode register` takes)."""

    private: Path
    public: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_server_credentials(folder: Path, host: str = "127.0.0.1") -> ServerCredentials:
    """A fresh CA and a SuperLink certificate for `host` (also valid for localhost)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, host, ca_key, ca_cert.subject)
    credentials = ServerCredentials(
        ca_cert=folder / "ca.crt",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
    )
    credentials.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    credentials.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, credentials.server_key)
    return credentials


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> Any:
    """A certificate of `key` for `subject`, valid from five minutes ago for `_VALID_FOR`."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
    )


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A self-signed CA that signs certificates only (no intermediate CAs)."""
    name = _name("fl-lightning deploy-local CA")
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        _builder(name, name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(ca_key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    host: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
) -> x509.Certificate:
    """The SuperLink's certificate for `host` and localhost, signed by the CA."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    server_auth = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    return (
        _builder(_name(host), ca_name, key)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(server_auth, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def make_node_key(folder: Path, name: str) -> NodeKey:
    """A SuperNode key pair (NIST P-384, OpenSSH format) as `<name>` and `<name>.pub`."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    node = NodeKey(private=folder / name, public=folder / f"{name}.pub")
    node.private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    node.private.chmod(0o600)
    node.public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return node
