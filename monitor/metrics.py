"""Prometheus metrics of the daemon, on a registry of its own.

A private `CollectorRegistry` (rather than the client's global one) lets tests run
several daemons in one process and keeps third-party libraries' metrics out of
driftloop's /metrics unless they are wanted.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """Every metric the ingestion path exports (names are documented in docs/operations.md)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events_in = Counter(
            "driftloop_events_in_total", "Kafka records received, valid or not.",
            ["topic"], registry=r)
        self.events_valid = Counter(
            "driftloop_events_valid_total", "Records that decoded and validated.",
            ["topic"], registry=r)
        self.dead_letters = Counter(
            "driftloop_dead_letter_total", "Records sent to the dead-letter topic, by reason.",
            ["topic", "reason"], registry=r)
        self.events_stored = Counter(
            "driftloop_events_stored_total",
            "Events made durable in the feedback store (final or partial windows).",
            ["topic"], registry=r)
        self.windows_closed = Counter(
            "driftloop_windows_closed_total", "Windows finalised by the watermark.",
            ["topic"], registry=r)
        self.checkpoints = Counter(
            "driftloop_checkpoints_total", "Checkpoints by outcome.", ["outcome"], registry=r)
        self.checkpoint_seconds = Histogram(
            "driftloop_checkpoint_seconds",
            "Time to make a checkpoint durable (files, state store).", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.commit_seconds = Histogram(
            "driftloop_kafka_commit_seconds", "Latency of the Kafka offset commit.", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
        self.commit_failures = Counter(
            "driftloop_kafka_commit_failures_total",
            "Kafka offset commits that failed (harmless: the state store is the truth).",
            registry=r)
        self.consumer_lag = Gauge(
            "driftloop_consumer_lag", "High watermark minus position, per partition.",
            ["topic", "partition"], registry=r)
        self.buffered_rows = Gauge(
            "driftloop_buffered_rows", "Rows in memory not yet checkpointed.", registry=r)
        self.open_windows = Gauge(
            "driftloop_open_windows", "Windows not yet finalised.", ["topic"], registry=r)
        self.watermark = Gauge(
            "driftloop_watermark_seconds", "Event-time watermark per topic (epoch s).",
            ["topic"], registry=r)
        self.rebalances = Counter(
            "driftloop_rebalances_total", "Partition revocations handled.", registry=r)
        self.reconnects = Counter(
            "driftloop_kafka_reconnects_total",
            "Consumers rebuilt: the broker or coordinator unreachable, or a group join stuck.",
            registry=r)
        self.poll_errors = Counter(
            "driftloop_poll_errors_total", "Errors raised by the Kafka client while polling.",
            registry=r)
        self.dead_letter_references = Counter(
            "driftloop_dead_letter_references_total",
            "Rejected records too large for the dead-letter topic, sent there as references.",
            ["topic"], registry=r)
        self.ingest_failures = Counter(
            "driftloop_ingest_failures_total",
            "Batches whose ingestion failed (the dead-letter topic or the store unreachable); "
            "rewound to the last checkpoint and read again.", registry=r)
        # -- the monitor's analysis (monitor/analysis.py) --------------------------
        self.windows_analysed = Counter(
            "driftloop_windows_analysed_total",
            "Closed prediction windows analysed, by stage (drift, join).", ["stage"], registry=r)
        self.analysis_seconds = Histogram(
            "driftloop_analysis_seconds", "Time to analyse one window, by stage.", ["stage"],
            registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.analysis_failures = Counter(
            "driftloop_analysis_failures_total",
            "Analysis steps that failed (retried on the next checkpoint).", registry=r)
        self.stage_stalled = Gauge(
            "driftloop_stage_stalled",
            "1 while an analysis stage has closed windows waiting and has made no progress "
            "for monitor.stall_seconds, by stage (drift, join).", ["stage"], registry=r)
        self.stage_idle = Gauge(
            "driftloop_stage_idle_seconds",
            "How long an analysis stage has made no progress while windows were waiting.",
            ["stage"], registry=r)
        self.analysis_lag = Gauge(
            "driftloop_analysis_lag_seconds",
            "Closed but not yet analysed event time, by stage.", ["stage"], registry=r)
        self.duplicate_predictions = Counter(
            "driftloop_duplicate_predictions_total",
            "Predictions whose prediction_id repeated within a window (counted once).",
            registry=r)
        self.duplicate_feedback = Counter(
            "driftloop_duplicate_feedback_total",
            "Feedback events repeated with the same prediction, type and time (counted once).",
            registry=r)
        self.feedback_unmatched = Counter(
            "driftloop_feedback_unmatched_total",
            "Feedback that matched no prediction within the attribution window.", ["type"],
            registry=r)
        self.join_index_bytes = Gauge(
            "driftloop_join_index_bytes", "Memory held by the feedback side of the join.",
            registry=r)
        self.label_rate = Gauge(
            "driftloop_label_rate", "Label rate of the latest matured window.",
            ["model", "version", "type"], registry=r)
        self.drift_psi = Gauge(
            "driftloop_drift_psi", "PSI of each feature in the latest analysed window.",
            ["model", "feature"], registry=r)
        self.leader = Gauge(
            "driftloop_leader", "1 while this replica is its group's leader (decides, alerts, "
            "launches and promotes), else 0.", registry=r)
        self.retrain_decisions = Counter(
            "driftloop_retrain_decisions_total",
            "Retraining policy decisions by code (launched, cooldown, running, no_data, ...).",
            ["model", "code"], registry=r)
        self.retrain_jobs_finished = Counter(
            "driftloop_retrain_jobs_finished_total",
            "Training jobs that ended, by final state (succeeded, failed, timed_out, lost).",
            ["model", "state"], registry=r)
        self.retrain_jobs_running = Gauge(
            "driftloop_retrain_jobs_running", "Training jobs pending or running now.", registry=r)
        self.gate_decisions = Counter(
            "driftloop_gate_decisions_total",
            "Promotion gate decisions on challengers, by outcome and code.",
            ["model", "outcome", "code"], registry=r)
        self.alias_moves = Counter(
            "driftloop_alias_moves_total",
            "Champion moves made by this daemon: promotions (gate, canary) and rollbacks.",
            ["model", "action"], registry=r)
        self.leader_changes = Counter(
            "driftloop_leader_changes_total", "Times this replica became or stopped being leader.",
            ["to"], registry=r)
        self.incidents_firing = Gauge(
            "driftloop_incidents_firing", "Open incidents by kind and severity.",
            ["kind", "severity"], registry=r)
        self.incident_transitions = Counter(
            "driftloop_incident_transitions_total",
            "Incidents opened, escalated and resolved.", ["kind", "transition"], registry=r)
        # -- alert delivery (monitor/alerting.py, docs/alerts.md) --------------------
        self.alerts_sent = Counter(
            "driftloop_alerts_sent_total", "Alert messages a receiver accepted (2xx).", ["sink"],
            registry=r)
        self.alert_attempts_failed = Counter(
            "driftloop_alert_attempts_failed_total",
            "Delivery attempts that failed, by reason (timeout, network, http_5xx, http_429, ...).",
            ["sink", "reason"], registry=r)
        self.alerts_given_up = Counter(
            "driftloop_alerts_given_up_total",
            "Alert messages abandoned: age (undelivered past give_up_after), rejected (4xx "
            "payload errors), stale (older than give_up_after when enqueued), invalid (an "
            "outbox payload this version cannot read).",
            ["sink", "reason"], registry=r)
        self.alerts_rate_limited = Counter(
            "driftloop_alerts_rate_limited_total",
            "Times a sink's rate limit held a due message back.", ["sink"], registry=r)
        self.alert_outbox_depth = Gauge(
            "driftloop_alert_outbox_depth", "Alert messages waiting for delivery.", ["sink"],
            registry=r)
        self.alert_outbox_oldest = Gauge(
            "driftloop_alert_outbox_oldest_seconds",
            "Age of the oldest alert message waiting for delivery (0: none).", ["sink"], registry=r)
        self.alert_delivery_latency = Histogram(
            "driftloop_alert_delivery_latency_seconds",
            "From the incident transition's commit to the receiver's 2xx.", ["sink"], registry=r,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
