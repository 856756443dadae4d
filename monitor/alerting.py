"""Alert delivery: incident transitions -> a durable outbox -> the sinks, once, in order.

The analysis stage appends every incident transition to ``incident_events`` in the
same transaction as the incident itself (connectors/state.py). This module reads that
log behind a cursor and delivers it (docs/alerts.md has the whole story):

1. **fill** (one thread): new events are grouped (the transitions of one model
   committed within ``group_wait`` of each other make one message), routed (each
   sink's minimum severity and kinds) and written to ``alert_outbox``, one row per
   (message, sink), *together with the cursor*, in one transaction. Nothing is sent
   that is not in the outbox first, and a crash before the commit only repeats the
   fill (rows have deterministic ids, the cursor moves by compare-and-set).
2. **deliver** (one thread per sink, each with its own SQLite connection): the sink's
   oldest pending row is sent; success marks it delivered, a retryable failure
   schedules the next attempt (exponential backoff with jitter, at least the
   receiver's Retry-After), a rejection or an age beyond ``give_up_after`` gives up,
   recorded in the row and counted. A sink's rows go out strictly in order, so a
   ``resolved`` never overtakes its ``firing``; a per-sink token bucket caps the rate.

Delivery is at-least-once: a crash between a receiver's 2xx and the row's update
sends that message again after the restart, with the same idempotency key (the
webhook-id; PagerDuty's dedup_key; Alertmanager's labels), so receivers see it once.
Nothing here runs on the ingestion thread, and no transaction is held across a send:
a receiver that hangs costs its own sink thread, nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgspec

from connectors.alerts import (
    PAGERDUTY_EVENTS_URL,
    AlertBatch,
    AlertItem,
    AlertmanagerSink,
    DeliveryError,
    PagerDutySink,
    RejectedDelivery,
    RetryableDelivery,
    Secret,
    SlackSink,
    WebhookSink,
    decode_signing_keys,
)
from connectors.state import OutboxRow, StateLocation, StateStore, open_state_store
from monitor.incidents import Incident, Severity
from monitor.metrics import Metrics
from monitor.reports import incident_path

__all__ = [
    "CURSOR_KEY",
    "AlertDispatcher",
    "AlertSink",
    "ArchiveSink",
    "DeliverySpec",
    "ReportArchive",
    "Route",
    "Slot",
    "TokenBucket",
    "backoff_seconds",
    "build_dispatcher",
    "item_from_incident",
    "plan_batches",
]

log = logging.getLogger(__name__)

#: The ``monitor_state`` key of the last incident event turned into outbox rows.
CURSOR_KEY = "alerts/upto_seq"
#: Incident kinds that are notifications rather than problems (docs/promotion.md).
NOTIFICATION_KINDS = frozenset({"model_promoted"})
#: The outbox name of the model registry's report archive.
ARCHIVE_SINK = "mlflow-reports"
#: Incident events read per fill transaction.
FILL_BATCH = 500
#: Evidence values copied into an alert (the rest stays in the report).
MAX_FACTS = 12


class AlertSink(Protocol):
    """One receiver: one attempt per `send`, which returns or raises
    `connectors.alerts.DeliveryError` (retryable or rejected)."""

    name: str

    def send(self, batch: AlertBatch) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class RefreshingSink(Protocol):
    """A sink that wants the firing set re-sent while it fires (Alertmanager)."""

    resend_seconds: float

    def refresh(self, batch: AlertBatch) -> None: ...


class ReportArchive(Protocol):
    """Where incident reports are kept next to the model version they are about.

    The MLflow implementation, `connectors.registry.MlflowReportArchive`, keeps the
    report as an artifact of the model version's run and tags the version with the
    incident id; the daemon wires it whenever ``mlflow.tracking_uri`` is set.
    `ArchiveSink` delivers to it through the outbox, so an archive outage is retried
    like any receiver's.
    """

    def archive(self, *, incident_id: str, model: str, version: str | None, transition: str,
                html: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class Route:
    """Which alerts a sink gets: at least ``min_severity``, and one of ``kinds``
    (empty: every kind). A resolve follows its firing: the incident's severity only
    rises, so an incident routed when it fired is routed when it resolves."""

    min_severity: Severity = Severity.WARNING
    kinds: frozenset[str] = frozenset()

    def accepts(self, item: AlertItem) -> bool:
        if item.kind in NOTIFICATION_KINDS:
            # Notifications (a promotion) are informational by nature; a sink that takes
            # every kind gets them whatever its minimum severity.
            return not self.kinds or item.kind in self.kinds
        try:
            severity = Severity.parse(item.severity)
        except ValueError:
            severity = Severity.CRITICAL  # unknown: err on the side of paging
        return severity >= self.min_severity and (not self.kinds or item.kind in self.kinds)


@dataclasses.dataclass(frozen=True)
class DeliverySpec:
    """Timing of the outbox (``alerts.*`` in the config)."""

    group_wait_ms: int = 5_000
    give_up_after_ms: int = 24 * 3_600_000
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    poll_s: float = 1.0
    retention_ms: int = 7 * 24 * 3_600_000

    def __post_init__(self) -> None:
        if self.group_wait_ms < 0:
            msg = f"group_wait_ms must be >= 0, got {self.group_wait_ms}"
            raise ValueError(msg)
        for name in ("give_up_after_ms", "backoff_initial_s", "backoff_max_s", "poll_s",
                     "retention_ms"):
            if getattr(self, name) <= 0:
                msg = f"{name} must be > 0, got {getattr(self, name)}"
                raise ValueError(msg)


class TokenBucket:
    """``per_minute`` sends a minute on average, in bursts of at most ``burst``.

    Example:
        >>> t = [0.0]
        >>> b = TokenBucket(60, burst=2, clock=lambda: t[0])
        >>> b.take(), b.take(), round(b.take(), 3)
        (0.0, 0.0, 1.0)
        >>> t[0] = 1.0; b.take()
        0.0
    """

    def __init__(self, per_minute: float, *, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            msg = f"rate must be > 0 per minute, got {per_minute}"
            raise ValueError(msg)
        self.rate = per_minute / 60.0
        self.burst = max(1.0, burst if burst is not None else min(per_minute, 10.0))
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> float:
        """Take a token and return 0.0, or return the seconds until one is available."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


