"""The daemon's promotion controller against a real MLflow server: the gate after a job,
the live watch that rolls a regression back, the canary, and promotions made elsewhere.

The versions are tiny real models (tests/test_promote.py's ``TinyScorer``) logged and
registered as the job does, with real evaluation reports; the label streams are what the
analysis stage's listener hands over, simulated with fixed seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from connectors.registry import ModelRegistry
from connectors.state import StateStore
from monitor.config import Config
from monitor.metrics import Metrics
from monitor.promotion import PromotionController, build_promoter
from monitor.retraining import job_store_location
from monitor.stats.labels import LabelSummary
from retrain.jobs import JobRecord, SqlJobStore
from retrain.promote import CHAMPION, PREVIOUS, AliasLockBusy, AliasMove, PostgresAdvisoryLock
from tests.daemon_proc import wait_until
from tests.mlflow_fixtures import unique_model_name
from tests.pg_fixtures import fresh_database
from tests.test_jobs import make_spec
from tests.test_promote import BASE, CLEARLY_BETTER, WORSE, Versions, world_frame


@pytest.fixture(scope="module")
def frames() -> dict[str, Any]:
    return {"train": world_frame(1, 20_000), "holdout": world_frame(2, 20_000)}


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def make(tmp: Path, uri: str, retrain: dict[str, Any] | None = None, metrics: Metrics | None = None,
         **promotion: Any) -> tuple[PromotionController, list[dict[str, Any]], StateStore, Clock]:
    config = msgspec.convert({"storage": {"data_dir": str(tmp)}, "mlflow": {"tracking_uri": uri},
                              "retrain": retrain or {},
                              "promotion": {"watch_events": 100_000, "baseline_events": 50_000,
                                            "canary_min_events": 2000, **promotion}}, Config)
    submitted: list[dict[str, Any]] = []
    clock = Clock()
    c = PromotionController(config, registry=ModelRegistry(uri), submit=lambda **kw: submitted.append(kw),
                            clock=clock, metrics=metrics)
    state = StateStore(tmp / "state.db", group_id="driftloop", instance="a")
    return c, submitted, state, clock


def feed(c: PromotionController, model: str, version: str, rate: float, events: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(events // 5000):
        y = rng.random(5000) < rate
        c.on_labels(model, version, 0, 0, LabelSummary.from_arrays(np.full(y.size, rate), {"click": y},
                                                                   "click"), y)


def kinds(submitted: list[dict[str, Any]]) -> list[str]:
    return [s.kind for batch in submitted for s in batch.get("signals", [])]


def test_a_better_challenger_is_promoted_then_a_live_regression_rolls_it_back(
        mlflow_server: str, tmp_path: Path, frames: dict[str, Any]) -> None:
    model = unique_model_name("ctr")
    registry = ModelRegistry(mlflow_server)
    versions = Versions(registry, model, tmp_path, frames)
    champion = versions.register(BASE)
    registry.set_alias(model, CHAMPION, champion)
    challenger = versions.register(CLEARLY_BETTER)
    versions.report(challenger, champion)

    metrics = Metrics()
    c, submitted, state, _ = make(tmp_path, mlflow_server, metrics=metrics)
    feed(c, model, champion, 0.05, 50_000, seed=1)  # the champion's live rate: the baseline
    c.job_succeeded(model, challenger, "job-1")
    c.step(state)
    assert registry.version_by_alias(model, CHAMPION) == challenger
    assert registry.version_by_alias(model, PREVIOUS) == champion
    assert kinds(submitted) == ["model_promoted"]
    assert submitted[0]["resolve"][0][0] == f"model_promoted/{model}/champion:{challenger}"
    assert c.status()["watches"][model]["version"] == challenger

    # Live, the new champion clicks 30% less than the old one did: rolled back.
    feed(c, model, challenger, 0.035, 60_000, seed=2)
    c.step(state)
    assert registry.version_by_alias(model, CHAMPION) == champion
    assert kinds(submitted)[-1] == "model_rollback"
    rollback = submitted[-1]["signals"][0]
    assert rollback.severity.label == "critical" and "rolled back" in rollback.summary
    moves = [(m.alias, m.from_version, m.to_version, m.action) for m in c.history.moves(model)]
    assert (CHAMPION, challenger, champion, "rollback") in moves
    assert (CHAMPION, champion, challenger, "promote") in moves
    assert model not in c.status()["watches"]
    counted = {(s.labels["action"], s.value) for m in metrics.alias_moves.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels["model"] == model}
    assert counted == {("promote:gate", 1.0), ("rollback", 1.0)}
    assert metrics.registry.get_sample_value("driftloop_gate_decisions_total", {
        "model": model, "outcome": "promote", "code": "promote"}) == 1

    # What the controller expects survives a restart: a new one on the same state knows
    # the restored champion (and would resume a watch in progress).
    c2, _, state2, _ = make(tmp_path, mlflow_server)
    c2.start(state2)
    try:
        assert c2.status()["champions"][model] == champion
    finally:
        c2.stop()


def test_a_worse_challenger_is_kept_out_and_the_reason_is_recorded(
        mlflow_server: str, tmp_path: Path, frames: dict[str, Any]) -> None:
    model = unique_model_name("ctr")
    registry = ModelRegistry(mlflow_server)
    versions = Versions(registry, model, tmp_path, frames)
    champion = versions.register(BASE)
    registry.set_alias(model, CHAMPION, champion)
    worse = versions.register(WORSE)
    versions.report(worse, champion)
    c, submitted, state, _ = make(tmp_path, mlflow_server)
    c.job_succeeded(model, worse, "job-2")
    c.step(state)
    assert registry.version_by_alias(model, CHAMPION) == champion
    assert submitted == []
    (decision,) = c.history.decisions(model)
    assert not decision.decision.promote and decision.decision.code != "promote"


def test_a_succeeded_job_in_the_store_is_gated_once_whichever_controller_sees_it(
        mlflow_server: str, tmp_path: Path, frames: dict[str, Any]) -> None:
    """The job store is the gate's queue: the controller that leads when a job has
    succeeded gates it (the one whose tracker saw it end may be dead), and the next
    one, on the same store, does not gate it again."""
    model = unique_model_name("ctr")
    registry = ModelRegistry(mlflow_server)
    versions = Versions(registry, model, tmp_path, frames)
    champion = versions.register(BASE)
    registry.set_alias(model, CHAMPION, champion)
    challenger = versions.register(CLEARLY_BETTER)
    versions.report(challenger, champion)
    c, submitted, state, _ = make(tmp_path, mlflow_server, retrain={"enabled": True})
    store = SqlJobStore(job_store_location(c.config), group_id=c.config.kafka.group_id)
    store.insert(JobRecord(job_id="job-9", model=model, state="running", spec=make_spec("job-9", model=model),
                           handle=None, started_ms=1))
    store.finish("job-9", state="succeeded", finished_ms=2, reason="",
                 result={"status": "succeeded", "model_version": challenger})
    c.start(state)
    try:
        wait_until(lambda: registry.version_by_alias(model, CHAMPION) == challenger, 30, "the gate")
    finally:
        c.stop()
    assert store.ungated() == []
    c2, submitted2, state2, _ = make(tmp_path, mlflow_server, retrain={"enabled": True})
    c2.start(state2)
    try:
        time.sleep(3)  # a step or more
    finally:
        c2.stop()
    assert len(c2.history.decisions(model)) == 1  # gated once
    assert kinds(submitted) == ["model_promoted"] and kinds(submitted2) == []
    store.close()


def test_two_versions_serving_at_once_the_significantly_better_one_is_promoted(
        mlflow_server: str, tmp_path: Path, frames: dict[str, Any]) -> None:
    model = unique_model_name("ctr")
    registry = ModelRegistry(mlflow_server)
    versions = Versions(registry, model, tmp_path, frames)
    champion = versions.bare()
    other = versions.bare()
    registry.set_alias(model, CHAMPION, champion)
    c, submitted, state, clock = make(tmp_path, mlflow_server, poll_seconds=1.0)
    c.step(state)  # learns the champion
    rng = np.random.default_rng(5)
    for _ in range(40):
        for version, rate in ((champion, 0.05), (other, 0.065)):
            y = rng.random(4000) < rate
            c.on_labels(model, version, 0, 0, LabelSummary.from_arrays(np.full(y.size, rate),
                                                                       {"click": y}, "click"), y)
        clock.t += 2
        c.step(state)
        if registry.version_by_alias(model, CHAMPION) == other:
            break
    assert registry.version_by_alias(model, CHAMPION) == other
    assert kinds(submitted) == ["model_promoted"]
    (move,) = [m for m in c.history.moves(model) if m.alias == CHAMPION]
    assert move.who == "driftloop-canary" and "mSPRT" in move.why


def test_a_promotion_made_elsewhere_is_noticed_and_watched(
        mlflow_server: str, tmp_path: Path, frames: dict[str, Any]) -> None:
    model = unique_model_name("ctr")
    registry = ModelRegistry(mlflow_server)
    versions = Versions(registry, model, tmp_path, frames)
    v1, v2 = versions.bare(), versions.bare()
    registry.set_alias(model, CHAMPION, v1)
    c, submitted, state, clock = make(tmp_path, mlflow_server, poll_seconds=1.0)
    feed(c, model, v1, 0.05, 50_000, seed=3)
    c.step(state)
    registry.set_alias(model, PREVIOUS, v1)
    registry.set_alias(model, CHAMPION, v2)  # a person in the MLflow UI
    clock.t += 5
    c.step(state)
    assert c.status()["watches"][model]["version"] == v2
    assert kinds(submitted) == ["model_promoted"]


def test_with_the_state_on_postgresql_every_replica_promotes_under_one_lock_and_history(
        mlflow_server: str, tmp_path: Path, postgres_uri: str) -> None:
    """A lease in one replica's data_dir would guard nothing on the others."""
    with fresh_database(postgres_uri) as url:
        promoters = []
        for i in range(2):
            config = msgspec.convert({"storage": {"data_dir": str(tmp_path / f"r{i}"), "state_url": url},
                                      "mlflow": {"tracking_uri": mlflow_server}}, Config)
            promoters.append(build_promoter(config, ModelRegistry(mlflow_server), owner=f"r{i}"))
        (a, ha), (b, hb) = promoters
        assert isinstance(a.lock, PostgresAdvisoryLock) and ha.path is None
        ha.record([AliasMove("ctr", CHAMPION, None, "4", "promote", 1, "r0", "gate")])
        assert [m.to_version for m in hb.moves("ctr")] == ["4"]  # the next leader's view
        with a.lock.hold("r0", ttl_s=30):
            assert not b.lock.acquire("r1", ttl_s=30)
            with pytest.raises(AliasLockBusy), b.lock.hold("r1", ttl_s=30):
                pass
        assert b.lock.acquire("r1", ttl_s=30)
        b.lock.release("r1")
        for h in (ha, hb):
            h.close()
