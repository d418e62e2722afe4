"""Erasure: which objects an erase selects, what its receipt says, and the exact bytes
that are signed, sans-I/O.

``meshscale erase --class C [--key-prefix P]`` or ``meshscale erase ID...`` deletes every
copy of the selected objects through the ordinary delete path (``obj.delete``: copies
dropped, tombstones spread), then asks every node that held a copy to confirm that its
copy is gone. Each holder answers with a *confirmation* it signs itself with its node key
(``confirmation_payload``): the receipt therefore carries, for each copy, a statement
from the node that held it, not the coordinator's word about it. The coordinating node
then signs the whole receipt body (``receipt_payload``) with its own key, as it signs its
audit chain heads. An auditor checks a receipt offline with the cluster's CA certificate
(``trust/receipts.py``): both kinds of signature, the certificates, and that every copy
listed is confirmed by the node that held it (``receipt_problems``).

The receipt file is canonical JSON (``receipt_json``): a file that is not byte for byte
the canonical form of what it decodes to is refused before any signature is checked, so
a changed byte is caught even where JSON would read it the same (white space, escapes).

What a selector picks (``select``):
- a class: every object whose copies carry that data class;
- a class and a KV key prefix ``P`` (under the class's prefix ``C/``): the live keys under
  ``P`` (deleted too) and the objects of class ``C`` those keys name (a key whose value is
  an object id);
- ids: those objects, whatever their class; an id that no live node holds is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated

import msgspec

from meshscale.core.policy import PolicyError, check_class_name, kv_key_class

__all__ = ["MAX_ERASE_IDS", "MAX_RECEIPT_BYTES", "RECEIPT_VERSION", "ConfirmPayload", "ErasedCopy",
           "ErasedKey", "ErasedObject", "HeldCopy", "NodeConfirmation", "Receipt",
           "ReceiptBody", "ReceiptError", "Selection", "Selector", "check_selector",
           "confirmation_payload", "decode_receipt", "is_object_id", "object_id_of_value",
           "receipt_json", "receipt_payload", "receipt_problems", "select"]

RECEIPT_VERSION = 1
MAX_ERASE_IDS = 10_000
"""Object ids one erase may name."""
MAX_RECEIPT_BYTES = 64 * 1024 * 1024
"""Largest receipt file ``decode_receipt`` reads."""
_OID_PREFIX = "b3-"
_OID_HEX = 64


class ReceiptError(ValueError):
    """A receipt that is malformed (``malformed``: not a receipt at all) or does not
    verify (altered, a bad signature or certificate); the message says which part."""

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.malformed = malformed


class Selector(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What an erase asks for: a class (perhaps narrowed by a KV key prefix) or ids."""

    data_class: str | None = None
    key_prefix: str | None = None
    ids: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.ids:
            return f"{len(self.ids)} object id(s)"
        prefix = f" under key prefix {self.key_prefix!r}" if self.key_prefix else ""
        return f"class {self.data_class}{prefix}"


def is_object_id(text: str) -> bool:
    return (len(text) == len(_OID_PREFIX) + _OID_HEX and text.startswith(_OID_PREFIX)
            and all(c in "0123456789abcdef" for c in text[len(_OID_PREFIX):]))


def check_selector(data_class: str | None, key_prefix: str | None,
                   ids: Sequence[str]) -> Selector:
    """A checked ``Selector``; ``PolicyError("malformed")`` naming what is wrong."""
    if ids:
        if data_class is not None or key_prefix is not None:
            raise PolicyError("malformed", "name object ids, or a class (with perhaps a key "
                                           "prefix), not both")
        if len(ids) > MAX_ERASE_IDS:
            raise PolicyError("malformed", f"at most {MAX_ERASE_IDS} object ids per erase")
        bad = [i for i in ids if not isinstance(i, str) or not is_object_id(i)]
        if bad:
            raise PolicyError("malformed", (
                f"not an object id: {bad[0]!r:.80} (an id is 'b3-' and 64 hex digits)"))
        return Selector(ids=tuple(sorted(set(ids))))
    if data_class is None:
        raise PolicyError("malformed", "name a data class (--class) or object ids")
    check_class_name(data_class)
    if key_prefix is not None and (not key_prefix.startswith(data_class + "/")
                                   or kv_key_class(key_prefix) != data_class):
        raise PolicyError("malformed", (
            f"key prefix {key_prefix!r:.80} is not under class {data_class}'s prefix "
            f"'{data_class}/': an erase by class reaches only the class's own keys"))
    return Selector(data_class=data_class, key_prefix=key_prefix)


