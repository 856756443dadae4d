"""Several replicas of the daemon in one consumer group, against the real broker.

Three `driftloop run` processes share 8-partition topics: each summarises what it
stored, one leader merges and decides. What a single daemon computes over the same
events is the yardstick: the per-window statistics, the detectors' states and the
incidents must be the same. Then the leader is killed with SIGKILL mid-stream: another
replica takes over within the configured time, and no incident or alert is lost or
doubled (docs/scale-out.md).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from connectors.state import StateStore, open_state_store
from connectors.summaries import SummaryStore
from monitor.incidents import Incident
from monitor.stats.labels import LabelSummary
from monitor.stats.profile import Profile
from monitor.testbed.local_kafka import create_topics
from retrain.jobs import SqlJobStore
from tests.daemon_proc import DaemonProcess, produce, wait_until
from tests.events_gen import drifting_world
from tests.mlflow_fixtures import unique_model_name
from tests.pg_fixtures import fresh_database
from tests.receivers import Answer, Receiver, Request, standard_webhooks_verify

pytestmark = pytest.mark.kafka

SEC = 1000
SHIFT = (30 * SEC, 45 * SEC)
DURATION = 75 * SEC
#: The replicas' consumer group, one per test (`state_url`): the replicas join it as
#: static members (their instance ids), and static members of an earlier test's group
#: linger for a session timeout after their processes stop, holding up the next
#: test's first rebalance.
_GROUPS: dict[str, str] = {}
#: The yardstick's own group: Kafka holds each group's offsets.
SOLO = "driftloop-solo"
PARTITIONS = 8
SECRET_ENV = "DRIFTLOOP_TEST_WEBHOOK_SECRET"
SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"

MONITOR = {
    "windows": {"size_seconds": 1, "allowed_lateness_seconds": 0, "idle_timeout_seconds": 2},
    "monitor": {"label_types": ["click", "like"], "attribution_seconds": 3,
                "bootstrap_seconds": 15, "resolve_after": 2, "labels_stall_seconds": 600,
                "performance": {"period_seconds": 5},
                "sequential": {"arl0_events": 1e6, "drops": [0.1, 0.3, 0.5]}},
}
CLUSTER = {"cluster": {"enabled": True, "leader_timeout_seconds": 4, "poll_seconds": 0.5}}


def _topics(bootstrap: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    topics = {"predictions": f"pred-{tag}", "feedback": f"fb-{tag}", "dead_letter": f"dlq-{tag}"}
    create_topics(bootstrap, {topics["predictions"]: PARTITIONS, topics["feedback"]: PARTITIONS,
                              topics["dead_letter"]: 1})
    return topics


def _produce(bootstrap: str, topics: dict[str, str], preds: list, fbs: list) -> None:
    """Both topics keyed by prediction id, as a recommender would: a prediction and its
    feedback land on the same partition number (the join does not rely on it)."""
    def key(v: bytes) -> bytes:
        return json.loads(v)["prediction_id"].encode()

    produce(bootstrap, topics["predictions"], [v for _, v in preds], keys=[key(v) for _, v in preds])
    produce(bootstrap, topics["feedback"], [v for _, v in fbs], keys=[key(v) for _, v in fbs])


def _group(where: str | Path) -> str:
    return SOLO if isinstance(where, Path) and where.parent.name == "single" else _GROUPS[str(where)]


def _state(where: str | Path) -> StateStore:
    return open_state_store(where, group_id=_group(where), instance="probe")


class Settled:
    """Both passes decided the stream's windows and stopped moving.

    The last windows of a finite stream never close (nothing later moves the
    watermark past them), so "settled" is: near the end, and unchanged for a while.
    """

    def __init__(self, state_path: str | Path, last_ts_ms: int, *, quiet_s: float = 3.0) -> None:
        self.state_path = state_path
        self.horizon = last_ts_ms - last_ts_ms % SEC - 6 * SEC
        self.quiet_s = quiet_s
        self._last: tuple[Any, ...] | None = None
        self._since = time.monotonic()

    def __call__(self) -> bool:
        state = _state(self.state_path)
        try:
            now = (state.monitor_value("drift_upto"), state.monitor_value("join_upto"))
        finally:
            state.close()
        if now != self._last:
            self._last, self._since = now, time.monotonic()
            return False
        drift, join = now
        return (drift is not None and join is not None and int(drift) >= self.horizon
                and int(join) >= self.horizon - 4 * SEC and time.monotonic() - self._since >= self.quiet_s)


def _leaders(daemons: list[DaemonProcess]) -> list[str]:
    out = []
    for d in daemons:
        if d.proc is None or d.proc.poll() is not None:
            continue
        cluster = (d.status() or {}).get("cluster") or {}
        if cluster.get("role") == "leader":
            out.append(d.instance)
    return out


def _assignments(daemons: list[DaemonProcess]) -> list[set[str]]:
    return [set((d.status() or {}).get("assignment", [])) for d in daemons]


def _wait_for_the_group(daemons: list[DaemonProcess], timeout: float = 120) -> list[set[str]]:
    """Until the group has settled: every partition of both topics assigned, each
    replica holding some, none held twice, and the same assignment two polls running.

    Events produced before that would go to whoever joined first: it can read all of
    them before the next rebalance hands the others their share, and then a replica
    stores no windows at all.
    """
    previous: list[set[str]] | None = None

    def settled() -> list[set[str]] | None:
        nonlocal previous
        for d in daemons:
            assert d.proc is not None and d.proc.poll() is None, d.tail()
        now = _assignments(daemons)
        shared = (all(now) and sum(map(len, now)) == 2 * PARTITIONS
                  and len(set.union(*now)) == 2 * PARTITIONS)
        stable, previous = shared and now == previous, now
        return now if stable else None

    assigned: list[set[str]] = wait_until(settled, timeout, "the group to share the partitions", every=0.5)
    return assigned


def _summaries(state_path: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(stage, window) -> merged statistics of every replica's summaries."""
    store = SummaryStore(state_path, group_id=_group(state_path))
    rows = store._rows("SELECT stage, window_start_ms, body FROM window_summaries WHERE group_id = ?",
                       (_group(state_path),))
    store.close()
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for stage, window, body in rows:
        into = merged.setdefault((stage, int(window)), {})
        for key, d in json.loads(body)["versions"].items():
            if stage == "drift":
                prof = None if d["profile"] is None else Profile.from_dict(d["profile"])
                rows_before, p = into.get(key, (0, None))
                merged_prof = prof if p is None else (p if prof is None else p + prof)
                into[key] = (rows_before + d["rows"], merged_prof)
            else:
                s = LabelSummary.from_dict(d)
                into[key] = into[key] + s if key in into else s
    return merged


