"""The federation's credentials: a CA, the SuperLink's TLS certificate, one SuperNode key pair per hospital.

Layout of the credentials folder (default `infra/secrets/`, git-ignored):

    ca.pem  ca.key                  the certificate authority (its key signs the SuperLink certificate only)
    superlink.pem  superlink.key    the SuperLink's TLS certificate (SANs: its host names and addresses) and key
    supernodes/<site>.key           a hospital's EC P-384 private key, OpenSSH format (`flower-supernode` reads it)
    supernodes/<site>.pub           its public key, OpenSSH format (`flwr supernode register` takes it)

Private keys are written 0600. Nothing that exists is overwritten unless asked: a second call only adds what is
missing, so a hospital's key, once registered with the SuperLink, stays valid.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CREDENTIALS_DIR = Path("infra/secrets")
LOCAL_HOSTNAMES = ("localhost",)
LOCAL_ADDRESSES = ("127.0.0.1", "::1")
# Flower's node authentication accepts NIST curves only (flwr.supercore.primitives.asymmetric.uses_nist_ec_curve);
# P-384 is the curve its guide uses.
CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime clients that follow the CA/Browser baseline accept for a server certificate


class CredentialsError(RuntimeError):
    """The credentials folder is in a state that cannot be completed without overwriting."""


@dataclass(frozen=True)
class Credentials:
    """Where the federation's credentials live inside one folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate: every SuperNode and the operator's `flwr` trust the SuperLink through it."""
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (keep it off the SuperLink host in a real deployment)."""
        return self.folder / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        """The SuperLink's TLS certificate, signed by the CA."""
        return self.folder / "superlink.pem"

    @property
    def superlink_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.folder / "superlink.key"

    def node_private_key(self, site: str) -> Path:
        """A hospital SuperNode's private key (OpenSSH format)."""
        return self.folder / "supernodes" / f"{site}.key"

    def node_public_key(self, site: str) -> Path:
        """A hospital SuperNode's public key (OpenSSH format), the one registered with the SuperLink."""
        return self.folder / "supernodes" / f"{site}.pub"


def make_credentials(
    folder: Path,
    sites: Iterable[str],
    *,
    hostnames: Iterable[str] = LOCAL_HOSTNAMES,
    addresses: Iterable[str] = LOCAL_ADDRESSES,
    overwrite: bool = False,
) -> Credentials:
    """Create whatever is missing of the CA, the SuperLink certificate and each site's key pair; return the paths.

    `hostnames` and `addresses` become the SuperLink certificate's subject alternative names: list every name the
    SuperNodes and the operator use to reach it. With `overwrite`, everything is made anew (every registered
    SuperNode key then has to be registered again).
    """
    credentials = Credentials(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if overwrite or not credentials.ca_cert.exists():
        if not overwrite and credentials.superlink_cert.exists():
            raise CredentialsError(
                f"{credentials.superlink_cert} exists but its CA {credentials.ca_cert} does not: restore ca.pem and "
                "ca.key, or delete superlink.pem and superlink.key to issue a new certificate"
            )
        _write_ca(credentials, overwrite=overwrite)
    if overwrite or not credentials.superlink_cert.exists():
        _write_superlink_cert(credentials, list(hostnames), list(addresses), overwrite=overwrite)
    for site in sites:
        make_node_key(credentials, site, overwrite=overwrite)
    return credentials


def make_node_key(credentials: Credentials, site: str, *, overwrite: bool = False) -> None:
    """Create a hospital's SuperNode key pair if missing (or derive a lost public key from its private key)."""
    if not site or "/" in site or site.startswith("."):
        raise ValueError(f"site name {site!r} cannot name a key file: use letters, digits, '-' or '_'")
    private_path, public_path = credentials.node_private_key(site), credentials.node_public_key(site)
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if overwrite or not private_path.exists():
        key = ec.generate_private_key(CURVE)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())  # fmt: skip
        _write(private_path, private, mode=0o600, overwrite=overwrite)
        # A public key without its private key is useless; it is replaced with the new pair's.
        _write(public_path, _openssh_public(key, site), mode=0o644, overwrite=True)
    elif not public_path.exists():
        loaded = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CredentialsError(f"{private_path} is not an EC private key: delete it to generate a new pair")
        _write(public_path, _openssh_public(loaded, site), mode=0o644, overwrite=False)


def _openssh_public(key: ec.EllipticCurvePrivateKey, site: str) -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" twinfed-{site}\n".encode()


def _write_ca(credentials: Credentials, *, overwrite: bool) -> None:
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twinfed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "twinfed federation CA")])  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(credentials.ca_key, _pem_private(key), mode=0o600, overwrite=overwrite)
    _write(credentials.ca_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)


def _write_superlink_cert(credentials: Credentials, hostnames: list[str], addresses: list[str], *,
                          overwrite: bool) -> None:  # fmt: skip
    if not hostnames and not addresses:
        raise ValueError("the SuperLink certificate needs at least one host name or address")
    if not credentials.ca_key.exists():
        raise CredentialsError(f"issuing {credentials.superlink_cert} needs the CA key {credentials.ca_key}: "
                               "run this where the CA key is kept")  # fmt: skip
    ca_key = serialization.load_pem_private_key(credentials.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{credentials.ca_key} is not an EC private key")
    ca_cert = x509.load_pem_x509_certificate(credentials.ca_cert.read_bytes())
    key = ec.generate_private_key(CURVE)
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twinfed"),
                    x509.NameAttribute(NameOID.COMMON_NAME, (hostnames or addresses)[0]),
                ]
            )
        )  # fmt: skip
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(credentials.superlink_key, _pem_private(key), mode=0o600, overwrite=overwrite)
    _write(credentials.superlink_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _write(path: Path, content: bytes, *, mode: int, overwrite: bool) -> None:
    """Write a file created with `mode` from the start (no window in which a key is world-readable)."""
    if overwrite:
        path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(content)
    os.chmod(path, mode)  # the umask may have narrowed a public file's mode; a key's 0600 it can only keep
