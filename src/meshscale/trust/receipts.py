"""Signing and checking erasure receipts (``core/erasure.py`` says what they contain).

A node signs with its certificate's key (ECDSA P-256, SHA-256), as it signs its audit
chain heads; signatures travel as base64 of ``r || s`` (64 bytes). ``verify_receipt``
needs only the cluster's CA certificate: it checks that each certificate in the receipt
was issued by that CA to a node of the name it claims, each holder's confirmation
signature, the coordinator's signature over the whole body, and that every copy listed
is confirmed gone by the node that held it. An auditor runs it offline
(``meshscale erase verify RECEIPT.json``)."""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from meshscale.core.erasure import Receipt, ReceiptError, receipt_payload, receipt_problems
from meshscale.trust.certs import CertError, Role, cert_info

__all__ = ["sign_bytes", "verify_receipt", "verify_signed"]


def sign_bytes(key_pem: bytes, payload: bytes) -> str:
    """``payload`` signed with the PEM private key ``key_pem``: base64 of r || s."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    r, s = decode_dss_signature(key.sign(payload, ec.ECDSA(hashes.SHA256())))
    return base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()


def verify_signed(cert_pem: str, ca_cert_pem: bytes, node: str, payload: bytes,
                  signature: str, what: str) -> None:
    """Check that node ``node``'s certificate ``cert_pem`` (issued by the CA) signed
    ``payload``; ``ReceiptError`` naming ``what`` if not."""
    try:
        info = cert_info(cert_pem.encode(), ca_cert_pem)
    except (CertError, UnicodeEncodeError) as e:
        raise ReceiptError(f"{what}: certificate: {e}") from None
    if info.name != node or info.role is not Role.NODE:
        raise ReceiptError(f"{what}: the certificate is {info.role.value} {info.name!r}, "
                           f"not node {node!r}")
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 64:
        raise ReceiptError(f"{what}: malformed signature")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public = x509.load_pem_x509_certificate(cert_pem.encode()).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ReceiptError(f"{what}: not an EC certificate")
    try:
        public.verify(der, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ReceiptError(f"{what}: the signature does not match (altered, or not signed "
                           f"by {node})") from None


def verify_receipt(receipt: Receipt, ca_cert_pem: bytes) -> list[str]:
    """Check ``receipt`` against the cluster's CA. ``ReceiptError`` if a signature or
    certificate does not verify; otherwise the problems the receipt itself states or
    shows (``core.erasure.receipt_problems``: an empty list is a complete erasure)."""
    body = receipt.body
    verify_signed(receipt.cert_pem, ca_cert_pem, body.coordinator, receipt_payload(body),
                  receipt.signature, f"coordinator {body.coordinator}")
    for conf in body.confirmations:
        verify_signed(conf.cert_pem, ca_cert_pem, conf.node, conf.payload(body.receipt_id),
                      conf.signature, f"confirmation of {conf.node}")
    problems = receipt_problems(body)
    stated = set(body.problems)
    if body.complete and problems:
        raise ReceiptError("the receipt says the erasure is complete but it is not: "
                           + problems[0])
    return sorted(stated | set(problems))
