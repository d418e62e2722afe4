from __future__ import annotations

import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshscale.trust.bundle import (
    BUNDLE_FILES,
    PRIVATE_FILES,
    Bundle,
    BundleError,
    init_bundle,
    issue_node_cert,
    load_bundle,
    rotate_keys,
    write_private,
)
from meshscale.trust.keyring import MAX_ROTATION_KEEP, Keyring, SealError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return init_bundle(tmp_path / "bundle")


def _load_error(path: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_init_creates_files_with_private_modes(bundle: Bundle) -> None:
    for name in BUNDLE_FILES:
        assert (bundle.path / name).is_file(), name
    for name in PRIVATE_FILES:
        assert _mode(bundle.path / name) == 0o600, name
    assert _mode(bundle.path) == 0o700
    assert not [p for p in bundle.path.iterdir() if p.name.startswith(".")]
    meta = json.loads((bundle.path / "bundle.json").read_text())
    assert meta == {"format": 2, "kind": "admin", "cluster_id": bundle.cluster_id,
                    "name": "admin"}
    assert len(bundle.token) >= 40


def test_ca_is_p256_ca(bundle: Bundle) -> None:
    ca = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_load_round_trips(bundle: Bundle) -> None:
    assert load_bundle(bundle.path) == bundle


def test_repr_hides_secrets(bundle: Bundle) -> None:
    text = repr(bundle)
    assert bundle.token not in text
    assert "PRIVATE KEY" not in text
    assert bundle.check_token(bundle.token)
    assert not bundle.check_token(bundle.token + "x")


def test_init_refuses_existing_bundle_unless_forced(bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="--force"):
        init_bundle(bundle.path)
    again = init_bundle(bundle.path, force=True)
    assert again.cluster_id != bundle.cluster_id
    assert load_bundle(bundle.path) == again


def test_init_on_a_file_fails(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        init_bundle(target)


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nope")


@pytest.mark.parametrize("name", ["bundle.json", "ca.pem", "ca.key", "keyring.json", "token",
                                  "client.pem", "client.key"])
def test_missing_file_names_the_file(bundle: Bundle, name: str) -> None:
    (bundle.path / name).unlink()
    message = _load_error(bundle.path)
    assert name in message and "missing" in message


def test_a_bundle_of_an_older_format_says_so(bundle: Bundle) -> None:
    (bundle.path / "bundle.json").write_text('{"format": 1, "cluster_id": "x"}')
    message = _load_error(bundle.path)
    assert "format version 1 is not supported" in message and "meshscale init" in message


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("bundle.json", b"{not json", "not valid JSON"),
        ("bundle.json", b'{"format": 99, "cluster_id": "x"}', "format version 99"),
        ("bundle.json", b'{"format": 2}', "cluster_id"),
        ("bundle.json", b'{"format": 2, "cluster_id": "x", "kind": "root"}', "'kind'"),
        ("ca.pem", b"garbage", "not a PEM certificate"),
        ("ca.key", b"garbage", "private key"),
        ("keyring.json", b'{"primary": "AAAA"}', "32 bytes"),
        ("keyring.json", b"\x00\x01binary", "not valid JSON"),
        ("token", b"\n", "empty"),
        ("token", b"two words\n", "not a valid token"),
    ],
)
def test_corrupted_file_names_the_file(bundle: Bundle, name: str, content: bytes, why: str) -> None:
    write_private(bundle.path / name, content)
    message = _load_error(bundle.path)
    assert name in message
    assert why in message


def test_ca_key_from_another_bundle_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    other = init_bundle(tmp_path / "other")
    assert other.ca_key_pem is not None
    write_private(bundle.path / "ca.key", other.ca_key_pem)
    assert "does not match" in _load_error(bundle.path)


@pytest.mark.parametrize("name", PRIVATE_FILES)
def test_world_readable_secret_is_refused(bundle: Bundle, name: str) -> None:
    os.chmod(bundle.path / name, 0o644)
    message = _load_error(bundle.path)
    assert name in message and "too open" in message


def test_oversized_file_is_refused(bundle: Bundle) -> None:
    write_private(bundle.path / "token", b"a" * (2 * 1024 * 1024))
    assert "larger than" in _load_error(bundle.path)


def test_directory_in_place_of_file(bundle: Bundle) -> None:
    (bundle.path / "token").unlink()
    (bundle.path / "token").mkdir()
    message = _load_error(bundle.path)
    assert "token" in message


def test_rotate_keeps_old_key_accepted(bundle: Bundle) -> None:
    sealed_before = bundle.keyring.seal(b"before rotation")
    rotated = rotate_keys(bundle.path)
    assert rotated.primary != bundle.keyring.primary
    assert bundle.keyring.primary in rotated.accepted
    reloaded = load_bundle(bundle.path)
    assert reloaded.keyring == rotated
    assert reloaded.keyring.open(sealed_before) == b"before rotation"
    assert _mode(bundle.path / "keyring.json") == 0o600
    assert not [p for p in bundle.path.iterdir() if p.name.endswith(".tmp")]
    # Nodes still on the old keyring cannot read the new primary's messages.
    with pytest.raises(SealError) as info:
        bundle.keyring.open(rotated.seal(b"after"))
    assert info.value.reason == "unknown_key"


def test_rotate_drops_the_oldest(bundle: Bundle) -> None:
    first = bundle.keyring.primary
    history: list[Keyring] = []
    for _ in range(MAX_ROTATION_KEEP + 2):
        history.append(rotate_keys(bundle.path))
    final = load_bundle(bundle.path).keyring
    assert len(final.accepted) == MAX_ROTATION_KEEP
    assert first not in final.keys
    # Newest first: the previous primary leads the accepted list.
    assert final.accepted[0] == history[-2].primary


def test_rotate_on_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        rotate_keys(tmp_path / "missing")


def test_write_private_is_0600_even_over_a_public_file(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_issue_node_cert(bundle: Bundle) -> None:
    cert_pem, key_pem = issue_node_cert(bundle, "node-1", ["10.1.2.3", "::1", "n1.example"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(bundle.ca_cert_pem)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["n1.example"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"PRIVATE KEY" in key_pem
    delta = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 824 <= delta.days <= 826


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "-x", "x" * 64, "sp ace"])
def test_issue_rejects_bad_names(bundle: Bundle, name: str) -> None:
    with pytest.raises(ValueError, match="invalid node name"):
        issue_node_cert(bundle, name)


@pytest.mark.parametrize("host", ["", "bad host", "-a.example", "a..b"])
def test_issue_rejects_bad_hosts(bundle: Bundle, host: str) -> None:
    with pytest.raises(ValueError, match="invalid host"):
        issue_node_cert(bundle, "n1", [host])
