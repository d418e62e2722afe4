"""The send path's shortcuts must act exactly as the straightforward path:

- a datagram that takes the whole broadcast queue (``Membership._take_joined``: one
  transmission counted for the queue, the bytes joined once per queue change) against
  the broadcast-by-broadcast loop (``_take_broadcasts``, which ``_fast_broadcasts =
  False`` forces);
- the gossip round's inlined choice of targets (``_gossip_now``) against
  ``_random_members`` with the gossip predicate.

Both are compared on generated traffic, datagram by datagram: the bytes sent, the queue
(order, effective transmissions), the counters and the random draws."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from meshscale.core.membership import (
    Alive,
    Dead,
    Membership,
    MembershipConfig,
    NodeMeta,
    State,
    Suspect,
)
from meshscale.core.wire import encode_envelope


def _node(n: int, seed: int) -> Membership:
    m = Membership("a", "a", NodeMeta(region="r1"), config=MembershipConfig(),
                   rng=random.Random(f"a/{seed}"), now=0.0)
    m.install_view([(f"n{i}", f"n{i}", 0, NodeMeta(region="r1")) for i in range(1, n)], 0.0)
    m.drain()
    return m


def _queue(m: Membership) -> object:
    return (
        [(b.key, b.data, b.order, b.transmits + m._bpend) for b in m._bqueue],
        list(m._broadcasts),
        m._bqueue_sorted,
    )


def _state(m: Membership) -> object:
    return (
        dict(m.stats),
        {k: (x.inc, x.state, x.addr, x.meta) for k, x in m.members.items()},
        _queue(m),
        m.rng.getstate(),
        m.next_deadline(),
    )


def _news(rnd: random.Random, n: int, i: int) -> bytes:
    """A datagram of news about the members (queued again as broadcasts)."""
    enc = msgspec.msgpack.encode
    msgs: list[bytes] = []
    for _ in range(rnd.randint(1, 6)):
        node, src = f"n{rnd.randrange(1, n)}", f"n{rnd.randrange(1, n)}"
        inc = i // 30 + rnd.choice((0, 0, 1))
        r = rnd.random()
        if r < 0.5:
            msgs.append(enc(Suspect(node, inc, src)))
        elif r < 0.9:
            # Metadata of varied size: broadcasts from a few bytes to hundreds.
            meta = NodeMeta(region="r1", tags={"x": "y" * rnd.choice((0, 5, 60, 300))})
            msgs.append(enc(Alive(node, inc + 1, node, meta)))
        else:
            msgs.append(enc(Dead(node, inc, src)))
    return encode_envelope(msgs)


@pytest.mark.parametrize("n", [8, 40, 300])
@pytest.mark.parametrize("seed", range(4))
def test_taking_the_whole_queue_at_once_is_the_broadcast_by_broadcast_loop(
    n: int, seed: int
) -> None:
    fast, full = _node(n, seed), _node(n, seed)
    full._fast_broadcasts = False
    rnd = random.Random(seed)
    whole = partial = 0
    now = 1.0
    for i in range(600):
        r = rnd.random()
        if r < 0.3:
            payload = _news(rnd, n, i)
            for m in (fast, full):
                m.handle_datagram("n1", payload, now)
        elif r < 0.8:
            # A datagram with a first message of any size: the queue fits whole, or not.
            first = bytes(rnd.choice((5, 40, 400, 1000, 1250, 1340)))
            pend = fast._bpend
            for m in (fast, full):
                m._send("n2", first if r < 0.7 else None, now)
            if fast._bpend > pend:
                whole += 1
            elif fast._bqueue:
                partial += 1
        elif r < 0.9:
            msgs = [bytes(rnd.choice((10, 300, 900))), bytes(20)]
            for m in (fast, full):
                m._send_many("n3", msgs, now)
        else:
            now += 0.5
            for m in (fast, full):
                m.on_timer(now)  # gossip, probe and suspicion rounds: sends of their own
        assert fast.drain() == full.drain(), i
        assert _state(fast) == _state(full), i
        now += 0.01
    print("whole queue taken:", whole, "taken in part:", partial)
    assert whole > 30
    assert partial > 10


def _gossip_as_before(m: Membership, now: float) -> None:
    """``_gossip_now`` as it was: ``_random_members`` with the gossip predicate."""
    if not m._broadcasts:
        return
    cfg = m.config
    targets = m._random_members(
        cfg.gossip_nodes,
        lambda x: x.state <= State.SUSPECT
        or (x.state == State.DEAD and now - x.state_since < cfg.gossip_to_dead_s),
    )
    for t in targets:
        if not m._broadcasts:
            break
        m._send(t.addr, None, now)
        m._count("gossip_out")


@pytest.mark.parametrize("n", [3, 8, 40])
@pytest.mark.parametrize("seed", range(4))
def test_the_gossip_rounds_inlined_choice_is_random_members(n: int, seed: int) -> None:
    inlined, before = _node(n, seed), _node(n, seed)
    rnd = random.Random(seed)
    now = 1.0
    sent: dict[str, Any] = {}
    for i in range(300):
        if rnd.random() < 0.3:
            # Deaths (recent and long past: gossip goes to the recently dead), suspicions
            # and refutations, so that the draws miss and the full scan runs too.
            payload = _news(rnd, n, i)
            for m in (inlined, before):
                m.handle_datagram("n1", payload, now)
        inlined._gossip_now(now)
        _gossip_as_before(before, now)
        out = inlined.drain()
        assert out == before.drain(), i
        for o in out:
            sent[getattr(o, "addr", "")] = True
        assert _state(inlined) == _state(before), i
        now += rnd.choice((0.1, 0.1, 5.0, 40.0))
    assert len(sent) > 1
