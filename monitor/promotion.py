"""Promotion inside the daemon: the gate after training, the live watch, the canary.

The pieces are in retrain/promote.py (the gate, the lock, the alias moves and their
history) and monitor/detectors/live.py (the live tests); this module wires them to the daemon
(docs/promotion.md):

* **after a training job** (a succeeded job the job store holds ungated, whichever
  replica's tracker saw it end; or `job_succeeded`): the job's `EvaluationReport`
  (challenger vs champion on the same holdout) goes through the gate; a pass moves
  ``champion`` (``previous`` keeps the old one). Every decision is logged to the
  challenger's run and kept in the history, "keep" included.
* **the watch**: after any promotion (the daemon's own, or one made elsewhere, seen by
  polling the alias), the new champion's matured labels are tested against the rate
  the previous champion achieved live; a significant drop rolls ``champion`` back to
  ``previous`` and raises a ``model_rollback`` incident, which pages.
* **the canary**: when matured windows show two versions of one model serving at
  once, their rates are compared by an always-valid test; a challenger that is
  significantly better is promoted.

Promotions and rollbacks are also notifications through the alert sinks: an
incident of kind ``model_promoted`` (severity info) that opens and resolves at once,
and ``model_rollback`` (critical), which resolves when a later promotion holds its
watch.

Label observations come from the analysis thread (`on_labels`, a queue); everything
else runs on this controller's own thread, so a slow registry never delays the
statistics. The watches and canaries are kept in the state store and survive restarts;
observations still queued at a crash are lost (the watch sees a few windows fewer).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from connectors.registry import ModelRegistry, RegistryError
from connectors.state import FencedOut, MonitorCommit, StateStore
from monitor.config import Config
from monitor.detectors.live import CanaryTest, PromotionWatch
from monitor.incidents import Severity, Signal
from monitor.metrics import Metrics
from monitor.retraining import job_store_location
from monitor.stats.labels import LabelSummary
from retrain.evaluate import REPORT_PATH, EvaluationReport
from retrain.jobs import SqlJobStore
from retrain.promote import (
    CHAMPION,
    PREVIOUS,
    AliasHistory,
    AliasLock,
    Gate,
    PostgresAdvisoryLock,
    Promoter,
    PromotionError,
    SqliteAliasLock,
)

__all__ = ["PromotionController", "build_promoter", "history_location"]

log = logging.getLogger(__name__)

_STATE_KEY = "promotion/live"


def history_location(config: Config) -> str | Path:
    """Where alias moves and gate decisions are kept: the cluster's PostgreSQL database
    when the state store is one (the next leader reads the same history), else
    ``<data_dir>/promotion.db``."""
    return config.storage.state_url or Path(config.storage.data_dir) / "promotion.db"


def build_promoter(config: Config, registry: ModelRegistry, *, owner: str) -> tuple[Promoter, AliasHistory]:
    """The promoter the daemon and the CLI share: same lock, same history.

    The lock: ``promotion.lock: postgres`` with its own DSN; else, with the state store
    on PostgreSQL, an advisory lock on that database (a lease in one replica's
    data_dir would guard nothing on the others); else the SQLite lease.
    """
    pc = config.promotion
    workdir = Path(config.storage.data_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    history = AliasHistory(history_location(config))
    key = f"driftloop.aliases.{config.kafka.group_id}"
    lock: AliasLock
    if pc.lock == "postgres":
        dsn = os.environ.get(pc.lock_dsn_env or "", "")
        if not dsn:
            msg = f"promotion.lock_dsn_env: environment variable {pc.lock_dsn_env} is not set"
            raise ValueError(msg)
        lock = PostgresAdvisoryLock(dsn, key)
    elif config.storage.state_url:
        lock = PostgresAdvisoryLock("postgresql://" + config.storage.state_url.split("://", 1)[1], key)
    else:
        lock = SqliteAliasLock(workdir / "promotion.db")
    return Promoter(registry, lock, history, owner=owner), history


class PromotionController:
    """Args:
        config: the daemon's configuration (``promotion``, ``monitor``, ...).
        registry: the model registry.
        submit: hands signals and resolutions to the analysis stage (the one writer
            of incidents).
        clock: seconds since the epoch.
        metrics: where gate decisions and alias moves are counted (the daemon's).
    """

    def __init__(self, config: Config, *, registry: ModelRegistry, submit: Callable[..., None],
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None) -> None:
        pc = config.promotion
        self.config = config
        self.registry = registry
        self.submit = submit
        self.clock = clock
        self.metrics = metrics
        self.gate = Gate(pc.spec())
        self.promoter, self.history = build_promoter(config, registry, owner=f"daemon:{config.instance}")
        self._obs: queue.Queue[tuple[str, str, int, np.ndarray]] = queue.Queue(maxsize=10_000)
        self._jobs: queue.Queue[dict[str, Any]] = queue.Queue()
        #: (model, version) -> recent windows' (events, positives), newest last.
        self._live: dict[tuple[str, str], collections.deque[tuple[int, int]]] = {}
        self._watches: dict[str, dict[str, Any]] = {}
        self._canaries: dict[str, dict[str, Any]] = {}
        self._champions: dict[str, str | None] = {}
        self._last_poll = 0.0
        self._stop = threading.Event()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="promotion", daemon=True)
        self.last_error: str | None = None
        self._state: StateStore | None = None
        self._job_store: SqlJobStore | None = None
        self._status_history: AliasHistory | None = None

    # -- inputs (other threads) --------------------------------------------------------

    def on_labels(self, model: str, version: str, start: int, end: int, summary: LabelSummary,
                  labels: np.ndarray) -> None:
        """A matured window of one version (the analysis thread's label listener)."""
        try:
            self._obs.put_nowait((model, version, end, np.asarray(labels, dtype=bool)))
        except queue.Full:
            log.warning("promotion: label observations dropped (the controller is behind)",
                        extra={"fields": {"model": model, "version": version}})
        self._wakeup.set()

    def job_succeeded(self, model: str, version: str, job_id: str) -> None:
        """A challenger to gate that the job store does not hold (tests, tooling): the
        daemon's own jobs are gated from the store (`_gate_stored_jobs`)."""
        self._jobs.put({"model": model, "version": version, "job_id": job_id})
        self._wakeup.set()

    # -- the loop ----------------------------------------------------------------------

    def start(self, state: StateStore) -> None:
        """Start the thread; ``state`` is a state-store connection for it alone."""
        self._state = state
        if self.config.retrain.enabled:
            self._job_store = SqlJobStore(job_store_location(self.config),
                                          group_id=self.config.kafka.group_id)
        raw = state.monitor_value(_STATE_KEY)
        if raw:
            saved = json.loads(raw)
            self._watches = saved.get("watches", {})
            self._canaries = saved.get("canaries", {})
            self._champions = saved.get("champions", {})
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=10)
        if self._state is not None:
            self._state.close()
        if self._job_store is not None:
            self._job_store.close()

    def _loop(self) -> None:
        assert self._state is not None
        while not self._stop.is_set():
            try:
                self.step(self._state)
                self.last_error = None
            except FencedOut as exc:
                self.last_error = str(exc)
                log.error("promotion stops: a newer leader has started", extra={"fields": {
                    "error": str(exc)}})
                return
            except Exception as exc:
                self.last_error = repr(exc)
                log.exception("promotion step failed; retrying")
            self._wakeup.wait(timeout=2.0)
            self._wakeup.clear()

    def step(self, state: StateStore) -> None:
        changed = False
        # Observations first: a promotion below takes the previous champion's live rate.
        seen: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
        while True:
            try:
                model, version, _end, y = self._obs.get_nowait()
            except queue.Empty:
                break
            self._observe(model, version, y)
            seen[model][version] = np.concatenate([seen[model].get(version, np.zeros(0, bool)), y])
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            self._after_job(job)
            changed = True
        changed |= self._gate_stored_jobs()
        for model, by_version in seen.items():
            changed |= self._watch(model, by_version)
            changed |= self._canary(model, by_version)
        if self.clock() - self._last_poll >= self.config.promotion.poll_seconds:
            self._last_poll = self.clock()
            changed |= self._poll_champions()
        if changed:
            state.commit_monitor(MonitorCommit(values={_STATE_KEY: json.dumps({
                "watches": self._watches, "canaries": self._canaries, "champions": self._champions})}))

    # -- live rates --------------------------------------------------------------------

    def _observe(self, model: str, version: str, y: np.ndarray) -> None:
        d = self._live.setdefault((model, version), collections.deque())
        d.append((int(y.size), int(y.sum())))
        total = sum(n for n, _ in d)
        while len(d) > 1 and total - d[0][0] >= self.config.promotion.baseline_events:
            total -= d.popleft()[0]

    def _live_rate(self, model: str, version: str | None) -> tuple[float, int] | None:
        d = self._live.get((model, version or ""))
        if not d:
            return None
        n = sum(x for x, _ in d)
        k = sum(x for _, x in d)
        return (k / n, n) if n else None

    # -- after a job ---------------------------------------------------------------------

    def _check_fence(self) -> None:
        """Before an alias moves (no transaction takes that back): raises `FencedOut`
        when a newer leader has started."""
        if self._state is not None:
            self._state.check_fence()

    def _gate_stored_jobs(self) -> bool:
        """Gate every succeeded job's challenger not gated yet, and mark it.

        The job store is the queue: a leader that dies between a job's end and its
        gate leaves the job ungated for the next one. Dying after the gate and before
        the mark gates it again, which decides ``already_champion`` or the same "keep"
        (the gate is deterministic on the job's report) and moves no alias. A registry
        that cannot be reached raises here and the job waits for the next step.
        """
        if self._job_store is None:
            return False
        done = False
        for record in self._job_store.ungated():
            version = (record.result or {}).get("model_version")
            if version:
                self._after_job({"model": record.model, "version": str(version),
                                 "job_id": record.job_id})
            self._job_store.mark_gated(record.job_id)
            done = True
        return done

    def _after_job(self, job: dict[str, Any]) -> None:
        model, version = job["model"], job["version"]
        if not self.config.promotion.auto:
            log.info("promotion.auto is off: the challenger waits for a person",
                     extra={"fields": {"model": model, "version": version}})
            return
        raw = self.registry.download_artifact(model, version, REPORT_PATH)
        if raw is None:
            log.error("the challenger has no evaluation report: not promoted",
                      extra={"fields": {"model": model, "version": version, "path": REPORT_PATH}})
            return
        report = EvaluationReport.from_dict(json.loads(raw))
        previous = self.registry.version_by_alias(model, CHAMPION)
        try:
            self._check_fence()
            outcome = self.promoter.decide_and_promote(model, version, report, self.gate, who="driftloop",
                                                       evidence={"job_id": job["job_id"]})
        except (PromotionError, RegistryError) as exc:
            log.error("promotion failed; the aliases are as the error says",
                      extra={"fields": {"model": model, "version": version, "error": str(exc)}})
            return
        d = outcome.decision
        if self.metrics is not None:
            self.metrics.gate_decisions.labels(model, "promote" if d.promote else "keep", d.code).inc()
        log.info(f"gate: {d.reason}", extra={"fields": {
            "model": model, "version": version, "promote": d.promote, "code": d.code}})
        if outcome.promoted:
            self._promoted(model, version, previous, why=d.reason, by="gate")

    def _promoted(self, model: str, version: str, previous: str | None, *, why: str, by: str) -> None:
        """Start the watch, notify, and remember the champion we now expect."""
        if self.metrics is not None and by in ("gate", "canary"):
            self.metrics.alias_moves.labels(model, f"promote:{by}").inc()
        self._champions[model] = version
        self._canaries.pop(model, None)
        now_ms = int(self.clock() * 1000)
        base = self._live_rate(model, previous)
        pc = self.config.promotion
        if previous is not None and base is not None and 0.0 < base[0] < 1.0:
            watch = PromotionWatch(base[0], arl0=pc.watch_arl0_events, max_events=pc.watch_events)
            self._watches[model] = {"version": version, "previous": previous, "baseline_events": base[1],
                                    "since_ms": now_ms, "watch": watch.state_dict()}
            watching = f"; watching its live rate against {base[0]:.4g} ({base[1]} events of v{previous})"
        else:
            watching = "; no live baseline of a previous champion, so no watch"
        self.submit(signals=[Signal(
            "model_promoted", model, f"champion:{version}", True, now_ms, now_ms, Severity.INFO,
            summary=f"{model} v{version} is the champion ({by}: {why}){watching}",
            evidence={"version": version, "previous": previous, "by": by})],
            resolve=[(f"model_promoted/{model}/champion:{version}", now_ms, {"version": version})])

    # -- the watch -------------------------------------------------------------------------

    def _watch(self, model: str, by_version: dict[str, np.ndarray]) -> bool:
        w = self._watches.get(model)
        if w is None or w["version"] not in by_version:
            return False
        watch = PromotionWatch.from_state_dict(w["watch"])
        result = watch.update(by_version[w["version"]])
        w["watch"] = watch.state_dict()
        if result.state == "watching":
            return True
        del self._watches[model]
        now_ms = int(self.clock() * 1000)
        fp = f"model_rollback/{model}/champion"
        if result.state == "held":
            log.info("the promotion held: its live rate did not drop", extra={"fields": {
                "model": model, "version": w["version"], **result.to_dict()}})
            self.submit(resolve=[(fp, now_ms, {"version": w["version"], "held": result.to_dict()})])
            return True
        why = (f"live {result.observed_rate:.4g} below the previous champion's {result.baseline_rate:.4g} "
               f"after {result.events} events (sequential test, drop of about "
               f"{max(result.detected_drops or (0.0,)):.0%})")
        try:
            self._check_fence()
            self.promoter.rollback(model, who="driftloop", why=why, evidence=result.to_dict())
        except (PromotionError, RegistryError) as exc:
            log.error("rollback failed", extra={"fields": {"model": model, "error": str(exc)}})
            self._watches[model] = w  # try again with the next window
            return True
        self._champions[model] = w["previous"]
        if self.metrics is not None:
            self.metrics.alias_moves.labels(model, "rollback").inc()
        self.submit(signals=[Signal(
            "model_rollback", model, "champion", True, w["since_ms"], now_ms, Severity.CRITICAL,
            summary=f"{model} v{w['version']} rolled back to v{w['previous']}: {why}",
            evidence={"version": w["version"], "restored": w["previous"], **result.to_dict()})])
        return True

    # -- the canary ------------------------------------------------------------------------

    def _canary(self, model: str, by_version: dict[str, np.ndarray]) -> bool:
        pc = self.config.promotion
        if not pc.canary or model in self._watches:
            return False
        champion = self._champions.get(model)
        c = self._canaries.get(model)
        if c is None:
            others = [v for v in by_version if v != champion]
            if champion is None or champion not in by_version or not others:
                return False
            c = {"challenger": others[0], "test": CanaryTest(
                (champion, others[0]), alpha=pc.canary_alpha, min_events=pc.canary_min_events).state_dict()}
            self._canaries[model] = c
            log.info("canary: two versions serving at once; comparing them live", extra={"fields": {
                "model": model, "champion": champion, "challenger": others[0]}})
        test = CanaryTest.from_state_dict(c["test"])
        result = test.update(by_version)
        c["test"] = test.state_dict()
        if result.winner is None:
            return True
        del self._canaries[model]
        challenger = c["challenger"]
        if result.winner != challenger:
            log.info("canary: the champion is significantly better; the challenger stays",
                     extra={"fields": {"model": model, **result.to_dict()}})
            return True
        why = (f"canary: v{challenger} {result.rates[challenger]:.4g} vs champion v{champion} "
               f"{result.rates[str(champion)]:.4g}, mSPRT {result.statistic:.3g} >= {result.threshold:.3g}")
        try:
            self._check_fence()
            self.promoter.promote(model, challenger, who="driftloop-canary", why=why,
                                  evidence=result.to_dict(), expected_champion=champion)
        except (PromotionError, RegistryError) as exc:
            log.error("canary promotion failed", extra={"fields": {"model": model, "error": str(exc)}})
            return True
        self._promoted(model, challenger, champion, why=why, by="canary")
        return True

    # -- promotions made elsewhere ---------------------------------------------------------

    def _poll_champions(self) -> bool:
        changed = False
        for model in sorted({m for m, _ in self._live} | set(self._champions)):
            try:
                current = self.registry.version_by_alias(model, CHAMPION)
            except RegistryError as exc:
                log.warning("promotion: cannot read the champion alias", extra={"fields": {
                    "model": model, "error": str(exc)}})
                continue
            known = self._champions.get(model, "<unknown>")
            if current == known:
                continue
            if known != "<unknown>" and current is not None:
                previous = self.registry.version_by_alias(model, PREVIOUS)
                moves = self.history.moves(model, limit=1, alias=CHAMPION)
                by = moves[0].who if moves else "someone outside driftloop"
                log.info("the champion moved outside this daemon: watching it", extra={"fields": {
                    "model": model, "version": current, "previous": previous, "by": by}})
                self._promoted(model, current, previous, why=f"moved by {by}", by=by)
            self._champions[model] = current
            changed = True
        return changed

    def status(self) -> dict[str, Any]:
        models = sorted({m for m, _ in self._live} | set(self._champions))
        return {
            "last_error": self.last_error,
            "champions": dict(self._champions),
            "watches": {m: {k: v for k, v in w.items() if k != "watch"}
                        | {"events": w["watch"]["events"], "state": w["watch"]["state"]}
                        for m, w in dict(self._watches).items()},
            "canaries": {m: {"challenger": c["challenger"], "events": c["test"]["n"]}
                         for m, c in dict(self._canaries).items()},
            "history": {m: [mv.to_dict() for mv in self._history_reader().moves(m, limit=10)]
                        for m in models},
        }

    def _history_reader(self) -> AliasHistory:
        # Its own connection: status runs on the HTTP server's threads.
        if self._status_history is None:
            self._status_history = AliasHistory(history_location(self.config))
        return self._status_history
