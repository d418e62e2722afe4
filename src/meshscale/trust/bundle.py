"""Bundles: the directories that hold a cluster's trust. There are three kinds.

The **admin bundle** (``meshscale init DIR``) stays on the operator's machine; it is the
only place the CA key lives, and every other bundle is made from it:

    bundle.json    format, kind, cluster id                         0644
    ca.pem         the cluster CA certificate (EC P-256)            0644
    ca.key         the CA private key                               0600
    keyring.json   gossip keys, see ``keyring.py``                  0600
    token          the admin token (HTTP API, dashboard)            0600
    client.pem     an admin client certificate, so the operator's   0644
    client.key     own commands need no second bundle               0600

A **node bundle** (``meshscale bundle node --name NAME``) is what one node runs with:

    bundle.json, ca.pem
    node.pem       the node's certificate (CN NAME, role node, SANs from --host)  0644
    node.key       its private key                                   0600
    keyring.json   gossip keys                                       0600
    tokens.json    SHA-256 of the admin and read-only tokens, to     0600
                   check what HTTP clients present (not the tokens)

A **client bundle** (``meshscale bundle client --name NAME [--read-only]``) is what a user,
a laptop or a service connects with:

    bundle.json, ca.pem
    client.pem     the client certificate (CN NAME, role admin or read-only)  0644
    client.key     its private key                                   0600
    token          the token of its role, for the HTTP API           0600

No bundle but the admin one holds ``ca.key``, and nothing mints a certificate at run time.
Private files must not be readable by group or others (like OpenSSH, a bundle whose
secrets are world-readable is refused). Every write is atomic: a temp file in the same
directory, fsync, ``os.replace``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshscale.trust.certs import (
    CA_VALIDITY_DAYS,
    DEFAULT_CERT_DAYS,
    NODE_NAME_RE,
    CertError,
    CertInfo,
    Role,
    cert_info,
    issue_cert,
    key_matches,
    make_ca,
)
from meshscale.trust.keyring import Keyring, KeyringError

__all__ = [
    "CA_VALIDITY_DAYS",
    "DEFAULT_CERT_DAYS",
    "NODE_NAME_RE",
    "Bundle",
    "BundleError",
    "BundleKind",
    "Role",
]

FORMAT_VERSION = 2

BUNDLE_JSON = "bundle.json"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
KEYRING_JSON = "keyring.json"
TOKEN = "token"
TOKENS_JSON = "tokens.json"
NODE_CERT = "node.pem"
NODE_KEY = "node.key"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client.key"
ADMIN_CLIENT_NAME = "admin"


class BundleKind(StrEnum):
    ADMIN = "admin"
    NODE = "node"
    CLIENT = "client"


FILES: dict[BundleKind, tuple[str, ...]] = {
    BundleKind.ADMIN: (BUNDLE_JSON, CA_CERT, CA_KEY, KEYRING_JSON, TOKEN, CLIENT_CERT,
                       CLIENT_KEY),
    BundleKind.NODE: (BUNDLE_JSON, CA_CERT, NODE_CERT, NODE_KEY, KEYRING_JSON, TOKENS_JSON),
    BundleKind.CLIENT: (BUNDLE_JSON, CA_CERT, CLIENT_CERT, CLIENT_KEY, TOKEN),
}
PRIVATE = frozenset({CA_KEY, KEYRING_JSON, TOKEN, TOKENS_JSON, NODE_KEY, CLIENT_KEY})
BUNDLE_FILES = FILES[BundleKind.ADMIN]
PRIVATE_FILES = tuple(f for f in BUNDLE_FILES if f in PRIVATE)
ALL_FILES = frozenset(f for files in FILES.values() for f in files)

# No bundle file is legitimately this large; refuse rather than read without bound.
MAX_FILE_SIZE = 1024 * 1024
MAX_TOKEN_LENGTH = 512
READ_ONLY_CONTEXT = b"meshscale read-only token v1"


class BundleError(Exception):
    """A bundle file is missing, unreadable or malformed, or the bundle is of the wrong
    kind for its use. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_only_token_of(admin_token: str) -> str:
    """The viewers' token: derived from the admin token with HMAC-SHA256, so it needs no
    file of its own in the admin bundle, changes when the admin token does, and does not
    reveal it."""
    mac = hmac.new(admin_token.encode("utf-8"), READ_ONLY_CONTEXT, hashlib.sha256)
    return "ro-" + base64.urlsafe_b64encode(mac.digest()).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class TokenHashes:
    """What a node needs to check a presented token: SHA-256 of each (the tokens are
    256-bit random, so a plain hash does not make them guessable)."""

    admin_sha256: str
    read_only_sha256: str

    @classmethod
    def of(cls, admin_token: str) -> TokenHashes:
        return cls(_sha256(admin_token), _sha256(read_only_token_of(admin_token)))

    def role_of(self, presented: str) -> Role | None:
        """The role a presented token grants (constant-time against both), or None. A
        value that is not a token's shape is refused before it is used at all."""
        if not is_valid_token(presented):
            return None
        digest = _sha256(presented)
        admin = hmac.compare_digest(digest, self.admin_sha256)
        viewer = hmac.compare_digest(digest, self.read_only_sha256)
        if admin:
            return Role.ADMIN
        return Role.READ_ONLY if viewer else None


