"""Content addressing of objects: one rule, used by the store, the client, the compute
plane and the simulator alike.

An object's id is ``b2b-`` followed by the lowercase hex BLAKE2b-256 of its bytes. Ids are
validated before they touch a filesystem path or a message.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

OBJECT_ID_PREFIX: Final = "b2b-"
DIGEST_SIZE: Final = 32
OBJECT_ID_RE: Final = re.compile(r"b2b-[0-9a-f]{64}")


def new_hasher() -> hashlib.blake2b:
    """A streaming hasher whose ``object_id_from`` is the id of the bytes fed to it."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def object_id_from(hasher: hashlib.blake2b) -> str:
    return OBJECT_ID_PREFIX + hasher.hexdigest()


def object_id(data: bytes | bytearray | memoryview) -> str:
    """The id of an object with these bytes."""
    return OBJECT_ID_PREFIX + hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def is_object_id(value: object) -> bool:
    return isinstance(value, str) and OBJECT_ID_RE.fullmatch(value) is not None
