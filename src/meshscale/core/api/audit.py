"""The audit trail's methods (``core/audit.py`` is the format): read one node's trail
(``audit.query``), check its chain against the heads the mesh remembers
(``audit.verify``), and the signed chain heads a node remembers (``audit.heads``).
Reading the trail needs the ``audit`` access (admin clients and nodes): it names who did
what."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from meshscale.core.api.contract import Empty, Method, Request
from meshscale.core.audit import Kind

__all__ = ["HEADS", "MAX_HEADS", "MAX_QUERY_LIMIT", "METHODS", "QUERY", "VERIFY", "AuditBreak",
           "AuditQuery", "AuditRow", "AuditRows", "HeadsReply", "VerifyReply", "VerifyRequest"]

MAX_QUERY_LIMIT = 1000
"""Largest page of ``audit.query``."""
MAX_HEADS = 256
"""Signed heads one ``audit.verify`` may be asked to check."""
MAX_HEAD_CHARS = 256
"""A signed head in its text form (``runtime/audit.py``) is about 150 characters."""

Text = Annotated[str, msgspec.Meta(max_length=256)]
HeadText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HEAD_CHARS)]


class AuditQuery(Request):
    """Filters; every one given must match."""

    subject: Text | None = None
    """An object id or key."""
    data_class: Text | None = None
    kind: Kind | None = None
    since: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Entries at or after this wall-clock time (seconds since the epoch)."""
    after_seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Entries after this seq (the next page: the last ``seq`` of the previous one)."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_QUERY_LIMIT)] = 100


class AuditRow(msgspec.Struct, omit_defaults=True):
    """One entry of a node's trail (its hashes left out; ``audit.verify`` checks them)."""

    node: str
    seq: int
    kind: str
    subject: str
    wall_s: float
    hlc: str
    who: str = ""
    role: str = ""
    data_class: str = ""
    from_region: str = ""
    to_region: str = ""
    detail: str = ""


class AuditRows(msgspec.Struct):
    rows: list[AuditRow]
    more: bool
    """More entries match after the last row (ask again with its seq as ``after_seq``)."""
    scanned: int
    """Entries read to answer."""


class VerifyRequest(Request):
    heads: Annotated[list[HeadText], msgspec.Meta(max_length=MAX_HEADS)] = []
    """Signed heads of this node's chain that other nodes remember (``audit.heads``)."""


class AuditBreak(msgspec.Struct, omit_defaults=True):
    """Where the chain broke (the first problem found)."""

    kind: str
    """``core.audit.BreakKind``."""
    segment: str
    """The segment file."""
    index: int
    """The entry's position in that segment, from 0."""
    offset: int
    """Its byte offset in that segment."""
    detail: str
    seq: int | None = None


class VerifyReply(msgspec.Struct, omit_defaults=True):
    node: str
    ok: bool
    entries: int
    segments: int
    bytes: int
    first_seq: int | None = None
    last_seq: int | None = None
    broke: AuditBreak | None = None
    heads_matched: int = 0
    heads_older_than_kept: int = 0
    """Heads before the oldest entry kept (rotated away): not checkable."""
    heads_bad: list[str] = []
    """Heads given that this node did not sign (or that are malformed)."""
    pending: int = 0
    """Entries appended but not yet on disk when the check ran (not checked)."""


class HeadsReply(msgspec.Struct):
    own: str | None
    """This node's latest signed head."""
    seen: dict[str, str]
    """Node name -> the highest signed head of its chain this node has seen gossiped."""


QUERY: Method[AuditQuery, AuditRows] = Method("audit.query", AuditQuery, AuditRows)
VERIFY: Method[VerifyRequest, VerifyReply] = Method("audit.verify", VerifyRequest, VerifyReply)
HEADS: Method[Empty, HeadsReply] = Method("audit.heads", Empty, HeadsReply)

METHODS: tuple[Method[Any, Any], ...] = (QUERY, VERIFY, HEADS)