@dataclass(frozen=True)
class Bundle:
    path: Path
    kind: BundleKind
    cluster_id: str
    ca_cert_pem: bytes
    name: str
    """The certificate holder: the node's name, the client's, or ``admin``."""
    role: Role
    """The role its certificate carries."""
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_key_pem: bytes | None = field(default=None, repr=False)
    """Admin bundles only."""
    keyring_or_none: Keyring | None = field(default=None, repr=False)
    """Admin and node bundles."""
    token: str | None = field(default=None, repr=False)
    """Admin bundles (the admin token) and client bundles (the token of their role)."""
    token_hashes: TokenHashes | None = field(default=None, repr=False)
    """Admin and node bundles: what checks a presented token."""

    @property
    def keyring(self) -> Keyring:
        if self.keyring_or_none is None:
            raise BundleError(f"{self.path}: a {self.kind} bundle holds no gossip keyring")
        return self.keyring_or_none

    @property
    def cert(self) -> CertInfo:
        return cert_info(self.cert_pem, self.ca_cert_pem)

    def token_role(self, presented: str) -> Role | None:
        """The role a presented HTTP/RPC token grants on a node of this cluster."""
        if self.token_hashes is None:
            return None
        return self.token_hashes.role_of(presented)

    def check_token(self, presented: str) -> bool:
        """The admin token (constant-time)."""
        return self.token_role(presented) is Role.ADMIN

    def check_read_token(self, presented: str) -> bool:
        """The admin token or the read-only token (constant-time for each)."""
        return self.token_role(presented) is not None

    @property
    def read_only_token(self) -> str:
        """The viewers' token (needs a bundle holding the admin token or the viewers'
        token itself)."""
        if self.token is None:
            raise BundleError(f"{self.path}: a {self.kind} bundle holds no token")
        if self.role is Role.READ_ONLY:
            return self.token
        return read_only_token_of(self.token)

    def require(self, *kinds: BundleKind, use: str) -> Bundle:
        """This bundle if it is of one of ``kinds``; else a one-line ``BundleError``
        saying which bundle ``use`` needs."""
        if self.kind in kinds:
            return self
        def a(k: BundleKind) -> str:
            return f"{'an' if k is BundleKind.ADMIN else 'a'} {k} bundle"

        want = " or ".join(a(k) for k in kinds)
        make = {
            BundleKind.NODE: "`meshscale bundle node --bundle ADMIN --name NAME --out DIR`",
            BundleKind.CLIENT: "`meshscale bundle client --bundle ADMIN --name NAME --out DIR`",
            BundleKind.ADMIN: "`meshscale init DIR`",
        }[kinds[0]]
        raise BundleError(f"{self.path} is {a(self.kind)}; {use} needs {want} (make one "
                          f"with {make})")


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


# -- making bundles --------------------------------------------------------------------------


def _prepare_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise BundleError(f"{path}: exists and is not a directory")
    existing = sorted(f for f in ALL_FILES if (path / f).exists())
    if existing and not force:
        raise BundleError(
            f"{path}: already contains a bundle ({', '.join(existing)}); "
            "use --force to overwrite it"
        )
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"{path}: cannot create: {e.strerror or e}") from None


