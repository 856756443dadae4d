"""Event generators shared by tests and benchmarks: valid events and every kind of bad one."""

from __future__ import annotations

import json
import random

BASE_TS_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def prediction(i: int, ts_ms: int, *, rng: random.Random | None = None) -> dict:
    r = rng or random.Random(i)
    return {
        "schema": "prediction/v1",
        "prediction_id": f"p-{i}",
        "ts": ts_ms,
        "model": "ctr",
        "model_version": "3",
        "user_id": f"u{r.randrange(10_000)}",
        "item_id": f"i{r.randrange(5_000)}",
        "score": round(r.random(), 6),
        "rank": r.randrange(1, 11),
        "features": {
            "age": r.randrange(18, 80),
            "price": round(r.lognormvariate(3, 1), 2),
            "country": r.choice(["de", "fr", "us", "br", "in"]),
            "device": r.choice(["ios", "android", "web"]),
            "is_new": r.random() < 0.2,
        },
    }


def feedback(i: int, ts_ms: int, kind: str = "click") -> dict:
    return {"schema": "feedback/v1", "prediction_id": f"p-{i}", "ts": ts_ms, "type": kind}


def encode(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def bad_predictions(max_bytes: int) -> list[tuple[bytes, str]]:
    """One message per rejection reason, with the reason expected in the DLQ header."""
    good = prediction(0, BASE_TS_MS)

    def with_(**kw: object) -> bytes:
        return encode({**good, **kw})

    missing = {k: v for k, v in good.items() if k != "user_id"}
    return [
        (b'{"schema": "prediction/v1", "prediction_id": ', "malformed_json"),
        (b"\xff\xfe not utf-8 \x80", "invalid_utf8"),
        (with_(prediction_id="\udcff".encode("utf-8", "surrogatepass").decode("latin-1"))
         .replace(b"\\u00ed\\u00b3\\u00bf", b"\xed\xb3\xbf"), "invalid_utf8"),
        (encode(missing), "schema_violation"),
        (with_(score="high"), "schema_violation"),
        (with_(features=[1, 2]), "schema_violation"),
        (with_(score=1.5), "score_out_of_range"),
        (with_(score=-0.1), "score_out_of_range"),
        (with_(score=float("nan")), "malformed_json"),  # json.dumps writes NaN: not JSON
        (with_(features={"x": 1e400}).replace(b"Infinity", b"1e400"), "non_finite"),
        (with_(score=1).replace(b'"score":1', b'"score":1e999'), "non_finite"),
        (with_(schema="prediction/v2"), "unknown_schema"),
        (with_(ts=1_700_000_000), "ts_out_of_range"),  # seconds, not ms
        (b"", "empty"),
        (with_(features={"blob": "x" * max_bytes}), "oversized"),
    ]


Timed = list[tuple[int, bytes]]


def drifting_world(duration_ms: int, rate_per_s: int, shift: tuple[int, int], seed: int,
                   *, base_ts_ms: int = BASE_TS_MS) -> tuple[Timed, Timed]:
    """A CTR model's traffic, (ts, encoded) predictions and feedback in event-time order.

    Between ``shift[0]`` and ``shift[1]`` (ms after the start) the feature ``age`` moves
    by +0.6 sd and users click half as often as the scores predict; elsewhere the
    scores are calibrated. ``like`` is 20% of clicks. Feedback follows its prediction
    by up to 90 s (scaled down for short worlds).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n = duration_ms * rate_per_s // 1000
    offsets = np.sort(rng.integers(0, duration_ms, n))
    ts = base_ts_ms + offsets
    shifted = (offsets >= shift[0]) & (offsets < shift[1])
    age = rng.normal(40, 10, n) + np.where(shifted, 6.0, 0.0)
    price = rng.lognormal(3, 1, n)
    country = rng.choice(["de", "fr", "us", "br"], n, p=[0.4, 0.3, 0.2, 0.1])
    score = 1 / (1 + np.exp(-(-2.4 + 0.9 * rng.normal(0, 1, n))))
    clicked = rng.random(n) < np.where(shifted, 0.5 * score, score)
    liked = clicked & (rng.random(n) < 0.2)
    delay = rng.integers(0, max(2, min(90_000, duration_ms // 30)), n)
    preds, fbs = [], []
    for i in range(n):
        t = int(ts[i])
        preds.append((t, encode({
            "schema": "prediction/v1", "prediction_id": f"p{i}", "ts": t, "model": "ctr",
            "model_version": "7", "user_id": f"u{i % 977}", "item_id": f"i{i % 131}",
            "score": float(score[i]),
            "features": {"age": float(age[i]), "price": float(price[i]), "country": str(country[i])},
        })))
        for kind, hit in (("click", clicked[i]), ("like", liked[i])):
            if hit:
                tf = t + int(delay[i])
                fbs.append((tf, encode({"schema": "feedback/v1", "prediction_id": f"p{i}",
                                        "ts": tf, "type": kind})))
    fbs.sort(key=lambda x: x[0])
    return preds, fbs