def _incidents(state_path: str | Path) -> tuple[list[Incident], list[tuple[Any, ...]]]:
    state = _state(state_path)
    try:
        incidents = [Incident.from_json(r.body) for r in state.incidents(limit=10_000)]
        events = state.incident_events(limit=100_000)
    finally:
        state.close()
    return incidents, events


def _incident_facts(incidents: list[Incident]) -> set[tuple[Any, ...]]:
    return {(i.fingerprint, i.status, i.opened_ms, i.resolved_ms) for i in incidents}


def _assert_same_statistics(single: Path, cluster: str | Path) -> None:
    a, b = _summaries(single), _summaries(cluster)
    decided = {k for k in a if k in b}
    assert len(decided) >= 50, sorted(a)[:5]
    for key in sorted(decided):
        sa, sb = a[key], b[key]
        assert set(sa) == set(sb), key
        for version in sa:
            if key[0] == "drift":
                (na, pa), (nb, pb) = sa[version], sb[version]
                assert na == nb, key
                assert (pa is None) == (pb is None), key
                if pa is not None:
                    for name, s in pa.numeric.items():
                        t = pb.numeric[name]
                        assert np.array_equal(s.counts, t.counts) and s.count == t.count, (key, name)
                        assert s.mean == pytest.approx(t.mean, rel=1e-9), (key, name)
                    for name, s in pa.categorical.items():
                        assert np.array_equal(s.counts, pb.categorical[name].counts), (key, name)
                    assert np.array_equal(pa.score.counts, pb.score.counts), key
            else:
                la, lb = sa[version], sb[version]
                assert (la.n, la.positives) == (lb.n, lb.positives), key
                assert np.array_equal(la.hist_pos, lb.hist_pos) and np.array_equal(la.hist_neg, lb.hist_neg)
                assert la.loss_sum == pytest.approx(lb.loss_sum, rel=1e-9), key


