"""Promotion and rollback: the gate, the alias lock, the alias history and the promoter.

docs/architecture.md; docs/promotion.md is the operator's version.

* :class:`Gate` (pure): decides from an :class:`~retrain.evaluate.EvaluationReport`
  whether the challenger replaces the champion, with a reason that carries the
  numbers. It needs a gain beyond a margin *with confidence* (the one-sided lower
  bound of DeLong's AUC difference) and no guardrail regression.
* :class:`AliasLock`: only one daemon moves a model's aliases at a time.
  :class:`SqliteAliasLock` is a lease row in the state store (expires, so a dead
  holder's lock lapses); :class:`PostgresAdvisoryLock` is a session advisory lock
  held on a dedicated connection (PostgreSQL frees it when the holder dies).
* :class:`AliasHistory`: MLflow keeps no alias history, so every move (who, why, the
  evidence) and every gate decision is kept here, in SQLite, self-contained like
  retrain/jobs.py's store so it can move into connectors/state.py later.
* :class:`Promoter`: moves ``previous`` then ``champion`` (``champion`` is never
  unset), tags the versions, records the history, all under the lock; undoes what it
  did when the registry fails half-way.

The daemon wiring (post-promotion live watch, canary, CLI, notifications) builds on
this module; it is not here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from connectors.registry import RegistryError
from connectors.sql import SqlDb
from connectors.state import open_sqlite
from retrain.evaluate import REPORT_PATH, EvaluationReport, ModelMetrics

__all__ = [
    "ANY",
    "CHAMPION",
    "GATE_PATH",
    "PREVIOUS",
    "TAG_DEMOTED_AT",
    "TAG_GATE",
    "TAG_GATE_CODE",
    "TAG_GATE_REASON",
    "TAG_PROMOTED_AT",
    "TAG_PROMOTED_BY",
    "TAG_PROMOTION_REASON",
    "TAG_ROLLBACK_REASON",
    "TAG_ROLLED_BACK_AT",
    "AliasHistory",
    "AliasLock",
    "AliasLockBusy",
    "AliasLockError",
    "AliasMove",
    "Gate",
    "GateCheck",
    "GateDecision",
    "GateRecord",
    "NothingToRollBack",
    "PostgresAdvisoryLock",
    "Promoter",
    "PromotionError",
    "PromotionFailed",
    "PromotionOutcome",
    "PromotionRegistry",
    "PromotionSpec",
    "SqliteAliasLock",
    "StaleChampion",
    "load_report",
]

log = logging.getLogger("driftloop.retrain.promote")

#: The alias the recommender serves; never unset by a promotion or a rollback.
CHAMPION = "champion"
#: The former champion, kept for rollback.
PREVIOUS = "previous"
#: Where the gate's decision goes in the challenger's run.
GATE_PATH = "evaluation/gate.json"
TAG_PROMOTED_AT = "driftloop.promoted_at"
TAG_PROMOTED_BY = "driftloop.promoted_by"
TAG_PROMOTION_REASON = "driftloop.promotion_reason"
TAG_DEMOTED_AT = "driftloop.demoted_at"
TAG_ROLLED_BACK_AT = "driftloop.rolled_back_at"
TAG_ROLLBACK_REASON = "driftloop.rollback_reason"
#: Run tags of the gate's decision.
TAG_GATE = "driftloop.gate"
TAG_GATE_CODE = "driftloop.gate_code"
TAG_GATE_REASON = "driftloop.gate_reason"


# -- the gate ---------------------------------------------------------------------------------


def _finite(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        msg = f"{name} must be a finite number, got {value!r}"
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class PromotionSpec:
    """What the gate demands (docs/promotion.md explains each default).

    Args:
        min_auc_gain: the AUC margin the challenger must beat the champion by.
        confidence: the one-sided confidence that the gain exceeds the margin (the
            lower bound of the DeLong difference at this level must be above it);
            also the level at which a log-loss increase counts as a regression.
        max_logloss_increase: the log-loss increase allowed before it is a regression
            (the lower confidence bound of the increase must not exceed it).
        calibration_band: observed/expected positives the challenger must be within
            (or no further from 1 than the champion is).
        calibration_level: the two-sided level of the interval for the challenger's
            observed/expected (:func:`~retrain.evaluate.calibration_interval`): it fails
            the band only when the whole interval is outside, so a calibrated model on
            a small holdout is not rejected for the ratio's own noise.
        max_size_ratio: challenger size / champion size allowed.
        max_latency_ratio: challenger / champion scoring time per 1,000 rows allowed.
        latency_slack_ms: a latency increase of at most this many milliseconds per 1,000
            rows passes whatever the ratio: at sub-millisecond times a ratio measures the
            timer and the machine's other work, not the model.
        min_auc: the AUC floor of a first champion (no champion to compare with).
        max_log_loss: the log-loss ceiling of a first champion (None: none).

    Example:
        >>> PromotionSpec(min_auc_gain=0.01).confidence
        0.95
        >>> PromotionSpec(confidence=1.0)
        Traceback (most recent call last):
        ...
        ValueError: confidence must be in [0.5, 1), got 1.0
    """

    min_auc_gain: float = 0.005
    confidence: float = 0.95
    max_logloss_increase: float = 0.0
    calibration_band: tuple[float, float] = (0.8, 1.25)
    calibration_level: float = 0.95
    max_size_ratio: float = 1.5
    max_latency_ratio: float = 2.0
    latency_slack_ms: float = 1.0
    min_auc: float = 0.55
    max_log_loss: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_auc_gain", "confidence", "max_logloss_increase", "calibration_level",
                     "max_size_ratio", "max_latency_ratio", "latency_slack_ms", "min_auc"):
            _finite(name, getattr(self, name))
        if not 0.0 <= self.min_auc_gain < 0.5:
            msg = f"min_auc_gain must be in [0, 0.5), got {self.min_auc_gain}"
            raise ValueError(msg)
        if not 0.5 <= self.confidence < 1.0:
            msg = f"confidence must be in [0.5, 1), got {self.confidence}"
            raise ValueError(msg)
        if self.max_logloss_increase < 0:
            msg = f"max_logloss_increase must be >= 0, got {self.max_logloss_increase}"
            raise ValueError(msg)
        band = tuple(self.calibration_band)
        if len(band) != 2:
            msg = f"calibration_band must be (low, high), got {self.calibration_band!r}"
            raise ValueError(msg)
        for b in band:
            _finite("calibration_band", b)
        if not 0.0 < band[0] <= 1.0 <= band[1]:
            msg = f"calibration_band must satisfy 0 < low <= 1 <= high, got {band}"
            raise ValueError(msg)
        object.__setattr__(self, "calibration_band", (float(band[0]), float(band[1])))
        if not 0.0 < self.calibration_level < 1.0:
            msg = f"calibration_level must be in (0, 1), got {self.calibration_level}"
            raise ValueError(msg)
        if self.max_size_ratio < 1.0:
            msg = f"max_size_ratio must be >= 1, got {self.max_size_ratio}"
            raise ValueError(msg)
        if self.max_latency_ratio < 1.0:
            msg = f"max_latency_ratio must be >= 1, got {self.max_latency_ratio}"
            raise ValueError(msg)
        if self.latency_slack_ms < 0:
            msg = f"latency_slack_ms must be >= 0, got {self.latency_slack_ms}"
            raise ValueError(msg)
        if not 0.0 <= self.min_auc < 1.0:
            msg = f"min_auc must be in [0, 1), got {self.min_auc}"
            raise ValueError(msg)
        if self.max_log_loss is not None:
            _finite("max_log_loss", self.max_log_loss)
            if self.max_log_loss <= 0:
                msg = f"max_log_loss must be > 0 or None, got {self.max_log_loss}"
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["calibration_band"] = list(self.calibration_band)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromotionSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            msg = f"unknown promotion settings {unknown}; known: {sorted(fields)}"
            raise ValueError(msg)
        kw = dict(d)
        if "calibration_band" in kw:
            kw["calibration_band"] = tuple(kw["calibration_band"])
        return cls(**kw)


Threshold = float | tuple[float, float] | None


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One check of the gate: its name, outcome, the measured value, the threshold and
    a sentence with both (what the reason is made of)."""

    name: str
    passed: bool
    value: float | None
    threshold: Threshold
    detail: str
    #: The decision code when this check is the first to fail.
    code: str = ""

    def to_dict(self) -> dict[str, Any]:
        value = None if self.value is None or not math.isfinite(self.value) else self.value
        threshold = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        return {"name": self.name, "passed": self.passed, "value": value, "threshold": threshold,
                "detail": self.detail, "code": self.code}


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The gate's answer: promote or keep, a machine code, a human reason, every check.

    Codes: ``promote`` and ``first_champion`` (promote); ``insufficient_gain``,
    ``log_loss_regressed``, ``calibration_out_of_band``, ``model_too_large``,
    ``too_slow``, ``below_floor``, and from the promoter ``stale_report`` and
    ``already_champion`` (keep).
    """

    promote: bool
    code: str
    reason: str
    checks: tuple[GateCheck, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "code": self.code, "reason": self.reason,
                "checks": [c.to_dict() for c in self.checks]}

    def metrics(self) -> dict[str, float]:
        """``gate.*`` numbers for the challenger's run."""
        out = {"gate.promote": 1.0 if self.promote else 0.0}
        for c in self.checks:
            out[f"gate.{c.name}.passed"] = 1.0 if c.passed else 0.0
            if c.value is not None and math.isfinite(c.value):
                out[f"gate.{c.name}"] = float(c.value)
        return out


