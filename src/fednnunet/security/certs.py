"""Certificates and site keys for a federation, made with the ``cryptography`` package.

What Flower needs, and what is made here:
- TLS: a CA certificate (given to every site as ``--root-certificates`` / ``--tls-root``), and a server
  certificate whose subject alternative names are the hosts sites connect to (SuperLink's ``--ssl-*`` files);
- SuperNode authentication: one EC key pair per site in OpenSSH format (NIST P-384, which Flower accepts); the
  public key is registered at the SuperLink (``flwr supernode register``), the private key stays at the site.
Everything is written to a temporary folder and renamed into place, private keys with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertificateSet:
    """Paths of everything :func:`make_certificates` wrote."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # site name -> (private key, public key)


def site_name(index: int) -> str:
    return f"site{index + 1}"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FednnU-Net"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca_and_server(hosts: Sequence[str], valid_days: int) -> dict[str, bytes]:
    """PEM files of a new CA and of a server certificate for ``hosts`` signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("FednnU-Net CA")).issuer_name(_name("FednnU-Net CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_san(hosts), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    return {"ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM), "ca.key": _pem_key(ca_key),
            "server.crt": server_cert.public_bytes(serialization.Encoding.PEM), "server.key": _pem_key(server_key)}


def make_loopback_tls(out: Path, valid_days: int = 30) -> Path:
    """ca.crt, server.crt and server.key (mode 0600) for a server on 127.0.0.1 only, in a new folder ``out``.

    Why: Flower's SuperLink refuses SuperNode authentication without TLS, also on the loopback address behind
    the coordinator's gateway. The CA's key is not kept: nothing else is ever signed with it.
    """
    out = Path(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=False)
    for name, data in _ca_and_server(["127.0.0.1", "localhost"], valid_days).items():
        if name != "ca.key":
            _write(out / name, data, private=name.endswith(".key"))
    return out


def make_certificates(out: Path, hosts: Sequence[str], sites: int, valid_days: int = 365) -> CertificateSet:
    """Create a CA, a server certificate for ``hosts`` and ``sites`` site key pairs in ``out`` (must not exist
    or be empty)."""
    out = Path(out)
    if not hosts:
        raise ValueError("at least one host name or address is needed for the server certificate")
    if sites < 1:
        raise ValueError("at least one site key is needed")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; refusing to overwrite certificates")
    pems = _ca_and_server(hosts, valid_days)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in pems.items():
            _write(tmp / name, data, private=name.endswith(".key"))
        (tmp / "sites").mkdir()
        for i in range(sites):
            key = ec.generate_private_key(ec.SECP384R1())
            name = site_name(i)
            _write(tmp / "sites" / f"{name}.key", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
                private=True)
            _write(tmp / "sites" / f"{name}.pub", key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    keys = {site_name(i): (out / "sites" / f"{site_name(i)}.key", out / "sites" / f"{site_name(i)}.pub")
            for i in range(sites)}
    return CertificateSet(out, out / "ca.crt", out / "server.crt", out / "server.key", keys)
