"""Gossip encryption: a keyring of AES-256-GCM keys, one primary and some still accepted.

Modelled on HashiCorp memberlist's keyring (seal with the primary, open with any installed
key, so a key can be rotated without a flag day), with our own wire format:

    version (1 byte, = 1) | key id (4 bytes) | nonce (12 bytes) | ciphertext + tag (16)

The key id is the first 4 bytes of BLAKE2b(key); it lets ``open`` pick the key instead of
trying each, and lets the node count ``unknown_key`` separately from forgeries. Version
and key id are bound to the ciphertext as associated data, so neither can be swapped.

Nonces are random (``os.urandom``). With 96-bit random nonces the safe budget is about
2**32 messages per key across the whole cluster, which is why keys are meant to be rotated
(``meshscale keys rotate``) rather than kept forever.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
KEY_SIZE = 32
KEY_ID_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + KEY_ID_SIZE
SEAL_OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE  # 33 bytes
assert SEAL_OVERHEAD == 33

# The largest UDP payload over IPv4; gossip never needs more.
DEFAULT_MAX_SEALED_SIZE = 65_507
# How many former primaries a rotation keeps accepting.
MAX_ROTATION_KEEP = 4
# Upper bound on installed keys (primary included) read from a keyring file.
MAX_KEYS = 16

SealReason = Literal["short", "version", "unknown_key", "auth", "too_large"]


class SealError(Exception):
    """A sealed message could not be opened (or a plaintext could not be sealed).

    ``reason`` is a short label suitable for ``rejected_messages{reason=...}``:
    ``short``, ``version``, ``unknown_key``, ``auth`` or ``too_large``.
    """

    def __init__(self, reason: SealReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: SealReason = reason


class KeyringError(ValueError):
    """A keyring (or its JSON form) is malformed."""


def key_id(key: bytes) -> bytes:
    """The 4-byte id of ``key``: the first bytes of its BLAKE2b digest."""
    return hashlib.blake2b(key).digest()[:KEY_ID_SIZE]


def generate_key() -> bytes:
    return os.urandom(KEY_SIZE)


def _check_key(key: bytes, what: str) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise KeyringError(f"{what} must be bytes, got {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise KeyringError(f"{what} must be {KEY_SIZE} bytes, got {len(key)}")
    return key


class Keyring:
    """An immutable set of AES-256-GCM keys: ``primary`` seals, every key opens."""

    __slots__ = ("_accepted", "_by_id", "_max_sealed_size", "_primary", "_primary_aead")

    def __init__(
        self,
        primary: bytes,
        accepted: Sequence[bytes] = (),
        *,
        max_sealed_size: int = DEFAULT_MAX_SEALED_SIZE,
    ) -> None:
        if max_sealed_size < SEAL_OVERHEAD:
            raise KeyringError(f"max_sealed_size must be at least {SEAL_OVERHEAD}")
        self._primary = _check_key(primary, "primary key")
        others: list[bytes] = []
        for i, key in enumerate(accepted):
            key = _check_key(key, f"accepted key #{i}")
            if key != self._primary and key not in others:
                others.append(key)
        if 1 + len(others) > MAX_KEYS:
            raise KeyringError(f"too many keys: {1 + len(others)} (at most {MAX_KEYS})")
        self._accepted: tuple[bytes, ...] = tuple(others)
        self._max_sealed_size = max_sealed_size
        self._primary_aead = AESGCM(self._primary)
        # Distinct keys may share a 4-byte id (p ~ 2**-32); keep all candidates.
        by_id: dict[bytes, list[AESGCM]] = {}
        for key in (self._primary, *self._accepted):
            aead = self._primary_aead if key == self._primary else AESGCM(key)
            by_id.setdefault(key_id(key), []).append(aead)
        self._by_id: dict[bytes, tuple[AESGCM, ...]] = {k: tuple(v) for k, v in by_id.items()}

    @classmethod
    def generate(cls, *, max_sealed_size: int = DEFAULT_MAX_SEALED_SIZE) -> Keyring:
        """A fresh keyring with one random primary key."""
        return cls(generate_key(), (), max_sealed_size=max_sealed_size)

    # -- introspection (never exposes key bytes in repr/str) ---------------------------

    @property
    def primary(self) -> bytes:
        return self._primary

    @property
    def accepted(self) -> tuple[bytes, ...]:
        """Keys that open but do not seal, newest first (the primary is not listed)."""
        return self._accepted

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every installed key, primary first."""
        return (self._primary, *self._accepted)

    @property
    def primary_id(self) -> str:
        return key_id(self._primary).hex()

    def key_ids(self) -> list[str]:
        """Hex ids of every installed key, primary first."""
        return [key_id(k).hex() for k in self.keys]

    @property
    def max_sealed_size(self) -> int:
        return self._max_sealed_size

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary_id}, keys={self.key_ids()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return self.keys == other.keys

    def __hash__(self) -> int:
        return hash(self.keys)

    # -- sealing ------------------------------------------------------------------------

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` with the primary key."""
        if len(plaintext) + SEAL_OVERHEAD > self._max_sealed_size:
            raise SealError(
                "too_large",
                f"{len(plaintext) + SEAL_OVERHEAD} bytes sealed > {self._max_sealed_size}",
            )
        header = bytes((VERSION,)) + key_id(self._primary)
        nonce = os.urandom(NONCE_SIZE)
        return header + nonce + self._primary_aead.encrypt(nonce, plaintext, header)

    def open(self, sealed: bytes) -> bytes:
        """Decrypt ``sealed``; raise ``SealError`` with a countable reason if it fails."""
        size = len(sealed)
        if size > self._max_sealed_size:
            raise SealError("too_large", f"{size} bytes > {self._max_sealed_size}")
        if size < SEAL_OVERHEAD:
            raise SealError("short", f"{size} bytes < {SEAL_OVERHEAD}")
        view = memoryview(sealed)
        if view[0] != VERSION:
            raise SealError("version", f"version {view[0]}")
        header = bytes(view[:HEADER_SIZE])
        candidates = self._by_id.get(header[1:])
        if candidates is None:
            raise SealError("unknown_key", f"key id {header[1:].hex()}")
        nonce = bytes(view[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE])
        body = bytes(view[HEADER_SIZE + NONCE_SIZE :])
        for aead in candidates:
            try:
                return aead.decrypt(nonce, body, header)
            except InvalidTag:
                continue
        raise SealError("auth")

    # -- rotation -----------------------------------------------------------------------

    def rotated(
        self, new_primary: bytes | None = None, *, keep: int = MAX_ROTATION_KEEP
    ) -> Keyring:
        """A keyring with a new primary; the old primary stays accepted.

        At most ``keep`` non-primary keys are kept, the oldest dropped first.
        """
        if keep < 1:
            raise KeyringError("keep must be at least 1 so the old primary still opens")
        primary = generate_key() if new_primary is None else _check_key(new_primary, "new key")
        accepted = [k for k in (self._primary, *self._accepted) if k != primary][:keep]
        return Keyring(primary, accepted, max_sealed_size=self._max_sealed_size)

    # -- JSON form: {"primary": b64, "keys": [b64, ...]} -----------------------------------

    def to_json(self) -> str:
        """JSON with the primary and every installed key (primary first), base64."""
        data = {
            "primary": base64.b64encode(self._primary).decode("ascii"),
            "keys": [base64.b64encode(k).decode("ascii") for k in self.keys],
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(
        cls, text: str | bytes, *, max_sealed_size: int = DEFAULT_MAX_SEALED_SIZE
    ) -> Keyring:
        """Parse the JSON form; ``keys`` may or may not repeat the primary."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise KeyringError(f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise KeyringError("expected a JSON object with 'primary' and 'keys'")
        unknown = set(data) - {"primary", "keys"}
        if unknown:
            raise KeyringError(f"unknown field(s): {', '.join(sorted(unknown))}")
        if "primary" not in data:
            raise KeyringError("missing field 'primary'")
        primary = _decode_key(data["primary"], "'primary'")
        raw_keys = data.get("keys", [])
        if not isinstance(raw_keys, list):
            raise KeyringError("'keys' must be a list of base64 strings")
        if len(raw_keys) > MAX_KEYS:
            raise KeyringError(f"too many keys: {len(raw_keys)} (at most {MAX_KEYS})")
        keys = [_decode_key(v, f"'keys'[{i}]") for i, v in enumerate(raw_keys)]
        return cls(primary, keys, max_sealed_size=max_sealed_size)


def _decode_key(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyringError(f"{what} must be a base64 string")
    try:
        key = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeyringError(f"{what} is not valid base64") from None
    if len(key) != KEY_SIZE:
        raise KeyringError(f"{what} must decode to {KEY_SIZE} bytes, got {len(key)}")
    return key
