from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.trust.keyring import (
    DEFAULT_MAX_SEALED_SIZE,
    MAX_ROTATION_KEEP,
    SEAL_OVERHEAD,
    Keyring,
    KeyringError,
    SealError,
    key_id,
)

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
K3 = bytes(range(64, 96))
K1_B64 = base64.b64encode(K1).decode()


def _reason(kr: Keyring, sealed: bytes) -> str:
    with pytest.raises(SealError) as info:
        kr.open(sealed)
    return info.value.reason


def test_overhead_is_33_bytes() -> None:
    assert SEAL_OVERHEAD == 33
    kr = Keyring(K1, [])
    assert len(kr.seal(b"hello")) == 5 + SEAL_OVERHEAD
    assert len(kr.seal(b"")) == SEAL_OVERHEAD


def test_wire_format_header() -> None:
    sealed = Keyring(K1).seal(b"x")
    assert sealed[0] == 1
    assert sealed[1:5] == key_id(K1)


def test_seal_open_round_trip_and_nonces_differ() -> None:
    kr = Keyring(K1, [K2])
    a, b = kr.seal(b"payload"), kr.seal(b"payload")
    assert a != b
    assert kr.open(a) == kr.open(b) == b"payload"


def test_accepted_key_opens_but_does_not_seal() -> None:
    old = Keyring(K2)
    sealed_with_old = old.seal(b"m")
    kr = Keyring(K1, [K2])
    assert kr.open(sealed_with_old) == b"m"
    assert kr.seal(b"m")[1:5] == key_id(K1)
    assert _reason(old, kr.seal(b"m")) == "unknown_key"


def test_unknown_key() -> None:
    sealed = Keyring(K3).seal(b"secret")
    assert _reason(Keyring(K1, [K2]), sealed) == "unknown_key"


def test_tampered_ciphertext_is_auth() -> None:
    kr = Keyring(K1)
    sealed = bytearray(kr.seal(b"some gossip"))
    sealed[-1] ^= 0x01
    assert _reason(kr, bytes(sealed)) == "auth"
    sealed = bytearray(kr.seal(b"some gossip"))
    sealed[7] ^= 0x80  # nonce
    assert _reason(kr, bytes(sealed)) == "auth"


def test_same_key_id_different_key_is_auth() -> None:
    # A forged message naming our key id but made with another key.
    forged = bytearray(Keyring(K2).seal(b"x"))
    forged[1:5] = key_id(K1)
    assert _reason(Keyring(K1), bytes(forged)) == "auth"


def test_short_and_version() -> None:
    kr = Keyring(K1)
    assert _reason(kr, b"") == "short"
    assert _reason(kr, b"\x01" * (SEAL_OVERHEAD - 1)) == "short"
    sealed = bytearray(kr.seal(b"x"))
    sealed[0] = 2
    assert _reason(kr, bytes(sealed)) == "version"


def test_size_bound() -> None:
    kr = Keyring(K1, max_sealed_size=100)
    assert kr.open(kr.seal(b"a" * (100 - SEAL_OVERHEAD))) == b"a" * 67
    with pytest.raises(SealError) as info:
        kr.seal(b"a" * (101 - SEAL_OVERHEAD))
    assert info.value.reason == "too_large"
    big = Keyring(K1).seal(b"a" * 200)
    assert _reason(kr, big) == "too_large"
    assert Keyring(K1).max_sealed_size == DEFAULT_MAX_SEALED_SIZE == 65_507


@given(st.binary(max_size=4096))
def test_round_trip_property(plaintext: bytes) -> None:
    kr = Keyring(K1, [K2, K3])
    assert kr.open(kr.seal(plaintext)) == plaintext
    assert Keyring(K2, [K1]).open(kr.seal(plaintext)) == plaintext


@settings(max_examples=200)
@given(st.binary(max_size=256), st.data())
def test_any_bit_flip_is_rejected(plaintext: bytes, data: st.DataObject) -> None:
    kr = Keyring(K1, [K2])
    sealed = bytearray(kr.seal(plaintext))
    i = data.draw(st.integers(0, len(sealed) - 1))
    bit = data.draw(st.integers(0, 7))
    sealed[i] ^= 1 << bit
    with pytest.raises(SealError) as info:
        kr.open(bytes(sealed))
    assert info.value.reason in {"version", "unknown_key", "auth"}


@given(st.binary(max_size=200))
def test_garbage_never_crashes(garbage: bytes) -> None:
    with pytest.raises(SealError):
        Keyring(K1).open(garbage)


def test_rejects_bad_keys() -> None:
    with pytest.raises(KeyringError, match="32 bytes"):
        Keyring(b"short")
    with pytest.raises(KeyringError, match="accepted key #1"):
        Keyring(K1, [K2, b"x" * 16])


def test_accepted_is_deduplicated_and_excludes_primary() -> None:
    kr = Keyring(K1, [K1, K2, K2])
    assert kr.accepted == (K2,)
    assert kr.keys == (K1, K2)
    assert kr.key_ids() == [key_id(K1).hex(), key_id(K2).hex()]
    assert kr.primary_id == key_id(K1).hex()


def test_repr_does_not_leak_keys() -> None:
    text = repr(Keyring(K1, [K2]))
    assert base64.b64encode(K1).decode() not in text
    assert K1.hex() not in text
    assert key_id(K1).hex() in text


def test_rotation_keeps_old_primary_and_bounds_history() -> None:
    kr = Keyring(K1)
    sealed = kr.seal(b"before")
    rotated = kr.rotated()
    assert rotated.primary != K1
    assert rotated.accepted == (K1,)
    assert rotated.open(sealed) == b"before"
    for _ in range(10):
        rotated = rotated.rotated()
    assert len(rotated.accepted) == MAX_ROTATION_KEEP
    assert K1 not in rotated.keys


def test_json_round_trip() -> None:
    kr = Keyring(K1, [K2, K3])
    text = kr.to_json()
    data = json.loads(text)
    assert base64.b64decode(data["primary"]) == K1
    assert [base64.b64decode(k) for k in data["keys"]] == [K1, K2, K3]
    assert Keyring.from_json(text) == kr
    assert Keyring.from_json(text.encode()) == kr


def test_json_keys_may_omit_primary() -> None:
    text = json.dumps(
        {"primary": base64.b64encode(K1).decode(), "keys": [base64.b64encode(K2).decode()]}
    )
    assert Keyring.from_json(text).keys == (K1, K2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[]", "JSON object"),
        ("{}", "missing field 'primary'"),
        ('{"primary": 3}', "base64 string"),
        ('{"primary": "!!!"}', "not valid base64"),
        ('{"primary": "AAAA"}', "32 bytes"),
        ('{"primary": "' + K1_B64 + '", "keys": "x"}', "list"),
        ('{"primary": "' + K1_B64 + '", "keys": [1]}', r"'keys'\[0\]"),
        ('{"primary": "' + K1_B64 + '", "extra": 1}', "unknown field"),
    ],
)
def test_json_malformed(text: str | bytes, match: str) -> None:
    with pytest.raises(KeyringError, match=match):
        Keyring.from_json(text)


def test_json_too_many_keys() -> None:
    keys = [base64.b64encode(bytes([i]) * 32).decode() for i in range(40)]
    text = json.dumps({"primary": keys[0], "keys": keys})
    with pytest.raises(KeyringError, match="too many keys"):
        Keyring.from_json(text)
