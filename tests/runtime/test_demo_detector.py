"""The demo's operator gives the model's own answers: its labels are what
``IsolationForest.predict`` says and its scores what ``score_samples`` says, for batches
with and without anomalies (it walks the forest once for both)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from meshscale.demo import make_detector, reading, train_model


@pytest.fixture(scope="module")
def model() -> object:
    return train_model(seed=3, samples=1000)


@pytest.mark.parametrize("size", [1, 3, 40])
def test_the_detector_answers_as_the_model_does(model: object, size: int) -> None:
    rng = random.Random(size)
    records = [SimpleNamespace(key=f"m{i}", value={"f": reading(rng, i % 3 == 0), "site": "a"})
               for i in range(size)]
    out = make_detector(model)(records)
    x = np.array([r.value["f"] for r in records])
    labels = model.predict(x)  # type: ignore[attr-defined]
    scores = model.score_samples(x)  # type: ignore[attr-defined]
    assert [o["anomaly"] for o in out] == [bool(v == -1) for v in labels]
    assert [o["score"] for o in out] == [round(float(s), 4) for s in scores]
    assert [o["machine"] for o in out] == [r.key for r in records]
    if size == 40:
        assert any(o["anomaly"] for o in out) and not all(o["anomaly"] for o in out)
