"""The daemon: the composition root that wires Kafka, ingestion, state and HTTP.

The loop is deliberately plain: poll, ingest, checkpoint when due, commit. All the
delivery logic is in monitor/ingest.py; this module owns the process's lifecycle:
start-up recovery, the rebalance callbacks, errors from the Kafka client (logged,
counted and retried with backoff, never fatal), and graceful shutdown on SIGTERM
(finish the batch, checkpoint, commit, close, exit 0).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from connectors.events import EventKind
from connectors.fetch import install as use_fast_records
from connectors.http import ControlServer, read_secret
from connectors.kafka import (
    DEAD_LETTER_OVERHEAD,
    DEFAULT_MAX_MESSAGE_BYTES,
    DeadLetterProducer,
    KafkaError,
    Listener,
    MissingTopicsError,
    TopicPartition,
    check_topics,
    commit_offsets,
    group_joined,
    make_consumer,
)
from connectors.leader import LeaderLockError, leader_lock
from connectors.mlflow_auth import apply_credentials
from connectors.state import FencedOut, StateStore, open_state_store
from connectors.store import SpillFiles, open_feedback_store
from monitor.analysis import NotYet
from monitor.config import Config, ConfigError
from monitor.incidents import Incident
from monitor.ingest import Ingestor
from monitor.metrics import Metrics
from monitor.reports import render_index, render_report
from monitor.service import wiring
from monitor.windows import WindowSpec

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

#: /healthz fails when the loop has not turned for this long (a wedged process).
STALL_SECONDS = 60.0
#: ... or when this many checkpoints in a row failed (a full disk, a broken store).
MAX_CHECKPOINT_FAILURES = 5


class Daemon:
    """One driftloop process.

    Args:
        config: the validated configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        try:
            # Before any registry client exists: MLflow reads its credentials from the
            # environment (docs/security.md).
            apply_credentials(config.mlflow, os.environ)
            action_token = read_secret("http.token", config.http.token_env, config.http.token_file,
                                       os.environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._started = time.time()
        self._last_loop = time.monotonic()
        self._last_poll_ok: float | None = None
        self._ready = False
        k = config.kafka
        self.topics = {k.predictions_topic: EventKind.PREDICTION,
                       k.feedback_topic: EventKind.FEEDBACK}
        storage = config.storage
        self.state = open_state_store(storage, group_id=k.group_id, instance=config.instance)
        try:
            self.dead_letters = DeadLetterProducer.for_settings(k, os.environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        spec = WindowSpec(
            size_ms=config.windows.size_seconds * 1000,
            allowed_lateness_ms=config.windows.allowed_lateness_seconds * 1000,
            idle_timeout_ms=config.windows.idle_timeout_seconds * 1000,
        )
        #: Shared by ingestion (writes) and analysis (reads): it keeps no mutable state.
        self.store = open_feedback_store(storage)
        self.ingestor = Ingestor(
            self.topics, spec, state=self.state, store=self.store,
            spills=SpillFiles(storage.spill_path), dead_letters=self.dead_letters,
            metrics=self.metrics, max_message_bytes=k.max_message_bytes)
        self.http = ControlServer(
            config.http.host, config.http.port, healthy=self._healthy, ready=self._readiness,
            status=self.status, registry=self.metrics.registry,
            pages={"/incidents": self._incident_page}, actions={"/retrain": self._retrain_request},
            action_token=action_token, protect_reads=config.http.protect_reads,
            timeout_s=config.http.timeout_seconds, max_connections=config.http.max_connections)
        self._pages_lock = threading.Lock()
        self._pages_state: StateStore | None = None
        #: The one model registry client (None without mlflow.tracking_uri).
        self.registry = wiring.registry(config) if config.monitor.enabled else None
        self.alerting = wiring.alerting(config, self.metrics, self.http.port, self._render_report,
                                        self.registry)
        self.analysis = (wiring.analysis(config, self.metrics, self.store, self.registry)
                         if config.monitor.enabled else None)
        self._analysis_wakeup = threading.Event()
        #: Several replicas (cluster.enabled): only the lock's holder decides, alerts,
        #: retrains and promotes; a single daemon is its own leader.
        self._lock = (leader_lock(config.storage.state_url or config.storage.state_path,
                                  group_id=k.group_id, owner=config.instance,
                                  timeout_s=config.cluster.leader_timeout_seconds)
                      if config.cluster.enabled and self.analysis is not None else None)
        self._is_leader = self._lock is None
        #: This replica's leadership epoch (`_take_epoch`); None: not leading, or alone.
        self._epoch: int | None = None
        self._leader_started = False
        self._exit_code = 0
        self._leadership_thread = threading.Thread(target=self._leadership, name="leadership",
                                                   daemon=True)
        self.promotion = (wiring.promotion(config, self._submit_evidence, self.metrics, self.registry)
                          if self.analysis else None)
        if self.promotion is not None and self.analysis is not None:
            self.analysis.label_listeners.append(self.promotion.on_labels)
        self.retraining = (wiring.retraining(config, self._submit_evidence, self.metrics, self.registry)
                           if self.analysis else None)
        self._analysis_thread = threading.Thread(target=self._analyse, name="analysis", daemon=True)
        self._consumer: Any = None
        self._pending_seeks: dict[tuple[str, int], int] = {}
        self._backoff = 0.1
        self._last_checkpoint_at = 0.0
        #: When the consumer was last seen start joining its group (`_join_stalled`).
        self._joining_since: float | None = None
        #: What the start-up check found of the topics (`_check_topics`), for /status.
        self._topics_status: dict[str, Any] | None = None

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint and exit (signal-safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> int:
        """Run until `stop`; returns the process exit code."""
        self.http.start()
        if self._lock is not None:
            self._leadership_thread.start()
        elif self.analysis is not None:
            self._lead()
        if self.analysis is not None:
            self._analysis_thread.start()
        log.info("driftloop started", extra={"fields": {
            "instance": self.config.instance, "group": self.config.kafka.group_id,
            "topics": sorted(self.topics), "http_port": self.http.port,
            "cluster": self.config.cluster.enabled}})
        try:
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                if self._topics_status is None:
                    self._check_topics()
                    continue
                if self._consumer is None:
                    try:
                        self._consumer = make_consumer(
                            self.config.kafka, self.topics,
                            Listener(self._revoked, self._assigned), self.config.instance)
                    except KafkaError as exc:
                        log.warning("cannot reach Kafka, retrying", extra={"fields": {
                            "error": str(exc), "retry_in_s": self._backoff}})
                        self._stop.wait(self._backoff)
                        self._backoff = min(self._backoff * 2, 10.0)
                        continue
                    # Records straight from kafka-python's fetch buffers (issue #2);
                    # falls back to the public path, once logged, if its internals moved.
                    use_fast_records(self._consumer)
                self._ready = True
                self._turn()
            self._checkpoint(commit=True)
        finally:
            self._shutdown()
        log.info("driftloop stopped", extra={"fields": {"instance": self.config.instance}})
        return self._exit_code

    def _check_topics(self) -> None:
        """Before the first poll: every topic exists (or is created, with
        ``kafka.create_topics``), and the dead-letter producer is sized so that every
        record the consumer can read has a place in the dead-letter topic.

        Raises:
            ConfigError: a topic is missing (the CLI exits 2); the message names it.
        """
        k = self.config.kafka
        try:
            report = check_topics(k, [*self.topics, k.dead_letter_topic], create=k.create_topics,
                                  dead_letter_topic=k.dead_letter_topic)
        except MissingTopicsError as exc:
            log.error("missing topics", extra={"fields": {"error": str(exc)}})
            msg = f"kafka: {exc}"
            raise ConfigError(msg) from None
        except KafkaError as exc:
            log.warning("cannot reach Kafka, retrying", extra={"fields": {
                "error": str(exc), "retry_in_s": self._backoff, "while": "checking the topics"}})
            self._stop.wait(self._backoff)
            self._backoff = min(self._backoff * 2, 10.0)
            return
        limits = report.max_message_bytes
        dlq = limits.get(k.dead_letter_topic) or DEFAULT_MAX_MESSAGE_BYTES
        largest = max(limits.get(t) or DEFAULT_MAX_MESSAGE_BYTES for t in self.topics)
        self.dead_letters.limit_to(dlq, largest)
        status: dict[str, Any] = {"created": list(report.created), "max_message_bytes": dict(limits)}
        if dlq < largest:
            fix = (f"kafka-configs.sh --bootstrap-server {k.bootstrap_servers} --alter --entity-type "
                   f"topics --entity-name {k.dead_letter_topic} --add-config "
                   f"max.message.bytes={largest + DEAD_LETTER_OVERHEAD}")
            status["dead_letter_mismatch"] = {
                "problem": (f"the dead-letter topic takes records up to {dlq} bytes, the inputs up "
                            f"to {largest}: a rejected record larger than {dlq - DEAD_LETTER_OVERHEAD} "
                            "bytes is dead-lettered as a reference (its position, size and first "
                            "KiB), not as a copy"),
                "fix": fix}
            log.warning("the dead-letter topic is smaller than the input topics", extra={"fields":
                        status["dead_letter_mismatch"]})
        if report.created:
            log.info("topics created", extra={"fields": {"topics": list(report.created)}})
        self._topics_status = status

    # -- leadership (cluster.enabled) ------------------------------------------------

    def _lead(self) -> None:
        """Start what only the leader runs: alert delivery, retraining, promotion. They
        resume from the shared state store where the previous leader left off."""
        if self._leader_started:
            return
        self._leader_started = True
        self.metrics.leader.set(1)
        if self.alerting is not None:
            self.alerting.start()
        for controller in (self.retraining, self.promotion):
            if controller is not None:
                controller.start(self._open_state())

    def _leadership(self) -> None:
        """Take the leader lock when it is free and renew it while held.

        Runs on its own thread so that a long analysis step never delays a renewal. A
        leader that fails to renew stops the process (exit code 3): its decisions may
        already be another replica's to make, and a fresh start as a follower is the
        one state in which it cannot act on stale ones.
        """
        assert self._lock is not None
        poll = self.config.cluster.poll_seconds
        while not self._stop.is_set():
            try:
                held = self._lock.acquire()
            except LeaderLockError as exc:
                held = False
                log.warning("the leader lock cannot be reached", extra={"fields": {"error": str(exc)}})
            if held and not self._is_leader:
                log.info("this replica is now the leader", extra={"fields": {
                    "instance": self.config.instance}})
                self.metrics.leader.set(1)
                self.metrics.leader_changes.labels("leader").inc()
                self._is_leader = True
                self._analysis_wakeup.set()
            elif not held and self._is_leader:
                log.error("leadership lost: stopping so that only the new leader decides",
                          extra={"fields": {"instance": self.config.instance}})
                self.metrics.leader.set(0)
                self.metrics.leader_changes.labels("follower").inc()
                self._is_leader = False
                self._exit_code = 3
                self.stop()
                return
            self._stop.wait(poll)

    def _turn(self) -> None:
        """One iteration: poll, ingest, maybe checkpoint."""
        consumer = self._consumer
        self._apply_seeks()
        try:
            polled = consumer.poll(timeout_ms=200)
            self._last_poll_ok = time.monotonic()
        except KafkaError as exc:
            self.metrics.poll_errors.inc()
            log.warning("poll failed", extra={"fields": {"error": repr(exc)}})
            self._reconnect()
            return
        if self._join_stalled(consumer):
            self._reconnect()
            return
        by_topic: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for tp, records in polled.items():
            by_topic[tp.topic].append((tp.partition, records))
        if polled:
            self._backoff = 0.1
        try:
            for topic, batches in by_topic.items():
                self.ingestor.ingest(topic, batches)
        except Exception as exc:
            # No record makes ingest raise; its dead-letter sink can (the topic deleted,
            # the broker gone). Handled as a failed checkpoint: back to the last durable
            # position, and the batch is read again once the sink answers.
            log.error("ingestion failed; rewinding to the last durable position", extra={"fields": {
                "error": repr(exc), "retry_in_s": self._backoff}})
            self.dead_letters.discard()
            self._recover()
            self._stop.wait(self._backoff)
            self._backoff = min(self._backoff * 2, 10.0)
            return
        for tp in consumer.assignment():
            self.ingestor.set_caught_up(tp.topic, tp.partition, consumer.highwater(tp))
        cp = self.config.checkpoint
        last = self._last_checkpoint_at
        if (self.ingestor.buffered_rows >= cp.max_buffered_rows
                or time.monotonic() - last >= cp.interval_seconds):
            if self._lock is not None:
                self._bound_by_group(consumer)
            self._checkpoint(commit=True)

    def _bound_by_group(self, consumer: Any) -> None:
        """Close windows no further than the group's slowest partition (cluster mode):
        what another replica has not read yet may move here (docs/scale-out.md)."""
        mine = consumer.assignment()
        try:
            for topic in self.topics:
                others = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
                          if TopicPartition(topic, p) not in mine]
                ends = consumer.end_offsets(others) if others else {}
                self.ingestor.set_group_floor(topic, {tp.partition: ends.get(tp) for tp in others})
        except KafkaError as exc:
            # Unknown progress elsewhere: close nothing new until it is known again.
            for topic in self.topics:
                self.ingestor.hold_windows(topic)
            log.warning("cannot read the group's progress; holding windows open",
                        extra={"fields": {"error": repr(exc)}})

    def _checkpoint(self, *, commit: bool) -> bool:
        self._last_checkpoint_at = time.monotonic()
        try:
            result = self.ingestor.checkpoint()
        except Exception as exc:
            log.error("checkpoint failed; rewinding to the last durable position",
                      extra={"fields": {"error": repr(exc)}})
            self.dead_letters.discard()
            self._recover()
            return False
        if result.windows_closed:
            self._analysis_wakeup.set()
        if result.windows_closed or result.rows_stored:
            log.info("windows closed", extra={"fields": {
                "windows": result.windows_closed, "rows": result.rows_stored,
                "seconds": round(result.seconds, 3)}})
        if commit and self._consumer is not None and result.offsets:
            t0 = time.perf_counter()
            try:
                commit_offsets(self._consumer, result.offsets)
                self.metrics.commit_seconds.observe(time.perf_counter() - t0)
            except (KafkaError, RuntimeError) as exc:
                # Harmless for the data: the state store holds the positions; Kafka's
                # copy is for lag tooling. But a failed commit means the coordinator
                # was unreachable, and kafka-python 3 was seen not to resume fetching
                # after a broker restart: start from a fresh client.
                self.metrics.commit_failures.inc()
                log.warning("Kafka offset commit failed", extra={"fields": {"error": repr(exc)}})
                self._reconnect()
        return True

    def _recover(self) -> None:
        """Rebuild ingestion from the state store, retrying while it is unreachable (a
        PostgreSQL restart): nothing can be made durable meanwhile, so nothing is read."""
        backoff = 0.5
        while True:
            try:
                self._pending_seeks.update(self.ingestor.recover())
                return
            except Exception as exc:
                if self._stop.is_set():
                    raise
                log.error("recovery from the state store failed; retrying", extra={"fields": {
                    "error": repr(exc), "retry_in_s": backoff}})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _join_stalled(self, consumer: Any) -> bool:
        """True once the consumer has been joining its group for longer than any
        rebalance can take (the rebalance timeout, ``max_poll_interval_ms``, plus a
        session): kafka-python 3.0 has been seen to lose a rejoin and sit synced on
        the broker's side, assigned nothing, for good. Rebuilding the consumer joins
        afresh (with static membership, in its old place)."""
        joined = group_joined(consumer)
        now = time.monotonic()
        if joined is None or joined:
            self._joining_since = None
            return False
        if self._joining_since is None:
            self._joining_since = now
            return False
        k = self.config.kafka
        limit_s = (k.max_poll_interval_ms + k.session_timeout_ms) / 1000
        if now - self._joining_since < limit_s:
            return False
        log.error("the consumer has been joining its group for too long: rebuilding it",
                  extra={"fields": {"joining_s": round(now - self._joining_since, 1),
                                    "limit_s": limit_s}})
        self._joining_since = None
        return True

    def _reconnect(self) -> None:
        """Drop the consumer and build a new one on the next turn.

        Everything consumed is durable at this point (or was just rewound), and the
        new consumer is seeked to the stored positions when its partitions are
        assigned, so nothing is lost or read twice. With static membership the new
        consumer takes the old one's place in the group without a rebalance.
        """
        # Whatever is buffered becomes durable first (or is rewound), so the new
        # consumer's seeks to the stored positions cannot re-read buffered rows.
        if self.ingestor.buffered_rows:
            self._checkpoint(commit=False)
        consumer, self._consumer = self._consumer, None
        self._ready = False
        if consumer is not None:
            try:
                consumer.close(timeout_ms=2_000)
            except Exception as exc:
                log.warning("consumer close failed", extra={"fields": {"error": repr(exc)}})
        self.metrics.reconnects.inc()
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, 10.0)

    def _apply_seeks(self) -> None:
        if not self._pending_seeks or self._consumer is None:
            return
        assigned = self._consumer.assignment()
        for (topic, p), offset in self._pending_seeks.items():
            tp = TopicPartition(topic, p)
            if tp in assigned:
                self._consumer.seek(tp, offset)
        self._pending_seeks.clear()

    # -- rebalance callbacks (run on kafka-python's I/O thread while poll() blocks) --

    def _revoked(self, partitions: set[TopicPartition]) -> None:
        self.metrics.rebalances.inc()
        keys = [(tp.topic, tp.partition) for tp in partitions]
        # Rows of these partitions must be durable before another consumer reads
        # them from the stored position; if that fails they are discarded and the
        # new owner reads them again (the positions did not move).
        self._checkpoint(commit=False)
        self.ingestor.revoke(keys)
        for key in keys:
            self._pending_seeks.pop(key, None)
        log.info("partitions revoked", extra={"fields": {"partitions": sorted(keys)}})

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        seeks = self.ingestor.assign(keys)
        for (topic, p), offset in seeks.items():
            # seek() only updates client state: allowed on the I/O thread.
            self._consumer.seek(TopicPartition(topic, p), offset)
        log.info("partitions assigned", extra={"fields": {
            "partitions": sorted(keys), "resumed_from_state": len(seeks)}})

    def _analyse(self) -> None:
        """The analysis thread: runs the statistics on windows as they close.

        A failing step (an unreadable file, a full disk) is logged, counted and retried
        with backoff; ingestion goes on regardless, and the stage resumes from its
        durable pointers, so nothing is analysed twice or skipped.
        """
        assert self.analysis is not None
        backoff = 1.0
        # Followers' summaries arrive without a local wake-up: the leader polls for them.
        idle = self.config.cluster.poll_seconds if self._lock is not None else 5.0
        while not self._stop.is_set():
            self._analysis_wakeup.wait(timeout=idle)
            self._analysis_wakeup.clear()
            failed = False
            try:
                if self._is_leader and not self.analysis.leader:
                    self._take_epoch()
                    self.analysis.become_leader()
                    self._lead()
                while self.analysis.step() and not self._stop.is_set():
                    pass
                self.analysis.last_error = None
                backoff = 1.0
            except NotYet as exc:
                # Normally gone by the next step; if it is not (a segment lost from the
                # store), the watch below reports the stage as stalled, with this.
                self.analysis.last_error = repr(exc)
            except FencedOut as exc:
                self._fenced_out(exc)
                return
            except Exception as exc:
                failed = True
                self.metrics.analysis_failures.inc()
                self.analysis.last_error = repr(exc)
                log.exception("analysis step failed; retrying", extra={"fields": {
                    "retry_in_s": backoff}})
            try:
                self.analysis.watch()
            except FencedOut as exc:
                self._fenced_out(exc)
                return
            except Exception as exc:
                log.warning("cannot check the analysis stages' progress", extra={"fields": {
                    "error": repr(exc)}})
            if failed:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)

    def _shutdown(self) -> None:
        # Also when run() ends by an exception (a missing topic): the threads' loops
        # end on the stop flag, not on the wake-up alone.
        self._stop.set()
        self._analysis_wakeup.set()
        if self._analysis_thread.is_alive():
            self._analysis_thread.join(timeout=30)
        if self._consumer is not None:
            try:
                # close() revokes through the listener; everything is already durable.
                self._consumer.close()
            except Exception as exc:
                log.warning("consumer close failed", extra={"fields": {"error": repr(exc)}})
        self.dead_letters.close()
        if self.retraining is not None:
            self.retraining.stop()
            self.retraining._state.close()
        if self.promotion is not None:
            self.promotion.stop()
        if self.alerting is not None:
            self.alerting.stop()
        self.http.stop()
        if self._lock is not None:
            if self._leadership_thread.is_alive():
                self._leadership_thread.join(timeout=10)
            self._lock.close()
        self.state.close()
        if self.analysis is not None:
            self.analysis.state.close()
            self.analysis.summaries.close()

    # -- health and status ---------------------------------------------------------

    def _healthy(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._last_loop
        if stalled > STALL_SECONDS:
            return False, f"main loop stalled for {stalled:.0f}s"
        if self.ingestor.consecutive_failures >= MAX_CHECKPOINT_FAILURES:
            return False, (f"{self.ingestor.consecutive_failures} checkpoints or batches failed "
                           "in a row")
        return True, "ok"

    def _readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "not connected to Kafka yet"
        if self._last_poll_ok is None or time.monotonic() - self._last_poll_ok > 30:
            return False, "no successful poll in the last 30s"
        consumer = self._consumer
        if consumer is None or not consumer.assignment():
            return False, "no partition assigned (joining the group, or more replicas than partitions)"
        stalls = {} if self.analysis is None else dict(self.analysis.stalls)
        if stalls:
            return False, "degraded: " + "; ".join(stalls.values())
        return True, "ok"

    def status(self) -> dict[str, Any]:
        def counter_values(counter: Any) -> dict[str, float]:
            out = {}
            for metric in counter.collect():
                for s in metric.samples:
                    if s.name.endswith("_total"):
                        out["/".join(s.labels.values())] = s.value
            return out

        assignment: list[str] = []
        if self._consumer is not None:
            assignment = sorted(f"{tp.topic}[{tp.partition}]" for tp in self._consumer.assignment())
        return {
            "instance": self.config.instance,
            "group_id": self.config.kafka.group_id,
            "uptime_s": round(time.time() - self._started, 1),
            "http_port": self.http.port,
            "assignment": assignment,
            "ingest": self.ingestor.status(),
            "topics": self._topics_status,
            "dead_letter_references": self.dead_letters.references,
            "events_in": counter_values(self.metrics.events_in),
            "events_stored": counter_values(self.metrics.events_stored),
            "dead_letters": counter_values(self.metrics.dead_letters),
            "cluster": self._cluster_status(),
            "monitor": None if self.analysis is None else self.analysis.status(),
            "alerts": None if self.alerting is None else self.alerting.status(),
            "retrain": None if self.retraining is None else self.retraining.status(),
            "promotion": None if self.promotion is None else self.promotion.status(),
            "incidents": {
                "firing": [json.loads(r.body) for r in self.state.incidents(status="firing")],
                "recently_resolved": [json.loads(r.body) for r in
                                      self.state.incidents(status="resolved", limit=20)],
            },
        }


    def _cluster_status(self) -> dict[str, Any] | None:
        if self._lock is None:
            return None
        return {"role": "leader" if self._is_leader else "follower", "leader": self._lock.holder(),
                "leader_timeout_s": self.config.cluster.leader_timeout_seconds}

    def _submit_evidence(self, signals: Any = (), resolve: Any = (), *,
                         on_committed: Callable[[], None] | None = None) -> None:
        """Incident evidence from the retraining thread, committed by the analysis thread."""
        assert self.analysis is not None
        self.analysis.submit(signals, resolve, on_committed=on_committed)
        self._analysis_wakeup.set()

    def _retrain_request(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /retrain (``driftloop retrain MODEL``)."""
        if self.retraining is None:
            return 409, {"error": "retraining is not enabled here (retrain.enabled, monitor.enabled)"}
        if not self._is_leader:
            holder = self._lock.holder() if self._lock is not None else None
            return 409, {"error": f"this replica is not the leader; ask {holder or 'the leader'}",
                         "leader": holder}
        return self.retraining.manual(body)

    def _render_report(self, incident_id: str) -> str | None:
        """One incident's report as HTML (what the alert links to and the archive keeps)."""
        with self._pages_lock:
            state = self._pages_store()
            row = state.incident(incident_id)
            if row is None:
                return None
            inc = Incident.from_json(row.body)
            related = [Incident.from_json(r.body) for r in state.incidents(limit=500)]
        return render_report(inc, related=related, source=self.config.kafka.group_id,
                             generated_ms=int(time.time() * 1000))

    def _open_state(self) -> StateStore:
        """A connection of its own (SQLite and psycopg connections are per thread here),
        fenced with this leader's epoch once there is one."""
        state = open_state_store(self.config.storage, group_id=self.config.kafka.group_id,
                                 instance=self.config.instance)
        state.fence(self._epoch)
        return state

    def _take_epoch(self) -> None:
        """A new leadership epoch, before anything is decided: every decision this
        replica commits from now on is refused once a successor has taken the next one
        (a leader paused past its lock's timeout that wakes up; docs/scale-out.md)."""
        if self._lock is None or self.analysis is None:
            return
        self._epoch = self.analysis.state.take_leadership(self.config.instance)
        self.analysis.state.fence(self._epoch)
        log.info("leadership epoch taken", extra={"fields": {"epoch": self._epoch}})

    def _fenced_out(self, exc: FencedOut) -> None:
        log.error("a newer leader has started: stopping without deciding anything more",
                  extra={"fields": {"instance": self.config.instance, "error": str(exc)}})
        self.metrics.leader.set(0)
        self._is_leader = False
        self._exit_code = 3
        self.stop()

    def _pages_store(self) -> StateStore:
        if self._pages_state is None:
            # Its own connection: this runs on the HTTP server's and the sinks' threads.
            self._pages_state = self._open_state()
        return self._pages_state

    def _incident_page(self, rest: str) -> tuple[int, str, bytes]:
        """``/incidents`` (a list) and ``/incidents/<id>`` (the report an alert links to)."""
        import urllib.parse

        incident_id = urllib.parse.unquote(rest.lstrip("/"))
        if not incident_id:
            with self._pages_lock:
                rows = self._pages_store().incidents(limit=200)
            html = render_index([Incident.from_json(r.body) for r in rows])
            return 200, "text/html; charset=utf-8", html.encode()
        report = self._render_report(incident_id)
        if report is None:
            return 404, "text/plain", b"no such incident\n"
        return 200, "text/html; charset=utf-8", report.encode()


def run_daemon(config: Config, *, on_ready: Callable[[Daemon], None] | None = None) -> int:
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    if on_ready is not None:
        on_ready(daemon)
    return daemon.run()
