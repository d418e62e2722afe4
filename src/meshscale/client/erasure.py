"""Erasure receipts from a client: save one (``save_receipt``) and check one against the
cluster's CA certificate (``verify_receipt_file``), offline: no node is asked. What a
receipt holds and why it can be trusted: ``core/erasure.py``, ``trust/receipts.py``."""

from __future__ import annotations

import os
from pathlib import Path

from meshscale.core.erasure import (
    MAX_RECEIPT_BYTES,
    Receipt,
    ReceiptError,
    decode_receipt,
    receipt_json,
)
from meshscale.trust.receipts import verify_receipt

__all__ = ["Receipt", "ReceiptError", "read_receipt", "save_receipt", "verify_receipt_file"]


def save_receipt(receipt: Receipt, path: str | os.PathLike[str]) -> Path:
    """Write ``receipt`` in its canonical file form (atomically); the path."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(receipt_json(receipt))
    os.replace(tmp, p)
    return p


def read_receipt(path: str | os.PathLike[str]) -> Receipt:
    """The receipt in file ``path``; ``ReceiptError`` if it is not one (``OSError`` if
    it cannot be read)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_RECEIPT_BYTES + 1)
    return decode_receipt(raw)


def verify_receipt_file(path: str | os.PathLike[str],
                        ca_cert_pem: bytes) -> tuple[Receipt, list[str]]:
    """Read and check a receipt: ``ReceiptError`` if it is malformed, altered, or a
    signature does not verify; else the receipt and what it does not prove (empty: a
    complete erasure)."""
    receipt = read_receipt(path)
    return receipt, verify_receipt(receipt, ca_cert_pem)
