"""Evidence in, incidents out: dedupe by fingerprint, debounce, resolve.

The statistics decide *whether* something is wrong in one window (with their own
persistence rules, e.g. k of the last m windows for drift). This module decides what
on-call sees: one incident per fingerprint ``kind/model/subject`` for as long as the
condition lasts, not one per window; an escalation when the severity rises; and a
resolution only after ``resolve_after`` consecutive clean evaluations, so a condition
hovering at its threshold does not page, clear and page again every minute.

Pure: the caller passes the evaluation time (the end of the window the evidence is
about, i.e. event time, so a replay after a crash reproduces the same incidents) and
persists what `IncidentBook.observe` returns. Incidents are plain JSON documents in
the state store; alert delivery (connectors/alerts.py) reads the transitions.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

__all__ = ["Incident", "IncidentBook", "Outcome", "Severity", "Signal", "Transition"]

#: How many firing windows an incident remembers (its evidence trail).
MAX_WINDOWS = 50
#: How many evaluations (firing or clean) its metric history keeps: the report's plot.
MAX_HISTORY = 240
#: The evidence key that is an incident's headline number, first present wins: PSI for
#: drift, the value of a data-quality check, the observed metric of a drop test, the
#: window's rate for the CUSUM.
HEADLINE_KEYS = ("psi", "value", "observed", "window_rate")


class Severity(enum.IntEnum):
    """Ordered, so an incident escalates when a signal is more severe than before."""

    INFO = 1
    WARNING = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> Severity:
        try:
            return cls[value.upper()]
        except KeyError:
            msg = f"unknown severity {value!r}: expected one of info, warning, critical"
            raise ValueError(msg) from None


@dataclasses.dataclass(frozen=True)
class Signal:
    """One rule's verdict on one subject for one evaluation.

    ``firing=False`` signals matter too: they are what resolves an open incident, so
    the caller emits one for every subject it evaluated.
    """

    kind: str
    model: str
    subject: str
    firing: bool
    window_start_ms: int
    window_end_ms: int
    severity: Severity = Severity.WARNING
    summary: str = ""
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return f"{self.kind}/{self.model}/{self.subject}"


class Incident(msgspec.Struct, kw_only=True):
    """The durable record of one condition, from first firing window to resolution."""

    id: str
    fingerprint: str
    kind: str
    model: str
    subject: str
    severity: str
    status: str  # "firing" | "resolved"
    summary: str
    opened_ms: int
    updated_ms: int
    resolved_ms: int | None = None
    clean_evaluations: int = 0
    firing_evaluations: int = 0
    #: [start, end] of the windows that fired, newest last, at most MAX_WINDOWS.
    windows: list[list[int]] = msgspec.field(default_factory=list)
    #: The statistics of the latest firing evaluation.
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)
    #: ... and of the evaluation that opened the incident (what paged).
    opening_evidence: dict[str, Any] = msgspec.field(default_factory=dict)
    #: [window end ms, headline number or None, firing] per evaluation since it opened,
    #: at most MAX_HISTORY, oldest first (the metric over time in the drift report).
    history: list[list[Any]] = msgspec.field(default_factory=list)

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Incident:
        return msgspec.json.decode(text, type=cls)


@dataclasses.dataclass(frozen=True)
class Transition:
    """What changed: ``firing`` (new), ``escalated`` (severity rose), ``resolved``."""

    transition: str
    incident: Incident


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One evaluation's effect: the transitions to announce, and every incident whose
    record changed (also without a transition, e.g. one more clean window counted),
    to persist."""

    transitions: list[Transition]
    touched: list[Incident]


