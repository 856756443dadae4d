"""The analysis stage end to end without Kafka: ingested windows in, incidents out.

A simulated recommender serves a CTR model for 45 minutes of event time: the first 10
minutes bootstrap the references, one feature shifts and the click rate halves from
minute 15 to 25, then the world returns to normal. Ingestion is the real Ingestor
(records are plain objects); the broker path is covered in test_daemon_kafka.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from connectors.events import EventKind
from connectors.state import StateStore
from connectors.store import FeedbackStore, SpillFiles
from monitor.analysis import Analysis, AnalysisSpec, NotYet
from monitor.incidents import Incident
from monitor.ingest import Ingestor
from monitor.join import JoinSpec
from monitor.metrics import Metrics
from monitor.stats.drift import DriftSpec
from monitor.stats.labels import LabelSummary
from monitor.stats.performance import PerformanceSpec
from monitor.windows import WindowSpec
from tests.events_gen import BASE_TS_MS, drifting_world
from tests.test_ingest import Clock, MemoryDeadLetters, Rec

P, F = "predictions", "feedback"
MIN = 60_000
WSPEC = WindowSpec(size_ms=MIN, allowed_lateness_ms=2_000, idle_timeout_ms=5_000)
SPEC = AnalysisSpec(
    window_ms=MIN, join=JoinSpec(attribution_ms=2 * MIN, label_types=("click", "like"), window_ms=MIN),
    primary_label="click", period_ms=5 * MIN, bootstrap_ms=10 * MIN, bootstrap_max_rows=50_000,
    resolve_after=2, drift=DriftSpec(), performance=PerformanceSpec(), performance_k=2,
    performance_m=3, sequential=True, arl0_events=1e6, cusum_drops=(0.1, 0.3, 0.5),
    labels_stall_ms=30 * MIN)
RATE = 40  # predictions per second
SHIFT = (15 * MIN, 25 * MIN)


@dataclasses.dataclass
class Run:
    tmp: Path
    ingestor: Ingestor
    analysis: Analysis
    clock: Clock


def _start(tmp: Path) -> Run:
    clock = Clock()
    state = StateStore(tmp / "state.db", group_id="g", instance="a")
    ing = Ingestor({P: EventKind.PREDICTION, F: EventKind.FEEDBACK}, WSPEC, state=state,
                   store=FeedbackStore(tmp / "store"), spills=SpillFiles(tmp / "spill"),
                   dead_letters=MemoryDeadLetters(), metrics=Metrics(), max_message_bytes=65536,
                   clock_ms=clock)
    ing.assign([(P, 0), (F, 0)])
    return Run(tmp, ing, _analysis(tmp), clock)


def _analysis(tmp: Path, store: type[StateStore] = StateStore) -> Analysis:
    return Analysis(SPEC, store(tmp / "state.db", group_id="g", instance="a"), P, F, None, Metrics())


class FailingCommits(StateStore):
    """A state store whose every third analysis commit fails, as a full disk or a
    dropped database connection would: nothing of that commit is written."""

    calls = 0

    def commit_monitor(self, step):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls % 3 == 0:
            raise OSError("disk full (injected)")
        super().commit_monitor(step)


def _drain(a: Analysis) -> None:
    while True:
        try:
            if not a.step():
                return
        except NotYet:  # pragma: no cover - files are published synchronously here
            continue
        except OSError as exc:  # the daemon logs "analysis step failed; retrying"
            assert "injected" in str(exc)
            continue


def _feed(run: Run, preds, fbs, *, crash_every: int | None = None, after_slice=None) -> None:
    """Ingest in 10 s slices of event time, checkpointing and analysing after each.

    ``after_slice(upto_ms)``, if given, runs after each slice's analysis (tests that change
    the world around the analysis mid-stream: an outage, a recovery)."""
    pi = fi = 0
    end = preds[-1][0] + 1
    for steps, upto in enumerate(range(BASE_TS_MS + 10_000, end + 10_000, 10_000), start=1):
        pj = pi
        while pj < len(preds) and preds[pj][0] < upto:
            pj += 1
        fj = fi
        while fj < len(fbs) and fbs[fj][0] < upto:
            fj += 1
        if pj > pi:
            run.ingestor.ingest(P, [(0, [Rec(k, preds[k][1]) for k in range(pi, pj)])])
        if fj > fi:
            run.ingestor.ingest(F, [(0, [Rec(k, fbs[k][1]) for k in range(fi, fj)])])
        pi, fi = pj, fj
        run.clock.now += 1_000
        run.ingestor.checkpoint()
        _drain(run.analysis)
        if after_slice is not None:
            after_slice(upto)
        if crash_every and steps % crash_every == 0:
            run.analysis.state.close()  # the analysis "dies"; its durable state remains
            run.analysis = _analysis(run.tmp)
    # The feedback of the last predictions, then the stream pauses: everything closes.
    if fi < len(fbs):
        run.ingestor.ingest(F, [(0, [Rec(k, fbs[k][1]) for k in range(fi, len(fbs))])])
    run.clock.now += WSPEC.idle_timeout_ms + 1
    run.ingestor.checkpoint()
    _drain(run.analysis)


def _incidents(state: StateStore) -> list[Incident]:
    return sorted((Incident.from_json(r.body) for r in state.incidents(limit=1000)),
                  key=lambda i: i.id)


@pytest.fixture(scope="module")
def world():
    return drifting_world(45 * MIN, RATE, SHIFT, seed=11)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    run = _start(tmp)
    _feed(run, *world)
    return run


def test_references_are_bootstrapped_and_said_so(finished: Run) -> None:
    status = finished.analysis.status()
    assert status["references"]["ctr@7"].startswith("bootstrap:")
    assert status["drift_upto"] is not None and status["join_upto"] is not None


def test_the_shifted_feature_fires_then_resolves_and_nothing_else_drifts(finished: Run) -> None:
    incs = _incidents(finished.analysis.state)
    drift = [i for i in incs if i.kind in ("feature_drift", "prediction_drift")]
    assert [i.subject for i in drift] == ["f.age"], [i.fingerprint for i in drift]
    age = drift[0]
    # k = 3 of m = 5: the third shifted window decides.
    assert age.opened_ms == BASE_TS_MS + SHIFT[0] + 3 * MIN
    assert age.status == "resolved" and age.resolved_ms is not None
    assert SHIFT[1] < age.resolved_ms - BASE_TS_MS <= SHIFT[1] + 6 * MIN
    assert age.opening_evidence["psi"] > 0.1 and age.opening_evidence["version"] == "7"


def test_the_click_drop_pages_sequentially_and_by_the_period_tests(finished: Run) -> None:
    incs = {i.subject: i for i in _incidents(finished.analysis.state) if i.kind == "performance_drop"}
    assert "cusum:click" in incs and "rate:click" in incs, list(incs)
    cusum, rate = incs["cusum:click"], incs["rate:click"]
    # The CUSUM pages within a few windows of the change, before the first period ends.
    assert SHIFT[0] < cusum.opened_ms - BASE_TS_MS <= SHIFT[0] + 4 * MIN
    # The period test needs 2 of 3 periods of 5 minutes: 10 minutes after the change.
    assert rate.opened_ms - BASE_TS_MS == SHIFT[0] + 10 * MIN
    assert rate.opening_evidence["relative_change"] < -0.3
    assert cusum.severity == "critical" and rate.severity == "critical"
    assert all(i.status == "resolved" for i in incs.values())
    # No false page outside the drop: nothing but the click rate and its consequences.
    assert set(incs) <= {"cusum:click", "rate:click", "rate:like", "calibration", "log_loss"}


def test_no_data_quality_findings_on_clean_data(finished: Run) -> None:
    assert [i.fingerprint for i in _incidents(finished.analysis.state) if i.kind == "data_quality"] == []


def test_incident_log_has_each_transition_once(finished: Run) -> None:
    events = finished.analysis.state.incident_events(limit=10_000)
    pairs = [(e[1], e[2]) for e in events]
    assert len(pairs) == len(set(pairs))
    for inc in _incidents(finished.analysis.state):
        assert (inc.id, "firing") in pairs and (inc.id, "resolved") in pairs


def test_restarts_of_the_analysis_give_the_same_incidents(world, finished: Run, tmp_path: Path) -> None:
    run = _start(tmp_path)
    _feed(run, *world, crash_every=7)
    again = [(i.id, i.status, i.opened_ms, i.resolved_ms, i.firing_evaluations)
             for i in _incidents(run.analysis.state)]
    once = [(i.id, i.status, i.opened_ms, i.resolved_ms, i.firing_evaluations)
            for i in _incidents(finished.analysis.state)]
    assert again == once


def test_failed_commits_lose_no_transition_and_count_no_window_twice(world, finished: Run,
                                                                     tmp_path: Path) -> None:
    """Every third commit fails after deciding changed the incident book and the
    detectors in memory; the step is retried, as the daemon does. The incidents and
    their log must be those of the run without failures: a book left ahead of the store
    would open the retried incident silently (no ``firing`` in the log, no page), and a
    CUSUM left ahead would count a window's labels twice."""
    run = _start(tmp_path)
    run.analysis = _analysis(tmp_path, FailingCommits)
    _feed(run, *world)
    assert run.analysis.state.calls > 100, run.analysis.state.calls  # type: ignore[attr-defined]

    def record(state: StateStore) -> tuple[list[tuple[object, ...]], list[tuple[str, str]]]:
        incs = [(i.id, i.status, i.opened_ms, i.resolved_ms, i.firing_evaluations,
                 i.clean_evaluations, i.severity) for i in _incidents(state)]
        log = sorted((e[1], e[2]) for e in state.incident_events(limit=10_000))
        return incs, log

    assert record(run.analysis.state) == record(finished.analysis.state)


