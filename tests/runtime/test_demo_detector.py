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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_forest_scorer_equals_scikit_learn_to_the_last_bit(seed: int) -> None:
    from meshscale.demo import ForestScorer

    model = train_model(seed=seed, samples=600)
    scorer = ForestScorer(model)
    rng = np.random.default_rng(seed)
    normal = random.Random(seed)
    x = np.vstack([
        np.array([reading(normal, i % 5 == 0) for i in range(300)]),
        rng.normal(0, 50, size=(200, 6)),  # far outside the training data
        rng.uniform(-1e3, 1e3, size=(1, 6)),
    ])
    for batch in (x[:1], x[:7], x):
        assert np.array_equal(scorer.score_samples(batch), model.score_samples(batch))


def test_the_forest_scorer_refuses_what_it_cannot_score(model: object) -> None:
    from meshscale.demo import ForestScorer

    scorer = ForestScorer(model)
    with pytest.raises(ValueError, match="6 features"):
        scorer.score_samples(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="missing value"):
        scorer.score_samples(np.full((1, 6), np.nan))
