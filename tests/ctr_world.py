"""A small simulated recommender world for the retraining tests: users and items with
latent tastes, a hidden true click model, predictions and delayed clicks written into
a real feedback store (connectors/store.py), as the daemon would have stored them.

``World(seed, shift=...)``: ``shift`` moves the world (concept drift: tastes rotate;
covariate drift: a feature's distribution moves), so a model fitted before the shift
is measurably worse after it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa

from connectors.store import FEEDBACKS, PREDICTIONS, FeedbackStore

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
WINDOW_MS = 60_000


@dataclasses.dataclass
class World:
    seed: int = 0
    users: int = 400
    items: int = 120
    dim: int = 4
    #: 0: the original world; 1: tastes rotated and the "age" feature moved.
    shift: float = 0.0
    base_rate: float = -2.6

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.u = rng.normal(size=(self.users, self.dim))
        self.v = rng.normal(size=(self.items, self.dim))
        other = np.random.default_rng(self.seed + 1000)
        if self.shift:
            # Concept drift: a share of each taste vector is replaced by a new one.
            self.u = (1 - self.shift) * self.u + self.shift * other.normal(size=self.u.shape)
        self.item_cat = rng.integers(0, 6, size=self.items)
        self.cat_effect = rng.normal(scale=0.6, size=6)
        if self.shift:
            fresh = other.normal(scale=0.6, size=6)
            self.cat_effect = (1 - self.shift) * self.cat_effect + self.shift * fresh

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        users = rng.integers(0, self.users, size=n)
        items = rng.integers(0, self.items, size=n)
        age = rng.normal(35 + 10 * self.shift, 10, size=n)
        device = rng.choice(np.array(["ios", "android", "web"]), size=n, p=[0.4, 0.4, 0.2])
        logit = (self.base_rate + 0.45 * np.sum(self.u[users] * self.v[items], axis=1) / np.sqrt(self.dim)
                 + self.cat_effect[self.item_cat[items]] + 0.02 * (age - 35)
                 + np.where(device == "web", -0.3, 0.0))
        p = 1.0 / (1.0 + np.exp(-logit))
        return {"users": users, "items": items, "age": age, "device": device,
                "category": self.item_cat[items], "p": p, "click": rng.random(n) < p}


def write_store(root: Path, world: World, *, rows: int, start_ms: int = T0, span_ms: int = 2 * 3_600_000,
                model: str = "ctr", seed: int = 0, score: np.ndarray | None = None) -> tuple[int, int]:
    """Predictions and their (delayed) clicks over ``[start, start + span)``, one segment
    per window, published as the daemon publishes them. Returns the window [start, end)."""
    rng = np.random.default_rng(seed)
    s = world.sample(rows, rng)
    ts = np.sort(start_ms + rng.integers(0, span_ms, size=rows))
    ids = np.array([f"{seed}-{i}" for i in range(rows)])
    delay = rng.exponential(60_000, size=rows).astype(np.int64)
    store = FeedbackStore(root)
    preds = pa.table({
        "schema": pa.array(["prediction/v1"] * rows),
        "prediction_id": pa.array(ids),
        "ts": pa.array(ts, type=pa.timestamp("ms", tz="UTC")),
        "model": pa.array([model] * rows),
        "model_version": pa.array(["1"] * rows),
        "user_id": pa.array([f"u{u}" for u in s["users"]]),
        "item_id": pa.array([f"i{i}" for i in s["items"]]),
        "score": pa.array(np.full(rows, 0.07) if score is None else score),
        "f.age": pa.array(s["age"]),
        "f.device": pa.array(s["device"]),
        "f.category": pa.array([f"c{c}" for c in s["category"]]),
    })
    click = s["click"]
    fb = pa.table({
        "schema": pa.array(["feedback/v1"] * int(click.sum())),
        "prediction_id": pa.array(ids[click]),
        "ts": pa.array(ts[click] + delay[click], type=pa.timestamp("ms", tz="UTC")),
        "type": pa.array(["click"] * int(click.sum())),
    })
    store.write_windows(PREDICTIONS, preds, instance=f"sim{seed}", window_ms=WINDOW_MS)
    store.write_windows(FEEDBACKS, fb, instance=f"sim{seed}", window_ms=WINDOW_MS)
    return start_ms, start_ms + span_ms