def _write_files(path: Path, kind: BundleKind, meta: dict[str, object],
                 files: dict[str, bytes]) -> None:
    """Secrets first, bundle.json last: a half-written bundle fails to load loudly. Files
    of another kind left from a forced overwrite are removed."""
    current = path
    try:
        for name, data in files.items():
            current = path / name
            (write_private if name in PRIVATE else write_public)(current, data)
        for stale in ALL_FILES - set(FILES[kind]):
            with contextlib.suppress(FileNotFoundError):
                (path / stale).unlink()
        current = path / BUNDLE_JSON
        meta = {"format": FORMAT_VERSION, "kind": kind.value, **meta}
        write_public(current, (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as e:
        raise BundleError(f"{current}: cannot write: {e.strerror or e}") from None


def _issue(admin: Bundle, name: str, role: Role, hosts: Sequence[str], days: int
           ) -> tuple[bytes, bytes]:
    admin.require(BundleKind.ADMIN, use="issuing a certificate")
    assert admin.ca_key_pem is not None
    try:
        return issue_cert(admin.ca_cert_pem, admin.ca_key_pem, name, role, hosts=hosts,
                          days=days)
    except CertError as e:
        raise BundleError(str(e)) from None


def init_bundle(path: Path, *, force: bool = False) -> Bundle:
    """Create a new admin bundle in ``path`` (made with mode 0700 if absent): a new CA,
    gossip keyring, admin token and admin client certificate. Refuses if any bundle file
    already exists there, unless ``force``."""
    path = Path(path)
    _prepare_dir(path, force)
    cluster_id = str(uuid.uuid4())
    ca_cert_pem, ca_key_pem = make_ca(cluster_id)
    keyring = Keyring.generate()
    token = secrets.token_urlsafe(32)
    cert_pem, key_pem = issue_cert(ca_cert_pem, ca_key_pem, ADMIN_CLIENT_NAME, Role.ADMIN,
                                   days=DEFAULT_CERT_DAYS)
    _write_files(path, BundleKind.ADMIN, {"cluster_id": cluster_id, "name": ADMIN_CLIENT_NAME}, {
        CA_KEY: ca_key_pem,
        KEYRING_JSON: keyring.to_json().encode(),
        TOKEN: (token + "\n").encode(),
        CLIENT_KEY: key_pem,
        CA_CERT: ca_cert_pem,
        CLIENT_CERT: cert_pem,
    })
    return load_bundle(path)


def write_node_bundle(
    admin: Bundle,
    name: str,
    out: Path,
    *,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
    renew: bool = False,
) -> Bundle:
    """Write a node bundle for ``name`` into ``out``. ``renew``: ``out`` must hold this
    node's bundle; its certificate and key are re-issued (same name and hosts unless
    given) and its keyring and token hashes brought up to date."""
    out = Path(out)
    if renew:
        old = load_bundle(out).require(BundleKind.NODE, use="--renew")
        if old.name != name:
            raise BundleError(f"{out} is node {old.name!r}'s bundle, not {name!r}")
        if old.cluster_id != admin.cluster_id:
            raise BundleError(f"{out} belongs to another cluster")
        if not hosts:
            hosts = cert_hosts(old.cert_pem)
    else:
        _prepare_dir(out, force)
    if not hosts:
        hosts = ("127.0.0.1", "localhost")
    cert_pem, key_pem = _issue(admin, name, Role.NODE, hosts, days)
    assert admin.token is not None
    hashes = TokenHashes.of(admin.token)
    tokens = {"admin_sha256": hashes.admin_sha256, "read_only_sha256": hashes.read_only_sha256}
    _write_files(out, BundleKind.NODE, {"cluster_id": admin.cluster_id, "name": name}, {
        NODE_KEY: key_pem,
        KEYRING_JSON: admin.keyring.to_json().encode(),
        TOKENS_JSON: (json.dumps(tokens, indent=2) + "\n").encode(),
        CA_CERT: admin.ca_cert_pem,
        NODE_CERT: cert_pem,
    })
    return load_bundle(out)


def write_client_bundle(
    admin: Bundle,
    name: str,
    out: Path,
    *,
    read_only: bool = False,
    days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
) -> Bundle:
    """Write a client bundle for ``name`` (role admin, or read-only) into ``out``."""
    out = Path(out)
    _prepare_dir(out, force)
    role = Role.READ_ONLY if read_only else Role.ADMIN
    cert_pem, key_pem = _issue(admin, name, role, (), days)
    assert admin.token is not None
    token = read_only_token_of(admin.token) if read_only else admin.token
    _write_files(out, BundleKind.CLIENT, {"cluster_id": admin.cluster_id, "name": name}, {
        CLIENT_KEY: key_pem,
        TOKEN: (token + "\n").encode(),
        CA_CERT: admin.ca_cert_pem,
        CLIENT_CERT: cert_pem,
    })
    return load_bundle(out)


def issue_node_cert(
    admin: Bundle,
    name: str,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = DEFAULT_CERT_DAYS,
) -> tuple[bytes, bytes]:
    """A node certificate and key from the admin bundle's CA, not written anywhere (for
    tests and benchmarks that build their own TLS ends). ``ValueError`` for a bad name,
    host or lifetime; ``BundleError`` if ``admin`` holds no CA key."""
    admin.require(BundleKind.ADMIN, use="issuing a certificate")
    assert admin.ca_key_pem is not None
    return issue_cert(admin.ca_cert_pem, admin.ca_key_pem, name, Role.NODE, hosts=hosts,
                      days=days)


def cert_hosts(cert_pem: bytes) -> list[str]:
    """The IP addresses and DNS names a certificate's SAN lists."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + list(
        san.get_values_for_type(x509.DNSName))


# -- loading ---------------------------------------------------------------------------------


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


def _require(path: Path) -> bytes:
    data = _read(path, private=path.name in PRIVATE)
    assert data is not None
    return data


def _json_object(path: Path) -> dict[str, object]:
    raw = _require(path)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return value


def _parse_meta(path: Path) -> tuple[BundleKind, str, str]:
    meta = _json_object(path)
    version = meta.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: missing or non-integer 'format'")
    if version != FORMAT_VERSION:
        hint = "; make a new one with `meshscale init`" if version < FORMAT_VERSION else ""
        raise BundleError(
            f"{path}: format version {version} is not supported (this meshscale reads "
            f"version {FORMAT_VERSION}){hint}"
        )
    cluster_id = meta.get("cluster_id")
    if not isinstance(cluster_id, str) or not cluster_id or len(cluster_id) > 128:
        raise BundleError(f"{path}: missing or invalid 'cluster_id'")
    try:
        kind = BundleKind(str(meta.get("kind")))
    except ValueError:
        raise BundleError(f"{path}: 'kind' must be admin, node or client") from None
    name = meta.get("name")
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise BundleError(f"{path}: missing or invalid 'name'")
    return kind, cluster_id, name


def _parse_ca(cert_path: Path) -> bytes:
    cert_pem = _require(cert_path)
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
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise BundleError(f"{cert_path}: not a valid self-signed certificate") from None
    return cert_pem


def _parse_ca_key(key_path: Path, ca_cert_pem: bytes) -> bytes:
    key_pem = _require(key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise BundleError(f"{key_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BundleError(f"{key_path}: not an EC private key")
    if key.public_key() != x509.load_pem_x509_certificate(ca_cert_pem).public_key():
        raise BundleError(f"{key_path}: does not match {CA_CERT}")
    return key_pem


def _parse_keyring(path: Path) -> Keyring:
    raw = _require(path)
    try:
        return Keyring.from_json(raw)
    except KeyringError as e:
        raise BundleError(f"{path}: {e}") from None


def load_keyring(path: Path) -> Keyring:
    """Read just the keyring of the bundle in ``path`` (nodes re-read it on rotation)."""
    return _parse_keyring(Path(path) / KEYRING_JSON)


def is_valid_token(token: object) -> bool:
    """One line of printable ASCII without spaces, at most ``MAX_TOKEN_LENGTH`` long."""
    # Checked on every request a node serves: C string methods, not a loop per character
    # (printable ASCII is 32..126; the space is the one printable refused).
    return (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH
            and token.isascii() and token.isprintable() and " " not in token)


def _parse_token(path: Path) -> str:
    raw = _require(path)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not ASCII text") from None
    if not token:
        raise BundleError(f"{path}: empty")
    if not is_valid_token(token):
        raise BundleError(f"{path}: not a valid token (one line of printable characters)")
    return token


def _parse_token_hashes(path: Path) -> TokenHashes:
    data = _json_object(path)
    values = [data.get("admin_sha256"), data.get("read_only_sha256")]
    if not all(isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
               for v in values):
        raise BundleError(f"{path}: expected admin_sha256 and read_only_sha256 (hex SHA-256)")
    return TokenHashes(str(values[0]), str(values[1]))


def _parse_cert(path: Path, key_path: Path, ca_cert_pem: bytes) -> tuple[bytes, bytes, CertInfo]:
    cert_pem = _require(path)
    key = _require(key_path)
    try:
        info = cert_info(cert_pem, ca_cert_pem)
    except CertError as e:
        raise BundleError(f"{path}: {e}") from None
    if not key_matches(cert_pem, key):
        raise BundleError(f"{key_path}: not the private key of {path.name}")
    return cert_pem, key, info


def load_bundle(path: Path) -> Bundle:
    """Read and validate the bundle in ``path``; ``BundleError`` names the bad file."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: bundle directory does not exist")
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory")
    kind, cluster_id, name = _parse_meta(path / BUNDLE_JSON)
    ca_cert_pem = _parse_ca(path / CA_CERT)
    ca_key_pem = keyring = token = hashes = None
    if kind is BundleKind.ADMIN:
        ca_key_pem = _parse_ca_key(path / CA_KEY, ca_cert_pem)
    if kind in (BundleKind.ADMIN, BundleKind.NODE):
        keyring = _parse_keyring(path / KEYRING_JSON)
    if kind in (BundleKind.ADMIN, BundleKind.CLIENT):
        token = _parse_token(path / TOKEN)
    if kind is BundleKind.NODE:
        hashes = _parse_token_hashes(path / TOKENS_JSON)
        cert_pem, key_pem, info = _parse_cert(path / NODE_CERT, path / NODE_KEY, ca_cert_pem)
    else:
        cert_pem, key_pem, info = _parse_cert(path / CLIENT_CERT, path / CLIENT_KEY, ca_cert_pem)
    if kind is BundleKind.ADMIN:
        assert token is not None
        hashes = TokenHashes.of(token)
    want = {BundleKind.NODE: (Role.NODE,), BundleKind.ADMIN: (Role.ADMIN,),
            BundleKind.CLIENT: (Role.ADMIN, Role.READ_ONLY)}[kind]
    cert_file = path / (NODE_CERT if kind is BundleKind.NODE else CLIENT_CERT)
    if info.role not in want or info.name != name:
        raise BundleError(f"{cert_file}: certificate of {info.role} {info.name!r} does not "
                          f"belong in the {kind} bundle of {name!r}")
    return Bundle(
        path=path, kind=kind, cluster_id=cluster_id, ca_cert_pem=ca_cert_pem, name=name,
        role=info.role, cert_pem=cert_pem, key_pem=key_pem, ca_key_pem=ca_key_pem,
        keyring_or_none=keyring, token=token, token_hashes=hashes,
    )


def rotate_keys(path: Path) -> Keyring:
    """Install a new random primary gossip key in the admin bundle at ``path``.

    The old primary stays accepted; at most ``MAX_ROTATION_KEEP`` former keys are kept.
    Node bundles get the new keyring by copying ``keyring.json`` (or ``bundle node
    --renew``); a node re-reads it on change."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory does not exist")
    kind, _, _ = _parse_meta(path / BUNDLE_JSON)
    if kind is not BundleKind.ADMIN:
        raise BundleError(f"{path} is a {kind} bundle; rotate the keys in the admin bundle, "
                          "then copy its keyring.json to every node bundle")
    target = path / KEYRING_JSON
    keyring = _parse_keyring(target).rotated()
    try:
        write_private(target, keyring.to_json().encode())
    except OSError as e:
        raise BundleError(f"{target}: cannot write: {e.strerror or e}") from None
    return keyring