def _versions(state_path: str | Path) -> dict[str, dict[str, Any]]:
    state = _state(state_path)
    try:
        return {k: json.loads(state.monitor_value(f"version/{k}") or "{}") for k in ("ctr@7",)}
    finally:
        state.close()


def _run_single(bootstrap: str, topics: dict[str, str], workdir: Path, last_ts: int,
                monitor: dict[str, Any] = MONITOR) -> Path:
    assert workdir.name == "single"
    daemon = DaemonProcess(workdir, bootstrap, topics, instance="solo", group=SOLO, overrides=monitor)
    daemon.start()
    try:
        daemon.wait_ready()
        wait_until(Settled(workdir / "state.db", last_ts), 240, "the single daemon to settle")
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    return workdir / "state.db"


@pytest.fixture
def state_url(postgres_uri: str) -> Iterator[str]:
    """The replicas' shared state store: a fresh PostgreSQL database (the production path:
    advisory-lock leadership, summaries and positions in one database)."""
    with fresh_database(postgres_uri) as url:
        _GROUPS[url] = f"driftloop-test-{uuid.uuid4().hex[:8]}"
        yield url


def _cluster(state_url: str) -> dict[str, Any]:
    return {**CLUSTER, "storage": {"state_url": state_url}}


@pytest.mark.mlflow
def test_three_replicas_compute_what_one_daemon_computes_with_exactly_one_leader(
        kafka_bootstrap: str, tmp_path: Path, state_url: str) -> None:
    where = state_url
    topics = _topics(kafka_bootstrap)
    preds, fbs = drifting_world(DURATION, 2_000, SHIFT, seed=5)
    last_ts = preds[-1][0]

    shared = tmp_path / "cluster"
    replicas = [DaemonProcess(tmp_path / f"r{i}", kafka_bootstrap, topics, instance=f"r{i}",
                              group=_group(where), shared_dir=shared,
                              overrides={**MONITOR, **_cluster(where)})
                for i in range(3)]
    for r in replicas:
        r.start()
    leader_counts: Counter[int] = Counter()
    try:
        for r in replicas:
            r.wait_ready()
        # The stream starts once the partitions are shared, as a live one would run
        # into a group that is up; the yardstick below reads the same topics.
        _wait_for_the_group(replicas)
        _produce(kafka_bootstrap, topics, preds, fbs)

        done = Settled(where, last_ts)

        def settled() -> bool:
            leader_counts[len(_leaders(replicas))] += 1
            for r in replicas:
                assert r.proc is not None and r.proc.poll() is None, r.tail()
            return done()

        wait_until(settled, 300, "the replicas to settle", every=0.5)
        assignments = _assignments(replicas)
        for r in replicas:
            assert r.terminate() == 0, r.tail()
    finally:
        for r in replicas:
            r.stop_quietly()

    # The partitions were shared, and never two leaders at once.
    assert all(assignments) and len(set.union(*assignments)) == 2 * PARTITIONS
    assert not set.intersection(*assignments)
    assert leader_counts[1] > 0 and not any(n > 1 for n in leader_counts), leader_counts
    summaries = SummaryStore(where, group_id=_group(where))
    owners = {r[0] for r in summaries._rows("SELECT DISTINCT instance FROM window_summaries", ())}
    summaries.close()
    assert owners == {"r0", "r1", "r2"}  # every replica stored and summarised windows

    single = _run_single(kafka_bootstrap, topics, tmp_path / "single", last_ts)
    _assert_same_statistics(single, where)
    va, vb = _versions(single), _versions(where)
    assert va["ctr@7"]["decider"] == vb["ctr@7"]["decider"]
    assert va["ctr@7"]["perf_decider"] == vb["ctr@7"]["perf_decider"]
    ia, _ = _incidents(single)
    ib, eb = _incidents(where)
    assert {"feature_drift/ctr/f.age", "performance_drop/ctr/cusum:click"} <= {i.fingerprint for i in ib}
    assert _incident_facts(ia) == _incident_facts(ib)
    assert len({(e[1], e[2]) for e in eb}) == len(eb)  # no transition twice