def _cmp(a: float, b: float) -> str:
    if math.isnan(a):
        return "is undefined against"
    return ">" if a > b else "<" if a < b else "="


def _pct(confidence: float) -> str:
    return f"{confidence * 100:g}%"


class Gate:
    """The promotion gate: a pure function of an :class:`EvaluationReport`.

    With a champion: promote only when the lower one-sided ``confidence`` bound of the
    DeLong AUC difference exceeds ``min_auc_gain`` and no guardrail regresses (log
    loss, calibration band, size, latency). Without one: promote when the absolute
    floors pass. Every check is reported, and the reason names the failing ones with
    their numbers.

    Args:
        spec: the thresholds.

    Example:
        >>> import numpy as np
        >>> from retrain.evaluate import HoldoutWindow, ModelScores, compare
        >>> y = np.array([0, 1] * 100); p = np.where(y, 0.7, 0.3)
        >>> r = compare(y, ModelScores(p), None, model="ctr", window=HoldoutWindow(0, 1))
        >>> d = Gate(PromotionSpec()).decide(r)
        >>> d.promote, d.code
        (True, 'first_champion')
    """

    def __init__(self, spec: PromotionSpec | None = None) -> None:
        self.spec = spec or PromotionSpec()

    def __repr__(self) -> str:
        return f"Gate({self.spec!r})"

    def state_dict(self) -> dict[str, Any]:
        """The gate's settings (it keeps no other state), torch.optim style."""
        return {"spec": self.spec.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.spec = PromotionSpec.from_dict(state["spec"])

    def decide(self, report: EvaluationReport) -> GateDecision:
        checks = self._first_champion(report) if report.champion is None else self._against(report)
        failed = [c for c in checks if not c.passed]
        if failed:
            return GateDecision(False, failed[0].code, "; ".join(c.detail for c in failed), tuple(checks))
        code = "first_champion" if report.champion is None else "promote"
        return GateDecision(True, code, "; ".join(c.detail for c in checks), tuple(checks))

    def _first_champion(self, report: EvaluationReport) -> list[GateCheck]:
        s, c = self.spec, report.challenger
        checks = [GateCheck("auc_floor", c.auc >= s.min_auc, c.auc, s.min_auc,
                            f"no champion: auc {c.auc:.4f} {_cmp(c.auc, s.min_auc)} floor {s.min_auc}",
                            "below_floor")]
        if s.max_log_loss is not None:
            checks.append(GateCheck(
                "log_loss_ceiling", c.log_loss <= s.max_log_loss, c.log_loss, s.max_log_loss,
                f"no champion: log loss {c.log_loss:.4f} {_cmp(c.log_loss, s.max_log_loss)} "
                f"ceiling {s.max_log_loss}", "below_floor"))
        checks.append(self._calibration(c, None))
        return checks

    def _against(self, report: EvaluationReport) -> list[GateCheck]:
        s, c, champ = self.spec, report.challenger, report.champion
        assert champ is not None and report.auc_test is not None  # the report validates it
        pct = _pct(s.confidence)
        t = report.auc_test
        lower = t.lower_bound(s.confidence)
        checks = [GateCheck(
            "auc_gain", lower > s.min_auc_gain, lower, s.min_auc_gain,
            f"auc gain {t.diff:.4f} [lower {pct} bound {lower:.4f}, p={t.p_one_sided:.3g}] "
            f"{_cmp(lower, s.min_auc_gain)} margin {s.min_auc_gain}", "insufficient_gain")]
        ll = report.logloss_test
        if ll is None:
            checks.append(GateCheck("log_loss", False, None, s.max_logloss_increase,
                                    "log loss not compared: the report has no paired log-loss test",
                                    "log_loss_regressed"))
        else:
            ll_lower = ll.lower_bound(s.confidence)
            # A regression is an increase we are confident of: the *lower* bound of the
            # increase above the allowance. A noisy, insignificant increase passes; the
            # AUC check already demands confidence in the direction that matters.
            ok = not ll_lower > s.max_logloss_increase and math.isfinite(ll_lower)
            checks.append(GateCheck(
                "log_loss", ok, ll_lower, s.max_logloss_increase,
                f"log loss change {ll.diff:+.4f} ({champ.log_loss:.4f} -> {c.log_loss:.4f}) "
                f"[lower {pct} bound {ll_lower:+.4f}] {'<=' if ok else '>'} allowed increase "
                f"{s.max_logloss_increase}", "log_loss_regressed"))
        checks.append(self._calibration(c, champ))
        checks.append(_ratio("size", c.size_bytes, champ.size_bytes, s.max_size_ratio, "model_too_large",
                             lambda v: f"{v:,.0f} bytes"))
        checks.append(_ratio("latency", c.latency_ms_per_1000, champ.latency_ms_per_1000, s.max_latency_ratio,
                             "too_slow", lambda v: f"{v:.2f} ms/1000 rows", slack=s.latency_slack_ms))
        return checks

    def _calibration(self, c: ModelMetrics, champ: ModelMetrics | None) -> GateCheck:
        """The challenger fails the band only when it is *demonstrably* outside it.

        With the counts (``positives``, ``expected_positives``): when the two-sided
        ``calibration_level`` interval of its observed/expected lies entirely outside
        the band. Each side is then a one-sided test at ``(1 - level) / 2`` of "the
        true ratio is inside the band", so a model exactly at the band's edge is
        rejected at most that often and a calibrated one far less: on the demo's
        holdout (~90 clicks) the ratio's own noise is about +-10-14%, and the point
        rule below rejected a calibrated model in a few percent of runs. An exact
        Poisson interval (:func:`~retrain.evaluate.calibration_interval` says why
        that one). Without the counts (a report from before they were kept), the
        point rule: the ratio itself must be inside.

        Either way, a challenger outside still passes when the champion's ratio is at
        least as far from 1 (point estimates, on the log scale, so 0.8 and 1.25 are
        equally far): a guardrail stops regressions, not imperfect fixes.
        """
        low, high = self.spec.calibration_band
        cal = c.calibration
        point_inside = low <= cal <= high  # False for NaN (nothing expected)
        ci = c.calibration_interval(self.spec.calibration_level)
        if ci is None:
            out_of_band, shown = not point_inside, ""
        else:
            # Only an interval entirely on one side of the band is evidence against it.
            out_of_band = ci[0] > high or ci[1] < low
            shown = f" ({_pct(self.spec.calibration_level)} CI {ci[0]:.3f}-{ci[1]:.3f})"
        no_worse = (champ is not None and math.isfinite(cal) and cal > 0 and math.isfinite(champ.calibration)
                    and champ.calibration > 0 and abs(math.log(cal)) <= abs(math.log(champ.calibration)))
        ok = not out_of_band or no_worse
        where = "inside" if point_inside else "outside"
        detail = f"calibration {cal:.3f}{shown} {where} band [{low}, {high}]"
        if not point_inside and not out_of_band:
            detail += " within noise (the interval reaches the band)"
        if out_of_band and champ is not None:
            than = "no worse than" if no_worse else "worse than"
            detail += f" ({than} the champion's {champ.calibration:.3f})"
        return GateCheck("calibration", ok, cal, (low, high), detail, "calibration_out_of_band")


def _ratio(name: str, new: float | None, old: float | None, limit: float, code: str,
           fmt: Callable[[float], str], *, slack: float = 0.0) -> GateCheck:
    if new is None or old is None or not old > 0:
        # Not measured (a custom trainer's directory, a job that ran before this check
        # existed): skipped, and said so, rather than blocking every promotion.
        return GateCheck(name, True, None, limit, f"{name} not measured for both models: not checked", code)
    ratio = float(new) / float(old)
    within_slack = float(new) - float(old) <= slack
    ok = ratio <= limit or within_slack
    op = "<=" if ratio <= limit else ">"
    detail = f"{name} {fmt(float(old))} -> {fmt(float(new))} (x{ratio:.2f}) {op} allowed x{limit}"
    if ratio > limit and slack:
        detail += f" ({'within' if within_slack else 'beyond'} the slack of {fmt(slack)})"
    return GateCheck(name, ok, ratio, limit, detail, code)


# -- the alias lock ---------------------------------------------------------------------------


class PromotionError(RuntimeError):
    """A promotion or rollback that did not happen (or not completely); the message says why."""


class AliasLockError(PromotionError):
    """The lock itself could not be reached (its database is down)."""


class AliasLockBusy(PromotionError):
    """Another promoter holds the alias lock: this attempt moved nothing.

    Attributes:
        holder: who holds it, when known.
    """

    def __init__(self, message: str, *, holder: str | None) -> None:
        super().__init__(message)
        self.holder = holder


class AliasLock(Protocol):
    """Mutual exclusion between promoters (daemons, people at the CLI).

    ``acquire`` never waits: a promoter that finds the lock taken reports and retries
    later, rather than queueing a promotion based on facts that will be stale.
    ``acquire`` by the holder renews its lease.
    """

    def acquire(self, owner: str, ttl_s: float) -> bool:
        """Take (or renew) the lock for ``owner`` for ``ttl_s`` seconds; False when another holds it."""
        ...

    def release(self, owner: str) -> None:
        """Give the lock back if ``owner`` holds it (a no-op otherwise)."""
        ...

    def holder(self) -> str | None:
        """Who holds the lock now, None when nobody does."""
        ...

    def hold(self, owner: str, ttl_s: float) -> contextlib.AbstractContextManager[None]:
        """The lock for the block's duration; :class:`AliasLockBusy` when another holds it."""
        ...


class _Holdable:
    """``hold`` on top of ``acquire``/``release``, for both lock kinds."""

    def acquire(self, owner: str, ttl_s: float) -> bool:
        raise NotImplementedError

    def release(self, owner: str) -> None:
        raise NotImplementedError

    def holder(self) -> str | None:
        raise NotImplementedError

    @contextlib.contextmanager
    def hold(self, owner: str, ttl_s: float) -> Iterator[None]:
        if not self.acquire(owner, ttl_s):
            holder = self.holder()
            msg = f"the alias lock {self!r} is held by {holder or 'another promoter'}: {owner} moved nothing"
            raise AliasLockBusy(msg, holder=holder)
        try:
            yield
        finally:
            self.release(owner)


def _check_ttl(ttl_s: float) -> None:
    if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
        msg = f"ttl_s must be a finite number > 0, got {ttl_s!r}"
        raise ValueError(msg)


def _open_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    return open_sqlite(path, schema, timeout_s=10.0)


_LOCK_SCHEMA = """
CREATE TABLE IF NOT EXISTS alias_locks (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    acquired_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
"""


class SqliteAliasLock(_Holdable):
    """A lease row in SQLite: one holder at a time, expiring so a dead holder's lock lapses.

    The row is read and written inside ``BEGIN IMMEDIATE``, which takes SQLite's write
    lock before the read: two processes cannot both see the lease free. The lease is
    wall-clock time (several processes compare it), so the TTL must be much longer than
    a promotion (a few registry calls) and than the clock skew between machines sharing
    the file (there should be none: SQLite over a network filesystem is not supported).

    Args:
        path: the database file (the state store's, or one of its own).
        name: which lock (one per deployment: every model's aliases share it).
        clock: seconds since the epoch (injectable for tests).

    Example:
        >>> import tempfile, pathlib
        >>> lock = SqliteAliasLock(pathlib.Path(tempfile.mkdtemp()) / "state.db")
        >>> lock.acquire("daemon-a", 60), lock.acquire("daemon-b", 60), lock.holder()
        (True, False, 'daemon-a')
        >>> lock.release("daemon-a"); lock.acquire("daemon-b", 60)
        True
    """

    def __init__(self, path: Path, *, name: str = "aliases", clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.name = name
        self._clock = clock
        self._db = _open_sqlite(self.path, _LOCK_SCHEMA)
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteAliasLock({str(self.path)!r}, name={self.name!r})"

    def close(self) -> None:
        self._db.close()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def acquire(self, owner: str, ttl_s: float) -> bool:
        _check_ttl(ttl_s)
        with self._mutex:
            now = self._now_ms()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT owner, expires_ms FROM alias_locks WHERE name = ?",
                                 (self.name,)).fetchone()
                if row is not None and row[0] != owner and int(row[1]) > now:
                    db.execute("ROLLBACK")
                    return False
                acquired = now if row is None or row[0] != owner else None
                db.execute(
                    "INSERT INTO alias_locks (name, owner, acquired_ms, expires_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                    "acquired_ms = coalesce(?, acquired_ms), expires_ms = excluded.expires_ms",
                    (self.name, owner, now, now + int(ttl_s * 1000), acquired))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return True

    def release(self, owner: str) -> None:
        with self._mutex:
            self._db.execute("DELETE FROM alias_locks WHERE name = ? AND owner = ?", (self.name, owner))

    def holder(self) -> str | None:
        with self._mutex:
            row = self._db.execute("SELECT owner FROM alias_locks WHERE name = ? AND expires_ms > ?",
                                   (self.name, self._now_ms())).fetchone()
        return None if row is None else str(row[0])


def _advisory_key(key: int | str) -> int:
    """A signed 64-bit advisory-lock key; a string is hashed (stable across processes,
    unlike ``hash``)."""
    if isinstance(key, str):
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)
    if not -(2**63) <= key < 2**63:
        msg = f"an advisory lock key must fit in a signed 64-bit integer, got {key}"
        raise ValueError(msg)
    return int(key)


