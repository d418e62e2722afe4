"""The cluster bundle: the directory ``meshscale init DIR`` makes, holding a cluster's trust.

    bundle.json    format version and cluster id                  0644
    ca.pem         the cluster CA certificate (EC P-256)          0644
    ca.key         the CA private key (only where certs are made) 0600
    keyring.json   gossip keys, see ``keyring.py``                0600
    token          the admin token clients present                0600

A node needs every file but ``ca.key``; keep the CA key on the machine that issues node
certificates. Private files must not be readable by group or others (like OpenSSH, a
bundle whose secrets are world-readable is refused). Every write is atomic: a temp file
in the same directory, fsync, ``os.replace``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import stat
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshscale.trust.keyring import Keyring, KeyringError

FORMAT_VERSION = 1

BUNDLE_JSON = "bundle.json"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
KEYRING_JSON = "keyring.json"
TOKEN = "token"
BUNDLE_FILES = (BUNDLE_JSON, CA_CERT, CA_KEY, KEYRING_JSON, TOKEN)
PRIVATE_FILES = (CA_KEY, KEYRING_JSON, TOKEN)

CA_VALIDITY_DAYS = 3650
DEFAULT_CERT_DAYS = 825
# Certificates start a little in the past so a peer whose clock is behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
# No bundle file is legitimately this large; refuse rather than read without bound.
MAX_FILE_SIZE = 1024 * 1024
MAX_TOKEN_LENGTH = 512
READ_ONLY_CONTEXT = b"meshscale read-only token v1"

NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class BundleError(Exception):
    """A bundle file is missing, unreadable or malformed. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class Bundle:
    path: Path
    ca_cert_pem: bytes
    ca_key_pem: bytes | None = field(repr=False)
    keyring: Keyring = field(repr=False)
    token: str = field(repr=False)
    cluster_id: str

    def check_token(self, presented: str) -> bool:
        """Constant-time comparison of a presented admin token."""
        return hmac.compare_digest(presented.encode("utf-8"), self.token.encode("utf-8"))

    @property
    def read_only_token(self) -> str:
        """A token for viewers: accepted by the HTTP API and dashboard (all reads), never by
        the RPC port that changes things. Derived from the admin token with HMAC-SHA256,
        so it needs no file of its own, changes when the admin token does, and does not
        reveal it."""
        mac = hmac.new(self.token.encode("utf-8"), READ_ONLY_CONTEXT, hashlib.sha256)
        return "ro-" + base64.urlsafe_b64encode(mac.digest()).decode("ascii").rstrip("=")

    def check_read_token(self, presented: str) -> bool:
        """The admin token or the read-only token (constant-time for each)."""
        ro = hmac.compare_digest(presented.encode("utf-8"),
                                 self.read_only_token.encode("utf-8"))
        return self.check_token(presented) | ro


# -- atomic file writes --------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (never visible with a wider mode)."""
    _atomic_write(Path(path), data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0644."""
    _atomic_write(Path(path), data, 0o644)


# -- certificates -----------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(cluster_id: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshscale"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshscale CA {cluster_id}"),
        ]
    )
    now = _now()
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _san_entry(host: str) -> x509.GeneralName:
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
        raise ValueError(f"invalid host {host!r}: not an IP address or DNS name")
    return x509.DNSName(name.lower())


def issue_node_cert(
    bundle: Bundle,
    name: str,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = DEFAULT_CERT_DAYS,
) -> tuple[bytes, bytes]:
    """Issue a node certificate signed by the bundle's CA; returns ``(cert_pem, key_pem)``.

    The key is EC P-256, the subject CN is ``name``, the SAN lists ``hosts`` (IP or DNS)
    and the EKU allows both serverAuth and clientAuth (nodes are both, over mutual TLS).
    Raises ``BundleError`` if the bundle has no usable CA key, ``ValueError`` for a bad
    name, host or lifetime.
    """
    if not NODE_NAME_RE.match(name):
        raise ValueError(
            f"invalid node name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not 1 <= days <= CA_VALIDITY_DAYS:
        raise ValueError(f"invalid lifetime {days} days: must be 1..{CA_VALIDITY_DAYS}")
    sans = [_san_entry(h) for h in dict.fromkeys(hosts)]
    if bundle.ca_key_pem is None:
        raise BundleError(f"{bundle.path / CA_KEY}: missing; this bundle cannot issue certificates")
    ca_cert = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
    ca_key = serialization.load_pem_private_key(bundle.ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise BundleError(f"{bundle.path / CA_KEY}: not an EC private key")

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
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
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


# -- init / load ---------------------------------------------------------------------------


def init_bundle(path: Path, *, force: bool = False) -> Bundle:
    """Create a new bundle in ``path`` (made with mode 0700 if absent).

    Refuses if any bundle file already exists there, unless ``force``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BundleError(f"{path}: exists and is not a directory")
    existing = [f for f in BUNDLE_FILES if (path / f).exists()]
    if existing and not force:
        raise BundleError(
            f"{path}: already contains a bundle ({', '.join(existing)}); "
            "use --force to overwrite it"
        )
    cluster_id = str(uuid.uuid4())
    ca_cert_pem, ca_key_pem = _make_ca(cluster_id)
    keyring = Keyring.generate()
    token = secrets.token_urlsafe(32)
    meta = {"format": FORMAT_VERSION, "cluster_id": cluster_id}
    current = path
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Secrets first, bundle.json last: a half-written bundle fails to load loudly.
        for name, data, private in (
            (CA_KEY, ca_key_pem, True),
            (KEYRING_JSON, keyring.to_json().encode(), True),
            (TOKEN, (token + "\n").encode(), True),
            (CA_CERT, ca_cert_pem, False),
            (BUNDLE_JSON, (json.dumps(meta, indent=2) + "\n").encode(), False),
        ):
            current = path / name
            (write_private if private else write_public)(current, data)
    except OSError as e:
        raise BundleError(f"{current}: cannot write: {e.strerror or e}") from None
    return Bundle(
        path=path,
        ca_cert_pem=ca_cert_pem,
        ca_key_pem=ca_key_pem,
        keyring=keyring,
        token=token,
        cluster_id=cluster_id,
    )


def _read(path: Path, *, private: bool, optional: bool = False) -> bytes | None:
    try:
        # O_NONBLOCK: a FIFO planted in place of a file must not hang the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if optional:
            return None
        raise BundleError(f"{path}: missing") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise BundleError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file")
    if private and os.name == "posix" and st.st_mode & 0o077:
        os.close(fd)
        raise BundleError(
            f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open; "
            f"it holds a secret (chmod 600 {path})"
        )
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_FILE_SIZE + 1)
        except OSError as e:
            raise BundleError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_SIZE:
        raise BundleError(f"{path}: larger than {MAX_FILE_SIZE} bytes")
    return data