def test_a_stored_reference_is_used_instead_of_bootstrapping(world, tmp_path: Path) -> None:

    from connectors.events import decode_batch
    from monitor.analysis import DirectoryReferences
    from monitor.stats.profile import Profile
    from monitor.stats.reference import Reference

    preds, _ = world
    # The reference: what the model saw in training, here the first 10 quiet minutes.
    train = decode_batch(EventKind.PREDICTION, [v for t, v in preds if t < BASE_TS_MS + 10 * MIN],
                         max_bytes=65536).table
    cols = [c for c in train.column_names if c == "score" or c.startswith("f.")]
    ref = Reference(Profile.fit(train.select(cols).to_pandas(), SPEC.profile), None, "training")
    (tmp_path / "refs" / "ctr" / "7").mkdir(parents=True)
    (tmp_path / "refs" / "ctr" / "7" / "reference.json").write_text(ref.to_json())

    run = _start(tmp_path)
    run.analysis = Analysis(SPEC, StateStore(tmp_path / "state.db", group_id="g", instance="a"), P, F,
                            DirectoryReferences(tmp_path / "refs"), Metrics())
    cut = BASE_TS_MS + 20 * MIN
    _feed(run, [p for p in preds if p[0] < cut], [f for f in world[1] if f[0] < cut])
    assert run.analysis.status()["references"]["ctr@7"].startswith("file:")
    age = [i for i in _incidents(run.analysis.state) if i.kind == "feature_drift"]
    assert [i.subject for i in age] == ["f.age"]
    assert age[0].opened_ms == BASE_TS_MS + SHIFT[0] + 3 * MIN


