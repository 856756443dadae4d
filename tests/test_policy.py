"""The retraining policy (retrain/policy.py): every path answers with its reason."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrain.policy import DAY_MS, DECISION_CODES, Decision, PolicySpec, RetrainPolicy
from retrain.spec import Trigger

MIN = 60_000
HOUR = 60 * MIN


def incident(at_ms: int, kind: str = "performance_drop", model: str = "ctr") -> Trigger:
    return Trigger(kind="incident", model=model, reason="AUC dropped", at_ms=at_ms,
                   incident_id=f"{kind}/{model}/auc@{at_ms}", incident_kind=kind)


def manual(at_ms: int) -> Trigger:
    return Trigger(kind="manual", model="ctr", reason="new features shipped", at_ms=at_ms, who="ana")


def schedule(at_ms: int) -> Trigger:
    return Trigger(kind="schedule", model="ctr", reason="cron 0 3 * * *", at_ms=at_ms)


@dataclasses.dataclass
class FakeState:
    """What the tracker would answer, updated as the simulated jobs start and finish."""

    running: int = 0
    last_started_ms: int | None = None
    fresh_labels: int = 10_000
    starts: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def decide(self, policy: RetrainPolicy, trigger: Trigger, *,
               severity: str | None = "warning") -> Decision:
        now = trigger.at_ms
        since = policy.budget_since_ms(now)
        d = policy.decide(trigger, now_ms=now, severity=severity, running=self.running,
                          last_started_ms=self.last_started_ms, fresh_labels=self.fresh_labels,
                          jobs_today=sum(1 for s in self.starts if s >= since),
                          seconds_today=self.seconds)
        if d.launch:
            self.running += 1
            self.last_started_ms = now
            self.starts.append(now)
        return d


def facts(**kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(now_ms=10 * HOUR, severity="warning", running=0, last_started_ms=None,
                                   fresh_labels=10_000, jobs_today=0, seconds_today=0.0)
    base.update(kw)
    return base


def test_spec_defaults_are_the_documented_ones() -> None:
    s = PolicySpec()
    assert s.incident_kinds == frozenset({"performance_drop", "prediction_drift", "feature_drift"})
    assert (s.min_severity, s.cooldown_ms, s.min_fresh_labels) == ("warning", 6 * HOUR, 5000)
    assert (s.max_running_per_model, s.max_jobs_per_day, s.max_gpu_seconds_per_day) == (1, 6, None)
    assert s.manual_bypasses_cooldown is True


@pytest.mark.parametrize("kw, needle", [
    ({"min_severity": "loud"}, "'loud'"),
    ({"cooldown_ms": -1}, "-1"),
    ({"min_fresh_labels": -5}, "-5"),
    ({"max_running_per_model": 0}, "max_running_per_model"),
    ({"max_jobs_per_day": 0}, "max_jobs_per_day"),
    ({"max_gpu_seconds_per_day": 0.0}, "max_gpu_seconds_per_day"),
    ({"incident_kinds": "feature_drift"}, "'feature_drift'"),
])
def test_spec_rejects_bad_values_naming_them(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        PolicySpec(**kw)  # type: ignore[arg-type]


def test_spec_freezes_incident_kinds_given_as_a_list() -> None:
    s = PolicySpec(incident_kinds=["feature_drift"])  # type: ignore[arg-type]
    assert s.incident_kinds == frozenset({"feature_drift"})
    hash(s)


def test_repeated_incidents_during_cooldown_launch_exactly_once() -> None:
    policy = RetrainPolicy(PolicySpec(cooldown_ms=6 * HOUR))
    state = FakeState()
    decisions = []
    # 50 incidents, one every 5 minutes (about 4 h): the first launches; its job runs
    # 40 min; everything after is refused, first as running, then as cooldown.
    for i in range(50):
        at = i * 5 * MIN
        if state.running and state.last_started_ms is not None and at - state.last_started_ms >= 40 * MIN:
            state.running = 0
        decisions.append(state.decide(policy, incident(at)))
    assert [d.launch for d in decisions].count(True) == 1
    assert decisions[0].code == "launched"
    codes = {d.code for d in decisions[1:]}
    assert codes == {"running", "cooldown"}
    assert all(d.reason for d in decisions)
    cooldown = next(d for d in decisions if d.code == "cooldown")
    assert cooldown.reason == "cooldown: last job started 40 min ago, cooldown is 6 h"


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.integers(min_value=0, max_value=3 * HOUR), min_size=1, max_size=50),
       run_ms=st.integers(min_value=MIN, max_value=2 * HOUR))
def test_launches_are_never_closer_than_the_cooldown(gaps: list[int], run_ms: int) -> None:
    spec = PolicySpec(cooldown_ms=6 * HOUR, max_jobs_per_day=1000)
    policy = RetrainPolicy(spec)
    state = FakeState()
    at = 0
    for gap in gaps:
        at += gap
        if state.running and state.last_started_ms is not None and at - state.last_started_ms >= run_ms:
            state.running = 0
        d = state.decide(policy, incident(at))
        assert d.code in DECISION_CODES and d.reason.startswith(d.code)
    assert all(b - a >= spec.cooldown_ms for a, b in zip(state.starts, state.starts[1:], strict=False))
    assert len(state.starts) >= 1


def test_manual_inside_cooldown_launches_when_allowed() -> None:
    policy = RetrainPolicy(PolicySpec())
    d = policy.decide(manual(0), **facts(last_started_ms=10 * HOUR - 30 * MIN))
    assert d.launch and d.code == "launched"
    assert "manual request by ana" in d.reason


def test_manual_inside_cooldown_is_refused_when_not_allowed() -> None:
    policy = RetrainPolicy(PolicySpec(manual_bypasses_cooldown=False))
    d = policy.decide(manual(0), **facts(last_started_ms=10 * HOUR - 30 * MIN))
    assert (d.launch, d.code) == (False, "cooldown")


def test_manual_never_launches_while_a_job_is_running() -> None:
    policy = RetrainPolicy(PolicySpec())
    d = policy.decide(manual(0), **facts(running=1, last_started_ms=10 * HOUR - 1 * MIN))
    assert (d.launch, d.code) == (False, "running")
    assert d.reason == "running: 1 job of ctr is running, at most 1 at a time"


def test_schedule_respects_the_cooldown() -> None:
    policy = RetrainPolicy(PolicySpec())
    d = policy.decide(schedule(0), **facts(last_started_ms=10 * HOUR - 2 * HOUR - 5 * MIN))
    assert d.code == "cooldown"
    assert d.reason == "cooldown: last job started 2 h 5 min ago, cooldown is 6 h"


def test_too_few_labels_is_refused_with_the_numbers() -> None:
    d = RetrainPolicy(PolicySpec()).decide(incident(0), **facts(fresh_labels=1234))
    assert (d.launch, d.code) == (False, "too_few_labels")
    assert d.reason == "too_few_labels: 1234 fresh labelled samples, at least 5000 needed"


def test_job_budget_exhaustion_is_refused() -> None:
    d = RetrainPolicy(PolicySpec(max_jobs_per_day=6)).decide(manual(0), **facts(jobs_today=6))
    assert (d.launch, d.code) == (False, "budget_jobs")
    assert d.reason == "budget_jobs: 6 jobs started in the last 24 h, the budget is 6"


def test_time_budget_exhaustion_is_refused() -> None:
    policy = RetrainPolicy(PolicySpec(max_gpu_seconds_per_day=2 * 3600.0))
    assert policy.decide(manual(0), **facts(seconds_today=7199.0)).launch
    d = policy.decide(manual(0), **facts(seconds_today=7200.0))
    assert (d.launch, d.code) == (False, "budget_time")
    assert d.reason == "budget_time: jobs ran 2 h in the last 24 h, the budget is 2 h"


def test_budget_is_a_rolling_day_in_the_simulation() -> None:
    policy = RetrainPolicy(PolicySpec(cooldown_ms=0, max_jobs_per_day=3))
    state = FakeState()
    # One manual trigger an hour, each job over before the next: three launch, the
    # rest of the day is refused, and the first slot frees 24 h after the first start.
    codes = []
    for h in range(26):
        state.running = 0
        codes.append(state.decide(policy, manual(h * HOUR)).code)
    assert codes[:3] == ["launched"] * 3
    assert set(codes[3:24]) == {"budget_jobs"}
    assert codes[24] == "launched"
    assert policy.budget_since_ms(DAY_MS) == 1


def test_incident_kind_not_configured() -> None:
    d = RetrainPolicy(PolicySpec()).decide(incident(0, kind="data_quality"), **facts())
    assert (d.launch, d.code) == (False, "kind_not_configured")
    assert "'data_quality'" in d.reason and "feature_drift" in d.reason


@pytest.mark.parametrize("severity, launch", [("info", False), ("warning", True), ("critical", True),
                                              (None, False)])
def test_min_severity_gates_incidents(severity: str | None, launch: bool) -> None:
    d = RetrainPolicy(PolicySpec(min_severity="warning")).decide(incident(0), **facts(severity=severity))
    assert d.launch is launch
    assert d.code == ("launched" if launch else "severity")


def test_unknown_severity_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'urgent'"):
        RetrainPolicy(PolicySpec()).decide(incident(0), **facts(severity="urgent"))


def test_severity_is_ignored_for_schedule_and_manual() -> None:
    policy = RetrainPolicy(PolicySpec(min_severity="critical"))
    assert policy.decide(schedule(0), **facts(severity=None)).launch
    assert policy.decide(manual(0), **facts(severity="info")).launch


def test_a_last_start_in_the_future_counts_as_just_now() -> None:
    d = RetrainPolicy(PolicySpec()).decide(incident(0), **facts(last_started_ms=10 * HOUR + 5 * MIN))
    assert d.code == "cooldown"
    assert "0 s ago" in d.reason


def test_running_is_reported_before_cooldown_and_labels() -> None:
    d = RetrainPolicy(PolicySpec()).decide(incident(0), **facts(running=2, last_started_ms=10 * HOUR,
                                                                fresh_labels=0))
    assert d.code == "running"
    assert d.reason.startswith("running: 2 jobs of ctr are running")


def test_decision_is_consistent_and_serialisable() -> None:
    d = RetrainPolicy(PolicySpec()).decide(incident(0), **facts())
    assert d.to_dict()["trigger"]["incident_kind"] == "performance_drop"
    assert d.at_ms == 10 * HOUR
    with pytest.raises(ValueError, match="contradicts"):
        Decision(launch=True, reason="x", code="cooldown", trigger=d.trigger, at_ms=0)
    with pytest.raises(ValueError, match="'maybe'"):
        Decision(launch=False, reason="x", code="maybe", trigger=d.trigger, at_ms=0)
