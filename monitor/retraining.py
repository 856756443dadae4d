"""Retraining inside the daemon: incidents, the schedule and people in; training jobs out.

The pieces are in retrain/ (the policy, the launchers, the job tracker, the schedule);
this module wires them to the daemon (docs/retraining.md):

* **incidents**: the incident log (``incident_events``) is read behind a cursor of
  its own, so every firing or escalated incident is seen once, also across restarts;
* **the schedule**: per-model cron expressions from ``retrain.schedule``, kept in an
  APScheduler job store next to the state, so missed runs are known after a restart;
* **people**: ``driftloop retrain MODEL`` (POST /retrain).

Every trigger goes to the policy, and every answer, "no" included, is stored with its
reason (``/status`` shows the latest). A "yes" becomes a `JobSpec` over the newest
matured data and a job the tracker launches, watches and times out. A job that fails,
times out or is lost becomes a ``training_failed`` incident (paged like any other);
the next job that succeeds resolves it.

All of it runs on one thread of its own: a launch or a slow registry never delays
ingestion or the statistics.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connectors.registry import ModelRegistry, RegistryError
from connectors.state import FencedOut, MonitorCommit, StateStore
from connectors.summaries import SummaryStore
from monitor.config import Config
from monitor.incidents import Incident, Severity, Signal
from monitor.join import JoinSpec, matured_upto
from monitor.metrics import Metrics
from retrain.jobs import JobEvent, JobTracker, SqlJobStore
from retrain.launch import KubernetesLauncher, Launcher, LocalLauncher, TorchrunLauncher
from retrain.policy import Decision, PolicySpec, RetrainPolicy
from retrain.schedule import RetrainSchedule
from retrain.spec import JobSpec, Trigger

__all__ = ["CURSOR_KEY", "FAILED_KIND", "RetrainController", "build_launcher", "job_store_location",
           "schedule_store_url", "schedule_table"]

log = logging.getLogger(__name__)

#: The ``monitor_state`` key of the last incident event looked at for triggers.
CURSOR_KEY = "retrain/upto_seq"
#: The incident kind of a training run that did not produce a model.
FAILED_KIND = "training_failed"
#: Incidents about retraining and promotion themselves: never a reason to retrain.
_OWN_KINDS = frozenset({FAILED_KIND, "model_promoted", "model_rollback"})
#: The alias whose version a job warm-starts from.
CHAMPION = "champion"


def build_launcher(config: Config) -> Launcher:
    rc = config.retrain
    if rc.launcher == "torchrun":
        return TorchrunLauncher(rc.torchrun_nproc_per_node, module=rc.entry_module)
    if rc.launcher == "kubernetes":
        k = rc.kubernetes
        return KubernetesLauncher(k.namespace, k.image, gpus=k.gpus, service_account=k.service_account)
    return LocalLauncher(module=rc.entry_module)


def job_store_location(config: Config) -> str | Path:
    """Where the jobs are kept: the cluster's PostgreSQL database when the state store is
    one (the next leader must see every job the last one started), else a SQLite file
    beside the job directories."""
    if config.storage.state_url:  # always PostgreSQL (monitor/config.py checks it)
        return config.storage.state_url
    rc = config.retrain
    return (Path(rc.workdir) if rc.workdir else Path(config.storage.data_dir) / "jobs") / "jobs.db"


def schedule_table(config: Config) -> str:
    """The schedule's table: one per consumer group on a shared PostgreSQL database (two
    deployments there must not run each other's crons), the old name in a file."""
    if not config.storage.state_url:
        return "driftloop_schedule"
    group = config.kafka.group_id
    digest = hashlib.sha256(group.encode()).hexdigest()[:8]
    return f"driftloop_schedule_{re.sub(r'[^a-z0-9]+', '_', group.lower())[:30]}_{digest}"


def schedule_store_url(config: Config, workdir: Path) -> str:
    """The APScheduler job store's SQLAlchemy URL: shared with the state store on
    PostgreSQL (a new leader knows what the last one already ran), a file otherwise."""
    url = config.storage.state_url
    if url:
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return f"sqlite:///{(workdir / 'schedule.sqlite').resolve()}"