def backoff_seconds(attempts: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Delay before attempt ``attempts + 1``: ``initial * 2**(attempts-1)``, capped at
    ``maximum``, times a uniform jitter in [0.5, 1] so that many messages failing at
    once do not retry in lockstep ("equal jitter", keeps at least half the backoff)."""
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return base * rng.uniform(0.5, 1.0)


def _facts(evidence: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in evidence.items():
        if k == "version" or isinstance(v, list | dict | tuple):
            continue
        if isinstance(v, float) and v != v:  # NaN is not JSON
            v = None
        out[k] = v
        if len(out) >= MAX_FACTS:
            break
    return out


def item_from_incident(inc: Incident, transition: str, seq: int) -> AlertItem:
    version = inc.evidence.get("version") or inc.opening_evidence.get("version")
    return AlertItem(
        seq=seq, transition=transition, incident_id=inc.id, fingerprint=inc.fingerprint,
        kind=inc.kind, model=inc.model, subject=inc.subject, severity=inc.severity,
        summary=inc.summary, opened_ms=inc.opened_ms, updated_ms=inc.updated_ms,
        resolved_ms=inc.resolved_ms, version=None if version is None else str(version),
        facts=_facts(inc.evidence or inc.opening_evidence), path=incident_path(inc.id))


def plan_batches(events: Sequence[tuple[int, str, str, int, str]], *, group_wait_ms: int,
                 now_ms: int) -> tuple[list[tuple[int, list[AlertItem]]], int | None]:
    """Group incident events into messages; returns ([(created_ms, items)], last seq used).

    A message holds the transitions of one model whose commit times (``at_ms``) lie
    within ``group_wait_ms`` of its first one, and is made only once that first one
    is ``group_wait_ms`` old, so the later ones have had time to arrive. Events are
    taken as a prefix of the log (the cursor is one number): the first event that
    cannot be placed yet stops the plan. One incident appears at most once per
    message; a second transition of it starts the model's next message.
    """
    open_groups: dict[str, tuple[int, list[AlertItem]]] = {}
    done: list[tuple[int, list[AlertItem]]] = []
    upto: int | None = None
    for seq, _iid, transition, at_ms, body in events:
        inc = Incident.from_json(body)
        item = item_from_incident(inc, transition, seq)
        g = open_groups.get(inc.model)
        if (g is not None and at_ms - g[0] <= group_wait_ms
                and all(i.incident_id != inc.id for i in g[1])):
            g[1].append(item)
        elif at_ms <= now_ms - group_wait_ms:
            if g is not None:
                done.append(g)
            open_groups[inc.model] = (at_ms, [item])
        else:
            break
        upto = seq
    done.extend(open_groups.values())
    done.sort(key=lambda g: g[1][0].seq)
    return done, upto


def message_id(source: str, sink: str, items: Iterable[AlertItem]) -> str:
    """Deterministic: the same events for the same sink always make the same id."""
    seqs = ",".join(str(i.seq) for i in items)
    return "dl_" + hashlib.sha256(f"{source}\n{sink}\n{seqs}".encode()).hexdigest()[:32]


@dataclasses.dataclass
class Slot:
    """A sink with its route and rate limit, and its thread's bookkeeping."""

    sink: AlertSink
    route: Route = dataclasses.field(default_factory=Route)
    limiter: TokenBucket | None = None
    kind: str = "custom"
    wakeup: threading.Event = dataclasses.field(default_factory=threading.Event)
    last_refresh: float = 0.0
    pending: int = 0
    oldest_pending_ms: int | None = None
    last_error: str | None = None
    last_delivered_ms: int | None = None

    @property
    def name(self) -> str:
        return self.sink.name


class AlertDispatcher:
    """Fills the outbox from the incident log and delivers it, on threads of its own.

    Args:
        spec: timing.
        slots: the sinks, each with its route and rate limit.
        open_state: opens a new state-store connection (one per thread).
        metrics: the daemon's metrics.
        source: the consumer group: part of every idempotency key and dedup_key.
        base_url: prefix of the report links (``alerts.base_url``).
        clock: seconds since the epoch.

    `fill` and `deliver_step` are the synchronous core (tests drive them directly);
    `start` runs them on threads until `stop`.
    """

    def __init__(self, spec: DeliverySpec, slots: Sequence[Slot], open_state: Callable[[], StateStore],
                 metrics: Metrics, *, source: str, base_url: str = "",
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            msg = f"sink names must be unique, got {names}"
            raise ValueError(msg)
        self.spec = spec
        self.slots = list(slots)
        self.open_state = open_state
        self.metrics = metrics
        self.source = source
        self.base_url = base_url
        self._clock = clock
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._fill_wakeup = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_prune = 0.0
        self.last_error: str | None = None

    # -- fill ----------------------------------------------------------------------

    def fill(self, state: StateStore) -> int:
        """Turn new incident events into outbox rows; returns how many rows were added."""
        added = 0
        while True:
            now_ms = int(self._clock() * 1000)
            raw = state.monitor_value(CURSOR_KEY)
            cursor = None if raw is None else int(raw)
            events = state.incident_events(after_seq=cursor or 0, limit=FILL_BATCH)
            if not events:
                return added
            groups, upto = plan_batches(events, group_wait_ms=self.spec.group_wait_ms, now_ms=now_ms)
            if upto is None:
                return added
            rows = []
            for created_ms, items in groups:
                stale = now_ms - created_ms >= self.spec.give_up_after_ms
                for slot in self.slots:
                    chosen = tuple(i for i in items if slot.route.accepts(i))
                    if not chosen:
                        continue
                    if stale:
                        # Older than the give-up age already (a daemon down for days, or
                        # sinks configured for the first time on an old store): never
                        # page about it, but count it.
                        self.metrics.alerts_given_up.labels(slot.name, "stale").inc()
                        continue
                    mid = message_id(self.source, slot.name, chosen)
                    batch = AlertBatch(id=mid, source=self.source, model=chosen[0].model,
                                       created_ms=created_ms, items=chosen)
                    rows.append(OutboxRow(mid, slot.name, chosen[0].seq, batch.to_json(),
                                          created_ms, next_attempt_ms=now_ms))
            if not state.outbox_fill(rows, cursor_key=CURSOR_KEY, expected=cursor, upto=upto):
                log.warning("another dispatcher moved the alert cursor; this one stands back "
                            "for this round (run alert delivery on one replica only)")
                return added
            added += len(rows)
            if rows:
                log.info("alerts enqueued", extra={"fields": {
                    "messages": len(rows), "upto_seq": upto,
                    "sinks": sorted({r.sink for r in rows})}})
            if upto != events[-1][0] or len(events) < FILL_BATCH:
                return added

    # -- deliver -------------------------------------------------------------------

    def deliver_step(self, slot: Slot, state: StateStore) -> float:
        """One attempt at ``slot``'s oldest pending message, if it is due.

        Returns the seconds to wait before the next step (0: go on at once).
        """
        pending = state.outbox_pending(slot.name, 1)
        now = self._clock()
        now_ms = int(now * 1000)
        if not pending:
            return self._refresh(slot, state, now)
        row = pending[0]
        age_ms = now_ms - row.created_ms
        if age_ms >= self.spec.give_up_after_ms:
            self._give_up(state, slot, row, now_ms, "age",
                          f"undelivered after {row.attempts} attempts and {age_ms / 1000:.0f}s; "
                          f"last error: {row.last_error}")
            return 0.0
        if row.next_attempt_ms > now_ms:
            return (row.next_attempt_ms - now_ms) / 1000
        if slot.limiter is not None:
            wait = slot.limiter.take()
            if wait > 0:
                self.metrics.alerts_rate_limited.labels(slot.name).inc()
                return wait
        attempts = row.attempts + 1
        try:
            batch = msgspec.structs.replace(AlertBatch.from_json(row.payload), base_url=self.base_url)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Written by another version of driftloop, say: no attempt can succeed.
            self._give_up(state, slot, row, now_ms, "invalid", f"unreadable outbox payload: {exc}")
            return 0.0
        try:
            slot.sink.send(batch)
        except RejectedDelivery as exc:
            self.metrics.alert_attempts_failed.labels(slot.name, exc.reason).inc()
            self._give_up(state, slot, row, now_ms, "rejected", str(exc), attempts=attempts)
            return 0.0
        except RetryableDelivery as exc:
            return self._retry_later(state, slot, row, attempts, now_ms, str(exc), exc.reason,
                                     exc.retry_after)
        except Exception as exc:  # a bug of ours (rendering): keep the row, retry, say so
            log.exception("alert sink failed unexpectedly", extra={"fields": {"sink": slot.name}})
            return self._retry_later(state, slot, row, attempts, now_ms,
                                     f"{type(exc).__name__} in sink {slot.name!r}", "error", None)
        done_ms = int(self._clock() * 1000)
        state.outbox_update(row.id, attempts=attempts, delivered_ms=done_ms)
        slot.last_delivered_ms = done_ms
        slot.last_error = None
        self.metrics.alerts_sent.labels(slot.name).inc()
        self.metrics.alert_delivery_latency.labels(slot.name).observe(
            max(0.0, (done_ms - row.created_ms) / 1000))
        log.info("alert delivered", extra={"fields": {
            "sink": slot.name, "message": row.id, "attempts": attempts,
            "incidents": [i.incident_id for i in batch.items]}})
        return 0.0

    def _retry_later(self, state: StateStore, slot: Slot, row: OutboxRow, attempts: int, now_ms: int,
                     error: str, reason: str, retry_after: float | None) -> float:
        delay = backoff_seconds(attempts, initial=self.spec.backoff_initial_s,
                                maximum=self.spec.backoff_max_s, rng=self._rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        # Never later than the give-up time: the next step then records the give-up.
        next_ms = min(now_ms + int(delay * 1000), row.created_ms + self.spec.give_up_after_ms)
        state.outbox_update(row.id, attempts=attempts, next_attempt_ms=next_ms, last_error=error)
        slot.last_error = error
        self.metrics.alert_attempts_failed.labels(slot.name, reason).inc()
        log.warning("alert delivery failed; will retry", extra={"fields": {
            "sink": slot.name, "message": row.id, "attempts": attempts, "error": error,
            "retry_in_s": round((next_ms - now_ms) / 1000, 3)}})
        return max(0.0, (next_ms - now_ms) / 1000)

    def _give_up(self, state: StateStore, slot: Slot, row: OutboxRow, now_ms: int, reason: str,
                 error: str, *, attempts: int | None = None) -> None:
        state.outbox_update(row.id, attempts=row.attempts if attempts is None else attempts,
                            gave_up_ms=now_ms, last_error=error)
        slot.last_error = error
        self.metrics.alerts_given_up.labels(slot.name, reason).inc()
        log.error("alert given up", extra={"fields": {
            "sink": slot.name, "message": row.id, "reason": reason, "error": error}})

    def _refresh(self, slot: Slot, state: StateStore, now: float) -> float:
        sink = slot.sink
        if not isinstance(sink, RefreshingSink):
            return self.spec.poll_s
        due = slot.last_refresh + sink.resend_seconds - now
        if due > 0:
            return min(due, self.spec.poll_s)
        slot.last_refresh = now
        items = []
        for r in state.incidents(status="firing", limit=1000):
            item = item_from_incident(Incident.from_json(r.body), "firing", 0)
            if slot.route.accepts(item):
                items.append(item)
        if not items:
            return self.spec.poll_s
        batch = AlertBatch(id=f"refresh-{int(now)}", source=self.source, model="*",
                           created_ms=int(now * 1000), items=tuple(items), base_url=self.base_url)
        try:
            sink.refresh(batch)
        except DeliveryError as exc:
            reason = getattr(exc, "reason", "error")
            self.metrics.alert_attempts_failed.labels(slot.name, reason).inc()
            slot.last_error = str(exc)
            log.warning("re-sending firing alerts failed; next try in resend_seconds",
                        extra={"fields": {"sink": slot.name, "error": str(exc)}})
        return self.spec.poll_s

    # -- threads -------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._fill_loop, name="alerts-fill", daemon=True)]
        self._threads += [threading.Thread(target=self._sink_loop, args=(s,), name=f"alerts-{s.name}",
                                           daemon=True) for s in self.slots]
        for t in self._threads:
            t.start()
        log.info("alert delivery started", extra={"fields": {
            "sinks": {s.name: getattr(s.sink, "redacted_url", s.kind) for s in self.slots}}})

    def wake(self) -> None:
        """New incident events may be there: fill now rather than at the next poll."""
        self._fill_wakeup.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads. A sink thread inside a send is left to finish on its own
        (it is a daemon thread): what it was sending stays pending in the outbox and
        goes out, with the same idempotency key, after the restart."""
        self._stop.set()
        self._fill_wakeup.set()
        for s in self.slots:
            s.wakeup.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in self.slots:
            if not any(t.is_alive() and t.name == f"alerts-{s.name}" for t in self._threads):
                s.sink.close()

    def _fill_loop(self) -> None:
        state = self.open_state()
        try:
            while not self._stop.is_set():
                try:
                    if self.fill(state):
                        for s in self.slots:
                            s.wakeup.set()
                    self._observe_depth(state)
                    self._prune(state)
                    self.last_error = None
                except Exception as exc:
                    self.last_error = repr(exc)
                    log.exception("alert outbox fill failed; retrying")
                self._fill_wakeup.wait(self.spec.poll_s)
                self._fill_wakeup.clear()
        finally:
            state.close()

    def _sink_loop(self, slot: Slot) -> None:
        state = self.open_state()
        try:
            while not self._stop.is_set():
                try:
                    wait = self.deliver_step(slot, state)
                except Exception as exc:  # the state store itself failing (disk full)
                    slot.last_error = repr(exc)
                    log.exception("alert delivery step failed", extra={"fields": {"sink": slot.name}})
                    wait = 5 * self.spec.poll_s
                if wait > 0:
                    slot.wakeup.wait(min(wait, 60.0))
                    slot.wakeup.clear()
        finally:
            state.close()

    def _observe_depth(self, state: StateStore) -> None:
        depth = state.outbox_depth()
        now_ms = int(self._clock() * 1000)
        for s in self.slots:
            n, oldest = depth.get(s.name, (0, None))
            s.pending, s.oldest_pending_ms = n, oldest
            self.metrics.alert_outbox_depth.labels(s.name).set(n)
            self.metrics.alert_outbox_oldest.labels(s.name).set(
                0 if oldest is None else max(0, now_ms - oldest) / 1000)

    def _prune(self, state: StateStore) -> None:
        now = self._clock()
        if now - self._last_prune < 3600:
            return
        self._last_prune = now
        n = state.outbox_prune(int(now * 1000) - self.spec.retention_ms)
        if n:
            log.info("old alert messages pruned", extra={"fields": {"rows": n}})

    def status(self) -> dict[str, Any]:
        now_ms = int(self._clock() * 1000)
        return {
            "last_error": self.last_error,
            "sinks": {s.name: {
                "type": s.kind, "url": getattr(s.sink, "redacted_url", None),
                "pending": s.pending,
                "oldest_pending_s": None if s.oldest_pending_ms is None
                else round(max(0, now_ms - s.oldest_pending_ms) / 1000, 1),
                "last_delivered_ms": s.last_delivered_ms, "last_error": s.last_error,
            } for s in self.slots},
        }


class ArchiveSink:
    """Delivers incident reports to a `ReportArchive` through the outbox (retried,
    given up and counted like any receiver). ``render(incident_id)`` returns the
    report's HTML, or None when the incident is unknown."""

    def __init__(self, name: str, archive: ReportArchive, render: Callable[[str], str | None]) -> None:
        self.name = name
        self._archive = archive
        self._render = render

    def send(self, batch: AlertBatch) -> None:
        for item in batch.items:
            html = self._render(item.incident_id)
            if html is None:
                continue
            try:
                self._archive.archive(incident_id=item.incident_id, model=item.model,
                                      version=item.version, transition=item.transition, html=html)
            except Exception as exc:
                msg = f"report archive {self.name!r}: {type(exc).__name__}"
                raise RetryableDelivery(msg, reason="archive") from exc

    def close(self) -> None:
        pass


# -- wiring from the config (called by the daemon, the composition root) ---------------------


def _read_secret(what: str, env: str | None, file: str | None, environ: Mapping[str, str]) -> str | None:
    if env:
        value = environ.get(env)
        if not value:
            msg = f"{what}: environment variable {env} is not set"
            raise ValueError(msg)
        return value.strip()
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            msg = f"{what}: cannot read {file}: {exc.strerror}"
            raise ValueError(msg) from None
    return None


def build_dispatcher(alerts: Any, *, source: str, state_path: StateLocation, metrics: Metrics,
                     environ: Mapping[str, str], base_url: str,
                     archive: ReportArchive | None = None,
                     render: Callable[[str], str | None] | None = None) -> AlertDispatcher:
    """The dispatcher for an ``alerts`` config section (monitor.config.AlertsConfig).

    Secrets and secret URLs are read here, once, from ``environ`` or files. With an
    ``archive`` (the model registry), every incident transition's report, rendered
    by ``render(incident_id)``, is kept there too, through the outbox like any sink.
    ``state_path`` is anything `connectors.state.open_state_store` takes (the storage
    config section, a SQLite path or a PostgreSQL URL): each delivery thread opens its own.

    Raises:
        ValueError: a secret is missing or malformed, or a URL read from the
            environment is not acceptable; the message names the sink and the
            variable or file, never the value.
    """
    slots = []
    for sc in alerts.sinks:
        what = f"alerts.sinks[{sc.name}]"
        url = sc.url or _read_secret(f"{what}.url", sc.url_env, sc.url_file, environ)
        if sc.type == "pagerduty" and not url:
            url = PAGERDUTY_EVENTS_URL
        secret = _read_secret(f"{what}.secret", sc.secret_env, sc.secret_file, environ)
        common: dict[str, Any] = {"timeout_s": sc.timeout_seconds, "tls_verify": sc.tls_verify,
                                  "ca_file": sc.ca_file, "allow_http": sc.allow_http}
        assert url is not None
        try:
            sink: AlertSink
            if sc.ca_file and not Path(sc.ca_file).is_file():
                msg = f"ca_file {sc.ca_file} is not a readable file"
                raise ValueError(msg)
            if sc.type == "webhook":
                sink = WebhookSink(sc.name, url, decode_signing_keys(secret or ""), **common)
            elif sc.type == "slack":
                sink = SlackSink(sc.name, url, **common)
            elif sc.type == "pagerduty":
                sink = PagerDutySink(sc.name, url, Secret(secret or ""), **common)
            else:
                sink = AlertmanagerSink(sc.name, url, resend_seconds=sc.resend_seconds, **common)
        except (ValueError, OSError) as exc:  # ssl.SSLError is an OSError: a bad CA bundle
            msg = f"{what}: {exc}"
            raise ValueError(msg) from None
        if not sc.tls_verify:
            log.warning("TLS certificate verification is off for an alert sink",
                        extra={"fields": {"sink": sc.name}})
        slots.append(Slot(sink, Route(Severity.parse(sc.min_severity), frozenset(sc.kinds)),
                          TokenBucket(sc.rate_limit_per_minute), kind=sc.type))
    if archive is not None and render is not None:
        slots.append(Slot(ArchiveSink(ARCHIVE_SINK, archive, render), Route(Severity.INFO),
                          kind="report-archive"))
    spec = DeliverySpec(
        group_wait_ms=int(alerts.group_wait_seconds * 1000),
        give_up_after_ms=int(alerts.give_up_after_seconds * 1000),
        backoff_initial_s=alerts.backoff_initial_seconds, backoff_max_s=alerts.backoff_max_seconds,
        poll_s=alerts.poll_seconds, retention_ms=int(alerts.retention_days * 86_400_000))
    return AlertDispatcher(
        spec, slots,
        lambda: open_state_store(state_path, group_id=source, instance="alerts"),
        metrics, source=source, base_url=base_url)
