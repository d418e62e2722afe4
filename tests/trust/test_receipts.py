"""Erasure receipts, without a mesh: what a selector picks (``core.erasure.select``), the
checks on a selector, and a receipt signed by a coordinator and its holders with real
certificates (``trust/receipts.py``) that verifies, and stops verifying when anything in
it changes: a field, a holder's confirmation, a certificate of another cluster, an
unconfirmed copy, the file's bytes."""

from __future__ import annotations

import msgspec
import pytest

from meshscale.core.erasure import (
    RECEIPT_VERSION,
    ErasedCopy,
    ErasedObject,
    HeldCopy,
    NodeConfirmation,
    Receipt,
    ReceiptBody,
    ReceiptError,
    Selector,
    check_selector,
    confirmation_payload,
    decode_receipt,
    receipt_json,
    receipt_payload,
    receipt_problems,
    select,
)
from meshscale.core.policy import PolicyError
from meshscale.trust.certs import Role, issue_cert, make_ca
from meshscale.trust.receipts import sign_bytes, verify_receipt

A, B = "b3-" + "a" * 64, "b3-" + "b" * 64


def test_select_by_class_ids_and_key_prefix() -> None:
    copies = [HeldCopy(A, "n1", "eu", 10, "pii"), HeldCopy(A, "n2", "eu", 10, "pii"),
              HeldCopy(B, "n1", "eu", 5, "other")]
    s = select(Selector(data_class="pii"), copies)
    assert list(s.objects) == [A] and [c.node for c in s.objects[A]] == ["n1", "n2"]
    assert select(Selector(data_class="nosuch"), copies).objects == {}
    s = select(Selector(ids=(B, "b3-" + "c" * 64)), copies)
    assert list(s.objects) == [B] and s.missing == ["b3-" + "c" * 64]
    keys = {"pii/x/1": A.encode(), "pii/x/2": b"not an id", "pii/x/3": B.encode(),
            "pii/y": A.encode()}
    s = select(Selector(data_class="pii", key_prefix="pii/x/"), copies, keys)
    # B is referenced but of another class: left alone; the keys all go.
    assert list(s.objects) == [A] and s.keys == ["pii/x/1", "pii/x/2", "pii/x/3"]


def test_bad_selectors() -> None:
    for args, what in (((None, None, []), "name a data class"),
                       (("pii", None, [A]), "not both"),
                       ((None, None, ["b3-zz"]), "not an object id"),
                       (("bad class", None, []), "malformed data class"),
                       (("pii", "other/k", []), "not under class pii"),
                       (("pii", "piiano/k", []), "not under class pii")):
        with pytest.raises(PolicyError, match=what):
            check_selector(*args)
    assert check_selector(None, None, [B, A, A]).ids == (A, B)


@pytest.fixture(scope="module")
def cluster() -> dict[str, tuple[bytes, bytes]]:
    ca_cert, ca_key = make_ca("c1")
    out = {"ca": (ca_cert, ca_key)}
    for name in ("n1", "n2"):
        out[name] = issue_cert(ca_cert, ca_key, name, Role.NODE, hosts=["127.0.0.1"])
    out["admin"] = issue_cert(ca_cert, ca_key, "admin", Role.ADMIN)
    return out


def confirm(cluster: dict[str, tuple[bytes, bytes]], rid: str, node: str,
            gone: list[str], still: tuple[str, ...] = ()) -> NodeConfirmation:
    cert, key = cluster[node]
    sig = sign_bytes(key, confirmation_payload(rid, node, "eu", gone, still, 12.5))
    return NodeConfirmation(node, "eu", sorted(gone), sorted(still), 12.5, sig, cert.decode())


def signed(cluster: dict[str, tuple[bytes, bytes]], body: ReceiptBody,
           by: str = "n1") -> Receipt:
    cert, key = cluster[by]
    return Receipt(body, sign_bytes(key, receipt_payload(body)), cert.decode())


def make_body(cluster: dict[str, tuple[bytes, bytes]]) -> ReceiptBody:
    rid = "erase-1"
    body = ReceiptBody(
        version=RECEIPT_VERSION, receipt_id=rid, coordinator="n1", coordinator_region="eu",
        requested_by="admin", requested_role="admin", selector=Selector(data_class="pii"),
        started_wall_s=1.0, finished_wall_s=2.0, hlc="x",
        objects=[ErasedObject(A, "pii", 10, [ErasedCopy("n1", "eu", 10),
                                             ErasedCopy("n2", "eu", 10)], "ts", ["n1", "n2"])],
        keys=[], confirmations=[confirm(cluster, rid, "n1", [A]),
                                confirm(cluster, rid, "n2", [A])],
        missing=[], problems=[], complete=True)
    assert receipt_problems(body) == []
    return body


def test_a_signed_receipt_verifies_and_its_file_round_trips(
        cluster: dict[str, tuple[bytes, bytes]]) -> None:
    ca = cluster["ca"][0]
    r = signed(cluster, make_body(cluster))
    assert verify_receipt(r, ca) == []
    raw = receipt_json(r)
    assert verify_receipt(decode_receipt(raw), ca) == []
    # Any byte changed in the file: refused (malformed, altered form, or a signature).
    for i in range(0, len(raw), 37):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(ReceiptError):
            verify_receipt(decode_receipt(bytes(bad)), ca)
    with pytest.raises(ReceiptError) as e:
        decode_receipt(b"[1, 2]")
    assert e.value.malformed


def test_what_does_not_verify(cluster: dict[str, tuple[bytes, bytes]]) -> None:
    ca = cluster["ca"][0]
    good = signed(cluster, make_body(cluster))

    def changed(**fields: object) -> Receipt:
        body = msgspec.structs.replace(good.body, **fields)
        return Receipt(body, good.signature, good.cert_pem)

    with pytest.raises(ReceiptError, match="coordinator n1: the signature does not match"):
        verify_receipt(changed(requested_by="someone else"), ca)
    # Signed by a holder claiming to be the coordinator.
    with pytest.raises(ReceiptError, match="not node 'n1'"):
        verify_receipt(signed(cluster, make_body(cluster), by="n2"), ca)
    with pytest.raises(ReceiptError, match="not node 'n1'"):
        verify_receipt(signed(cluster, make_body(cluster), by="admin"), ca)
    # A confirmation the holder did not sign (the coordinator re-signs the body: still
    # caught, by the holder's own signature).
    body = make_body(cluster)
    body.confirmations[1].gone = [A, B]
    with pytest.raises(ReceiptError, match="confirmation of n2"):
        verify_receipt(signed(cluster, body), ca)
    # Another cluster's CA.
    with pytest.raises(ReceiptError, match="not issued by this cluster's CA"):
        verify_receipt(good, make_ca("c2")[0])
    # A copy nobody confirmed, claimed complete: refused; stated as incomplete: listed.
    body = make_body(cluster)
    body.confirmations = body.confirmations[:1]
    with pytest.raises(ReceiptError, match="complete but it is not"):
        verify_receipt(signed(cluster, body), ca)
    body.complete = False
    body.problems = receipt_problems(body)
    assert verify_receipt(signed(cluster, body), ca) == [
        f"{A}: the copy on n2 is not confirmed by that node"]
    # A holder that says it still holds its copy.
    body = make_body(cluster)
    body.confirmations[1] = confirm(cluster, "erase-1", "n2", [], (A,))
    body.complete = False
    assert verify_receipt(signed(cluster, body), ca) == [f"{A}: n2 still holds its copy"]