class PostgresAdvisoryLock(_Holdable):
    """A PostgreSQL session advisory lock (``pg_try_advisory_lock``) on a dedicated connection.

    The lock lives as long as the connection: the holder keeps it open while it holds
    the lock, and PostgreSQL releases it when the connection ends, so a holder that
    dies (its socket closes) frees it at once; no lease to expire. ``ttl_s`` is
    therefore unused. A holder that hangs with its connection open keeps the lock:
    ``pg_terminate_backend`` is the operator's tool (docs/promotion.md). The connection
    carries ``application_name = driftloop-alias-lock:<owner>``, which is how
    :meth:`holder` names the holder.

    Args:
        dsn: a libpq connection string or URI.
        key: the lock's key: an int64, or a string hashed to one (the default is the
            same in every deployment of a database: one promoter per database).
        connect_timeout_s: bound on connecting.

    Example:
        >>> lock = PostgresAdvisoryLock("postgresql://driftloop@db/driftloop")  # doctest: +SKIP
        >>> with lock.hold("daemon-a", ttl_s=60):  # doctest: +SKIP
        ...     promoter_moves_aliases()
    """

    def __init__(self, dsn: str, key: int | str = "driftloop.aliases", *, connect_timeout_s: int = 5) -> None:
        self.dsn = dsn
        self.key = _advisory_key(key)
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._owner: str | None = None
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresAdvisoryLock(key={self.key})"

    def _connect(self, owner: str) -> Any:
        import psycopg

        try:
            return psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s,
                                   application_name=f"driftloop-alias-lock:{owner}"[:63])
        except psycopg.Error as exc:
            msg = f"the alias lock database cannot be reached: {exc}"
            raise AliasLockError(msg) from exc

    def acquire(self, owner: str, ttl_s: float) -> bool:
        import psycopg

        _check_ttl(ttl_s)
        with self._mutex:
            if self._owner is not None:
                if self._owner != owner:
                    return False
                # Session locks stack: never take it twice; check the connection (and
                # so the lock) is still there instead.
                try:
                    self._conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    log.warning("the alias lock's connection was lost: the lock is lost with it",
                                extra={"fields": {"owner": owner}})
                    self._drop()
            conn = self._connect(owner)
            try:
                got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])
            except psycopg.Error as exc:
                conn.close()
                msg = f"taking the alias lock failed: {exc}"
                raise AliasLockError(msg) from exc
            if not got:
                conn.close()
                return False
            self._conn, self._owner = conn, owner
            return True

    def _drop(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn, self._owner = None, None

    def release(self, owner: str) -> None:
        import psycopg

        with self._mutex:
            if self._owner != owner:
                return
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except psycopg.Error:
                pass  # closing the connection below releases it anyway
            finally:
                self._drop()

    def holder(self) -> str | None:
        import psycopg

        u = self.key & 0xFFFFFFFFFFFFFFFF
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s) as conn:
                row = conn.execute(
                    "SELECT a.application_name, a.pid FROM pg_locks l JOIN pg_stat_activity a "
                    "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                    "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())",
                    (u >> 32, u & 0xFFFFFFFF)).fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        name = str(row[0] or "")
        return name.removeprefix("driftloop-alias-lock:") if name else f"backend pid {row[1]}"