@pytest.mark.mlflow
def test_killing_the_leader_hands_over_and_loses_or_doubles_nothing(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_url: str) -> None:
    where = state_url
    monkeypatch.setenv(SECRET_ENV, SECRET)
    topics = _topics(kafka_bootstrap)
    preds, fbs = drifting_world(DURATION, 2_000, SHIFT, seed=5)
    last_ts = preds[-1][0]
    half = len(preds) // 2
    cut = preds[half][0]
    # The stream pauses while the leader dies: a pause shorter than the idle timeout must
    # not close the open windows (one daemon, fed without a pause, would not either).
    monitor = {**MONITOR, "windows": {**MONITOR["windows"], "idle_timeout_seconds": 60}}

    def script(req: Request) -> Answer:
        standard_webhooks_verify(SECRET, req.headers, req.body)
        return Answer(204)

    shared = tmp_path / "cluster"
    with Receiver(script) as hook:
        alerts = {"alerts": {"sinks": [{"name": "oncall", "type": "webhook", "url": hook.url + "/hook",
                                        "secret_env": SECRET_ENV, "allow_http": True,
                                        "min_severity": "warning"}],
                             "group_wait_seconds": 0, "poll_seconds": 0.2,
                             "backoff_initial_seconds": 0.2}}
        replicas = [DaemonProcess(tmp_path / f"r{i}", kafka_bootstrap, topics, instance=f"r{i}",
                                  group=_group(where), shared_dir=shared,
                                  overrides={**monitor, **_cluster(where), **alerts})
                    for i in range(3)]
        for r in replicas:
            r.start()
        try:
            for r in replicas:
                r.wait_ready()
            _produce(kafka_bootstrap, topics, preds[:half], [f for f in fbs if f[0] < cut])
            leader = wait_until(lambda: _leaders(replicas), 60, "a leader")
            assert len(leader) == 1
            boss = next(r for r in replicas if r.instance == leader[0])

            def fired() -> bool:
                incidents, _ = _incidents(where)
                return any(i.fingerprint == "feature_drift/ctr/f.age" for i in incidents)

            wait_until(fired, 180, "the drift incident before the kill")
            boss.kill9()
            killed_at = time.monotonic()
            rest = [r for r in replicas if r is not boss]
            successor = wait_until(lambda: _leaders(rest), 30, "a new leader", every=0.1)
            handover_s = time.monotonic() - killed_at
            assert len(successor) == 1 and successor[0] != boss.instance

            # The rest of the stream goes on at once: whatever the dead leader had not made
            # durable resumes elsewhere behind the clocks there, which wait for it.
            _produce(kafka_bootstrap, topics, preds[half:], [f for f in fbs if f[0] >= cut])
            # A supervisor restarts the killed replica under its own name: it owns spill
            # files of windows that were open when it died.
            boss.start()
            wait_until(Settled(where, last_ts), 300, "the replicas to settle", every=0.5)
            time.sleep(2.0)  # alerts of the last transitions
            assert len(_leaders(replicas)) == 1
            state = _state(where)
            epoch = state.leader_epoch()  # before the shutdown hands leadership on
            state.close()
            for r in replicas:
                assert r.terminate() == 0, r.tail()
        finally:
            for r in replicas:
                r.stop_quietly()
        accepted = hook.accepted()

    assert handover_s <= CLUSTER["cluster"]["leader_timeout_seconds"] + 2.0, handover_s
    # Two leaderships, two epochs: the successor decided under the second one.
    assert epoch == (2, successor[0]), epoch
    single = _run_single(kafka_bootstrap, topics, tmp_path / "single", last_ts, monitor)
    _assert_same_statistics(single, where)
    ia, _ = _incidents(single)
    ib, eb = _incidents(where)
    assert _incident_facts(ia) == _incident_facts(ib)
    assert len({(e[1], e[2]) for e in eb}) == len(eb)
    # Every notification the outbox holds was delivered; a message in flight at the kill
    # may be delivered again, under the same idempotency key, and nothing else twice.
    ids = [q.headers["webhook-id"] for q in accepted]
    state = _state(where)
    rows = state.outbox_rows()
    state.close()
    assert rows and {row.id for row in rows} == set(ids)
    assert all(row.delivered_ms is not None for row in rows)
    doubled = [k for k, n in Counter(ids).items() if n > 1]
    assert len(doubled) <= 1, doubled
    transitions = {(e[1], e[2]) for e in eb}
    alerted: Counter[tuple[str, str]] = Counter()
    messages: set[str] = set()
    for q in accepted:
        if q.headers["webhook-id"] in messages:
            continue
        messages.add(q.headers["webhook-id"])
        for a in json.loads(q.body)["data"]["alerts"]:
            alerted[(a["incident_id"], a["transition"])] += 1
    assert set(alerted) == transitions
    assert all(n == 1 for n in alerted.values()), alerted


