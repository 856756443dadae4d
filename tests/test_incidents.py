"""Incidents: one per fingerprint, escalation, debounced resolution, JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest

from monitor.incidents import Incident, IncidentBook, Severity, Signal


def _sig(firing: bool, end: int, subject: str = "f.age",
         severity: Severity = Severity.WARNING) -> Signal:
    return Signal("feature_drift", "ctr", subject, firing, end - 60_000, end, severity,
                  summary=f"{subject} moved", evidence={"psi": 0.3 if firing else 0.01})


def test_one_incident_per_fingerprint_while_it_fires() -> None:
    book = IncidentBook(resolve_after=2)
    first = book.observe([_sig(True, 60_000), _sig(True, 60_000, "f.country")])
    assert [t.transition for t in first.transitions] == ["firing", "firing"]
    again = book.observe([_sig(True, 120_000)])
    assert again.transitions == []
    inc = again.touched[0]
    assert inc.firing_evaluations == 2 and inc.windows == [[0, 60_000], [60_000, 120_000]]
    assert set(book.open) == {"feature_drift/ctr/f.age", "feature_drift/ctr/f.country"}


def test_resolves_only_after_consecutive_clean_evaluations() -> None:
    book = IncidentBook(resolve_after=3)
    book.observe([_sig(True, 60_000)])
    assert book.observe([_sig(False, 120_000)]).transitions == []
    assert book.observe([_sig(False, 180_000)]).transitions == []
    # Firing again resets the clean count: no flapping.
    assert book.observe([_sig(True, 240_000)]).transitions == []
    for end in (300_000, 360_000):
        assert book.observe([_sig(False, end)]).transitions == []
    done = book.observe([_sig(False, 420_000)]).transitions
    assert [t.transition for t in done] == ["resolved"]
    assert done[0].incident.resolved_ms == 420_000 and done[0].incident.status == "resolved"
    assert book.open == {}
    # The next firing is a new incident with a new id.
    new = book.observe([_sig(True, 480_000)]).transitions
    assert new[0].transition == "firing" and new[0].incident.id != done[0].incident.id


def test_escalation_is_announced_once() -> None:
    book = IncidentBook()
    book.observe([_sig(True, 60_000)])
    up = book.observe([_sig(True, 120_000, severity=Severity.CRITICAL)]).transitions
    assert [t.transition for t in up] == ["escalated"] and up[0].incident.severity == "critical"
    assert book.observe([_sig(True, 180_000, severity=Severity.WARNING)]).transitions == []


def test_clean_signal_without_incident_changes_nothing() -> None:
    book = IncidentBook()
    out = book.observe([_sig(False, 60_000)])
    assert out.transitions == [] and out.touched == []


def test_restored_book_continues_the_same_incident() -> None:
    book = IncidentBook(resolve_after=2)
    inc = book.observe([_sig(True, 60_000)]).transitions[0].incident
    stored = Incident.from_json(inc.to_json())
    restored = IncidentBook(resolve_after=2, open_incidents=[stored])
    assert restored.observe([_sig(True, 120_000)]).transitions == []
    restored.observe([_sig(False, 180_000)])
    out = restored.observe([_sig(False, 240_000)])
    assert out.transitions[0].incident.id == inc.id


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="resolve_after"):
        IncidentBook(resolve_after=0)
    with pytest.raises(ValueError, match="unknown severity"):
        Severity.parse("loud")
    assert dataclasses.replace(_sig(True, 1), kind="x").fingerprint == "x/ctr/f.age"