# -- the history ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AliasMove:
    """One alias move, as recorded.

    Args:
        model, alias: what moved.
        from_version: where it pointed before (None: it was not set).
        to_version: where it points now (None: it was removed).
        action: ``promote`` or ``rollback``.
        at_ms: when (the promoter's clock).
        who: the person or daemon that asked.
        why: the reason (the gate's, or the person's).
        evidence: what the decision rested on (the report, the gate's checks, a live test).
        id: the history row, once recorded.
    """

    model: str
    alias: str
    from_version: str | None
    to_version: str | None
    action: str
    at_ms: int
    who: str
    why: str
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    id: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ("promote", "rollback"):
            msg = f"action must be promote or rollback, got {self.action!r}"
            raise ValueError(msg)
        if self.from_version == self.to_version:
            msg = f"a move of {self.model}@{self.alias} from {self.from_version} to itself is no move"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "alias": self.alias, "from_version": self.from_version,
                "to_version": self.to_version, "action": self.action, "at_ms": self.at_ms, "who": self.who,
                "why": self.why, "evidence": dict(self.evidence)}


@dataclasses.dataclass(frozen=True)
class GateRecord:
    """A stored gate decision (promote or keep), for ``driftloop status`` and audits."""

    id: int
    at_ms: int
    model: str
    version: str
    who: str
    decision: GateDecision


