"""The simulated replica receiver checks a copy against its class's policy with the same
function as the runtime's (``core.policy.copy_refusal``): a copy whose header names the
class but not its regions is refused outside the class's regions, and nothing of the
class lands there, through puts, repair and a crash."""

from __future__ import annotations

import random

from meshscale.core.objects import object_id
from meshscale.core.placement import ObjectPolicy, Residency
from meshscale.core.policy import make_policy
from meshscale.sim.dataplane import DataMesh


def _settled(mesh: DataMesh, t: float = 2.0) -> DataMesh:
    mesh.sim.run_until(mesh.sim.now + t)
    return mesh


def test_receivers_refuse_copies_outside_the_class_they_know() -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    mesh = _settled(DataMesh(12, seed=seed))
    eu = sorted(n for n in mesh.names if mesh.metas[n].region == "eu-west")
    assert eu, "the topology has an eu-west region"
    pii = make_policy("pii", ["eu-west"])
    for n in mesh.names:
        mesh.node(n).policies["pii"] = pii
    # Headers that name the class only (a sender that did not resolve its rule): only
    # what the receivers' own check lets through is stored.
    policy = ObjectPolicy(3, Residency(None, "pii"))
    oids = []
    for i in range(20):
        data = f"record {i}".encode()
        oids.append(object_id(data))
        mesh.put_async(eu[i % len(eu)], data, policy, 1)
    mesh.sim.run_until_true(lambda: len(mesh.results) == 20, mesh.sim.now + 30.0, 0.5)
    mesh.crash(eu[0])
    mesh.sim.run_until(mesh.sim.now + 20.0)
    refused = sum(mesh.node(n).refused_copies for n in mesh.names
                  if mesh.metas[n].region != "eu-west")
    assert refused > 0, "no copy was ever sent outside eu-west: nothing was tested"
    for oid in oids:
        where = {mesh.metas[n].region for n in mesh.holders(oid)}
        assert where <= {"eu-west"}, (oid, where)
