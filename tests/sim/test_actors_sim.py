"""Actors in the simulator (``sim/actors.py``): 50 seeds of calls to counters under
crashes, restarts, pauses, a partition and datagram loss, each checked by the oracles (every call
ends once with a value or a stated error; no count acknowledged twice; the state a
loader picks holds every acknowledged call and no more than ran). A KV that does not
check conditional puts (nothing fences a stale owner) is caught by the same oracles."""

from __future__ import annotations

import random

from meshscale.sim.actors import actor_chaos_run


def test_actor_swarm_keeps_every_acknowledged_call() -> None:
    base = random.randrange(1 << 30)
    print(f"base seed {base}")
    acked = calls = 0
    for i in range(50):
        seed = base + i
        r = actor_chaos_run(seed, loss=(0.0, 0.01, 0.03)[i % 3], duration_s=30.0,
                            partitions=1 + i % 2)
        assert not r.problems(), (seed, r.problems())
        assert set(r.failed) <= {"replica-lost", "caller-node-lost", "no-replica"}, r.failed
        acked += r.acked
        calls += r.calls
    assert acked > calls // 2, (acked, calls)  # the faults do not stop the service


def test_the_same_seed_gives_the_same_run() -> None:
    a, b = actor_chaos_run(7, duration_s=15.0), actor_chaos_run(7, duration_s=15.0)
    assert (a.calls, a.acked, a.failed) == (b.calls, b.acked, b.failed)


def test_an_unfenced_kv_is_caught() -> None:
    base = random.randrange(1 << 30)
    print(f"base seed {base}")
    caught = [s for s in range(base, base + 12)
              if actor_chaos_run(s, unfenced=True, duration_s=30.0).problems()]
    assert caught, "no seed of 12 caught owners checkpointing over each other"