def test_a_stationary_hour_raises_no_incident(tmp_path: Path) -> None:
    """Every rule at once on an unchanged world: 60 drift windows x 3 features and the
    score, 10 performance periods x 5 metrics, 144k events of CUSUM (ARL 1e6)."""
    preds, fbs = drifting_world(60 * MIN, RATE, (0, 0), seed=23)
    run = _start(tmp_path)
    _feed(run, preds, fbs)
    assert run.analysis.status()["join_upto"] is not None
    assert [i.fingerprint for i in _incidents(run.analysis.state)] == []


def test_a_sparse_start_is_no_label_reference(tmp_path: Path) -> None:
    """A version's first bootstrap period held 9 rows and no click: its label reference
    used to be those 9 rows (rate 0.0), which switched the CUSUM off for good. The
    reference now waits for bootstrap_min_rows rows and bootstrap_min_labels clicks."""
    preds, fbs = drifting_world(30 * MIN, RATE, SHIFT, seed=12)
    quiet = BASE_TS_MS + SPEC.bootstrap_ms + 2 * MIN  # longer than a bootstrap period
    early = [p for p in preds if p[0] < quiet]
    preds = early[:: max(1, len(early) // 9)][:9] + [p for p in preds if p[0] >= quiet]
    fbs = [f for f in fbs if f[0] >= quiet]
    run = _start(tmp_path)
    _feed(run, preds, fbs)
    state = run.analysis.state
    version = json.loads(state.monitor_value("version/ctr@7") or "{}")
    assert version["label_ref_done"]
    ref = LabelSummary.from_dict(version["label_ref"])
    assert ref.n >= SPEC.bootstrap_min_rows
    assert ref.positives["click"] >= SPEC.bootstrap_min_labels and 0 < ref.rate("click") < 1
    kinds = {(i.kind, i.subject) for i in _incidents(state)}
    assert ("performance_drop", "cusum:click") in kinds  # the sequential test is on
