"""Unit tests of the SWIM + Lifeguard state machine, with no driver: messages are
handed from one protocol object to another by hand."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.membership import (
    Ack,
    Alive,
    Dead,
    MemberDown,
    MemberJoined,
    MemberLeft,
    Membership,
    MembershipConfig,
    MemberSuspect,
    MemberUpdated,
    Nack,
    NodeMeta,
    Ping,
    State,
    Suspect,
    retransmit_limit,
    suspicion_min_timeout,
)
from meshscale.core.outputs import SendDatagram, StreamRequest
from meshscale.core.wire import PROTOCOL_VERSION, decode_envelope, encode_envelope


def make(name: str, now: float = 0.0, **cfg: object) -> Membership:
    config = MembershipConfig(**cfg)  # type: ignore[arg-type]
    return Membership(name, name, NodeMeta(region="r1", zone="z1"), config=config,
                      rng=random.Random(name), now=now)


def datagrams(m: Membership) -> list[SendDatagram]:
    return [o for o in m.drain() if isinstance(o, SendDatagram)]


def messages(payload: bytes) -> list[object]:
    dec = msgspec.msgpack.Decoder(Ping | Ack | Alive | Suspect | Dead)
    out: list[object] = []
    for raw in decode_envelope(payload, 1400):
        try:
            out.append(dec.decode(raw))
        except msgspec.ValidationError:
            out.append(raw)
    return out


def converged(names: list[str], **cfg: object) -> dict[str, Membership]:
    nodes = {n: make(n, **cfg) for n in names}
    view = [(n, n, 0, nodes[n].meta) for n in names]
    for m in nodes.values():
        m.install_view(view, 0.0)
        m.drain()
    return nodes


def pump(nodes: dict[str, Membership], until: float, down: set[str] = frozenset(),  # type: ignore[assignment]
         start: float = 0.0) -> list[tuple[float, str, object]]:
    """A minimal lossless driver with 1 ms delivery, to exercise whole exchanges."""
    import heapq

    events: list[tuple[float, str, object]] = []
    heap: list[tuple[float, int, str, str, str, bytes]] = []
    seq = 0
    now = start

    def route(name: str) -> None:
        nonlocal seq
        for o in nodes[name].drain():
            seq += 1
            if isinstance(o, SendDatagram):
                heapq.heappush(heap, (now + 0.001, seq, "dg", name, o.addr, o.payload))
            elif isinstance(o, StreamRequest):
                heapq.heappush(heap, (now + 0.002, seq, "st", name, o.addr, o.payload))
            else:
                events.append((now, name, o))

    while True:
        deadlines = [(m.next_deadline(), n) for n, m in nodes.items() if n not in down]
        nxt = min((d, n) for d, n in deadlines if d is not None)
        t_msg = heap[0][0] if heap else float("inf")
        t = min(nxt[0], t_msg)
        if t > until:
            break
        now = t
        if t_msg <= nxt[0]:
            _, _, kind, src, dst, payload = heapq.heappop(heap)
            if dst in down:
                if kind == "st":
                    nodes[src].stream_failed(dst, now)
                    route(src)
                continue
            if kind == "dg":
                nodes[dst].handle_datagram(src, payload, now)
            elif kind == "st":
                reply = nodes[dst].handle_stream(src, payload, now)
                if reply is not None:
                    seq += 1
                    heapq.heappush(heap, (now + 0.001, seq, "sr", dst, src, reply))
            else:
                nodes[dst].handle_stream_reply(src, payload, now)
            route(dst)
        else:
            nodes[nxt[1]].on_timer(now)
            route(nxt[1])
    return events


def test_suspicion_timeout_scales_with_log_n() -> None:
    c = MembershipConfig()
    assert suspicion_min_timeout(c, 10) == pytest.approx(c.suspicion_mult * c.probe_interval_s)
    assert suspicion_min_timeout(c, 1000) == pytest.approx(3 * c.suspicion_mult * c.probe_interval_s)
    assert retransmit_limit(c, 10) < retransmit_limit(c, 10_000)


def test_ping_gets_ack_with_coordinate() -> None:
    b = make("b")
    b.handle_datagram("a", encode_envelope([msgspec.msgpack.encode(Ping(7, "b", "a", "a"))]), 1.0)
    out = datagrams(b)
    assert len(out) == 1 and out[0].addr == "a"
    acks = [m for m in messages(out[0].payload) if isinstance(m, Ack)]
    assert acks and acks[0].seq == 7 and acks[0].coord is not None


def test_ping_for_another_name_is_not_acked() -> None:
    b = make("b")
    b.handle_datagram("a", encode_envelope([msgspec.msgpack.encode(Ping(7, "zz", "a", "a"))]), 1.0)
    assert not any(isinstance(m, Ack) for o in datagrams(b) for m in messages(o.payload))
    assert b.stats["rejected.wrong_target"] == 1


def test_join_through_seed_gives_both_full_view() -> None:
    nodes = {n: make(n) for n in ["s", "a", "b", "c"]}
    for n in ["a", "b", "c"]:
        nodes[n].join(["s"], 0.0)
    pump(nodes, 5.0)
    for m in nodes.values():
        assert m.alive_count() == 4
        assert {x.name for x in m.live_members()} == set(nodes)


def test_crashed_node_is_declared_dead_by_all() -> None:
    nodes = converged([f"n{i}" for i in range(8)])
    events = pump(nodes, 15.0, down={"n3"})
    for name, m in nodes.items():
        if name != "n3":
            assert m.state_of("n3") == State.DEAD, name
    downs = {n for (_, n, e) in events if isinstance(e, MemberDown) and e.name == "n3"}
    assert downs == set(nodes) - {"n3"}
    # Nobody else was ever suspected on a lossless network.
    assert not [e for (_, _, e) in events if isinstance(e, MemberSuspect) and e.name != "n3"]


def test_suspected_node_refutes_with_higher_incarnation() -> None:
    b = make("b")
    b.handle_datagram("a", encode_envelope([msgspec.msgpack.encode(Suspect("b", 0, "a"))]), 1.0)
    assert b.incarnation == 1
    assert b.stats["refutations"] == 1
    assert b.health_score() == 1  # Lifeguard: being refuted means we may be the slow one
    sent = [m for o in datagrams(b) for m in messages(o.payload)]  # nobody to send to yet
    assert sent == []


def test_suspicion_without_refutation_becomes_dead_after_timeout_and_last_chance() -> None:
    nodes = converged(["a", "b", "c", "d"])
    a = nodes["a"]
    a.handle_datagram("c", encode_envelope([msgspec.msgpack.encode(Suspect("b", 0, "c"))]), 1.0)
    assert a.state_of("b") == State.SUSPECT
    evs = a.drain()
    assert any(isinstance(e, MemberSuspect) for e in evs)
    # With fewer than K+2 live members, Lifeguard uses the minimum timeout.
    t_min = suspicion_min_timeout(a.config, 4)
    a.on_timer(1.0 + t_min - 0.01)
    assert a.state_of("b") == State.SUSPECT
    a.on_timer(1.0 + t_min + 0.01)
    # Timeout reached: a last-chance ping (carrying the suspicion) goes to b first.
    sent = [(o.addr, m) for o in datagrams(a) for m in messages(o.payload)]
    assert any(addr == "b" and isinstance(m, Ping) for addr, m in sent)
    assert any(addr == "b" and isinstance(m, Suspect) and m.node == "b" for addr, m in sent)
    assert a.state_of("b") == State.SUSPECT
    a.on_timer(1.0 + t_min + 0.02 + a.config.probe_timeout_s)
    assert a.state_of("b") == State.DEAD


def test_last_chance_ack_saves_a_live_suspect() -> None:
    nodes = converged(["a", "b", "c", "d"])
    a, b = nodes["a"], nodes["b"]
    a.handle_datagram("c", encode_envelope([msgspec.msgpack.encode(Suspect("b", 0, "c"))]), 1.0)
    a.drain()
    t = 1.0 + suspicion_min_timeout(a.config, 4) + 0.01
    a.on_timer(t)
    for o in datagrams(a):
        if o.addr == "b":
            b.handle_datagram("a", o.payload, t + 0.001)
    for o in datagrams(b):
        if o.addr == "a":
            a.handle_datagram("b", o.payload, t + 0.002)
    # b refuted (incarnation 1) and its alive message rode back on the ack.
    assert b.incarnation == 1
    assert a.state_of("b") == State.ALIVE
    assert a.members["b"].inc == 1


def test_confirmations_shorten_suspicion() -> None:
    names = [f"n{i}" for i in range(20)]
    nodes = converged(names)
    a = nodes["n0"]

    def suspect(src: str, t: float) -> None:
        a.handle_datagram(src, encode_envelope([msgspec.msgpack.encode(Suspect("n1", 0, src))]), t)

    suspect("n2", 1.0)
    t_min = suspicion_min_timeout(a.config, 20)
    t_max = a.config.suspicion_max_mult * t_min
    a.on_timer(1.0 + t_min + 0.01)
    assert a.state_of("n1") == State.SUSPECT  # one accuser: still far from max
    for i, src in enumerate(["n3", "n4", "n5"]):
        suspect(src, 1.0 + 0.01 * i)
    # A repeated accuser is not a new confirmation.
    suspect("n3", 1.1)
    assert a.stats["suspicion_confirmations"] == 3
    a.on_timer(1.0 + t_min + 0.05)
    a.on_timer(1.0 + t_min + 0.06 + a.config.probe_timeout_s)  # after the last chance
    assert a.state_of("n1") == State.DEAD
    assert t_max > t_min


def test_lifeguard_off_uses_fixed_min_timeout() -> None:
    nodes = converged([f"n{i}" for i in range(20)], lifeguard=False)
    a = nodes["n0"]
    a.handle_datagram("n2", encode_envelope([msgspec.msgpack.encode(Suspect("n1", 0, "n2"))]), 1.0)
    a.on_timer(1.0 + suspicion_min_timeout(a.config, 20) + 0.01)
    assert a.state_of("n1") == State.DEAD  # plain SWIM: no last chance


def test_old_incarnation_is_ignored_and_newer_alive_revives() -> None:
    nodes = converged(["a", "b", "c"])
    a = nodes["a"]
    a.handle_datagram("c", encode_envelope([msgspec.msgpack.encode(Dead("b", 0, "c"))]), 1.0)
    assert a.state_of("b") == State.DEAD
    a.handle_datagram("c", encode_envelope([msgspec.msgpack.encode(Alive("b", 0, "b", NodeMeta()))]), 1.1)
    assert a.state_of("b") == State.DEAD
    a.handle_datagram("c", encode_envelope([msgspec.msgpack.encode(Alive("b", 1, "b", NodeMeta()))]), 1.2)
    assert a.state_of("b") == State.ALIVE


def test_graceful_leave_is_left_not_dead() -> None:
    nodes = converged(["a", "b", "c", "d"])
    nodes["b"].leave(0.5)
    events = pump(nodes, 3.0, start=0.5)
    nodes["b"].stop()
    for n in ["a", "c", "d"]:
        assert nodes[n].state_of("b") == State.LEFT
    assert any(isinstance(e, MemberLeft) for (_, _, e) in events)
    assert not any(isinstance(e, MemberDown) for (_, _, e) in events)


def test_metadata_update_propagates() -> None:
    nodes = converged([f"n{i}" for i in range(10)])
    nodes["n4"].update_meta(NodeMeta(region="r9", zone="z", labels={"gpu": "a100"}), 0.5)
    events = pump(nodes, 4.0, start=0.5)
    for n, m in nodes.items():
        assert m.members["n4"].meta.labels == {"gpu": "a100"}, n
    assert sum(isinstance(e, MemberUpdated) for (_, _, e) in events) >= 9


def test_packets_fit_one_datagram_even_with_many_updates() -> None:
    a = make("a")
    big_meta = NodeMeta(region="r", zone="z", labels={f"k{i}": "v" * 20 for i in range(12)})
    view = [(f"n{i}", f"n{i}", 0, NodeMeta()) for i in range(50)]
    a.install_view(view, 0.0)
    for i in range(50):
        a.handle_datagram(
            "x", encode_envelope([msgspec.msgpack.encode(Alive(f"n{i}", 1, f"n{i}", big_meta))]), 0.1
        )
    a.on_timer(1.0)
    out = datagrams(a)
    assert out, "gossip round sent nothing"
    assert all(len(o.payload) <= a.config.max_payload_bytes for o in out)
    assert max(len(m) for o in out for m in [messages(o.payload)]) > 1  # packed, not one each


def test_metadata_over_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_meta_bytes"):
        Membership("a", "a", NodeMeta(labels={"x": "y" * 600}), rng=random.Random(1), now=0.0)


def test_new_member_event_and_unknown_suspect_ignored() -> None:
    a = make("a")
    a.handle_datagram("x", encode_envelope([msgspec.msgpack.encode(Suspect("ghost", 3, "x"))]), 0.1)
    assert a.state_of("ghost") is None
    a.handle_datagram("x", encode_envelope([msgspec.msgpack.encode(Alive("b", 2, "b", NodeMeta()))]), 0.2)
    assert any(isinstance(e, MemberJoined) and e.name == "b" for e in a.drain())


def test_paused_node_learns_it_was_declared_dead_from_an_ack() -> None:
    nodes = converged(["a", "b", "c"])
    a = nodes["a"]
    a.handle_datagram("c", encode_envelope([msgspec.msgpack.encode(Dead("b", 0, "c"))]), 1.0)
    a.drain()
    a.handle_datagram("b", encode_envelope([msgspec.msgpack.encode(Ping(1, "a", "b", "b"))]), 2.0)
    sent = [m for o in datagrams(a) for m in messages(o.payload)]
    assert any(isinstance(m, Ack) for m in sent)
    assert any(isinstance(m, Dead) and m.node == "b" for m in sent)


def test_malformed_and_oversized_input_is_counted_and_dropped() -> None:
    a = make("a")
    a.handle_datagram("x", b"\xff\x00garbage", 0.1)
    a.handle_datagram("x", b"\x00" * 5000, 0.1)
    a.handle_datagram("x", msgspec.msgpack.encode((99, [])), 0.1)
    a.handle_datagram("x", encode_envelope([msgspec.msgpack.encode([42, "unknown tag"]), msgspec.msgpack.encode(Alive("b", 1, "b", NodeMeta()))]), 0.1)
    assert a.stats["rejected.malformed"] == 2
    assert a.stats["rejected.oversized"] == 1
    assert a.stats["rejected.version"] == 1
    assert a.state_of("b") == State.ALIVE  # the good message in a bad packet still counts
    assert a.handle_stream("x", b"\x93garbage", 0.2) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_random_datagrams_never_raise(payload: bytes) -> None:
    a = make("a")
    a.handle_datagram("x", payload, 0.5)
    a.handle_stream("x", payload, 0.5)
    a.on_timer(2.0)
    assert a.state_of("a") == State.ALIVE


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alive", "suspect", "dead"]),
                          st.sampled_from(["b", "c", "a"]), st.integers(0, 5)), max_size=30))
def test_incarnations_never_go_backwards(ops: list[tuple[str, str, int]]) -> None:
    nodes = converged(["a", "b", "c"])
    a = nodes["a"]
    seen: dict[str, int] = {n: 0 for n in nodes}
    t = 1.0
    for kind, node, inc in ops:
        msg: object
        if kind == "alive":
            msg = Alive(node, inc, node, NodeMeta())
        elif kind == "suspect":
            msg = Suspect(node, inc, "c")
        else:
            msg = Dead(node, inc, "c")
        a.handle_datagram("c", encode_envelope([msgspec.msgpack.encode(msg)]), t)
        t += 0.01
        for n, m in a.members.items():
            assert m.inc >= seen[n]
            seen[n] = m.inc
        assert a.state_of("a") == State.ALIVE
        assert a.alive_count() == sum(1 for m in a.members.values() if m.state <= State.SUSPECT)


# -- removal: signed revocations (opaque to core; a stand-in verifier here) ------------------


def _verifier(blob: bytes) -> str | None:
    """Entries are b"revoke:NAME" here; the runtime checks a CA signature instead."""
    text = blob.decode("ascii", "replace")
    return text.removeprefix("revoke:") if text.startswith("revoke:") else None


def revoking(names: list[str], **cfg: object) -> dict[str, Membership]:
    config = MembershipConfig(**cfg)  # type: ignore[arg-type]
    nodes = {n: Membership(n, n, NodeMeta(region="r1"), config=config, rng=random.Random(n),
                           now=0.0, verify_revocation=_verifier) for n in names}
    view = [(n, n, 0, nodes[n].meta) for n in names]
    for m in nodes.values():
        m.install_view(view, 0.0)
        m.drain()
    return nodes


def test_a_revocation_spreads_to_every_node_and_is_final() -> None:
    from meshscale.core.membership import MemberRemoved

    names = [f"n{i}" for i in range(8)]
    nodes = revoking(names)
    assert nodes["n0"].revoke(b"revoke:n7", 0.0) == "n7"
    events = pump(nodes, 3.0, down={"n7"})
    for n in names[:7]:
        assert nodes[n].state_of("n7") == State.REMOVED, n
        assert nodes[n].revoked["n7"] == b"revoke:n7"
    removed = {name for _, name, ev in events if isinstance(ev, MemberRemoved)}
    assert removed == set(names[:7])
    # The removed node is told directly (nobody gossips to it any more), so it stops.
    told = revoking(["n7", "n0"])
    told["n0"].revoke(b"revoke:n7", 0.0)
    notices = [o for o in datagrams(told["n0"]) if o.addr == "n7"]
    assert notices
    for o in notices:
        told["n7"].handle_datagram("n0", o.payload, 0.1)
    assert told["n7"].removed and told["n7"].next_deadline() is None
    # Whatever incarnation it claims, a removed member is not believed again.
    alive = encode_envelope([msgspec.msgpack.encode(Alive("n7", 99, "n7", NodeMeta()))])
    nodes["n1"].handle_datagram("n7", alive, 3.1)
    assert nodes["n1"].state_of("n7") == State.REMOVED
    assert nodes["n1"].stats["rejected.removed"] >= 1
    # Nor are its pings answered, nor its accusations heard.
    ping = encode_envelope([msgspec.msgpack.encode(Ping(5, "n1", "n7", "n7")),
                            msgspec.msgpack.encode(Suspect("n2", 0, "n7"))])
    nodes["n1"].handle_datagram("n7", ping, 3.2)
    assert not datagrams(nodes["n1"])
    assert nodes["n1"].state_of("n2") == State.ALIVE


def test_an_entry_that_does_not_verify_changes_nothing() -> None:
    nodes = revoking(["a", "b"])
    assert nodes["a"].revoke(b"forged:b", 0.0) is None
    assert nodes["a"].state_of("b") == State.ALIVE and not nodes["a"].revoked
    assert nodes["a"].stats["rejected.revocation"] == 1
    plain = make("c")  # no verifier: every entry is refused
    assert plain.revoke(b"revoke:a", 0.0) is None


def test_a_node_that_missed_the_gossip_gets_the_entry_by_push_pull() -> None:
    nodes = revoking(["a", "b", "c"])
    nodes["a"].revoke(b"revoke:c", 0.0)
    nodes["a"].drain()  # the gossip is lost: b hears nothing of it
    req = nodes["b"]._push_pull_with("a", False)  # b's periodic push/pull with a
    out = [o for o in nodes["b"].drain() if isinstance(o, StreamRequest)]
    assert req is None and out
    reply = nodes["a"].handle_stream("b", out[0].payload, 1.0, peer="b")
    assert reply is not None
    nodes["b"].handle_stream_reply("a", reply, 1.0, peer="a")
    assert nodes["b"].state_of("c") == State.REMOVED


def test_a_removed_node_stops_and_a_push_pull_from_it_is_refused() -> None:
    from meshscale.core.membership import MemberRemoved

    nodes = revoking(["a", "b"])
    nodes["b"].revoke(b"revoke:b", 0.0)
    assert nodes["b"].removed
    assert any(isinstance(o, MemberRemoved) and o.name == "b" for o in nodes["b"].drain())
    assert nodes["b"].next_deadline() is None  # it takes no further part
    nodes["a"].revoke(b"revoke:b", 0.0)
    nodes["a"].drain()
    nodes["b"]._push_pull_with("a", True)
    out = [o for o in nodes["b"].drain() if isinstance(o, StreamRequest)]
    assert nodes["a"].handle_stream("b", out[0].payload, 1.0, peer="b") is None
    assert nodes["a"].stats["rejected.removed"] == 1


def test_a_push_pull_must_come_from_the_node_it_names() -> None:
    nodes = revoking(["a", "b", "c"])
    nodes["b"]._push_pull_with("a", False)
    out = [o for o in nodes["b"].drain() if isinstance(o, StreamRequest)]
    # The certificate on the connection says "c", the message says "b": refused.
    assert nodes["a"].handle_stream("b", out[0].payload, 1.0, peer="c") is None
    assert nodes["a"].stats["rejected.impersonation"] == 1
    assert nodes["a"].handle_stream("b", out[0].payload, 1.0, peer="b") is not None


def test_push_pull_as_sent_encodes_like_push_pull() -> None:
    """The sender builds push/pull states as tuples (``_PushPullOut``, no 10,000 structs
    per exchange); the bytes must be exactly those of the ``PushPull`` receivers decode."""
    from meshscale.core.membership import (
        NodeState,
        PushPull,
        _encode,
        _PushPullOut,
    )

    states = [
        ("a", "10.0.0.1:7946", 3, State.SUSPECT,
         NodeMeta("eu", "eu-1", {"k": "v"}, {"cpu": 4.0}, {"http": "x:1"})),
        ("b", "b", 0, State.ALIVE, NodeMeta()),
        ("c", "c", 2**40, State.LEFT, NodeMeta(region="us")),
    ]
    for join in (False, True):
        for revoked in ([], [b"entry"]):
            sent = _encode(_PushPullOut("s", join, states, revoked))
            ref = PushPull("s", join, [NodeState(n, a, i, int(st), m)
                                       for n, a, i, st, m in states], revoked)
            assert sent == _encode(ref)


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 255, 256, 65535, 65536, 65537])
def test_envelope_is_built_as_msgpack_would_encode_it(n: int) -> None:
    msgs = [msgspec.msgpack.encode([i, "x" * (i % 5)]) for i in range(n)]
    ref = msgspec.msgpack.encode((PROTOCOL_VERSION, [msgspec.Raw(m) for m in msgs]))
    assert encode_envelope(msgs) == ref
    if n <= 256:
        assert [bytes(r) for r in decode_envelope(ref, 10**7)] == msgs


STANDBY_META = NodeMeta(region="r1", zone="z1", tags={"pw": "s1765000000:4:0:0:0:10"})


def _with_standby(names: list[str], sleepers: set[str]) -> dict[str, Membership]:
    nodes = {n: Membership(n, n, STANDBY_META if n in sleepers else
                           NodeMeta(region="r1", zone="z1"),
                           rng=random.Random(n), now=0.0) for n in names}
    view = [(n, n, 0, nodes[n].meta) for n in names]
    for m in nodes.values():
        m.install_view(view, 0.0)
        m.drain()
    return nodes


def test_standby_members_are_probed_less_often() -> None:
    """A sleeper (its capacity tag says standby, as runtime.capacity.encode_tag writes
    it) gets one probe in ``standby_probe_every`` of its turns; the others every turn."""
    from meshscale.core.capacity import PeerCapacity, PowerState
    from meshscale.runtime.capacity import POWER_TAG, encode_tag

    cfg = MembershipConfig()
    asleep = encode_tag(PeerCapacity("s", "r1", "z1", PowerState.STANDBY, 1.0, 4.0))
    awake = encode_tag(PeerCapacity("s", "r1", "z1", PowerState.ACTIVE, 1.0, 4.0))
    assert cfg.standby_tag == POWER_TAG and asleep.startswith(cfg.standby_prefix)
    assert not awake.startswith(cfg.standby_prefix)
    names = [f"n{i}" for i in range(8)]
    sleepers = {"n5", "n6", "n7"}
    nodes = _with_standby(names, sleepers)
    a = nodes["n0"]
    probed: dict[str, int] = {}
    pick = a._next_probe_target

    def counting() -> object:
        m = pick()
        if m is not None:
            probed[m.name] = probed.get(m.name, 0) + 1
        return m

    a._next_probe_target = counting  # type: ignore[method-assign]
    events = pump(nodes, 120.0)
    assert not [e for (_, _, e) in events if isinstance(e, MemberSuspect)]
    every = cfg.standby_probe_every
    active_mean = sum(probed[n] for n in names[1:5]) / 4
    for n in sleepers:
        assert probed.get(n, 0) > 0, probed  # still probed: a dead sleeper is found
        assert probed[n] <= active_mean / every * 1.5 + 1, probed
    assert a.stats["standby_probes_skipped"] > 0


def test_a_suspected_sleeper_gets_a_longer_suspicion_and_is_still_found_dead() -> None:
    names = ["a", "b", "c", "d"]
    nodes = _with_standby(names, {"b"})
    a = nodes["a"]
    every = a.config.standby_probe_every
    t_min = suspicion_min_timeout(a.config, 4)
    for who in ("b", "c"):  # b sleeps, c is active
        a.handle_datagram("d", encode_envelope([msgspec.msgpack.encode(Suspect(who, 0, "d"))]),
                          1.0)
    a.drain()
    a.on_timer(1.0 + t_min + 0.01)  # c's last-chance ping goes out
    a.on_timer(1.0 + t_min + 0.02 + a.config.probe_timeout_s)
    assert a.state_of("c") == State.DEAD
    assert a.state_of("b") == State.SUSPECT  # its probes come every `every` turns
    a.on_timer(1.0 + every * t_min - 0.01)
    assert a.state_of("b") == State.SUSPECT
    # Then its last chance (two pings, a probe timeout scaled by a's own health: a's
    # unanswered probes in this driverless test raise it) and death.
    t = 1.0 + every * t_min
    while a.state_of("b") == State.SUSPECT and t < 1.0 + every * t_min + 10.0:
        t += 0.05
        a.on_timer(t)
    assert a.state_of("b") == State.DEAD
    assert a.stats["standby_suspicions"] == 1


def test_cancelled_timers_are_dropped_in_bulk_and_deadlines_are_unchanged() -> None:
    # Each confirmation of a suspicion re-arms its timer and cancels the earlier one.
    names = [f"n{i}" for i in range(60)]
    m = converged(names)["n0"]
    for round_ in range(3):
        for i, subject in enumerate(names[1:]):
            src = names[(i + round_ + 2) % len(names)]
            payload = encode_envelope([msgspec.msgpack.encode(Suspect(subject, 0, src))])
            m.handle_datagram(src, payload, 1.0)
    assert m.stats["suspicion_confirmations"] == 2 * (len(names) - 1)
    live = [(at, seq) for at, seq, t in m._timers if t.active]
    cancelled = len(m._timers) - len(live)
    assert cancelled == m._cancelled
    # 118 cancellations; without the bulk drop they would all still be in the heap.
    assert cancelled < max(64, len(live))
    assert m.next_deadline() == min(live)[0]
    m.on_timer(1000.0)  # the suspicions expire: a last-chance ping each
    m.on_timer(1001.0)  # unanswered: dead
    assert all(m.state_of(n) == State.DEAD for n in names[1:])
    assert m._cancelled == sum(1 for _, _, t in m._timers if not t.active)


def _twin_datagrams() -> list[bytes]:
    """Datagrams a node may get: well formed, with one bad message among good ones,
    of another version, with too many messages, oversized, not an envelope at all."""
    enc = msgspec.msgpack.encode
    good = [enc(Suspect("n1", 0, "n2")), enc(Alive("n3", 1, "n3", NodeMeta(region="r2"))),
            enc(Ping(5, "a", "n2", "n2")), enc(Suspect("n1", 0, "n3")), enc(Dead("n3", 1, "n2"))]
    bad = enc([6, "n1"])  # a Suspect's tag with its fields missing
    unknown = enc([42, "x"])  # no such tag
    return [
        encode_envelope(good),
        encode_envelope([good[0], bad, good[1], unknown, good[3]]),
        msgspec.msgpack.encode((PROTOCOL_VERSION + 1, [msgspec.Raw(m) for m in good])),
        encode_envelope([enc(Nack(9))] * 257),  # 257 messages in 780 bytes
        encode_envelope([good[2]] * 130),  # over max_payload_bytes
        encode_envelope([]),
        b"\x92\x03",  # truncated
        enc({"not": "an envelope"}),
    ]


@pytest.mark.parametrize("index", range(len(_twin_datagrams())))
def test_whole_datagram_decoding_acts_as_message_by_message(index: int) -> None:
    # handle_datagram parses a well-formed datagram in one call; anything else goes
    # message by message. Both must leave a node in the same state with the same output.
    payload = _twin_datagrams()[index]
    names = ["a", "n1", "n2", "n3"]
    fast, slow = converged(names)["a"], converged(names)["a"]
    fast.handle_datagram("n2", payload, 1.0)
    slow._handle_datagram_slowly(payload, 1.0)
    assert fast.stats == slow.stats
    assert fast.drain() == slow.drain()
    assert {n: (m.inc, m.state) for n, m in fast.members.items()} == {
        n: (m.inc, m.state) for n, m in slow.members.items()}
    assert fast.next_deadline() == slow.next_deadline()


def test_an_update_is_retransmitted_as_often_as_the_current_view_says() -> None:
    # The retransmit limit is computed once per live count (and config), not per
    # datagram: it must still follow the view as members die and the config it runs.
    names = [f"n{i}" for i in range(12)]
    m = converged(names)["n0"]

    def sends(data: bytes) -> int:
        m._queue_broadcast("probe-marker", data)
        count = 0
        for _ in range(100):
            count += m._take_broadcasts(1000).count(data)
            if "probe-marker" not in m._broadcasts:
                return count
        raise AssertionError("the update never expired")

    assert m.alive_count() == 12
    assert sends(b"\xa1a") == retransmit_limit(m.config, 12) == 8
    for name in names[1:4]:
        dead = msgspec.msgpack.encode(Dead(name, 0, "n5"))
        m.handle_datagram("n5", encode_envelope([dead]), 1.0)
    assert m.alive_count() == 9
    assert sends(b"\xa1b") == retransmit_limit(m.config, 9) == 4
    m.config = MembershipConfig(retransmit_mult=2)
    assert sends(b"\xa1c") == retransmit_limit(m.config, 9) == 2
