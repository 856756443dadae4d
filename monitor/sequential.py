"""Streaming change detectors for a Bernoulli label stream (CTR and friends).

Windows wait for labels to mature and then for the window to close; a large
drop in click-through rate should page before that. Page's CUSUM (Page 1954)
on the per-event log-likelihood ratio is the detector that minimises the
worst-case expected delay among all detectors with the same average run
length (ARL) between false alarms (Lorden 1971; Moustakides 1986).

Both detectors follow the contract of STYLE.md section 3: hyperparameters
are public attributes, state is private, ``drift_detected`` latches until
``reset()`` is called by the decision layer (a detector never resets itself),
and ``state_dict()``/``load_state_dict()`` round-trip exactly.

How the threshold is computed from the ARL. For a drop from ``p0`` to ``p1``
each event adds ``ln(p1/p0)`` (a click) or ``ln((1-p1)/(1-p0))`` (no click)
to the statistic. The detector runs on an integer lattice: the two steps are
replaced by integers ``+u`` and ``-v`` whose ratio matches the ratio of the
log-likelihood ratios within 1% (Reynolds & Stoumbos 1999 do the same for
their Bernoulli CUSUM), which makes the statistic a Markov chain on
``{0, ..., H - 1}`` and the ARL an exact linear solve (Brook & Evans 1972):
``(I - Q) L = 1``, banded with ``v`` sub- and ``u`` super-diagonals. The
threshold ``H`` is the smallest integer whose ARL under ``p0`` reaches the
configured ``arl0``, found by bisection. No diffusion approximation is
involved, which matters here: Siegmund's (1985) corrected approximation
treats the overshoot of a continuous walk, while a Bernoulli CUSUM with a
rare "click" moves in large lattice jumps and the approximation is off by
several percent. The rounding of the step ratio means the detector is the
exact CUSUM for a slightly different ``p1``; its false-alarm rate is exact.

Vectorised updates. With the carried-in statistic ``S_0`` and the block's
cumulative step sums ``C_t`` (``C_0 = 0``), the recursion
``S_t = max(0, S_{t-1} + step_t)`` has the closed form

    ``S_t = C_t - min(-S_0, min_{1 <= s <= t} C_s)``

(the last reset to zero happened at the minimising ``s``, or never, in which
case ``S_t = S_0 + C_t``). One ``cumsum`` and one ``minimum.accumulate``
replace the Python loop; integer arithmetic keeps it exactly equal to the
scalar recursion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.linalg import solve_banded

__all__ = ["AdaptiveBernoulliCUSUM", "BernoulliCUSUM", "lattice_arl"]

IntArray = npt.NDArray[np.int64]

#: Events per block in update_many: big enough to amortise numpy's call
#: overhead, small enough that the temporaries stay in L2 cache.
_BLOCK = 1 << 15

#: Most lattice states the ARL solve may use (memory ~ states * (u + v) * 8 B).
_MAX_STATES = 2_000_000


def lattice_arl(up: int, down: int, threshold: int, p_up: float) -> float:
    """Exact ARL from zero of an integer CUSUM (Brook & Evans 1972).

    The statistic starts at 0, moves ``+up`` with probability ``p_up`` and
    ``-down`` otherwise, is reflected at 0 and alarms on reaching
    ``threshold``. The expected number of steps ``L_i`` to alarm from state
    ``i`` solves ``L_i = 1 + p_up L_{i+up} + (1 - p_up) L_{max(0, i-down)}``
    with ``L_i = 0`` for ``i >= threshold``: a banded linear system. Its
    condition number grows with the ARL: expect a relative error of about
    ``ARL * 1e-16`` (1e-4 at the largest allowed arl0 of 1e12).

    Example:
        >>> lattice_arl(1, 1, 1, 0.5)  # alarms on the first up-step
        2.0
    """
    if up < 1 or down < 1 or threshold < 1:
        msg = f"need up, down, threshold >= 1, got {up}, {down}, {threshold}"
        raise ValueError(msg)
    if not 0.0 < p_up <= 1.0:
        msg = f"p_up must be in (0, 1], got {p_up}"
        raise ValueError(msg)
    n = threshold
    p_down = 1.0 - p_up
    # LAPACK band storage: ab[up + i - j, j] = A[i, j].
    ab = np.zeros((up + down + 1, n))
    ab[up, :] = 1.0
    if up < n:
        ab[0, up:] = -p_up  # A[i, i + up] for i + up < n
    if down < n:
        ab[up + down, : n - down] = -p_down  # A[i, i - down] for i >= down
    # States below ``down`` fall back to 0: A[i, 0] for 0 <= i < down.
    rows = np.arange(min(down, n))
    ab[up + rows, 0] -= p_down
    arl = solve_banded((down, up), ab, np.ones(n))
    return float(arl[0])


def _lattice_steps(up_llr: float, down_llr: float) -> tuple[int, int]:
    """Integer steps (up, down) with ratio within 1% of up_llr / down_llr."""
    ratio = up_llr / down_llr
    best: tuple[float, int, int] = (math.inf, 1, 1)
    for d in range(1, 257):
        up, down = (round(ratio * d), d) if ratio >= 1.0 else (d, round(d / ratio))
        if up < 1 or down < 1:
            continue
        err = abs(up / down / ratio - 1.0)
        if err < best[0]:
            best = (err, up, down)
        if err <= 0.01:
            break
    return best[1], best[2]


def _lattice_p1(p0: float, p1: float, ratio: float) -> float:
    """The p1 whose up/down log-likelihood ratio equals ``ratio`` (bisection).

    For a drop the ratio ``ln((1-q)/(1-p0)) / ln(p0/q)`` rises monotonically
    from 0 (q -> 0) to ``p0 / (1 - p0)`` (q -> p0); for a rise ``ln(q/p0) /
    ln((1-p0)/(1-q))`` falls from ``(1 - p0) / p0`` to 0 as q goes from p0 to
    1. A ratio rounded past the end of that range maps to the range's end.
    """
    def r(q: float) -> float:
        if q < p0:
            return math.log((1.0 - q) / (1.0 - p0)) / math.log(p0 / q)
        return math.log(q / p0) / math.log((1.0 - p0) / (1.0 - q))

    lo, hi = (1e-12, p0 - 1e-12) if p1 < p0 else (p0 + 1e-12, 1.0 - 1e-12)
    rising = p1 < p0  # r increases with q on the drop side, decreases on the rise side
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (r(mid) < ratio) == rising:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _threshold(up: int, down: int, p_up: float, arl0: float) -> tuple[int, float]:
    """Smallest integer threshold whose ARL under the null reaches arl0.

    The ARL grows with the threshold, so doubling brackets it and bisection
    finds it. A solve far beyond arl0 (ARL above ~1e15) loses all accuracy
    and may return nonsense, even a value below its predecessor's; such a
    value can only come from an ARL far above arl0 and is read that way.
    """
    def reaches(threshold: int, below: float) -> tuple[bool, float]:
        arl = lattice_arl(up, down, threshold, p_up)
        garbage = not math.isfinite(arl) or arl < below
        return garbage or arl >= arl0, math.inf if garbage else arl

    lo, arl_lo, hi = 0, 0.0, up
    ok, arl_hi = reaches(hi, arl_lo)
    while not ok:
        lo, arl_lo, hi = hi, arl_hi, 2 * hi
        if hi > _MAX_STATES:
            msg = (f"arl0 {arl0:g} needs a threshold above {_MAX_STATES} lattice states; "
                   "the change to detect is too small for this ARL")
            raise ValueError(msg)
        ok, arl_hi = reaches(hi, arl_lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, arl_mid = reaches(mid, arl_lo)
        if ok:
            hi, arl_hi = mid, arl_mid
        else:
            lo, arl_lo = mid, arl_mid
    return hi, arl_hi


def _as_bits(xs: Any) -> npt.NDArray[Any]:
    x = np.asarray(xs)
    if x.ndim != 1:
        msg = f"update_many needs a 1-d array, got shape {x.shape}"
        raise ValueError(msg)
    if x.dtype != np.bool_ and x.size:
        if not np.issubdtype(x.dtype, np.integer):
            msg = f"update_many needs an integer or boolean array, got dtype {x.dtype}"
            raise ValueError(msg)
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 1:
            msg = f"events must be 0 or 1, got {lo if lo < 0 else hi}"
            raise ValueError(msg)
    return x


def _reflected(steps: IntArray, s0: IntArray) -> IntArray:
    """CUSUM path of a block along the last axis, in place of ``steps``.

    ``S_t = C_t - min(-S_0, min_{s<=t} C_s)`` with ``C`` the cumulative sum
    of the block's steps (see the module docstring).
    """
    c = np.cumsum(steps, axis=-1, out=steps)
    low = np.minimum.accumulate(c, axis=-1)
    np.minimum(low, -s0[..., None], out=low)
    np.subtract(c, low, out=low)
    return low


class BernoulliCUSUM:
    """Page's CUSUM for a change of a Bernoulli rate from ``p0`` to ``p1``.

    Parameters:
        p0: Rate before the change (e.g. the reference CTR).
        p1: Rate after the change the detector is tuned to; below ``p0`` for a
            drop, above for a rise. The delay is shortest for changes of about
            this size (Lorden 1971).
        arl0: Average number of events between false alarms when the rate
            stays ``p0``: 1e6 means at most one false alarm per million events
            on average. The achieved value, ``arl0_exact``, is at most one
            lattice step above it.

    Attributes:
        h: Threshold on the log-likelihood-ratio statistic, in nats.
        arl0_exact: Exact ARL under ``p0`` at the chosen threshold.
        steps: The lattice steps ``(up, down)``: the statistic moves ``+up``
            on the outcome that favours the change and ``-down`` otherwise.
        h_steps: The threshold in lattice units (alarm when ``S >= h_steps``).
        p1_lattice: The rate after the change for which the integer steps are
            the exact log-likelihood ratios: the detector is Page's CUSUM for
            ``p0 -> p1_lattice``, which lies within about 10% of the drop
            ``p0 - p1``.

    Example:
        >>> det = BernoulliCUSUM(p0=0.05, p1=0.045, arl0=1e6)
        >>> round(det.h, 2), det.arl0_exact >= 1e6
        (5.86, True)
        >>> rng = np.random.default_rng(7)
        >>> det.update_many(rng.random(200_000) < 0.05)  # no change: no alarm
        -1
        >>> det.update_many(rng.random(200_000) < 0.045) > 0, det.drift_detected
        (True, True)
    """

    def __init__(self, p0: float, p1: float, arl0: float = 1e6) -> None:
        for name, p in [("p0", p0), ("p1", p1)]:
            if not 0.0 < p < 1.0:
                msg = f"{name} must be in (0, 1), got {p}"
                raise ValueError(msg)
        if p0 == p1:
            msg = f"p1 must differ from p0, got both {p0}"
            raise ValueError(msg)
        if not 1.0 < arl0 <= 1e12:
            msg = f"arl0 must be in (1, 1e12], got {arl0}"
            raise ValueError(msg)
        self.p0 = p0
        self.p1 = p1
        self.arl0 = arl0
        llr1 = math.log(p1 / p0)
        llr0 = math.log((1.0 - p1) / (1.0 - p0))
        # The "up" outcome is the one that favours the change: no-click for a
        # drop, click for a rise.
        self._up_is_one = llr1 > 0.0
        up_llr, down_llr = (llr1, -llr0) if self._up_is_one else (llr0, -llr1)
        self._up, self._down = _lattice_steps(up_llr, down_llr)
        self._nats = up_llr / self._up
        p_up0 = p0 if self._up_is_one else 1.0 - p0
        self._h, self.arl0_exact = _threshold(self._up, self._down, p_up0, arl0)
        self.h = self._h * self._nats
        self.steps = (self._up, self._down)
        self.h_steps = self._h
        self.p1_lattice = _lattice_p1(p0, p1, self._up / self._down)
        self._w1 = self._up if self._up_is_one else -self._down
        self._w0 = -self._down if self._up_is_one else self._up
        self._s = 0
        self._n = 0
        self._alarm_at: int | None = None

    # ------------------------------------------------------------------ updates

    def update(self, x: int) -> None:
        """Feed one event: 1 (positive label) or 0."""
        if x not in (0, 1):
            msg = f"events must be 0 or 1, got {x!r}"
            raise ValueError(msg)
        self._s = max(0, self._s + (self._w1 if x else self._w0))
        self._n += 1
        if self._alarm_at is None and self._s >= self._h:
            self._alarm_at = self._n

    def update_many(self, xs: Any) -> int:
        """Feed a 1-d array of 0/1 events; exactly equal to calling :meth:`update`.

        Returns:
            Index into ``xs`` of the event that raised the alarm, or -1 when
            this call raised none (also when the alarm was already up). Every
            event is consumed either way; to restart after an alarm at ``i``,
            call :meth:`reset` and feed ``xs[i + 1:]``.
        """
        x = _as_bits(xs)
        first = -1
        s0 = np.array(self._s, dtype=np.int64)
        for start in range(0, x.size, _BLOCK):
            block = x[start:start + _BLOCK]
            steps = np.where(block, self._w1, self._w0).astype(np.int64, copy=False)
            path = _reflected(steps, s0)
            if first < 0 and self._alarm_at is None and int(path.max()) >= self._h:
                first = start + int(np.argmax(path >= self._h))
                self._alarm_at = self._n + first + 1
            s0 = path[-1]
        self._s = int(s0)
        self._n += int(x.size)
        return first

    # -------------------------------------------------------------------- state

    @property
    def drift_detected(self) -> bool:
        """Whether the statistic has reached the threshold since the last reset."""
        return self._alarm_at is not None

    @property
    def statistic(self) -> float:
        """Current CUSUM statistic in nats (alarm at ``h``)."""
        return self._s * self._nats

    @property
    def n_seen(self) -> int:
        """Events fed since the last reset."""
        return self._n

    @property
    def alarm_at(self) -> int | None:
        """1-based count, since the last reset, of the event that raised the alarm."""
        return self._alarm_at

    def arl(self, p: float) -> float:
        """Exact expected events to alarm from a fresh start when the rate is ``p``.

        ``arl(p0)`` is the false-alarm ARL, ``arl(p1)`` the zero-state mean delay.
        """
        if not 0.0 < p < 1.0:
            msg = f"p must be in (0, 1), got {p}"
            raise ValueError(msg)
        return lattice_arl(self._up, self._down, self._h, p if self._up_is_one else 1.0 - p)

    def reset(self) -> None:
        """Start afresh: statistic 0, no alarm."""
        self._s = 0
        self._n = 0
        self._alarm_at = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state with the hyperparameters it belongs to."""
        return {"p0": self.p0, "p1": self.p1, "arl0": self.arl0,
                "s": self._s, "n": self._n, "alarm_at": self._alarm_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output of a detector with the same hyperparameters."""
        mine = (self.p0, self.p1, self.arl0)
        theirs = (state["p0"], state["p1"], state["arl0"])
        if theirs != mine:
            msg = f"state is for (p0, p1, arl0) = {theirs}, this detector has {mine}"
            raise ValueError(msg)
        if int(state["s"]) < 0 or int(state["n"]) < 0:
            msg = f"state has a negative statistic or count: {state['s']}, {state['n']}"
            raise ValueError(msg)
        self._s = int(state["s"])
        self._n = int(state["n"])
        self._alarm_at = None if state["alarm_at"] is None else int(state["alarm_at"])

    def __repr__(self) -> str:
        return f"BernoulliCUSUM(p0={self.p0}, p1={self.p1}, arl0={self.arl0:g})"


class AdaptiveBernoulliCUSUM:
    """A bank of CUSUMs over a grid of relative drop sizes, for unknown drops.

    A CUSUM tuned to a 5% drop is slow on a 30% drop and vice versa (its
    delay is about ``h / KL(p1_true || p0)`` only near its own ``p1``). The
    bank runs one CUSUM per drop size and alarms when any of them does, a
    discretised version of the generalised likelihood ratio over the drop
    size (Lorden 1971; Lai 1995 discusses the windowed GLR it approximates).
    Calibration is Bonferroni's: each member gets ARL ``arl0 * len(drops)``.
    Run lengths are roughly exponential, so the bank's false-alarm rate is at
    most the sum of the members' rates and its ARL at least about ``arl0``;
    the members watch the same events and are positively correlated, so the
    achieved ARL is somewhat above ``arl0`` (measured in docs/statistics.md).

    Parameters:
        p0: Rate before the change.
        arl0: Average events between false alarms of the whole bank.
        drops: Relative drop sizes, each in (0, 1): 0.1 means ``p1 = 0.9 p0``.

    Example:
        >>> bank = AdaptiveBernoulliCUSUM(p0=0.05, arl0=1e6)
        >>> rng = np.random.default_rng(3)
        >>> bank.update_many(rng.random(50_000) < 0.035) > 0, bank.drift_detected
        (True, True)
    """

    def __init__(self, p0: float, arl0: float = 1e6,
                 drops: Sequence[float] = (0.05, 0.1, 0.2, 0.3)) -> None:
        if not drops:
            msg = "drops must name at least one drop size"
            raise ValueError(msg)
        for d in drops:
            if not 0.0 < d < 1.0:
                msg = f"each drop must be in (0, 1), got {d}"
                raise ValueError(msg)
        if len(set(drops)) != len(drops):
            msg = f"drops must be distinct, got {tuple(drops)}"
            raise ValueError(msg)
        self.p0 = p0
        self.arl0 = arl0
        self.drops = tuple(float(d) for d in drops)
        self._members = [BernoulliCUSUM(p0, p0 * (1.0 - d), arl0 * len(drops))
                         for d in self.drops]
        self._w1 = np.array([m._w1 for m in self._members], dtype=np.int64)
        self._w0 = np.array([m._w0 for m in self._members], dtype=np.int64)
        self._hs = np.array([m._h for m in self._members], dtype=np.int64)

    def update(self, x: int) -> None:
        """Feed one event: 1 (positive label) or 0."""
        for m in self._members:
            m.update(x)

    def update_many(self, xs: Any) -> int:
        """Feed a 1-d array of 0/1 events; exactly equal to calling :meth:`update`.

        Returns:
            Index into ``xs`` of the event at which the first member raised
            its alarm in this call, or -1 when no member raised one.
        """
        x = _as_bits(xs)
        armed = np.array([m._alarm_at is None for m in self._members])
        firsts = np.full(len(self._members), -1, dtype=np.int64)
        s0 = np.array([m._s for m in self._members], dtype=np.int64)
        for start in range(0, x.size, _BLOCK):
            block = x[start:start + _BLOCK]
            steps = np.where(block[None, :], self._w1[:, None], self._w0[:, None])
            path = _reflected(steps.astype(np.int64, copy=False), s0)
            hit = (path.max(axis=1) >= self._hs) & armed & (firsts < 0)
            for g in np.flatnonzero(hit).tolist():
                firsts[g] = start + int(np.argmax(path[g] >= self._hs[g]))
            s0 = path[:, -1].copy()
        for g, m in enumerate(self._members):
            m._s = int(s0[g])
            if firsts[g] >= 0:
                m._alarm_at = m._n + int(firsts[g]) + 1
            m._n += int(x.size)
        raised = firsts[firsts >= 0]
        # The bank alarms once, when its first member does; members that
        # alarm later only refine detected_drops.
        if raised.size == 0 or not bool(armed.all()):
            return -1
        return int(raised.min())

    @property
    def drift_detected(self) -> bool:
        """Whether any member has alarmed since the last reset."""
        return any(m.drift_detected for m in self._members)

    @property
    def detected_drops(self) -> tuple[float, ...]:
        """Drop sizes whose member has alarmed: a rough size of the change."""
        return tuple(d for d, m in zip(self.drops, self._members, strict=True)
                     if m.drift_detected)

    @property
    def alarm_at(self) -> int | None:
        """1-based count, since the last reset, of the event that raised the first alarm."""
        times = [m.alarm_at for m in self._members if m.alarm_at is not None]
        return min(times) if times else None

    @property
    def members(self) -> tuple[BernoulliCUSUM, ...]:
        """The member CUSUMs, one per drop size (read them, do not feed them)."""
        return tuple(self._members)

    def reset(self) -> None:
        """Start every member afresh."""
        for m in self._members:
            m.reset()

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state with the hyperparameters it belongs to."""
        return {"p0": self.p0, "arl0": self.arl0, "drops": list(self.drops),
                "members": [m.state_dict() for m in self._members]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output of a bank with the same hyperparameters."""
        mine = (self.p0, self.arl0, self.drops)
        theirs = (state["p0"], state["arl0"], tuple(state["drops"]))
        if theirs != mine:
            msg = f"state is for (p0, arl0, drops) = {theirs}, this bank has {mine}"
            raise ValueError(msg)
        for m, s in zip(self._members, state["members"], strict=True):
            m.load_state_dict(s)

    def __repr__(self) -> str:
        return (f"AdaptiveBernoulliCUSUM(p0={self.p0}, arl0={self.arl0:g}, "
                f"drops={self.drops})")