def _post(daemon: DaemonProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{daemon.port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.mlflow
def test_a_training_job_in_flight_when_the_leader_dies_is_neither_lost_nor_doubled(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_url: str,
        mlflow_server: str) -> None:
    """The leader starts a job, then dies with it running. The next leader re-attaches
    it from the shared job store, sees it fail, raises the one ``training_failed``
    incident and pages once; nobody starts a second job for the same request."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    from mlflow import MlflowClient

    model = unique_model_name("ctr")
    client = MlflowClient(mlflow_server)
    client.create_registered_model(model)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.log_text(run.info.run_id, "a stand-in", "model/MLmodel")
    champion = client.create_model_version(model, source=f"{run.info.artifact_uri}/model",
                                           run_id=run.info.run_id)
    client.set_registered_model_alias(model, "champion", champion.version)

    topics = _topics(kafka_bootstrap)
    preds, fbs = drifting_world(20 * SEC, 500, (10 * SEC, 15 * SEC), seed=3)
    with Receiver(lambda req: Answer(204)) as hook:
        overrides = {
            **MONITOR, **_cluster(state_url),
            "mlflow": {"tracking_uri": mlflow_server},
            # The job: a stand-in that runs long enough to outlive its leader, then fails.
            "retrain": {"enabled": True, "entry_module": "tests.fake_jobs", "min_fresh_labels": 0,
                        "params": {"behaviour": "report_failed", "sleep_s": 8}},
            "alerts": {"sinks": [{"name": "oncall", "type": "webhook", "url": hook.url + "/hook",
                                  "secret_env": SECRET_ENV, "allow_http": True}],
                       "group_wait_seconds": 0, "poll_seconds": 0.2, "backoff_initial_seconds": 0.2},
        }
        shared = tmp_path / "cluster"
        replicas = [DaemonProcess(tmp_path / f"r{i}", kafka_bootstrap, topics, instance=f"r{i}",
                                  group=_group(state_url), shared_dir=shared, overrides=overrides)
                    for i in range(2)]
        for r in replicas:
            r.start()
        try:
            for r in replicas:
                r.wait_ready()
            _produce(kafka_bootstrap, topics, preds, fbs)
            (leader,) = wait_until(lambda: _leaders(replicas), 60, "a leader")
            boss = next(r for r in replicas if r.instance == leader)

            def launched() -> bool:
                # Until labels have matured the answer is no_data, and nothing starts.
                retrain = (boss.status() or {}).get("retrain") or {}
                if retrain.get("running"):
                    return True
                code, _ = _post(boss, "/retrain", {"model": model, "who": "test"})
                assert code == 202
                return False

            wait_until(launched, 90, "a job launched", every=1.0)
            boss.kill9()
            killed_at = time.monotonic()
            (successor,) = [r for r in replicas if r is not boss]
            wait_until(lambda: _leaders([successor]), 30, "a new leader", every=0.1)
            handover_s = time.monotonic() - killed_at
            # The same request again, to the new leader: the running job answers it.
            assert _post(successor, "/retrain", {"model": model, "who": "test"})[0] == 202

            def failed_and_paged() -> bool:
                incidents, _ = _incidents(state_url)
                return (any(i.kind == "training_failed" for i in incidents)
                        and any(b"training_failed" in q.body for q in hook.accepted()))

            wait_until(failed_and_paged, 60, "the job's failure as an incident and a page")
            time.sleep(3.0)  # nothing more may come
            status = successor.status() or {}
            state = _state(state_url)
            epoch = state.leader_epoch()
            state.close()
            assert successor.terminate() == 0, successor.tail()
        finally:
            for r in replicas:
                r.stop_quietly()
        accepted = hook.accepted()

    assert handover_s <= CLUSTER["cluster"]["leader_timeout_seconds"] + 2.0, handover_s
    assert epoch == (2, successor.instance), epoch
    jobs = SqlJobStore(state_url, group_id=_group(state_url))
    try:
        (job,) = jobs.jobs(model=model)
        assert job.state == "failed" and jobs.unreported() == [] and job.started_ms > 0, job.reason
        decisions = [d.decision.code for d in jobs.decisions(100, model=model)]
    finally:
        jobs.close()
    # One launch; the request the new leader got is answered by the job it re-attached.
    assert decisions.count("launched") == 1 and decisions[0] == "running", decisions
    assert any(d["job_id"] == job.job_id for d in status["retrain"]["recent_jobs"])
    incidents, events = _incidents(state_url)
    failed = [i for i in incidents if i.kind == "training_failed"]
    assert len(failed) == 1 and failed[0].evidence["job_id"] == job.job_id
    assert [e[2] for e in events if e[1] == failed[0].id] == ["firing"]
    pages = {q.headers["webhook-id"] for q in accepted if b"training_failed" in q.body}
    assert len(pages) == 1, pages


def test_a_leader_whose_epoch_is_over_stops_before_committing_another_decision(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """What a leader paused past its lock's timeout meets when it wakes: a successor has
    taken the next epoch (taken here by the test, the lock left to the old leader so that
    only the fence can stop it). Its next decision is refused whole, it exits 3, and the
    pointers stay where the epoch's end left them."""
    topics = _topics(kafka_bootstrap)
    preds, fbs = drifting_world(20 * SEC, 500, (10 * SEC, 15 * SEC), seed=4)
    half = len(preds) // 2
    group = f"fence-{uuid.uuid4().hex[:8]}"
    daemon = DaemonProcess(tmp_path / "r0", kafka_bootstrap, topics, instance="r0", group=group,
                           overrides={**MONITOR, **CLUSTER})
    db = tmp_path / "r0" / "state.db"
    daemon.start()
    try:
        daemon.wait_ready()
        _produce(kafka_bootstrap, topics, preds[:half], [f for f in fbs if f[0] < preds[half][0]])
        wait_until(lambda: _leaders([daemon]), 30, "the leader")
        state = open_state_store(db, group_id=group, instance="successor")
        wait_until(lambda: state.monitor_value("drift_upto") is not None, 60, "a first decision")
        assert state.leader_epoch() == (1, "r0")
        assert state.take_leadership("successor") == 2
        frozen = state.monitor_value("drift_upto")
        _produce(kafka_bootstrap, topics, preds[half:], [f for f in fbs if f[0] >= preds[half][0]])
        assert daemon.proc is not None
        code = daemon.proc.wait(timeout=60)
        assert code == 3, daemon.tail()
        assert state.monitor_value("drift_upto") == frozen  # nothing of epoch 1 after epoch 2
        assert "a newer leader has started" in daemon.log_path.read_text()
        state.close()
    finally:
        daemon.stop_quietly()
