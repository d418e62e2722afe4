"""Erasure (``erase.*``, ``core/erasure.py``): ``erase.run`` deletes every copy of what a
selector picks and answers with a signed receipt (admin role: ``WRITE``);
``erase.confirm`` is asked of each node that held a copy, which answers, once its copies
are gone, with a confirmation it signs itself (node to node only)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from meshscale.core.api.contract import Method, Request
from meshscale.core.erasure import MAX_ERASE_IDS, NodeConfirmation, Receipt

__all__ = ["CONFIRM", "METHODS", "RUN", "ConfirmRequest", "EraseRequest"]

ObjectId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class EraseRequest(Request):
    """A class (``data_class``, perhaps narrowed by ``key_prefix``) or object ``ids``;
    checked by ``core.erasure.check_selector``, which names what is wrong."""

    data_class: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    key_prefix: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    ids: Annotated[list[ObjectId], msgspec.Meta(max_length=MAX_ERASE_IDS)] = []


class ConfirmRequest(Request):
    receipt_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    ids: Annotated[list[ObjectId], msgspec.Meta(max_length=100_000)]
    """The objects whose copies this node held (it confirms each gone or still held)."""


RUN: Method[EraseRequest, Receipt] = Method("erase.run", EraseRequest, Receipt)
CONFIRM: Method[ConfirmRequest, NodeConfirmation] = Method("erase.confirm", ConfirmRequest,
                                                           NodeConfirmation)

METHODS: tuple[Method[Any, Any], ...] = (RUN, CONFIRM)
