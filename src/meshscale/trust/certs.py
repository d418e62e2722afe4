"""Certificates of a cluster: the CA, node certificates and client certificates, and who a
verified peer is.

Every certificate names its holder (subject CN) and its role (subject OU):

    meshscale-node        a node: serves and calls node-to-node methods; EKU server+client
    meshscale-admin       a client that may read and change the mesh; EKU client only
    meshscale-read-only   a client that may only list and read; EKU client only

The role is part of what the CA signed, so a client cannot raise it; nodes check it on
every RPC (``trust/access.py``). Client certificates cannot serve: without the
serverAuth EKU, a node refuses a peer presenting one as a server.

Certificates are issued only where the CA key is (``meshscale bundle ...`` on the
operator's machine); nothing here runs in a node.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY_DAYS = 3650
DEFAULT_CERT_DAYS = 825
# Certificates start a little in the past so a peer whose clock is behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
EXPIRY_WARNING_DAYS = 30
"""``members`` and the dashboard warn when a certificate ends within this many days."""

NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_OU_PREFIX = "meshscale-"


class Role(StrEnum):
    """Who a certificate's holder is, as the CA signed it."""

    NODE = "node"
    ADMIN = "admin"
    READ_ONLY = "read-only"

    @property
    def ou(self) -> str:
        return _OU_PREFIX + self.value


class CertError(ValueError):
    """A certificate cannot be issued or used; the message is one line."""


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says about its holder."""

    name: str
    role: Role
    serial: int
    not_after: dt.datetime

    def expires_in_days(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_name(name: str, what: str = "node") -> None:
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise CertError(
            f"invalid {what} name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(cluster_id: str) -> tuple[bytes, bytes]:
    """A new self-signed EC P-256 CA: ``(cert_pem, key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshscale"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshscale CA {cluster_id}"),
        ]
    )
    now = utc_now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def load_ca_key(ca_key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("the CA key is not an EC private key")
    return key


def san_entry(host: str) -> x509.GeneralName:
    """An IP address or DNS name for a certificate's SAN; ``CertError`` otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.rstrip(".")
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if (
        not name
        or len(name) > 253
        or not labels
        or not all(_DNS_LABEL_RE.match(label) for label in labels)
    ):
        raise CertError(f"invalid host {host!r}: not an IP address or DNS name")
    return x509.DNSName(name.lower())


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    name: str,
    role: Role,
    *,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_CERT_DAYS,
) -> tuple[bytes, bytes]:
    """Issue a certificate for ``name`` in ``role``, signed by the CA: ``(cert_pem,
    key_pem)``. Node certificates list ``hosts`` (IP or DNS) in their SAN and may serve
    and call; client certificates may only call. ``CertError`` for a bad name, host or
    lifetime."""
    check_name(name, "node" if role is Role.NODE else "client")
    if not 1 <= days <= CA_VALIDITY_DAYS:
        raise CertError(f"invalid lifetime {days} days: must be 1..{CA_VALIDITY_DAYS}")
    sans = [san_entry(h) for h in dict.fromkeys(hosts)]
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = load_ca_key(ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = utc_now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role is Role.NODE:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.ou),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def _role_of_ou(values: Sequence[str]) -> Role | None:
    for value in values:
        if value.startswith(_OU_PREFIX):
            try:
                return Role(value.removeprefix(_OU_PREFIX))
            except ValueError:
                return None
    return None


def cert_info(cert_pem: bytes, ca_cert_pem: bytes) -> CertInfo:
    """Check that the CA issued ``cert_pem`` and read its holder; ``CertError`` if not."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CertError("not a PEM certificate") from None
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError("not issued by this cluster's CA") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = _role_of_ou([str(a.value) for a in ous])
    if not cn or role is None:
        raise CertError("carries no meshscale name and role (issued by an older meshscale?)")
    return CertInfo(str(cn[0].value), role, cert.serial_number, cert.not_valid_after_utc)


def key_matches(cert_pem: bytes, key_pem_bytes: bytes) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem_bytes, password=None)
    except (ValueError, TypeError):
        return False
    return isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key()


@dataclass(frozen=True)
class Peer:
    """The holder of a verified peer certificate (name and role as the CA signed them)."""

    name: str
    role: Role


def peer_subject(ssl_object: ssl.SSLObject | ssl.SSLSocket | None
                 ) -> tuple[str | None, list[str]] | None:
    """The CN and the OUs of a verified peer certificate, or None if there is none."""
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):  # handshake not done
        return None
    if not cert:
        return None
    subject = cert.get("subject", ())
    if not isinstance(subject, tuple):
        return None
    cn: str | None = None
    ous: list[str] = []
    for rdn in subject:
        for pair in rdn:
            if len(pair) != 2 or not isinstance(pair[1], str):
                continue
            if pair[0] == "commonName" and cn is None:
                cn = pair[1]
            elif pair[0] == "organizationalUnitName":
                ous.append(pair[1])
    return cn, ous


def peer_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Peer | None:
    """Who is on the other end of a verified TLS connection, or None (no certificate, or
    one without a meshscale role)."""
    subject = peer_subject(ssl_object)
    if subject is None:
        return None
    cn, ous = subject
    role = _role_of_ou(ous)
    if cn is None or role is None:
        return None
    return Peer(cn, role)
