"""The throwaway CA, SuperLink certificate and SuperNode keys of `deploy-local`."""

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from fl_lightning.run.certificates import make_node_key, make_server_credentials


def test_server_certificate_is_signed_by_the_ca_for_the_host(tmp_path: Path) -> None:
    creds = make_server_credentials(tmp_path, "127.0.0.1")
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert creds.server_key.stat().st_mode & 0o077 == 0  # private key readable by owner only


def test_each_node_key_is_a_fresh_nist_key_flower_accepts(tmp_path: Path) -> None:
    first, second = make_node_key(tmp_path, "a"), make_node_key(tmp_path, "b")
    # What `flwr supernode register` does with the public key file.
    assert try_load_public_key(first.public) != try_load_public_key(second.public)
    assert first.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    # What `flower-supernode --auth-supernode-private-key` loads.
    private = load_ssh_private_key(first.private.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert first.private.stat().st_mode & 0o077 == 0
