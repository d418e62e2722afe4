"""The receive path's shortcuts (``Membership.handle_datagram`` skips a ``Suspect``
about a member suspected with more than K confirmations or by the same source already,
and an ``Alive`` about another member at an incarnation it has) must act exactly as the full path, a handler call for
every message: the message-by-message path (``_handle_datagram_slowly``) takes no
shortcut, so the two are compared on generated traffic, datagram by datagram."""

from __future__ import annotations

import random

import msgspec
import pytest

from meshscale.core.membership import (
    Ack,
    Alive,
    Dead,
    Member,
    Membership,
    MembershipConfig,
    NodeMeta,
    Revoke,
    State,
    Suspect,
)
from meshscale.core.wire import encode_envelope

NAMES = ["a"] + [f"n{i}" for i in range(1, 8)]


def _verifier(blob: bytes) -> str | None:
    text = blob.decode("ascii", "replace")
    return text.removeprefix("revoke:") if text.startswith("revoke:") else None


def _node(lifeguard: bool) -> Membership:
    m = Membership("a", "a", NodeMeta(region="r1"), config=MembershipConfig(lifeguard=lifeguard),
                   rng=random.Random("a"), now=0.0, verify_revocation=_verifier)
    m.install_view([(n, n, 0, NodeMeta(region="r1")) for n in NAMES], 0.0)
    m.drain()
    return m


def _traffic(seed: int, revokes: bool) -> list[bytes]:
    """Mostly suspicions about a few members from a few sources (so that they settle),
    with refutations, deaths, acks and, if ``revokes``, a rare revocation at the end."""
    rnd = random.Random(seed)
    enc = msgspec.msgpack.encode
    out = []
    for i in range(400):
        msgs: list[bytes] = []
        for _ in range(rnd.randint(1, 16)):
            node, src = rnd.choice(NAMES), rnd.choice(NAMES)
            inc = rnd.choice((0, 0, 0, 1, 2)) + i // 40  # keeps refutations coming
            r = rnd.random()
            if r < 0.7:
                msgs.append(enc(Suspect(node, inc, src)))
            elif r < 0.8:
                meta = NodeMeta(region=rnd.choice(("r1", "r2")))
                msgs.append(enc(Alive(node, inc, node, meta)))
            elif r < 0.83:
                msgs.append(enc(Dead(node, inc, rnd.choice((src, node)))))
            elif r < 0.995 or not revokes or i < 150:  # the shortcut is off once one is
                msgs.append(enc(Ack(rnd.randrange(8), src)))
            else:
                msgs.append(enc(Revoke(f"revoke:{node}".encode())))
        out.append(encode_envelope(msgs))
    return out


def _state(m: Membership) -> object:
    return (
        dict(m.stats),
        {n: (x.inc, x.state, x.addr, x.meta) for n, x in m.members.items()},
        {n: (sorted(s.confirmations), s.k, s.last_chances) for n, s in m._suspicions.items()},
        m.awareness,
        m.next_deadline(),
    )


@pytest.mark.parametrize("lifeguard", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_settled_suspicions_are_skipped_exactly_as_the_full_path_would(
    seed: int, lifeguard: bool
) -> None:
    fast, full = _node(lifeguard), _node(lifeguard)
    # Suspicions the shortcut may skip, settled and from a known source: the test must
    # exercise both.
    settled = known = 0
    installed = False
    now = 1.0
    for i, payload in enumerate(_traffic(seed, revokes=seed % 2 == 1)):
        if not installed and i >= 20 and any(
                len(s.confirmations) > s.k for s in fast._suspicions.values()):
            # A converged view installed under settled suspicions: their members'
            # records say alive again, so the shortcut must not take them any more.
            records = {n: Member(n, n, 0, State.ALIVE, NodeMeta(region="r1"), now, shared=True)
                       for n in NAMES}
            for m in (fast, full):
                m.install_shared_view(records, NAMES, now)
            installed = True
        sus = fast._suspicions
        for msg in msgspec.msgpack.decode(payload)[1]:
            if msg[0] == 6 and not fast.revoked and msg[1] in sus and sus[msg[1]].shortcut:
                if len(sus[msg[1]].confirmations) > sus[msg[1]].k:
                    settled += 1
                elif msg[3] in sus[msg[1]].confirmations:
                    known += 1
        fast.handle_datagram("n1", payload, now)
        full._now = now  # as handle_datagram sets it before taking the slow path
        full._handle_datagram_slowly(payload, now)
        assert fast.drain() == full.drain(), i
        assert _state(fast) == _state(full), i
        now += 0.05
        if i % 10 == 9:
            for m in (fast, full):
                m.on_timer(now)
            assert fast.drain() == full.drain(), i
            assert _state(fast) == _state(full), i
    print("settled suspicions in the traffic:", settled, "known sources:", known)
    assert settled > 50
    assert known > 20 or not lifeguard  # without Lifeguard, K = 0: settled at once
    assert installed
