"""``@meshscale.service(...)``: what a class declares, how ``deploy``'s own keywords
override it, and the options refused (no mesh needed: ``client.services._options`` is
what ``deploy`` and ``deploy_actor`` merge with)."""

from __future__ import annotations

import pytest

import meshscale
from meshscale.client.services import SERVICE_ATTR, ServiceOptions, _options


@meshscale.service(replicas=3, idempotent=["a"], cpus=2.0, data_class="pii")
class Declared:
    def a(self) -> int:
        return 1


class Plain:
    def a(self) -> int:
        return 1


def test_declared_options_are_kept_on_the_class_and_it_stays_a_class() -> None:
    assert isinstance(Declared, type) and Declared().a() == 1
    assert getattr(Declared, SERVICE_ATTR) == ServiceOptions(
        False, {"replicas": 3, "idempotent": ("a",), "cpus": 2.0, "data_class": "pii"})


def test_the_call_overrides_the_class_which_overrides_the_defaults() -> None:
    actor, o = _options(Plain, {"cpus": None})
    assert not actor
    assert (o["placement"], o["cpus"], o["replicas"], o["idempotent"]) == (
        "near-caller", 1.0, None, ())
    _, o = _options(Declared, {"cpus": None, "placement": None})
    assert (o["replicas"], o["cpus"], o["data_class"], o["idempotent"]) == (3, 2.0, "pii",
                                                                            ("a",))
    _, o = _options(Declared, {"cpus": 0.5, "placement": "central"})
    assert (o["cpus"], o["placement"], o["replicas"]) == (0.5, "central", 3)
    # replicas and autoscale are one choice: the call's autoscale drops the class's replicas.
    _, o = _options(Declared, {"autoscale": (1, 4, 2.0)})
    assert (o["replicas"], o["autoscale"]) == (None, (1, 4, 2.0))


def test_refused_options() -> None:
    with pytest.raises(ValueError, match="replicas or autoscale"):
        meshscale.service(replicas=2, autoscale=(1, 2, 1.0))
    with pytest.raises(ValueError, match="actor"):
        meshscale.service(actor=True, replicas=2)
    with pytest.raises(ValueError, match="one string"):
        meshscale.service(idempotent="a")
    with pytest.raises(TypeError, match="decorates a class"):
        meshscale.service()(lambda: 1)  # type: ignore[type-var]
    actor, _ = _options(meshscale.service(actor=True)(type("A", (), {"m": lambda s: 1})), {})
    assert actor
