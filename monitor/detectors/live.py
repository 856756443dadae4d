"""Live comparisons of model versions on their label streams (pure cores).

Two questions the registry's holdout cannot answer, because only live traffic can:

* **Did the promotion hurt?** (`PromotionWatch`) For a configured stretch after a
  promotion, the new champion's label stream is tested against the rate the previous
  champion achieved live just before it, with the mixture Shiryaev-Roberts detector
  of `monitor.detectors.sequential` (false alarms at most one per ``arl0`` events, exactly, by
  optional stopping). An alarm is evidence for a rollback; the end of the stretch
  without one is "the promotion held".

* **Which of two versions serving at once is better?** (`CanaryTest`) When the
  recommender splits traffic between two versions, their click rates are compared by
  the mixture sequential probability ratio test of Johari, Koomen, Pekelis & Walsh
  (2017, "Peeking at A/B tests", KDD; Johari, Pekelis & Walsh 2015, "Always valid
  inference"): with a normal mixing distribution of variance ``tau2`` over the
  difference of the two rates, the statistic

      ``Lambda_n = sqrt(V / (V + tau2)) * exp(tau2 * d^2 / (2 V (V + tau2)))``,

  where ``d`` is the observed difference and ``V`` its variance, is a nonnegative
  martingale under "no difference" (asymptotically, for the Bernoulli version), so
  rejecting when it reaches ``1 / alpha`` keeps the false-positive rate at most
  ``alpha`` however often it is looked at: after every window here. A plain
  two-proportion test checked after every window would be wrong far more often.

No I/O, no clock: counts and 0/1 arrays in, verdicts out; state round-trips through
``state_dict`` so the daemon keeps it across restarts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from monitor.detectors.sequential import AdaptiveBernoulliCUSUM

__all__ = ["CanaryResult", "CanaryTest", "PromotionWatch", "WatchResult"]


@dataclasses.dataclass(frozen=True)
class WatchResult:
    """``state``: ``watching``, ``regressed`` (roll back) or ``held`` (the watch is over)."""

    state: str
    events: int
    observed_rate: float
    baseline_rate: float
    detected_drops: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PromotionWatch:
    """Is the new champion's live rate below what the previous one achieved?

    Args:
        baseline_rate: the previous champion's live rate of the primary label.
        arl0: average events between false alarms (at most one per ``arl0``).
        drops: relative drop sizes the detector adapts to.
        max_events: the watch ends, "held", after this many labelled events.

    Example:
        >>> w = PromotionWatch(baseline_rate=0.05, arl0=1e5, max_events=200_000)
        >>> rng = np.random.default_rng(1)
        >>> w.update(rng.random(50_000) < 0.05).state
        'watching'
        >>> w.update(rng.random(50_000) < 0.03).state
        'regressed'
    """

    def __init__(self, baseline_rate: float, *, arl0: float = 1e6,
                 drops: tuple[float, ...] = (0.05, 0.1, 0.2), max_events: int = 500_000) -> None:
        if not 0.0 < baseline_rate < 1.0:
            msg = f"baseline_rate must be in (0, 1), got {baseline_rate}"
            raise ValueError(msg)
        if max_events < 1:
            msg = f"max_events must be >= 1, got {max_events}"
            raise ValueError(msg)
        self.baseline_rate = baseline_rate
        self.arl0 = arl0
        self.drops = tuple(drops)
        self.max_events = max_events
        self._detector = AdaptiveBernoulliCUSUM(baseline_rate, arl0, self.drops)
        self._positives = 0
        self._events = 0
        self._state = "watching"

    def update(self, labels: Any) -> WatchResult:
        """Feed the new champion's matured labels (0/1) of one window."""
        y = np.asarray(labels, dtype=bool)
        if self._state == "watching" and y.size:
            room = self.max_events - self._events
            y = y[:room]
            self._events += int(y.size)
            self._positives += int(y.sum())
            if self._detector.update_many(y) >= 0 or self._detector.drift_detected:
                self._state = "regressed"
            elif self._events >= self.max_events:
                self._state = "held"
        return self.result

    @property
    def result(self) -> WatchResult:
        rate = self._positives / self._events if self._events else math.nan
        return WatchResult(self._state, self._events, rate, self.baseline_rate,
                           self._detector.detected_drops if self._state == "regressed" else ())

    def state_dict(self) -> dict[str, Any]:
        return {"baseline_rate": self.baseline_rate, "arl0": self.arl0, "drops": list(self.drops),
                "max_events": self.max_events, "detector": self._detector.state_dict(),
                "positives": self._positives, "events": self._events, "state": self._state}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> PromotionWatch:
        w = cls(float(d["baseline_rate"]), arl0=float(d["arl0"]), drops=tuple(d["drops"]),
                max_events=int(d["max_events"]))
        w._detector.load_state_dict(d["detector"])
        w._positives, w._events, w._state = int(d["positives"]), int(d["events"]), str(d["state"])
        return w