class HeldCopy(msgspec.Struct, frozen=True, omit_defaults=True):
    """One copy a live member holds, as its ``obj.local_list`` describes it."""

    oid: str
    node: str
    region: str
    size: int
    data_class: str | None = None
    regions: tuple[str, ...] | None = None
    """The residency rule the copy carries (None: anywhere)."""


def object_id_of_value(value: bytes | None) -> str | None:
    """The object id a KV value names (a reference key such as ``pii/customer/42`` ->
    ``b3-...``), or None."""
    if value is None or len(value) != len(_OID_PREFIX) + _OID_HEX:
        return None
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return text if is_object_id(text) else None


class Selection(msgspec.Struct, frozen=True):
    """What an erase will delete: objects with the copies the members hold now, and keys."""

    objects: dict[str, list[HeldCopy]]
    keys: list[str]
    missing: list[str]
    """Ids named (or referenced by a key) that no live member holds."""


def select(selector: Selector, copies: Iterable[HeldCopy],
           keys: Mapping[str, bytes | None] | None = None) -> Selection:
    """The objects (and keys) ``selector`` picks out of the members' ``copies`` and, for a
    key prefix, the live ``keys`` under it (key -> value)."""
    by_oid: dict[str, list[HeldCopy]] = {}
    for c in copies:
        by_oid.setdefault(c.oid, []).append(c)
    wanted: set[str]
    chosen_keys: list[str] = []
    if selector.ids:
        wanted = set(selector.ids)
    elif selector.key_prefix is not None:
        wanted = set()
        for key, value in sorted((keys or {}).items()):
            if not key.startswith(selector.key_prefix):
                continue
            chosen_keys.append(key)
            oid = object_id_of_value(value)
            if oid is not None:
                wanted.add(oid)
        # A referenced object of another class is left alone: the erase names one class.
        wanted = {o for o in wanted
                  if o not in by_oid or any(c.data_class == selector.data_class
                                            for c in by_oid[o])}
    else:
        wanted = {o for o, cs in by_oid.items()
                  if any(c.data_class == selector.data_class for c in cs)}
    objects = {o: sorted(by_oid[o], key=lambda c: c.node) for o in sorted(wanted)
               if o in by_oid}
    missing = sorted(wanted - set(objects))
    return Selection(objects, chosen_keys, missing)


# ------------------------------------------------------------------ the receipt

Name = Annotated[str, msgspec.Meta(max_length=256)]


