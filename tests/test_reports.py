"""Incident reports (monitor/reports.py): self-contained HTML with SVG plots, escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from monitor.incidents import Incident, IncidentBook, Severity, Signal
from monitor.reports import bin_labels, render_index, render_report, svg_distribution, svg_series

MIN = 60_000


def _drifting(subject: str, psi: float, windows: int = 4, model: str = "ctr") -> Incident:
    book = IncidentBook(resolve_after=2)
    inc = None
    for k in range(1, windows + 1):
        firing = k <= windows - 1
        out = book.observe([Signal(
            "feature_drift", model, subject, firing, (k - 1) * MIN, k * MIN, Severity.WARNING,
            summary=f"{subject} drifted: PSI {psi}",
            evidence={"version": "7", "psi": psi * k if firing else 0.001, "p_adjusted": 1e-6,
                      "reference": "bootstrap:1000 rows", "edges": [1.0, 2.0, 3.0],
                      "reference_counts": [10, 20, 30, 40], "window_counts": [40, 30, 20, 10]})])
        inc = out.touched[0] if out.touched else inc
    assert inc is not None
    return inc


def test_a_drift_report_plots_distributions_and_the_metric_over_time() -> None:
    inc = _drifting("f.age", 0.1)
    assert [h[2] for h in inc.history] == [True, True, True, False]
    page = render_report(inc, related=[_drifting("f.price", 0.5), _drifting("f.other", 0.2, model="x")],
                         source="g", generated_ms=10 * MIN)
    svgs = page.count("<svg")
    assert svgs == 3  # over time, f.age, f.price (f.other belongs to another model)
    assert "f.price: reference vs current (PSI 1.500)" in page
    assert "f.other" not in page
    for needle in ("feature drift: f.age on ctr v7", "f.age drifted: PSI 0.1", "bootstrap:1000 rows",
                   "Windows that fired (3 kept", "PSI per evaluation"):
        assert needle in page, needle
    assert "<script" not in page.lower()


def test_producer_supplied_names_are_escaped() -> None:
    inc = _drifting("f.<script>alert(1)</script>", 0.1)
    page = render_report(inc)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<script>" not in render_index([inc])


def test_svg_plots_are_well_formed_and_to_scale() -> None:
    svg = svg_distribution("t <&>", ["a", "b"], [1, 3], [3, 1])
    root = ET.fromstring(svg)
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.find(
        "{http://www.w3.org/2000/svg}title") is not None]
    heights = [float(b.get("height", 0)) for b in bars]
    assert len(bars) == 4 and heights[1] == heights[2] == max(heights)  # 75% is the top
    assert abs(heights[0] * 3 - heights[1]) < 0.5
    series = svg_series("s", [[MIN, 0.1, False], [2 * MIN, None, False], [3 * MIN, 0.3, True]],
                        [[2 * MIN, 3 * MIN]])
    ET.fromstring(series)
    assert series.count("<circle") == 2 and "(fired)" in series
    assert svg_series("s", [], []) == "" and svg_distribution("t", [], [], []) == ""


def test_bin_labels_follow_the_profiles_right_closed_bins() -> None:
    assert bin_labels({"edges": [0.5]}) == ["≤0.5", ">0.5"]
    assert bin_labels({"categories": ["de", "(other)"]}) == ["de", "(other)"]
    assert bin_labels({}) is None
