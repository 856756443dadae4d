"""Whether a trigger becomes a training run: the retraining policy (docs/retraining.md).

A pure core: the caller gathers the facts (how many jobs are running, when the last
one started, how many fresh labels there are, what was spent today) and passes the
time in; :meth:`RetrainPolicy.decide` answers with a :class:`Decision` that carries a
machine ``code`` and one human sentence with the numbers. Every path answers, the
"no"s included, because an operator asking "why did it not retrain?" deserves the
same evidence as one asking "why did it?" (docs/retraining.md).

The checks run in a fixed order and the first that refuses is the answer: what the
trigger is (its incident kind and severity), then what is happening (a running job,
the cooldown), then what there is to learn from (fresh labels), then what may be
spent (the budgets). So a storm of incidents during a run reads "running", not
"cooldown", which is the more useful thing to know.
"""

from __future__ import annotations

import dataclasses

from retrain.spec import Trigger

__all__ = ["DECISION_CODES", "SEVERITIES", "Decision", "PolicySpec", "RetrainPolicy"]

#: Severities from least to most severe; the monitor's vocabulary (monitor/incidents.py),
#: repeated here because retrain/ must not import monitor/.
SEVERITIES = ("info", "warning", "critical")

#: Every ``Decision.code``; ``launched`` is the only yes.
DECISION_CODES = ("launched", "kind_not_configured", "severity", "running", "cooldown",
                  "too_few_labels", "budget_jobs", "budget_time",
                  # Decided by the daemon after a "yes": no matured data yet, or the
                  # registry could not say which version to warm-start from.
                  "no_data", "registry")

_HOUR_MS = 3_600_000
#: "Per day" is a rolling 24 h, not a calendar day: a budget that resets at midnight
#: UTC lets two full budgets be spent within minutes of each other.
DAY_MS = 24 * _HOUR_MS

_DEFAULT_KINDS = frozenset({"performance_drop", "prediction_drift", "feature_drift"})


def _fmt_duration(ms: float) -> str:
    """``"41 min"``, ``"6 h"``, ``"2 h 5 min"``, ``"30 s"``: short and exact enough for a reason."""
    s = max(0, round(ms / 1000))
    if s < 60:
        return f"{s} s"
    m, _ = divmod(s, 60)
    h, m = divmod(m, 60)
    if h == 0:
        return f"{m} min"
    return f"{h} h" if m == 0 else f"{h} h {m} min"


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """The knobs of the retraining policy (defaults and why: docs/retraining.md).

    Args:
        incident_kinds: incident kinds that may start a run. Data-quality incidents
            are left out by default: retraining on broken data teaches the model the
            breakage.
        min_severity: the least severe incident that may start a run.
        cooldown_ms: after a job starts, further automatic triggers for the model are
            refused for this long; a fine-tune needs time to be evaluated and its
            effect measured before another is worth its cost.
        min_fresh_labels: labelled samples matured since the base version's training
            window ended; fewer and the run mostly relearns what the model knows.
        max_running_per_model: concurrent jobs per model (1: two runs from the same
            base race to the registry and waste the GPU).
        max_jobs_per_day: jobs started in any rolling 24 h, a budget.
        max_gpu_seconds_per_day: job wall time (finished and running) in any rolling
            24 h; None: unlimited.
        manual_bypasses_cooldown: a person may retrain inside the cooldown (never
            beyond ``max_running_per_model``, never past the budgets).

    Example:
        >>> PolicySpec(cooldown_ms=3_600_000).min_severity
        'warning'
        >>> PolicySpec(min_severity="loud")
        Traceback (most recent call last):
        ...
        ValueError: min_severity must be one of ('info', 'warning', 'critical'), got 'loud'
    """

    incident_kinds: frozenset[str] = _DEFAULT_KINDS
    min_severity: str = "warning"
    cooldown_ms: int = 6 * _HOUR_MS
    min_fresh_labels: int = 5000
    max_running_per_model: int = 1
    max_jobs_per_day: int = 6
    max_gpu_seconds_per_day: float | None = None
    manual_bypasses_cooldown: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.incident_kinds, str) or not all(
                isinstance(k, str) and k for k in self.incident_kinds):
            msg = f"incident_kinds must be a set of non-empty kind names, got {self.incident_kinds!r}"
            raise ValueError(msg)
        # Accept any iterable from a config file but keep the frozen type, so the spec
        # stays hashable and nobody mutates a shared default.
        object.__setattr__(self, "incident_kinds", frozenset(self.incident_kinds))
        if self.min_severity not in SEVERITIES:
            msg = f"min_severity must be one of {SEVERITIES}, got {self.min_severity!r}"
            raise ValueError(msg)
        if self.cooldown_ms < 0:
            msg = f"cooldown_ms must be >= 0, got {self.cooldown_ms}"
            raise ValueError(msg)
        if self.min_fresh_labels < 0:
            msg = f"min_fresh_labels must be >= 0, got {self.min_fresh_labels}"
            raise ValueError(msg)
        if self.max_running_per_model < 1:
            msg = f"max_running_per_model must be >= 1, got {self.max_running_per_model}"
            raise ValueError(msg)
        if self.max_jobs_per_day < 1:
            msg = f"max_jobs_per_day must be >= 1, got {self.max_jobs_per_day}"
            raise ValueError(msg)
        if self.max_gpu_seconds_per_day is not None and self.max_gpu_seconds_per_day <= 0:
            msg = f"max_gpu_seconds_per_day must be > 0 or None, got {self.max_gpu_seconds_per_day}"
            raise ValueError(msg)

    def build(self) -> RetrainPolicy:
        return RetrainPolicy(self)