_HISTORY_TABLES = """
CREATE TABLE IF NOT EXISTS alias_moves (
    id {serial},
    at_ms {int} NOT NULL,
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    from_version TEXT,
    to_version TEXT,
    action TEXT NOT NULL,
    who TEXT NOT NULL,
    why TEXT NOT NULL,
    evidence TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alias_moves_model ON alias_moves (model, id);
CREATE TABLE IF NOT EXISTS gate_decisions (
    id {serial},
    at_ms {int} NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    promote INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    who TEXT NOT NULL,
    decision TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS gate_decisions_model ON gate_decisions (model, id);
"""
_HISTORY_SQLITE = _HISTORY_TABLES.format(int="INTEGER", serial="INTEGER PRIMARY KEY AUTOINCREMENT")
_HISTORY_POSTGRES = _HISTORY_TABLES.format(int="BIGINT",
                                           serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")

_MOVE_COLUMNS = "id, at_ms, model, alias, from_version, to_version, action, who, why, evidence"


def _limit(sql: str, args: list[object], limit: int | None) -> str:
    if limit is None:
        return sql
    args.append(limit)
    return sql + " LIMIT ?"


class AliasHistory:
    """Every alias move and gate decision (MLflow keeps no alias history).

    Args:
        location: a SQLite file (the state store's, or one of its own; created with
            its tables when missing), or the ``postgresql://`` URL a cluster's replicas
            share: whichever replica leads, ``previous_before`` and the audit trail are
            the same. Keyed by model, like the registry's aliases themselves.

    Example:
        >>> import tempfile, pathlib
        >>> h = AliasHistory(pathlib.Path(tempfile.mkdtemp()) / "state.db")
        >>> _ = h.record([AliasMove("ctr", "champion", None, "1", "promote", 0, "me", "first")])
        >>> [(m.alias, m.to_version) for m in h.moves("ctr")]
        [('champion', '1')]
    """

    def __init__(self, location: str | Path) -> None:
        self.location = location
        self._db = SqlDb(location, sqlite_schema=_HISTORY_SQLITE, postgres_schema=_HISTORY_POSTGRES,
                         name="driftloop-promotion")

    @property
    def path(self) -> Path | None:
        """The SQLite file, None on PostgreSQL."""
        return None if self._db.postgres else Path(self.location)

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "postgresql"
        return f"AliasHistory({str(where)!r})"

    def close(self) -> None:
        self._db.close()

    def record(self, moves: Sequence[AliasMove]) -> list[AliasMove]:
        """Stores ``moves`` in one transaction; returns them with their row ids."""
        out = []
        with self._db.transaction():
            for m in moves:
                ((row_id,),) = self._db.rows(
                    "INSERT INTO alias_moves (at_ms, model, alias, from_version, to_version, action, "
                    "who, why, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (m.at_ms, m.model, m.alias, m.from_version, m.to_version, m.action, m.who, m.why,
                     json.dumps(dict(m.evidence), sort_keys=True, default=str)))
                out.append(dataclasses.replace(m, id=int(row_id)))
        return out

    def moves(self, model: str, limit: int | None = None, *, alias: str | None = None) -> list[AliasMove]:
        """The moves of ``model`` (of one alias if given), newest first."""
        sql = f"SELECT {_MOVE_COLUMNS} FROM alias_moves WHERE model = ?"
        args: list[object] = [model]
        if alias is not None:
            sql += " AND alias = ?"
            args.append(alias)
        rows = self._db.rows(_limit(sql + " ORDER BY id DESC", args, limit), args)
        return [AliasMove(id=int(r[0]), at_ms=int(r[1]), model=r[2], alias=r[3], from_version=r[4],
                          to_version=r[5], action=r[6], who=r[7], why=r[8], evidence=json.loads(r[9]))
                for r in rows]

    def previous_before(self, model: str, version: str) -> str | None:
        """What ``previous`` pointed at before a promotion moved it to ``version``.

        Only promotions count: a rollback's own moves of ``previous`` go backwards
        through this chain and would make it loop.
        """
        rows = self._db.rows(
            "SELECT from_version FROM alias_moves WHERE model = ? AND alias = ? AND to_version = ? "
            "AND action = 'promote' ORDER BY id DESC LIMIT 1", (model, PREVIOUS, version))
        return rows[0][0] if rows else None

    def record_decision(self, model: str, version: str, decision: GateDecision, *, who: str,
                        at_ms: int) -> int:
        """Keeps one gate decision, a "keep" included; returns its id."""
        ((row_id,),) = self._db.rows(
            "INSERT INTO gate_decisions (at_ms, model, version, promote, code, reason, who, decision) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (at_ms, model, version, int(decision.promote), decision.code, decision.reason, who,
             json.dumps(decision.to_dict(), sort_keys=True)))
        return int(row_id)

    def decisions(self, model: str, limit: int | None = None) -> list[GateRecord]:
        """Gate decisions about ``model``, newest first."""
        args: list[object] = [model]
        rows = self._db.rows(_limit("SELECT id, at_ms, model, version, who, decision FROM gate_decisions "
                                    "WHERE model = ? ORDER BY id DESC", args, limit), args)
        out = []
        for r in rows:
            d = json.loads(r[5])
            checks = tuple(GateCheck(name=c["name"], passed=c["passed"], value=c["value"],
                                     threshold=tuple(c["threshold"]) if isinstance(c["threshold"], list)
                                     else c["threshold"], detail=c["detail"], code=c.get("code", ""))
                           for c in d["checks"])
            out.append(GateRecord(id=int(r[0]), at_ms=int(r[1]), model=r[2], version=r[3], who=r[4],
                                  decision=GateDecision(d["promote"], d["code"], d["reason"], checks)))
        return out