class RetrainController:
    """Args:
        config: the daemon's configuration (``retrain``, ``monitor``, ``kafka``, ...).
        registry: the model registry (the champion to warm-start from).
        submit: hands signals and resolutions to the analysis stage, the one writer of
            incidents (`monitor.analysis.Analysis.submit`); a job's outcome counts as
            reported when its ``on_committed`` is called.
        launcher: how jobs run; built from the config when omitted.
        clock: seconds since the epoch.
        metrics: where decisions and finished jobs are counted (the daemon's).
    """

    def __init__(self, config: Config, *, registry: ModelRegistry,
                 submit: Callable[..., None], launcher: Launcher | None = None,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None) -> None:
        rc = config.retrain
        self.config = config
        self.registry = registry
        self.submit = submit
        self.clock = clock
        self.metrics = metrics
        self.policy = RetrainPolicy(PolicySpec(
            incident_kinds=frozenset(rc.incident_kinds), min_severity=rc.min_severity,
            cooldown_ms=int(rc.cooldown_seconds * 1000), min_fresh_labels=rc.min_fresh_labels,
            max_jobs_per_day=rc.max_jobs_per_day, manual_bypasses_cooldown=rc.manual_bypasses_cooldown))
        self.workdir = Path(rc.workdir) if rc.workdir else Path(config.storage.data_dir) / "jobs"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jobs = SqlJobStore(job_store_location(config), group_id=config.kafka.group_id)
        #: The replicas' clocks (cluster.enabled): what is final is the group's to say.
        self._group = (SummaryStore(config.storage.state_url or config.storage.state_path,
                                    group_id=config.kafka.group_id)
                       if config.cluster.enabled else None)
        self.tracker = JobTracker(self.jobs, launcher or build_launcher(config), workdir=self.workdir,
                                  clock=clock)
        self.join = JoinSpec(attribution_ms=config.monitor.attribution_seconds * 1000,
                             label_types=tuple(config.monitor.label_types),
                             window_ms=config.windows.size_seconds * 1000)
        self._requests: queue.Queue[Trigger] = queue.Queue()
        #: Jobs whose outcome the analysis thread committed (`_finished`'s acknowledgement).
        self._committed: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retrain", daemon=True)
        self.last_error: str | None = None
        self.schedule: RetrainSchedule | None = None
        if rc.schedule:
            self.schedule = RetrainSchedule(schedule_store_url(config, self.workdir), self.request,
                                            clock=clock, name=f"retrain-{id(self)}",
                                            tablename=schedule_table(config))
            for model in list(self.schedule.crons()):
                if model not in rc.schedule:  # removed from the config since the last start
                    self.schedule.remove(model)
            for model, expression in rc.schedule.items():
                try:
                    self.schedule.set_cron(model, expression)
                except ValueError as exc:
                    msg = f"retrain.schedule.{model}: {exc}"
                    raise ValueError(msg) from None

    # -- inputs ----------------------------------------------------------------------

    def request(self, trigger: Trigger) -> None:
        """A trigger from another thread (the schedule, the HTTP server)."""
        self._requests.put(trigger)
        self._wakeup.set()

    def manual(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /retrain: ``{"model": "ctr", "reason": "...", "who": "alice"}``."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return 400, {"error": "model is required: the registered model to retrain"}
        reason = str(body.get("reason") or "asked by a person")
        who = str(body.get("who") or "unknown")
        self.request(Trigger(kind="manual", model=model, reason=reason, who=who,
                             at_ms=int(self.clock() * 1000)))
        return 202, {"accepted": True, "model": model,
                     "note": "the decision (and the job, if any) shows in /status under retrain"}

    # -- the loop ----------------------------------------------------------------------

    def start(self, state: StateStore) -> None:
        """Start the thread; ``state`` is a state-store connection for it alone."""
        self._state = state
        for r in self.tracker.resume():
            log.info("training job re-attached after restart", extra={"fields": {
                "job": r.job_id, "model": r.model, "state": r.state}})
        if self.schedule is not None:
            self.schedule.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop deciding. Running jobs go on (they run in their own sessions or pods) and
        are re-attached by the next start."""
        self._stop.set()
        self._wakeup.set()
        if self.schedule is not None:
            self.schedule.shutdown(wait=False)
        self._thread.join(timeout=10)
        self.jobs.close()
        if self._group is not None:
            self._group.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(self._state)
                self.last_error = None
            except FencedOut as exc:
                # A newer leader decides now; the daemon is stopping (docs/scale-out.md).
                self.last_error = str(exc)
                log.error("retraining stops: a newer leader has started", extra={"fields": {
                    "error": str(exc)}})
                return
            except Exception as exc:  # a full disk, a broken store: say so, retry
                self.last_error = repr(exc)
                log.exception("retraining step failed; retrying")
            self._wakeup.wait(timeout=2.0)
            self._wakeup.clear()

    def step(self, state: StateStore) -> list[Decision]:
        """One round: new triggers decided, jobs polled. Returns the decisions made."""
        decisions = []
        triggers, upto_seq = self._incident_triggers(state)
        for trigger, severity in triggers:
            decisions.append(self._decide(state, trigger, severity))
        if upto_seq is not None:
            # After the decisions are stored: a crash in between decides the same incidents
            # again, and the policy then sees the job the first decision started.
            state.commit_monitor(MonitorCommit(values={CURSOR_KEY: str(upto_seq)}))
        while True:
            try:
                trigger = self._requests.get_nowait()
            except queue.Empty:
                break
            decisions.append(self._decide(state, trigger, None))
        for event in self.tracker.poll():
            self._finished(event)
        if self.metrics is not None:
            self.metrics.retrain_jobs_running.set(len(self.jobs.active()))
        done = []
        while True:
            try:
                done.append(self._committed.get_nowait())
            except queue.Empty:
                break
        if done:
            self.tracker.reported(done)
        return decisions

    def _incident_triggers(self, state: StateStore) -> tuple[list[tuple[Trigger, str]], int | None]:
        raw = state.monitor_value(CURSOR_KEY)
        cursor = 0 if raw is None else int(raw)
        events = state.incident_events(after_seq=cursor, limit=1000)
        out = []
        for _seq, _iid, transition, at_ms, body in events:
            if transition not in ("firing", "escalated"):
                continue
            inc = Incident.from_json(body)
            if inc.kind in _OWN_KINDS:  # retraining's and promotion's own outcomes
                continue
            out.append((Trigger(kind="incident", model=inc.model, reason=inc.summary or inc.fingerprint,
                                at_ms=at_ms, incident_id=inc.id, incident_kind=inc.kind), inc.severity))
        return out, (events[-1][0] if events else None)

    # -- deciding ----------------------------------------------------------------------

    def _fresh_labels(self, state: StateStore, model: str, upto: int | None) -> int:
        """Matured predictions since the model's last successful run's window (or ever).

        Counted from the segment registry (rows per window), so it costs no file read;
        it counts every model's predictions in those windows, an upper bound for one
        model when several share the topics.
        """
        if upto is None:
            return 0
        since = None
        for r in self.jobs.jobs(model=model):
            if r.state == "succeeded":
                since = max(since or 0, r.spec.data_end_ms)
        topic = self.config.kafka.predictions_topic
        total = 0
        for w in state.segment_windows(topic, None if since is None else since - 1, upto):
            if since is not None and w < since:
                continue
            total += sum(s.rows for s in state.segments_of_window(topic, w))
        return total

    def _closed_upto(self, state: StateStore, topic: str) -> int | None:
        """How far ``topic``'s windows are final: this daemon's clock alone, or with
        several replicas the group's (the least of every stakeholder's), since the
        leader may own no partition of the topic at all."""
        if self._group is None:
            return state.closed_upto(topic)
        return self._group.view(topic).closed_upto()

    def _matured_upto(self, state: StateStore) -> int | None:
        pred = self._closed_upto(state, self.config.kafka.predictions_topic)
        fb = matured_upto(self.join, self._closed_upto(state, self.config.kafka.feedback_topic))
        if pred is None or fb is None:
            return None
        return min(pred, fb)

    def _decide(self, state: StateStore, trigger: Trigger, severity: str | None) -> Decision:
        now_ms = int(self.clock() * 1000)
        upto = self._matured_upto(state)
        jobs_today, seconds_today = self.tracker.jobs_since(self.policy.budget_since_ms(now_ms))
        decision = self.policy.decide(
            trigger, now_ms=now_ms, severity=severity, running=self.tracker.running(trigger.model),
            last_started_ms=self.tracker.last_started_ms(trigger.model),
            fresh_labels=self._fresh_labels(state, trigger.model, upto), jobs_today=jobs_today,
            seconds_today=seconds_today)
        job_id = None
        if decision.launch and upto is None:
            decision = Decision(launch=False, code="no_data", trigger=trigger, at_ms=now_ms,
                                reason="no_data: no prediction window has matured labels yet")
        if decision.launch and upto is not None:
            try:
                spec = self._spec(trigger, upto, now_ms)
            except RegistryError as exc:
                decision = Decision(launch=False, code="registry", trigger=trigger, at_ms=now_ms,
                                    reason=f"registry: cannot read {trigger.model}@{CHAMPION}: {exc}")
            else:
                # Not undone by any rollback: a leader whose epoch is over launches nothing.
                state.check_fence()
                record = self.tracker.start(spec)
                job_id = record.job_id
        self.jobs.record_decision(decision, job_id=job_id)
        if self.metrics is not None:
            self.metrics.retrain_decisions.labels(trigger.model, decision.code).inc()
        level = logging.INFO if decision.launch else logging.WARNING if decision.code == "registry" \
            else logging.INFO
        log.log(level, f"retrain decision: {decision.reason}", extra={"fields": {
            "model": trigger.model, "trigger": trigger.kind, "launch": decision.launch,
            "code": decision.code, "job": job_id, "incident": trigger.incident_id}})
        return decision

    def _spec(self, trigger: Trigger, upto: int, now_ms: int) -> JobSpec:
        rc = self.config.retrain
        base = self.registry.version_by_alias(trigger.model, CHAMPION)
        start = max(0, upto - int(rc.window_seconds * 1000))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_ms / 1000))
        mon = self.config.monitor
        return JobSpec(
            job_id=f"{trigger.model}-{stamp}-{secrets.token_hex(2)}"[:128], model=trigger.model,
            base_version=base, data_start_ms=start, data_end_ms=upto,
            store=self.config.storage.store_url or str(self.config.storage.store_path.resolve()),
            tracking_uri=str(self.config.mlflow.tracking_uri), trigger=trigger,
            label=mon.primary, label_types=tuple(mon.label_types),
            attribution_ms=mon.attribution_seconds * 1000, params=dict(rc.params),
            search_trials=rc.search_trials, seed=rc.seed, budget_s=rc.budget_seconds,
            trainer=rc.trainer, min_rows=rc.min_rows, device=rc.device)

    # -- results -----------------------------------------------------------------------

    def _finished(self, event: JobEvent) -> None:
        if self.metrics is not None:
            self.metrics.retrain_jobs_finished.labels(event.model, event.state).inc()
        fingerprint = f"{FAILED_KIND}/{event.model}/training"
        end = event.finished_ms or int(self.clock() * 1000)
        result = dict(event.result or {})
        evidence = {"job_id": event.job_id, "state": event.state, "reason": event.reason,
                    "exit_code": event.exit_code, "trigger": event.trigger.kind,
                    "code": result.get("code"), "model_version": result.get("model_version"),
                    "run_id": result.get("run_id")}
        def committed() -> None:  # on the analysis thread
            self._committed.put(event.job_id)
            self._wakeup.set()

        if event.failed:
            log.error("training job did not produce a model", extra={"fields": evidence})
            self.submit(on_committed=committed, signals=[Signal(
                FAILED_KIND, event.model, "training", True, event.started_ms, end, Severity.WARNING,
                summary=(f"training job {event.job_id} {event.state}: "
                         f"{(result.get('reason') or event.reason)[:300]}"),
                evidence=evidence)])
        else:
            # The promotion gate finds the challenger in the job store itself
            # (`SqlJobStore.ungated`), whichever replica leads when it looks.
            log.info("training job registered a challenger", extra={"fields": evidence})
            self.submit(on_committed=committed, resolve=[(fingerprint, end, evidence)])

    def status(self) -> dict[str, Any]:
        jobs = self.jobs.jobs()
        return {
            "last_error": self.last_error,
            "running": [{"job_id": r.job_id, "model": r.model, "state": r.state,
                         "started_ms": r.started_ms, "trigger": r.spec.trigger.kind}
                        for r in jobs if r.state in ("pending", "running")],
            "recent_jobs": [{"job_id": r.job_id, "model": r.model, "state": r.state,
                             "started_ms": r.started_ms, "finished_ms": r.finished_ms,
                             "reason": r.reason, "version": (r.result or {}).get("model_version")}
                            for r in jobs[:20]],
            "decisions": [{**d.decision.to_dict(), "job_id": d.job_id} for d in self.jobs.decisions(20)],
            "schedule": {} if self.schedule is None else {
                m: {"cron": c[0], "next_run_ms": self.schedule.next_run_ms(m)}
                for m, c in self.schedule.crons().items()},
        }
