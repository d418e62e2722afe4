"""The three kinds of bundle: what each holds, what each refuses to be used as."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshscale.transport.credentials import Credentials
from meshscale.trust.bundle import (
    Bundle,
    BundleError,
    BundleKind,
    init_bundle,
    load_bundle,
    write_client_bundle,
    write_node_bundle,
)
from meshscale.trust.certs import Role


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return init_bundle(tmp_path_factory.mktemp("kinds") / "admin")


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_the_admin_bundle_can_act_as_an_admin_client(admin: Bundle) -> None:
    assert admin.kind is BundleKind.ADMIN and admin.role is Role.ADMIN
    assert admin.ca_key_pem is not None and admin.token is not None
    creds = Credentials.from_bundle(admin)
    assert creds.role is Role.ADMIN and creds.token == admin.token
    assert admin.token not in repr(creds) and admin.token not in repr(admin)


def test_a_node_bundle_holds_no_ca_key_and_no_token(admin: Bundle, tmp_path: Path) -> None:
    node = write_node_bundle(admin, "edge-1", tmp_path / "n", hosts=["10.0.0.7", "edge-1.local"])
    assert _names(node.path) == {"bundle.json", "ca.pem", "node.pem", "node.key",
                                 "keyring.json", "tokens.json"}
    for private in ("node.key", "keyring.json", "tokens.json"):
        assert _mode(node.path / private) == 0o600, private
    assert node.kind is BundleKind.NODE and node.name == "edge-1" and node.role is Role.NODE
    assert node.ca_key_pem is None and node.token is None
    assert admin.token is not None
    assert admin.token not in (node.path / "tokens.json").read_text()
    # ... yet it checks both tokens.
    assert node.check_token(admin.token) and not node.check_token(admin.read_only_token)
    assert node.check_read_token(admin.read_only_token)
    assert not node.check_read_token(admin.token + "x")
    assert node.keyring == admin.keyring
    cert = x509.load_pem_x509_certificate(node.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert san.get_values_for_type(x509.DNSName) == ["edge-1.local"]
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert json.loads((node.path / "bundle.json").read_text())["kind"] == "node"


def test_client_bundles_carry_their_role_and_its_token(admin: Bundle, tmp_path: Path) -> None:
    full = write_client_bundle(admin, "alice", tmp_path / "a")
    viewer = write_client_bundle(admin, "grafana", tmp_path / "v", read_only=True)
    for b in (full, viewer):
        assert _names(b.path) == {"bundle.json", "ca.pem", "client.pem", "client.key", "token"}
        assert b.ca_key_pem is None
        with pytest.raises(BundleError, match="no gossip keyring"):
            _ = b.keyring
        cert = x509.load_pem_x509_certificate(b.cert_pem)
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert eku == {ExtendedKeyUsageOID.CLIENT_AUTH}  # a client cannot serve
    assert full.role is Role.ADMIN and full.token == admin.token
    assert viewer.role is Role.READ_ONLY and viewer.token == admin.read_only_token
    assert Credentials.from_bundle(viewer).role is Role.READ_ONLY


def test_each_bundle_refuses_the_uses_it_is_not_for(admin: Bundle, tmp_path: Path) -> None:
    node = write_node_bundle(admin, "n1", tmp_path / "n")
    client = write_client_bundle(admin, "c1", tmp_path / "c")
    with pytest.raises(BundleError, match="is a node bundle; a client needs a client bundle"):
        Credentials.from_bundle(node)
    with pytest.raises(BundleError, match="is a client bundle; a node needs a node bundle"):
        Credentials.for_node(client)
    with pytest.raises(BundleError, match=r"is an? admin bundle"):
        Credentials.for_node(admin)
    with pytest.raises(BundleError, match="is a client bundle"):
        write_node_bundle(client, "n2", tmp_path / "n2")


def test_an_existing_bundle_is_kept_unless_forced(admin: Bundle, tmp_path: Path) -> None:
    write_node_bundle(admin, "n1", tmp_path / "n")
    with pytest.raises(BundleError, match="--force"):
        write_client_bundle(admin, "c1", tmp_path / "n")
    again = write_client_bundle(admin, "c1", tmp_path / "n", force=True)
    # Nothing of the node bundle is left beside the client's.
    assert again.kind is BundleKind.CLIENT and not (tmp_path / "n" / "node.key").exists()


def test_renew_reissues_the_same_node(admin: Bundle, tmp_path: Path) -> None:
    first = write_node_bundle(admin, "n1", tmp_path / "n", hosts=["10.1.1.1"])
    renewed = write_node_bundle(admin, "n1", tmp_path / "n", renew=True, days=30)
    assert renewed.cert.serial != first.cert.serial and renewed.name == "n1"
    assert renewed.cert.expires_in_days() == pytest.approx(30, abs=0.1)
    cert = x509.load_pem_x509_certificate(renewed.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.1.1")]
    with pytest.raises(BundleError, match=r"node 'n1'.s bundle, not 'n2'"):
        write_node_bundle(admin, "n2", tmp_path / "n", renew=True)
    write_client_bundle(admin, "c", tmp_path / "c")
    with pytest.raises(BundleError, match="client bundle; --renew needs a node bundle"):
        write_node_bundle(admin, "c", tmp_path / "c", renew=True)


def _forge(admin: Bundle, bundle: Bundle, *, ca_key: ec.EllipticCurvePrivateKey | None = None,
           expired: bool = False, ou: str = "meshscale-admin", cn: str | None = None) -> None:
    """Replace ``bundle``'s certificate with one built by hand (another CA, an ended
    lifetime, another role), keeping its key."""
    key = serialization.load_pem_private_key(bundle.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(admin.ca_cert_pem)
    assert admin.ca_key_pem is not None
    signer = ca_key or serialization.load_pem_private_key(admin.ca_key_pem, None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (
        now - dt.timedelta(minutes=5), now + dt.timedelta(days=10))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn or bundle.name)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    (bundle.path / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_an_expired_certificate_is_refused_with_a_date(admin: Bundle, tmp_path: Path) -> None:
    client = write_client_bundle(admin, "old", tmp_path / "c")
    _forge(admin, client, expired=True)
    loaded = load_bundle(client.path)
    with pytest.raises(BundleError, match=r"expired on \d{4}-\d\d-\d\d.*bundle client"):
        Credentials.from_bundle(loaded)


def test_a_certificate_from_another_ca_is_refused(admin: Bundle, tmp_path: Path) -> None:
    client = write_client_bundle(admin, "x", tmp_path / "c")
    _forge(admin, client, ca_key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(BundleError, match=r"client\.pem: not issued by this cluster's CA"):
        load_bundle(client.path)


def test_a_certificate_of_another_role_does_not_belong(admin: Bundle, tmp_path: Path) -> None:
    client = write_client_bundle(admin, "x", tmp_path / "c")
    _forge(admin, client, ou="meshscale-node")
    with pytest.raises(BundleError, match="certificate of node 'x' does not belong in the "
                       "client bundle"):
        load_bundle(client.path)
    _forge(admin, client, cn="someone-else")
    with pytest.raises(BundleError, match="does not belong"):
        load_bundle(client.path)


@pytest.mark.parametrize("kind", ["node", "client"])
def test_a_missing_or_open_private_file_is_named(admin: Bundle, tmp_path: Path,
                                                 kind: str) -> None:
    b = (write_node_bundle(admin, "n", tmp_path / "b") if kind == "node"
         else write_client_bundle(admin, "c", tmp_path / "b"))
    key = b.path / f"{kind}.key"
    os.chmod(key, 0o644)
    with pytest.raises(BundleError, match=f"{kind}.key: permissions 0644 are too open"):
        load_bundle(b.path)
    key.unlink()
    with pytest.raises(BundleError, match=f"{kind}.key: missing"):
        load_bundle(b.path)