def _require(path: Path, *, private: bool) -> bytes:
    data = _read(path, private=private)
    assert data is not None
    return data


def _parse_meta(path: Path) -> str:
    raw = _require(path, private=False)
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = meta.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: missing or non-integer 'format'")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format version {version} is not supported (this meshscale reads "
            f"version {FORMAT_VERSION})"
        )
    cluster_id = meta.get("cluster_id")
    if not isinstance(cluster_id, str) or not cluster_id or len(cluster_id) > 128:
        raise BundleError(f"{path}: missing or invalid 'cluster_id'")
    return cluster_id


def _parse_ca(cert_path: Path, key_path: Path) -> tuple[bytes, bytes | None]:
    cert_pem = _require(cert_path, private=False)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise BundleError(f"{cert_path}: not a PEM certificate") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        constraints = None
    if constraints is None or not constraints.ca:
        raise BundleError(f"{cert_path}: not a CA certificate")
    key_pem = _read(key_path, private=True, optional=True)
    if key_pem is not None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise BundleError(f"{key_path}: not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise BundleError(f"{key_path}: not an EC private key")
        if key.public_key() != cert.public_key():
            raise BundleError(f"{key_path}: does not match {cert_path.name}")
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            raise BundleError(f"{cert_path}: not a valid self-signed certificate") from None
    return cert_pem, key_pem


def _parse_keyring(path: Path) -> Keyring:
    raw = _require(path, private=True)
    try:
        return Keyring.from_json(raw)
    except KeyringError as e:
        raise BundleError(f"{path}: {e}") from None


def load_keyring(path: Path) -> Keyring:
    """Read just the keyring of the bundle in ``path`` (nodes re-read it on rotation)."""
    return _parse_keyring(Path(path) / KEYRING_JSON)


def is_valid_token(token: object) -> bool:
    """One line of printable ASCII without spaces, at most ``MAX_TOKEN_LENGTH`` long."""
    return (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH
            and all(33 <= ord(c) < 127 for c in token))


def _parse_token(path: Path) -> str:
    raw = _require(path, private=True)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not ASCII text") from None
    if not token:
        raise BundleError(f"{path}: empty")
    if not is_valid_token(token):
        raise BundleError(f"{path}: not a valid token (one line of printable characters)")
    return token


def load_bundle(path: Path) -> Bundle:
    """Read and validate the bundle in ``path``; ``BundleError`` names the bad file."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: bundle directory does not exist")
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory")
    cluster_id = _parse_meta(path / BUNDLE_JSON)
    ca_cert_pem, ca_key_pem = _parse_ca(path / CA_CERT, path / CA_KEY)
    keyring = _parse_keyring(path / KEYRING_JSON)
    token = _parse_token(path / TOKEN)
    return Bundle(
        path=path,
        ca_cert_pem=ca_cert_pem,
        ca_key_pem=ca_key_pem,
        keyring=keyring,
        token=token,
        cluster_id=cluster_id,
    )


def rotate_keys(path: Path) -> Keyring:
    """Install a new random primary gossip key in the bundle at ``path``.

    The old primary stays accepted; at most ``MAX_ROTATION_KEEP`` former keys are kept.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory does not exist")
    target = path / KEYRING_JSON
    keyring = _parse_keyring(target).rotated()
    try:
        write_private(target, keyring.to_json().encode())
    except OSError as e:
        raise BundleError(f"{target}: cannot write: {e.strerror or e}") from None
    return keyring
