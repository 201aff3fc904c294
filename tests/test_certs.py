"""`make_certificates`: a CA, a server certificate for the given hosts, site key pairs Flower accepts."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fednnunet.security.certs import make_certificates, make_site_key


def test_certificates_chain_hosts_and_site_keys(tmp_path):
    certs = make_certificates(tmp_path / "tls", ["fl.hospital.example", "127.0.0.1"], sites=3)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.hospital.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sorted(certs.site_keys) == ["site1", "site2", "site3"]
    for private, public in certs.site_keys.values():
        key = load_ssh_private_key(private.read_bytes(), password=None)
        assert isinstance(key.curve, ec.SECP384R1)  # Flower requires a NIST curve key in SSH format
        assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600


def test_refuses_to_overwrite_and_bad_arguments(tmp_path):
    make_certificates(tmp_path / "tls", ["localhost"], sites=1)
    with pytest.raises(FileExistsError):
        make_certificates(tmp_path / "tls", ["localhost"], sites=1)
    with pytest.raises(ValueError):
        make_certificates(tmp_path / "other", [], sites=1)
    for bad in (-1, ["../h1"], ["h1", "h1"], [".hidden"], ["a b"]):
        with pytest.raises(ValueError):
            make_certificates(tmp_path / "other", ["localhost"], sites=bad)
    assert not (tmp_path / "other").exists()


def test_no_site_keys_and_named_ones(tmp_path):
    """The coordinator may make no site keys at all (each hospital makes its own), or named ones."""
    assert make_certificates(tmp_path / "none", ["localhost"]).site_keys == {}
    assert list((tmp_path / "none" / "sites").iterdir()) == []
    named = make_certificates(tmp_path / "named", ["localhost"], sites=["h1", "clinic-b"])
    assert sorted(named.site_keys) == ["clinic-b", "h1"]
    assert named.site_keys["h1"][1].read_text().split()[2] == "h1"  # the name travels as the key's comment


def test_a_hospital_makes_its_own_key(tmp_path):
    private, public = make_site_key(tmp_path / "keys", "h1")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):
        make_site_key(tmp_path / "keys", "h1")
    with pytest.raises(ValueError):
        make_site_key(tmp_path / "keys", "../h2")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["h1.key", "h1.pub"]
