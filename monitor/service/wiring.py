"""Wiring: every collaborator the daemon needs, built once from the configuration.

The daemon (monitor/service/daemon.py) owns the lifecycle; this module owns the
construction, so that each thing exists once per process (one model registry client,
whose settings MLflow keeps in the process's environment) and a configuration error
found while building (a secret missing, a bad sink) is a ConfigError naming its key.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from connectors.state import open_state_store
from connectors.store import FeedbackStore
from connectors.summaries import SummaryStore
from monitor.alerting import AlertDispatcher, build_dispatcher
from monitor.analysis import Analysis, AnalysisSpec, DirectoryReferences, References
from monitor.config import Config, ConfigError
from monitor.join import JoinSpec
from monitor.metrics import Metrics
from monitor.promotion import PromotionController
from monitor.retraining import RetrainController

if TYPE_CHECKING:
    from connectors.registry import ModelRegistry

__all__ = ["alerting", "analysis", "promotion", "references", "registry", "retraining"]


def alerting(config: Config, metrics: Metrics, http_port: int, render: Callable[[str], str | None],
             registry: ModelRegistry | None) -> AlertDispatcher | None:
    """Alert delivery runs where the analysis runs (the replica that decides), and only
    when sinks or a model registry (which keeps the reports) are configured
    (docs/alerts.md)."""
    if not config.monitor.enabled or not (config.alerts.sinks or config.mlflow.tracking_uri):
        return None
    host = config.http.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    elif ":" in host:  # an IPv6 literal needs brackets in a URL
        host = f"[{host}]"
    base_url = config.alerts.base_url or f"http://{host}:{http_port}"
    try:
        archive = None
        if registry is not None:
            from connectors.registry import MlflowReportArchive

            archive = MlflowReportArchive(registry)
        return build_dispatcher(config.alerts, source=config.kafka.group_id,
                                state_path=config.storage, metrics=metrics,
                                environ=os.environ, base_url=base_url, archive=archive,
                                render=render)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def registry(config: Config) -> ModelRegistry | None:
    """The process's one model registry client (None without ``mlflow.tracking_uri``).

    One, because MLflow's client reads its timeouts and retries from the process's
    environment: every construction rewrites them for all.
    """
    if not config.mlflow.tracking_uri:
        return None
    # Imported here: mlflow takes seconds to import, and only this needs it.
    from connectors.registry import ModelRegistry

    return ModelRegistry(config.mlflow.tracking_uri, timeout_s=config.mlflow.request_timeout_seconds,
                         max_retries=config.mlflow.max_retries)


def retraining(config: Config, submit: Callable[..., None], metrics: Metrics,
               registry: ModelRegistry | None) -> RetrainController | None:
    """Retraining runs where the analysis runs, when enabled (docs/retraining.md)."""
    if not config.retrain.enabled:
        return None
    try:
        return RetrainController(config, registry=registry, submit=submit, metrics=metrics)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def promotion(config: Config, submit: Callable[..., None], metrics: Metrics,
              registry: ModelRegistry | None) -> PromotionController | None:
    """Promotion runs where the analysis runs, with a registry (docs/promotion.md)."""
    if not (config.promotion.enabled and registry is not None):
        return None
    try:
        return PromotionController(config, registry=registry, submit=submit, metrics=metrics)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def references(config: Config, registry: ModelRegistry | None) -> References | None:
    """The model registry's references first (mlflow.tracking_uri), then reference_dir."""
    sources: list[References] = []
    if registry is not None:
        from monitor.references import MlflowReferences

        sources.append(MlflowReferences(registry))
    if config.monitor.reference_dir:
        sources.append(DirectoryReferences(Path(config.monitor.reference_dir)))
    if len(sources) > 1:
        from monitor.references import FirstOf

        return FirstOf(sources)
    return sources[0] if sources else None


def analysis(config: Config, metrics: Metrics, store: FeedbackStore | None,
             registry: ModelRegistry | None) -> Analysis:
    m = config.monitor
    window_ms = config.windows.size_seconds * 1000
    spec = AnalysisSpec(
        window_ms=window_ms,
        join=JoinSpec(attribution_ms=m.attribution_seconds * 1000, label_types=m.label_types,
                      window_ms=window_ms),
        primary_label=m.primary,
        period_ms=m.performance.period_seconds * 1000,
        bootstrap_ms=m.bootstrap_seconds * 1000,
        bootstrap_max_rows=m.bootstrap_max_rows,
        bootstrap_min_rows=m.bootstrap_min_rows,
        bootstrap_min_labels=m.bootstrap_min_labels,
        stall_ms=m.stall_seconds * 1000,
        resolve_after=m.resolve_after,
        drift=m.drift.spec(),
        performance=m.performance.spec(),
        performance_k=m.performance.k,
        performance_m=m.performance.m,
        sequential=m.sequential.enabled,
        arl0_events=m.sequential.arl0_events,
        cusum_drops=m.sequential.drops,
        labels_stall_ms=m.labels_stall_seconds * 1000,
    )
    # Its own connection: SQLite transactions are per connection, and this one runs on
    # the analysis thread while the main thread checkpoints.
    state = open_state_store(config.storage, group_id=config.kafka.group_id, instance=config.instance)
    refs = references(config, registry)
    cluster = config.cluster.enabled
    # The URL as configured (the store keeps a redacted copy for messages).
    summaries = SummaryStore(config.storage.state_url or config.storage.state_path,
                             group_id=config.kafka.group_id)
    return Analysis(spec, state, config.kafka.predictions_topic, config.kafka.feedback_topic,
                    refs, metrics, summaries=summaries, cluster=cluster, leader=not cluster,
                    store=store)
