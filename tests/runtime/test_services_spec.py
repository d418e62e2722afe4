"""The services plane's wire spec -> decisions spec (``runtime/services_plane.spec_of``):
every bad field is refused naming it, and a good one keeps every field."""

from __future__ import annotations

import pytest

from meshscale.core.api import ResidencyWire
from meshscale.core.api.services import AutoscaleWire, ServiceWire
from meshscale.core.scheduling import InRegions
from meshscale.core.services import ServiceSpecError
from meshscale.runtime.services_plane import spec_of


def wire(**kw: object) -> ServiceWire:
    base: dict[str, object] = {"name": "svc", "methods": ["predict", "write"],
                               "code_id": "b3-" + "0" * 64}
    base.update(kw)
    return ServiceWire(**base)  # type: ignore[arg-type]


def test_good_spec_keeps_every_field() -> None:
    s = spec_of(wire(placement="regions", regions=["a", "b"], replicas=3, cpus=2.0,
                     memory_mb=512, idempotent=["predict"], labels={"gpu": "yes"},
                     residency=ResidencyWire(["a", "b"], "personal")))
    assert s.mode() == InRegions(frozenset({"a", "b"}))
    assert s.bounds == (3, 3) and s.is_idempotent("predict") and not s.is_idempotent("write")
    assert (s.resources.cpus, s.resources.memory_mb) == (2.0, 512)
    assert s.residency is not None and s.residency.data_class == "personal"
    assert dict(s.labels) == {"gpu": "yes"}
    auto = spec_of(wire(autoscale=AutoscaleWire(1, 4, 2.0)))
    assert auto.bounds == (1, 4)


@pytest.mark.parametrize(("kw", "field", "text"), [
    ({"idempotent": ["nope"]}, "idempotent", "names methods the class does not have: nope"),
    ({"regions": ["a"]}, "regions", "only a placement of 'regions' names regions"),
    ({"placement": "regions", "regions": []}, "placement", "at least one"),
    ({"autoscale": AutoscaleWire(3, 2, 1.0)}, "autoscale",
     "min_replicas 3 is greater than max_replicas 2"),
    ({"replicas": 2, "autoscale": AutoscaleWire(1, 2, 1.0)}, "replicas", "not both"),
    ({"central_region": "a"}, "central_region", "only a central service names one"),
    ({"health": "check"}, "health", "names a method the class does not have: check"),
])
def test_bad_spec_names_the_field(kw: dict[str, object], field: str, text: str) -> None:
    with pytest.raises(ServiceSpecError, match=text) as e:
        spec_of(wire(**kw))
    assert e.value.field == field