class IncidentBook:
    """The open incidents and the rule that opens, escalates and resolves them.

    Args:
        resolve_after: consecutive clean evaluations that resolve an incident.
        open_incidents: the firing incidents loaded from the state store.

    Example:
        >>> book = IncidentBook(resolve_after=2)
        >>> fire = Signal("feature_drift", "ctr", "f.age", True, 0, 60_000)
        >>> [t.transition for t in book.observe([fire]).transitions]
        ['firing']
        >>> book.observe([dataclasses.replace(fire, window_end_ms=120_000)]).transitions
        []
        >>> clean = dataclasses.replace(fire, firing=False, window_end_ms=180_000)
        >>> [[t.transition for t in book.observe([clean]).transitions] for _ in range(2)]
        [[], ['resolved']]
    """

    def __init__(self, resolve_after: int = 3, open_incidents: Iterable[Incident] = ()) -> None:
        if resolve_after < 1:
            msg = f"resolve_after must be >= 1, got {resolve_after}"
            raise ValueError(msg)
        self.resolve_after = resolve_after
        self._open: dict[str, Incident] = {i.fingerprint: i for i in open_incidents
                                           if i.status == "firing"}

    @property
    def open(self) -> dict[str, Incident]:
        return dict(self._open)

    def observe(self, signals: Iterable[Signal]) -> Outcome:
        """Apply one evaluation's signals."""
        out: list[Transition] = []
        touched: dict[str, Incident] = {}
        for s in signals:
            fp = s.fingerprint
            inc = self._open.get(fp)
            if s.firing:
                if inc is None:
                    inc = Incident(
                        id=f"{fp}@{s.window_end_ms}", fingerprint=fp, kind=s.kind, model=s.model,
                        subject=s.subject, severity=s.severity.label, status="firing",
                        summary=s.summary, opened_ms=s.window_end_ms, updated_ms=s.window_end_ms,
                        firing_evaluations=1, windows=[[s.window_start_ms, s.window_end_ms]],
                        evidence=dict(s.evidence), opening_evidence=dict(s.evidence))
                    self._open[fp] = inc
                    out.append(Transition("firing", inc))
                else:
                    escalated = s.severity > Severity.parse(inc.severity)
                    inc.clean_evaluations = 0
                    inc.firing_evaluations += 1
                    inc.updated_ms = max(inc.updated_ms, s.window_end_ms)
                    inc.summary = s.summary or inc.summary
                    inc.evidence = dict(s.evidence)
                    inc.windows = [*inc.windows, [s.window_start_ms, s.window_end_ms]][-MAX_WINDOWS:]
                    if escalated:
                        inc.severity = s.severity.label
                        out.append(Transition("escalated", inc))
                _record(inc, s)
                touched[fp] = inc
            elif inc is not None:
                inc.clean_evaluations += 1
                inc.updated_ms = max(inc.updated_ms, s.window_end_ms)
                if inc.clean_evaluations >= self.resolve_after:
                    inc.status = "resolved"
                    inc.resolved_ms = s.window_end_ms
                    del self._open[fp]
                    out.append(Transition("resolved", inc))
                _record(inc, s)
                touched[fp] = inc
        return Outcome(out, list(touched.values()))


    def resolve(self, fingerprint: str, at_ms: int, evidence: Mapping[str, Any] | None = None) -> Outcome:
        """Resolve an open incident at once (nothing happens when none is open).

        For conditions that end with an event rather than with clean windows: a
        training run that succeeds after one failed ends "training is failing".
        """
        inc = self._open.pop(fingerprint, None)
        if inc is None:
            return Outcome([], [])
        inc.status = "resolved"
        inc.resolved_ms = max(at_ms, inc.updated_ms)
        inc.updated_ms = inc.resolved_ms
        if evidence:
            inc.evidence = dict(evidence)
        inc.history = [*inc.history, [inc.resolved_ms, None, False]][-MAX_HISTORY:]
        return Outcome([Transition("resolved", inc)], [inc])


def headline(evidence: Mapping[str, Any]) -> float | None:
    """The number that says how bad it is (see HEADLINE_KEYS), or None."""
    for key in HEADLINE_KEYS:
        v = evidence.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def _record(inc: Incident, s: Signal) -> None:
    inc.history = [*inc.history, [s.window_end_ms, headline(s.evidence), s.firing]][-MAX_HISTORY:]