# -- the promoter -----------------------------------------------------------------------------


class PromotionRegistry(Protocol):
    """The registry calls the promoter makes (``connectors.registry.ModelRegistry``).

    Every call raises ``RegistryError`` on failure.
    """

    def aliases(self, model: str) -> dict[str, str]: ...

    def set_alias(self, model: str, alias: str, version: str) -> None: ...

    def delete_alias(self, model: str, alias: str) -> None: ...

    def version_tags(self, model: str, version: str) -> dict[str, str] | None: ...

    def set_version_tags(self, model: str, version: str, tags: dict[str, str]) -> None: ...

    def delete_version_tag(self, model: str, version: str, key: str) -> None: ...

    def version_run_id(self, model: str, version: str) -> str | None: ...

    def set_run_tags(self, run_id: str, tags: dict[str, Any]) -> None: ...

    def log_run_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None: ...

    def log_run_text(self, run_id: str, text: str, path: str) -> None: ...

    def download_artifact(self, model: str, version: str, path: str) -> bytes | None: ...


class StaleChampion(PromotionError):
    """The champion moved since the evidence was gathered: nothing moved, re-evaluate."""


class NothingToRollBack(PromotionError):
    """No ``previous`` version to roll back to: nothing moved."""


class PromotionFailed(PromotionError):
    """The registry failed during the moves.

    Attributes:
        state: ``restored`` (every move made was undone: as if nothing happened),
            ``partial`` (an undo failed too; ``aliases`` says what is where) or
            ``unknown`` (the registry did not answer the read-back).
        aliases: the model's aliases as read back after the failure, or, when the
            registry did not answer, as this promoter believes them to be.
        confirmed: whether ``aliases`` was read back (True) or inferred (False).

    Retrying the same call is safe in every state: moves that are already in place
    are skipped.
    """

    def __init__(self, message: str, *, state: str, aliases: Mapping[str, str], confirmed: bool) -> None:
        super().__init__(message)
        self.state = state
        self.aliases = dict(aliases)
        self.confirmed = confirmed