class ConfirmPayload(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a holder signs: for erase ``receipt_id``, node ``node`` (in ``region``) no
    longer holds ``gone``, still holds ``still_held``, at ``wall_s``."""

    version: int
    receipt_id: str
    node: str
    region: str
    gone: tuple[str, ...]
    still_held: tuple[str, ...]
    wall_s: float


_mp = msgspec.msgpack.Encoder()


def confirmation_payload(receipt_id: str, node: str, region: str, gone: Iterable[str],
                         still_held: Iterable[str], wall_s: float) -> bytes:
    """The bytes a holder signs (ids sorted: one statement, one encoding)."""
    return _mp.encode(ConfirmPayload(RECEIPT_VERSION, receipt_id, node, region,
                                     tuple(sorted(set(gone))), tuple(sorted(set(still_held))),
                                     float(wall_s)))


class NodeConfirmation(msgspec.Struct, forbid_unknown_fields=True):
    """A holder's signed statement (``confirmation_payload``) with its certificate."""

    node: str
    region: str
    gone: list[str]
    still_held: list[str]
    wall_s: float
    signature: str
    """ECDSA P-256 over ``confirmation_payload``, base64 (r || s)."""
    cert_pem: str

    def payload(self, receipt_id: str) -> bytes:
        return confirmation_payload(receipt_id, self.node, self.region, self.gone,
                                    self.still_held, self.wall_s)


class ErasedCopy(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    region: str
    size: int


class ErasedObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    data_class: str
    size: int
    copies: list[ErasedCopy]
    """Every copy the live members held when the erase began."""
    delete_ts: str
    """The delete's HLC time ("" if the delete failed: see ``ReceiptBody.problems``)."""
    tombstones: list[str]
    """Nodes that confirmed a durable tombstone (they refuse the object from now on)."""


class ErasedKey(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    delete_ts: str


class ReceiptBody(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    receipt_id: str
    coordinator: str
    coordinator_region: str
    requested_by: str
    requested_role: str
    selector: Selector
    started_wall_s: float
    finished_wall_s: float
    hlc: str
    objects: list[ErasedObject]
    keys: list[ErasedKey]
    confirmations: list[NodeConfirmation]
    missing: list[str]
    """Ids named that no live member held (nothing to erase)."""
    problems: list[str]
    """What is not confirmed (``receipt_problems`` as the coordinator found it); empty
    for a complete erasure."""
    complete: bool


class Receipt(msgspec.Struct, forbid_unknown_fields=True):
    body: ReceiptBody
    signature: str
    """The coordinator's ECDSA P-256 signature over ``receipt_payload(body)``, base64."""
    cert_pem: str
    """The coordinator's certificate (checked against the cluster's CA)."""


def receipt_payload(body: ReceiptBody) -> bytes:
    """The bytes the coordinator signs: the body's canonical MessagePack."""
    return _mp.encode(body)


_receipt_decoder = msgspec.json.Decoder(Receipt)


def receipt_json(receipt: Receipt) -> bytes:
    """A receipt's file form: canonical, indented JSON ending in a newline."""
    return msgspec.json.format(msgspec.json.encode(receipt), indent=2) + b"\n"


def decode_receipt(raw: bytes) -> Receipt:
    """A receipt file's contents; ``ReceiptError`` if malformed or not in canonical form."""
    if len(raw) > MAX_RECEIPT_BYTES:
        raise ReceiptError(f"receipt is larger than {MAX_RECEIPT_BYTES} bytes", malformed=True)
    try:
        receipt = _receipt_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ReceiptError(f"not an erasure receipt: {e}", malformed=True) from None
    if receipt.body.version != RECEIPT_VERSION:
        raise ReceiptError(f"receipt version {receipt.body.version} is not "
                           f"{RECEIPT_VERSION}", malformed=True)
    if receipt_json(receipt) != raw:
        raise ReceiptError("the file is not in the receipt's canonical form: it was altered "
                           "after it was written")
    return receipt


def receipt_problems(body: ReceiptBody) -> list[str]:
    """What a receipt does not prove: each copy listed must be confirmed gone by the node
    that held it (in that node's own signed confirmation), each object deleted."""
    out: list[str] = []
    by_node = {c.node: c for c in body.confirmations}
    if len(by_node) != len(body.confirmations):
        out.append("a node confirms twice")
    for obj in body.objects:
        if not obj.delete_ts:
            out.append(f"{obj.id}: the delete was not confirmed")
        for copy in obj.copies:
            conf = by_node.get(copy.node)
            if conf is None:
                out.append(f"{obj.id}: the copy on {copy.node} is not confirmed by that node")
            elif obj.id in conf.still_held:
                out.append(f"{obj.id}: {copy.node} still holds its copy")
            elif obj.id not in conf.gone:
                out.append(f"{obj.id}: {copy.node}'s confirmation does not name it")
    for conf in body.confirmations:
        if conf.node not in {c.node for o in body.objects for c in o.copies}:
            out.append(f"{conf.node} confirms but held no copy listed")
    return out