@dataclasses.dataclass(frozen=True)
class Decision:
    """One answer of the policy, yes or no, as logged and shown by ``/status``.

    Args:
        launch: whether a job is to be started.
        reason: one sentence for people, with the numbers that decided it.
        code: one of :data:`DECISION_CODES`, for metrics and tests.
        trigger: what asked.
        at_ms: when it was decided (epoch ms).
    """

    launch: bool
    reason: str
    code: str
    trigger: Trigger
    at_ms: int

    def __post_init__(self) -> None:
        if self.code not in DECISION_CODES:
            msg = f"decision code must be one of {DECISION_CODES}, got {self.code!r}"
            raise ValueError(msg)
        if self.launch != (self.code == "launched"):
            msg = f"decision launch={self.launch} contradicts code {self.code!r}"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, object]:
        return {"launch": self.launch, "reason": self.reason, "code": self.code,
                "trigger": self.trigger.to_dict(), "at_ms": self.at_ms}


class RetrainPolicy:
    """Decides, from facts passed in, whether a trigger starts a training run.

    Args:
        spec: the knobs.

    Example:
        >>> p = RetrainPolicy(PolicySpec())
        >>> t = Trigger(kind="manual", model="ctr", reason="new features", at_ms=0, who="ana")
        >>> d = p.decide(t, now_ms=10_000, severity=None, running=0, last_started_ms=5_000,
        ...              fresh_labels=9000, jobs_today=1, seconds_today=600.0)
        >>> d.launch, d.code
        (True, 'launched')
        >>> p.decide(t, now_ms=10_000, severity=None, running=1, last_started_ms=5_000,
        ...          fresh_labels=9000, jobs_today=1, seconds_today=600.0).reason
        'running: 1 job of ctr is running, at most 1 at a time'
    """

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec

    def budget_since_ms(self, now_ms: int) -> int:
        """Start of the budget window: count ``jobs_today``/``seconds_today`` from here (inclusive).

        The window is the 24 h ending now, ``(now - 24 h, now]``: a job started exactly a day
        ago no longer counts, hence the ``+ 1`` for callers that filter ``started >= since``.
        """
        return now_ms - DAY_MS + 1

    def decide(self, trigger: Trigger, *, now_ms: int, severity: str | None, running: int,
               last_started_ms: int | None, fresh_labels: int, jobs_today: int,
               seconds_today: float) -> Decision:
        """Answer one trigger.

        Args:
            trigger: what asked.
            now_ms: the current time (epoch ms).
            severity: the incident's severity (``info``/``warning``/``critical``), for
                incident triggers; ignored for the others.
            running: jobs of ``trigger.model`` pending or running now.
            last_started_ms: when the model's latest job started (any outcome: a
                failed run also used the GPU and ends in cooldown, which keeps a
                broken job from being retried every window); None: never.
            fresh_labels: labelled samples matured since the base version's
                training window ended.
            jobs_today, seconds_today: jobs started and their wall time in the budget
                window (:meth:`budget_since_ms`).

        Raises:
            ValueError: ``severity`` is not a known severity.
        """
        s = self.spec
        model = trigger.model

        def no(code: str, reason: str) -> Decision:
            return Decision(launch=False, reason=reason, code=code, trigger=trigger, at_ms=now_ms)

        if trigger.kind == "incident":
            if trigger.incident_kind not in s.incident_kinds:
                return no("kind_not_configured",
                          f"kind_not_configured: incident kind {trigger.incident_kind!r} does not "
                          f"trigger retraining (configured: {', '.join(sorted(s.incident_kinds))})")
            if severity is None:
                return no("severity", f"severity: incident {trigger.incident_id} has no severity, "
                                      f"retraining needs at least {s.min_severity}")
            if severity not in SEVERITIES:
                msg = f"unknown severity {severity!r}: expected one of {SEVERITIES}"
                raise ValueError(msg)
            if SEVERITIES.index(severity) < SEVERITIES.index(s.min_severity):
                return no("severity", f"severity: incident {trigger.incident_id} is {severity}, "
                                      f"retraining needs at least {s.min_severity}")
        if running >= s.max_running_per_model:
            verb = f"job of {model} is" if running == 1 else f"jobs of {model} are"
            return no("running", f"running: {running} {verb} running, at most "
                                 f"{s.max_running_per_model} at a time")
        if last_started_ms is not None and s.cooldown_ms > 0:
            # A last start in the future (clock skew between daemons) counts as "just now":
            # refusing is the safe side of the doubt.
            ago = max(0, now_ms - last_started_ms)
            bypass = trigger.kind == "manual" and s.manual_bypasses_cooldown
            if ago < s.cooldown_ms and not bypass:
                return no("cooldown", f"cooldown: last job started {_fmt_duration(ago)} ago, "
                                      f"cooldown is {_fmt_duration(s.cooldown_ms)}")
        if fresh_labels < s.min_fresh_labels:
            return no("too_few_labels", f"too_few_labels: {fresh_labels} fresh labelled samples, "
                                        f"at least {s.min_fresh_labels} needed")
        if jobs_today >= s.max_jobs_per_day:
            return no("budget_jobs", f"budget_jobs: {jobs_today} jobs started in the last 24 h, "
                                     f"the budget is {s.max_jobs_per_day}")
        if s.max_gpu_seconds_per_day is not None and seconds_today >= s.max_gpu_seconds_per_day:
            return no("budget_time", f"budget_time: jobs ran {_fmt_duration(seconds_today * 1000)} "
                                     f"in the last 24 h, the budget is "
                                     f"{_fmt_duration(s.max_gpu_seconds_per_day * 1000)}")
        how = {"incident": f"incident {trigger.incident_id} ({trigger.incident_kind}, {severity})",
               "schedule": f"schedule ({trigger.reason})",
               "manual": f"manual request by {trigger.who or 'an operator'}"}[trigger.kind]
        since = ("no earlier job" if last_started_ms is None
                 else f"last job started {_fmt_duration(max(0, now_ms - last_started_ms))} ago")
        return Decision(launch=True, code="launched", trigger=trigger, at_ms=now_ms,
                        reason=f"launched: {how}; {fresh_labels} fresh labels, {since}, "
                               f"{jobs_today + 1} of {s.max_jobs_per_day} jobs in 24 h")