@dataclasses.dataclass(frozen=True)
class CanaryResult:
    """``winner``: None while undecided, else the better arm's name."""

    winner: str | None
    statistic: float
    threshold: float
    rates: dict[str, float]
    events: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CanaryTest:
    """Always-valid comparison of two versions' click rates (mSPRT, see the module doc).

    Args:
        arms: the two version names, e.g. ``("7", "8")``.
        alpha: the false-positive rate, however often the test is looked at.
        tau2: variance of the mixing distribution over the rate difference; the test
            is most sensitive to differences of about ``sqrt(tau2)`` (default: 0.01^2,
            i.e. a percentage point of CTR).
        min_events: each arm needs this many labelled events before any verdict (the
            normal approximation of the Bernoulli variance needs some data).

    Example:
        >>> t = CanaryTest(("7", "8"), alpha=0.05, tau2=1e-4)
        >>> rng = np.random.default_rng(0)
        >>> for _ in range(20):
        ...     r = t.update({"7": rng.random(5000) < 0.05, "8": rng.random(5000) < 0.065})
        >>> r.winner
        '8'
    """

    def __init__(self, arms: tuple[str, str], *, alpha: float = 0.05, tau2: float = 1e-4,
                 min_events: int = 1000) -> None:
        if len(arms) != 2 or arms[0] == arms[1]:
            msg = f"a canary compares two distinct versions, got {arms}"
            raise ValueError(msg)
        if not 0.0 < alpha < 1.0:
            msg = f"alpha must be in (0, 1), got {alpha}"
            raise ValueError(msg)
        if tau2 <= 0:
            msg = f"tau2 must be > 0, got {tau2}"
            raise ValueError(msg)
        self.arms = (str(arms[0]), str(arms[1]))
        self.alpha = alpha
        self.tau2 = tau2
        self.min_events = min_events
        self._n = {a: 0 for a in self.arms}
        self._k = {a: 0 for a in self.arms}
        self._winner: str | None = None
        self._stat = 0.0

    def update(self, labels: Mapping[str, Any]) -> CanaryResult:
        """Feed each arm's matured labels (0/1) of one window; an arm may be absent."""
        for arm, y in labels.items():
            if arm not in self._n:
                continue
            a = np.asarray(y, dtype=bool)
            self._n[arm] += int(a.size)
            self._k[arm] += int(a.sum())
        if self._winner is None:
            self._stat = self._statistic()
            if self._stat >= 1.0 / self.alpha:
                a, b = self.arms
                self._winner = b if self._rate(b) > self._rate(a) else a
        return self.result

    def _rate(self, arm: str) -> float:
        return self._k[arm] / self._n[arm] if self._n[arm] else math.nan

    def _statistic(self) -> float:
        a, b = self.arms
        if min(self._n.values()) < self.min_events:
            return 0.0
        pa, pb = self._rate(a), self._rate(b)
        v = pa * (1 - pa) / self._n[a] + pb * (1 - pb) / self._n[b]
        if v <= 0:
            return 0.0
        d = pb - pa
        log_lam = 0.5 * math.log(v / (v + self.tau2)) + self.tau2 * d * d / (2 * v * (v + self.tau2))
        return math.exp(min(log_lam, 700.0))

    @property
    def result(self) -> CanaryResult:
        return CanaryResult(self._winner, self._stat, 1.0 / self.alpha,
                            {a: self._rate(a) for a in self.arms}, dict(self._n))

    def state_dict(self) -> dict[str, Any]:
        return {"arms": list(self.arms), "alpha": self.alpha, "tau2": self.tau2,
                "min_events": self.min_events, "n": dict(self._n), "k": dict(self._k),
                "winner": self._winner, "stat": self._stat}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> CanaryTest:
        t = cls((str(d["arms"][0]), str(d["arms"][1])), alpha=float(d["alpha"]),
                tau2=float(d["tau2"]), min_events=int(d["min_events"]))
        t._n = {k: int(v) for k, v in d["n"].items()}
        t._k = {k: int(v) for k, v in d["k"].items()}
        t._winner, t._stat = d["winner"], float(d["stat"])
        return t
