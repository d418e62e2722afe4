"""A stream pipeline with your own model, run near where the data enters the mesh.

Run it against a local mesh:

    .venv/bin/meshscale up --nodes 3 --regions eu-west,us-east --base-port 0 --dir /tmp/mesh
    # in another terminal, once `up` printed the members table:
    .venv/bin/python examples/stream_custom_model.py /tmp/mesh/mesh.json

or give a node's address and the cluster bundle directly:

    .venv/bin/python examples/stream_custom_model.py 127.0.0.1:PORT /tmp/mesh/client

What it does: trains a small logistic-regression model (NumPy only, written here, on
generated pump telemetry: no download) that predicts whether a pump is about to fail,
registers it as a near-source operator on topic ``pumps`` (it runs on the node each
reading entered through, in that node's warm worker pool), publishes 400 readings,
subscribes to the output topic ``pump-risk`` and prints the riskiest pumps and how many
readings the model flagged. Exits 0 once every reading came back scored.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import meshscale

TOPIC, OUTPUT = "pumps", "pump-risk"
N_READINGS = 400


class FailureModel:
    """Logistic regression on standardised features, trained by plain gradient descent.
    Any picklable object works as a model: it travels to the nodes with the operator."""

    def fit(self, x: np.ndarray, y: np.ndarray, steps: int = 500, lr: float = 0.5) -> FailureModel:
        self.mean, self.std = x.mean(axis=0), x.std(axis=0)
        z = (x - self.mean) / self.std
        self.w, self.b = np.zeros(z.shape[1]), 0.0
        for _ in range(steps):
            p = 1 / (1 + np.exp(-(z @ self.w + self.b)))
            self.w -= lr * z.T @ (p - y) / len(y)
            self.b -= lr * float(np.mean(p - y))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=float) - self.mean) / self.std
        return 1 / (1 + np.exp(-(z @ self.w + self.b)))


def telemetry(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(temperature C, vibration mm/s, pressure bar) per reading, and 1 = about to fail."""
    failing = rng.random(n) < 0.1
    x = np.column_stack([rng.normal(60, 3, n), rng.normal(2.0, 0.4, n), rng.normal(5.0, 0.3, n)])
    x[failing] += [5.0, 0.9, -0.5]
    return x.round(2), failing.astype(float)


def address_and_bundle(argv: list[str]) -> tuple[str, str]:
    """``MESH_JSON`` (``meshscale up --dir``'s mesh.json) or ``ADDRESS BUNDLE_DIR``."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        info = json.loads(Path(argv[0]).read_text())
        return info["nodes"][0]["address"], info["bundle"]
    if len(argv) == 2:
        return argv[0], argv[1]
    sys.exit(f"usage: {sys.argv[0]} MESH_JSON | ADDRESS BUNDLE_DIR")


def main(argv: list[str]) -> int:
    address, bundle = address_and_bundle(argv)
    rng = np.random.default_rng(1)
    model = FailureModel().fit(*telemetry(rng, 5000))
    x_test, y_test = telemetry(rng, 1000)
    accuracy = float(np.mean((model.predict_proba(x_test) > 0.5) == y_test))
    print(f"model trained here: accuracy {accuracy:.1%} on 1000 held-out readings")

    def score(records: list[meshscale.Record]) -> list[dict[str, Any]]:
        """The operator (batch=True): one output per reading; runs on a mesh node."""
        risk = model.predict_proba([r.value["x"] for r in records])
        return [{"pump": r.key, "risk": round(float(p), 3), "failing": bool(p > 0.5)}
                for r, p in zip(records, risk, strict=True)]

    with meshscale.connect(address, bundle=bundle) as mesh:
        op = mesh.operator(TOPIC, score, placement="near-source", output=OUTPUT, batch=True,
                           name="pump-risk-model")
        print(f"operator {op.name}: {TOPIC} -> {OUTPUT}, placement {op.placement}")

        run = uuid.uuid4().hex[:8]  # this run's record ids: a re-run ignores older outputs
        x, y = telemetry(rng, N_READINGS)
        with mesh.stream(TOPIC) as stream:
            for i, (row, label) in enumerate(zip(x, y, strict=True)):
                stream.publish(f"pump-{i % 20:02d}", {"x": row, "truth": bool(label)},
                               id=f"{run}-{i}")
            stream.flush(timeout=30)
            print(f"published {N_READINGS} readings through {stream.node}")

        results: dict[str, dict[str, Any]] = {}
        ran_on: Counter[str] = Counter()
        sub = mesh.subscribe(OUTPUT)
        deadline = time.monotonic() + 45
        while len(results) < N_READINGS and time.monotonic() < deadline:
            for rec in sub.poll(timeout=1.0):
                rid = rec.id.removeprefix(op.name + ":")
                if rid.startswith(run + "-"):
                    results[rid] = rec.value
                    ran_on[rec.node] += 1  # the node whose output shard it is: where it ran
        sub.close()

    truth = {f"{run}-{i}": bool(label) for i, label in enumerate(y)}
    flagged = {rid for rid, v in results.items() if v["failing"]}
    caught = sum(truth[rid] for rid in flagged)
    worst: dict[str, float] = {}
    for v in results.values():
        worst[v["pump"]] = max(worst.get(v["pump"], 0.0), v["risk"])
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    print(f"scored {len(results)} / {N_READINGS} readings on the mesh, on "
          + ", ".join(f"{node} ({n})" for node, n in ran_on.most_common()))
    print(f"flagged {len(flagged)}: {caught} of {sum(truth.values())} failing pumps caught, "
          f"{len(flagged) - caught} false alarms")
    print("riskiest pumps: " + ", ".join(f"{pump} ({risk:.2f})" for pump, risk in top))
    return 0 if len(results) == N_READINGS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