class _LeaseLost(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class PromotionOutcome:
    """What :meth:`Promoter.decide_and_promote` did: the decision, and the moves if it promoted."""

    decision: GateDecision
    moves: tuple[AliasMove, ...] = ()

    @property
    def promoted(self) -> bool:
        return bool(self.moves)


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: ``expected_champion`` default: promote whatever the champion is now.
ANY: Any = _Any()


@dataclasses.dataclass(eq=False)
class _Step:
    """One registry write and how to take it back."""

    what: str
    do: Callable[[], None]
    undo: Callable[[], None]
    move: tuple[str, str | None, str | None] | None = None  # (alias, from, to)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds")


def _fmt_aliases(aliases: Mapping[str, str]) -> str:
    keys = [CHAMPION, PREVIOUS, *sorted(k for k in aliases if k not in (CHAMPION, PREVIOUS))]
    return ", ".join(f"{k}={aliases.get(k, 'unset')}" for k in keys)


class Promoter:
    """Moves a model's ``champion`` and ``previous`` aliases, under a lock, with a history.

    Args:
        registry: the MLflow edge (``connectors.registry.ModelRegistry``).
        lock: who may move aliases (:class:`SqliteAliasLock`, :class:`PostgresAdvisoryLock`).
        history: where every move and gate decision is recorded.
        clock: seconds since the epoch, for the history and the tags.
        owner: this promoter's name in the lock (default: host, pid and a random suffix,
            so two promoters in one process are two owners).
        lock_ttl_s: the lease; renewed before every write, so it bounds only how long a
            dead holder blocks the next one (SQLite lease).

    Example:
        >>> promoter = Promoter(registry, SqliteAliasLock(db), AliasHistory(db))  # doctest: +SKIP
        >>> promoter.decide_and_promote("ctr", "8", report, Gate(), who="driftloop")  # doctest: +SKIP
    """

    def __init__(self, registry: PromotionRegistry, lock: AliasLock, history: AliasHistory, *,
                 clock: Callable[[], float] = time.time, owner: str | None = None,
                 lock_ttl_s: float = 60.0) -> None:
        _check_ttl(lock_ttl_s)
        self.registry = registry
        self.lock = lock
        self.history = history
        self.clock = clock
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.lock_ttl_s = lock_ttl_s

    def __repr__(self) -> str:
        return f"Promoter(owner={self.owner!r}, lock={self.lock!r})"

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- promotion ------------------------------------------------------------------------

    def promote(self, model: str, version: str, *, who: str, why: str,
                evidence: Mapping[str, Any] | None = None, expected_champion: Any = ANY) -> list[AliasMove]:
        """Makes ``version`` the champion; the former champion becomes ``previous``.

        ``previous`` moves first and ``champion`` second: between the two, both point
        at the old champion, so a reader never finds ``champion`` unset (MLflow moves
        an alias in one write) and ``previous`` never names a version that was not
        the champion.

        Args:
            model, version: what to promote.
            who: the person or daemon asking.
            why: the reason (recorded with every move and as a tag).
            evidence: what the decision rests on (recorded with every move).
            expected_champion: refuse unless the champion is this (None: no champion);
                the evidence compared against it, so it must still be the one serving.

        Returns:
            The moves made, recorded; empty when ``version`` already is the champion.

        Raises:
            AliasLockBusy: another promoter holds the lock; nothing moved.
            StaleChampion: the champion is not ``expected_champion``; nothing moved.
            PromotionError: ``version`` does not exist.
            PromotionFailed: the registry failed during the moves (see its ``state``).
            RegistryError: the registry failed before anything moved.
        """
        evidence = dict(evidence or {})
        with self.lock.hold(self.owner, self.lock_ttl_s):
            aliases = self.registry.aliases(model)
            old = aliases.get(CHAMPION)
            if expected_champion is not ANY and old != expected_champion:
                msg = (f"{model}: the champion is {old or 'unset'}, not {expected_champion or 'unset'} as "
                       f"the evidence for {version} assumed: nothing moved; evaluate against the current "
                       "champion")
                raise StaleChampion(msg)
            if old == version:
                log.info("already the champion", extra={"fields": {"model": model, "version": version}})
                return []
            if self.registry.version_tags(model, version) is None:
                msg = f"{model}/{version} does not exist in the registry: nothing moved"
                raise PromotionError(msg)
            now = self.clock()
            moves: list[tuple[str, str | None, str | None]] = []
            if old is not None and aliases.get(PREVIOUS) != old:
                moves.append((PREVIOUS, aliases.get(PREVIOUS), old))
            moves.append((CHAMPION, old, version))
            tags = {version: {TAG_PROMOTED_AT: _iso(now), TAG_PROMOTED_BY: who, TAG_PROMOTION_REASON: why}}
            if old is not None:
                tags[old] = {TAG_DEMOTED_AT: _iso(now)}
            return self._apply(model, aliases, moves, tags, action="promote", who=who, why=why,
                               evidence=evidence)

    def rollback(self, model: str, *, who: str, why: str,
                 evidence: Mapping[str, Any] | None = None) -> list[AliasMove]:
        """Moves ``champion`` back to ``previous``; ``previous`` to what came before it.

        ``champion`` moves first (to the version ``previous`` names, so both point at
        it for a moment), then ``previous`` moves to the version the history says it
        named before, or is removed when there was none.

        Raises:
            NothingToRollBack: there is no ``previous`` (or it is the champion).
            AliasLockBusy, PromotionFailed, RegistryError: as for :meth:`promote`.
        """
        evidence = dict(evidence or {})
        with self.lock.hold(self.owner, self.lock_ttl_s):
            aliases = self.registry.aliases(model)
            champ, prev = aliases.get(CHAMPION), aliases.get(PREVIOUS)
            if prev is None:
                msg = (f"{model} has no {PREVIOUS!r} version to roll back to (champion={champ or 'unset'}): "
                       "nothing moved")
                raise NothingToRollBack(msg)
            if prev == champ:
                msg = (f"{model}: {PREVIOUS!r} and {CHAMPION!r} both point at {prev} (a promotion that did "
                       "not complete? retry it): nothing to roll back to, nothing moved")
                raise NothingToRollBack(msg)
            before = self.history.previous_before(model, prev)
            if before == champ:  # the version being rolled back is no fallback
                before = None
            now = self.clock()
            moves: list[tuple[str, str | None, str | None]] = [(CHAMPION, champ, prev),
                                                               (PREVIOUS, prev, before)]
            tags = {prev: {TAG_PROMOTED_AT: _iso(now), TAG_PROMOTED_BY: who,
                           TAG_PROMOTION_REASON: f"rollback: {why}"}}
            if champ is not None:
                tags[champ] = {TAG_DEMOTED_AT: _iso(now), TAG_ROLLED_BACK_AT: _iso(now),
                               TAG_ROLLBACK_REASON: why}
            return self._apply(model, aliases, moves, tags, action="rollback", who=who, why=why,
                               evidence=evidence)

    def _renew(self) -> None:
        if not self.lock.acquire(self.owner, self.lock_ttl_s):
            raise _LeaseLost

    def _alias_step(self, model: str, alias: str, frm: str | None, to: str | None) -> _Step:
        r = self.registry

        def put(target: str | None) -> Callable[[], None]:
            if target is None:
                return lambda: r.delete_alias(model, alias)
            return lambda: r.set_alias(model, alias, target)

        what = f"delete alias {alias}" if to is None else f"set alias {alias} -> {to}"
        return _Step(what, put(to), put(frm), (alias, frm, to))

    def _tag_step(self, model: str, version: str, tags: dict[str, str]) -> _Step:
        r = self.registry
        before = r.version_tags(model, version) or {}

        def undo() -> None:
            restore = {k: before[k] for k in tags if k in before}
            if restore:
                r.set_version_tags(model, version, restore)
            for k in tags:
                if k not in before:
                    r.delete_version_tag(model, version, k)

        return _Step(f"tag version {version}", lambda: r.set_version_tags(model, version, tags), undo)

    def _apply(self, model: str, aliases: dict[str, str], moves: list[tuple[str, str | None, str | None]],
               tags: dict[str, dict[str, str]], *, action: str, who: str, why: str,
               evidence: dict[str, Any]) -> list[AliasMove]:
        """Runs the moves, then the tags, then records the history; undoes on failure.

        A saga rather than a transaction: MLflow has no multi-write transaction. Each
        step's undo is registered *before* the step runs, because a request that timed
        out may have been applied; every undo is idempotent (set an alias to where it
        was, restore a tag), so undoing a step that never happened is harmless.
        """
        steps = [self._alias_step(model, *m) for m in moves]
        steps += [self._tag_step(model, v, t) for v, t in tags.items()]
        started: list[_Step] = []
        completed: list[_Step] = []
        at_ms = self._now_ms()
        records = [AliasMove(model, alias, frm, to, action, at_ms, who, why, evidence)
                   for alias, frm, to in moves]
        current = "renewing the lock"
        try:
            for step in steps:
                current = step.what
                self._renew()
                started.append(step)
                step.do()
                completed.append(step)
            current = "recording the history"
            self._renew()
            recorded = self.history.record(records)
        except (RegistryError, sqlite3.Error, _LeaseLost, AliasLockError) as exc:
            cause = ("the alias lock's lease was lost (held past its ttl?)" if isinstance(exc, _LeaseLost)
                     else str(exc))
            raise self._undo(model, aliases, started, completed, records, action=action,
                             failed_at=current, cause=cause) from exc
        log.info(f"{action}: {model} aliases moved", extra={"fields": {
            "model": model, "action": action, "who": who, "why": why,
            "moves": [f"{m.alias}: {m.from_version} -> {m.to_version}" for m in recorded]}})
        return recorded

    def _undo(self, model: str, before: dict[str, str], started: list[_Step], completed: list[_Step],
              records: list[AliasMove], *, action: str, failed_at: str, cause: str) -> PromotionFailed:
        undo_errors = []
        in_effect: list[_Step] = []
        for step in reversed(started):
            try:
                step.undo()
            except RegistryError as exc:
                undo_errors.append(f"undoing {step.what}: {exc}")
                if any(step is c for c in completed):
                    in_effect.append(step)
        try:
            now, confirmed = self.registry.aliases(model), True
        except RegistryError:
            # What we know: the completed moves whose undo failed are in place. (The
            # failing request itself may or may not have been applied: "believed".)
            now, confirmed = dict(before), False
            for step in in_effect:
                if step.move is not None:
                    alias, _, to = step.move
                    if to is None:
                        now.pop(alias, None)
                    else:
                        now[alias] = to
        if confirmed:
            restored = all(now.get(a) == before.get(a) for a in (CHAMPION, PREVIOUS))
            state = "restored" if restored else "partial"
        else:
            state = "unknown" if undo_errors else "restored"
        if state != "restored":
            # Keep the history true to the registry: the moves still in effect are
            # recorded, marked incomplete, so that a later rollback's lookup of what
            # ``previous`` pointed at before still finds them.
            effective = [r for r in records if now.get(r.alias) == r.to_version]
            with contextlib.suppress(sqlite3.Error):
                self.history.record([dataclasses.replace(r, why=f"{r.why} [incomplete {action}: {cause}]")
                                     for r in effective])
        what = {"restored": "every move made was undone, the aliases are as before",
                "partial": "an undo failed too, the aliases are NOT as before",
                "unknown": "an undo failed and the registry did not answer, so the aliases are probably "
                           "NOT as before"}[state]
        msg = (f"{action} of {model} failed at {failed_at}: {cause}. State {state}: {what}; "
               f"{'read back' if confirmed else 'believed'}: {_fmt_aliases(now)} "
               f"(before: {_fmt_aliases(before)}); {CHAMPION!r} was never unset. "
               + (f"Undo errors: {'; '.join(undo_errors)}. " if undo_errors else "")
               + "Retrying is safe: moves already in place are skipped.")
        log.error(msg, extra={"fields": {"model": model, "state": state}})
        return PromotionFailed(msg, state=state, aliases=now, confirmed=confirmed)

    # -- the gate in front ----------------------------------------------------------------

    def decide_and_promote(self, model: str, version: str, report: EvaluationReport, gate: Gate, *, who: str,
                           evidence: Mapping[str, Any] | None = None) -> PromotionOutcome:
        """Runs the gate on ``report``, logs its decision to the challenger's run, and
        promotes when it passes.

        The decision goes to the run of ``version`` as tags (``driftloop.gate`` =
        ``promote`` | ``keep``, ``driftloop.gate_code``, ``driftloop.gate_reason``),
        ``gate.*`` metrics and ``evaluation/gate.json``, and into the history, a
        "keep" included. A report that compared against another champion than the
        one serving now is not evidence: the decision is ``stale_report``.

        Raises:
            PromotionError: ``version`` does not exist or has no run.
            AliasLockBusy, StaleChampion, PromotionFailed, RegistryError: from
                :meth:`promote` (the decision is logged first either way).
        """
        run_id = self.registry.version_run_id(model, version)
        if run_id is None:
            msg = f"{model}/{version} does not exist in the registry or has no run: nothing decided"
            raise PromotionError(msg)
        current = self.registry.aliases(model).get(CHAMPION)
        if current == version:
            decision = GateDecision(False, "already_champion", f"{model}/{version} already is the champion")
        elif report.champion_version != current:
            decision = GateDecision(
                False, "stale_report",
                f"the evaluation compared with champion {report.champion_version or 'none'} and the champion "
                f"is {current or 'unset'}: evaluate {version} against the current champion")
        else:
            decision = gate.decide(report)
        self._log_decision(run_id, model, version, report, gate, decision, who)
        if not decision.promote:
            log.info("gate: keep the champion", extra={"fields": {
                "model": model, "version": version, "code": decision.code, "reason": decision.reason}})
            return PromotionOutcome(decision)
        moves = self.promote(model, version, who=who, why=decision.reason, expected_champion=current,
                             evidence={"run_id": run_id, "gate": decision.to_dict(),
                                       "report": report.to_dict(), "spec": gate.spec.to_dict(),
                                       **dict(evidence or {})})
        return PromotionOutcome(decision, tuple(moves))

    def _log_decision(self, run_id: str, model: str, version: str, report: EvaluationReport, gate: Gate,
                      decision: GateDecision, who: str) -> None:
        doc = {"model": model, "version": version, "who": who, "at": _iso(self.clock()),
               "decision": decision.to_dict(), "spec": gate.spec.to_dict(),
               "champion_version": report.champion_version}
        self.registry.set_run_tags(run_id, {TAG_GATE: "promote" if decision.promote else "keep",
                                            TAG_GATE_CODE: decision.code, TAG_GATE_REASON: decision.reason})
        self.registry.log_run_metrics(run_id, decision.metrics())
        self.registry.log_run_text(run_id, json.dumps(doc, indent=2, sort_keys=True), GATE_PATH)
        self.history.record_decision(model, version, decision, who=who, at_ms=self._now_ms())


def load_report(registry: PromotionRegistry, model: str, version: str) -> EvaluationReport | None:
    """The :class:`EvaluationReport` the training job logged with ``version``; None when
    the version or the report does not exist (a version not trained by the job)."""
    data = registry.download_artifact(model, version, REPORT_PATH)
    return None if data is None else EvaluationReport.from_json(data)
