"""Certificates and site keys for a federation, made with the ``cryptography`` package.

What Flower needs, and what is made here:
- TLS: a CA certificate (given to every site as ``--root-certificates`` / ``--tls-root``), and a server
  certificate whose subject alternative names are the hosts sites connect to (SuperLink's ``--ssl-*`` files);
- SuperNode authentication: one EC key pair per site in OpenSSH format (NIST P-384, which Flower accepts); the
  public key is registered at the SuperLink (``flwr supernode register``), the private key stays at the site.

A site IS its key: the coordinator names each site by the file its public key has in ``<tls-dir>/sites/``
(``NAME.pub``), and every reply is attributed to the name of the key that sent it, whatever the site calls
itself. Best practice is that each hospital makes its own pair (:func:`make_site_key`, ``fednnunet keygen``) and
hands over only ``NAME.pub``; ``make_certificates(..., sites=N)`` also makes pairs, for trials where the
coordinator may hold every key. Names are plain identifiers (:func:`check_site_name`): they become file and log
names at both ends. Everything is written to a temporary folder and renamed into place, private keys 0600.
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

from fednnunet.identifiers import check_identifier


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


def check_site_name(name: str) -> str:
    """``name`` if it is a plain identifier of at most 64 characters: it names files, log lines and JSON keys at
    both ends (:func:`fednnunet.identifiers.check_identifier`)."""
    return check_identifier(name, "site name", max_len=64)


def _write_site_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A new P-384 key pair as ``folder/NAME.key`` (OpenSSH private, 0600) and ``folder/NAME.pub`` (its public
    key, with the name as the key's comment so that a registered file shows whose it is)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
           + f" {name}\n".encode())
    return private, public


def make_site_key(out: Path, name: str) -> tuple[Path, Path]:
    """A hospital's own key pair ``out/NAME.key`` and ``out/NAME.pub`` (``fednnunet keygen``): only the public key
    leaves the hospital (the coordinator puts it into ``<tls-dir>/sites/``). Refuses to overwrite a key."""
    check_site_name(name)
    out = Path(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = [p for p in (out / f"{name}.key", out / f"{name}.pub") if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite a site key")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        _write_site_pair(tmp, name)
        for suffix in (".pub", ".key"):
            os.replace(tmp / f"{name}{suffix}", out / f"{name}{suffix}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / f"{name}.key", out / f"{name}.pub"


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


def make_certificates(out: Path, hosts: Sequence[str], sites: int | Sequence[str] = 0,
                      valid_days: int = 365) -> CertificateSet:
    """Create a CA, a server certificate for ``hosts`` and site key pairs in ``out`` (must not exist or be empty).

    ``sites``: a count (``site1`` ... ``siteN``), names, or 0 for none: the hospitals make their own pairs
    (:func:`make_site_key`) and the coordinator copies each ``NAME.pub`` into ``out/sites/``."""
    out = Path(out)
    if not hosts:
        raise ValueError("at least one host name or address is needed for the server certificate")
    names = [site_name(i) for i in range(sites)] if isinstance(sites, int) else [check_site_name(n) for n in sites]
    if isinstance(sites, int) and sites < 0:
        raise ValueError("the number of site keys cannot be negative")
    if len(set(names)) != len(names):
        raise ValueError(f"site names repeat: {', '.join(names)}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; refusing to overwrite certificates")
    pems = _ca_and_server(hosts, valid_days)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in pems.items():
            _write(tmp / name, data, private=name.endswith(".key"))
        (tmp / "sites").mkdir()
        for name in names:
            _write_site_pair(tmp / "sites", name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    keys = {name: (out / "sites" / f"{name}.key", out / "sites" / f"{name}.pub") for name in names}
    return CertificateSet(out, out / "ca.crt", out / "server.crt", out / "server.key", keys)
