"""River's side of ``bench.detect``; runs in River's own virtual environment.

Not imported by driftloop: ``bench.detect`` starts it with the interpreter of the
environment it built (numpy and river only) as

    python bench/detect_river.py < job.json > result.json

The job names a directory of streams written by ``bench.detect`` (packed 0/1
arrays, ``np.packbits``), the detectors (River class name and parameters) and what
to run: false-alarm counts on stationary streams, and delay runs (a warm-up at the
pre-change rate, then one post-change stream per drop size, fed to a copy of the
detector as it stood at the change). River's detectors reset themselves on the
update after an alarm, so false alarms during the warm-up restart them as
production would.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from river import __version__ as river_version
from river import drift


def load(directory: Path, name: str) -> list[int]:
    with np.load(directory / f"{name}.npz") as z:
        return np.unpackbits(z["bits"], count=int(z["n"])).tolist()


def first_alarm(det: Any, xs: list[int]) -> int:
    """Index of the event after which the detector first flags, or -1."""
    update = det.update
    for i, x in enumerate(xs):
        update(x)
        if det.drift_detected:
            return i
    return -1


def count_alarms(det: Any, xs: list[int]) -> int:
    update = det.update
    n = 0
    for x in xs:
        update(x)
        if det.drift_detected:
            n += 1
    return n


def run_detector(spec: dict[str, Any], job: dict[str, Any], directory: Path) -> dict[str, Any]:
    def make() -> Any:
        return getattr(drift, spec["cls"])(**spec["params"])

    out: dict[str, Any] = {"fa_alarms": 0, "fa_events": 0, "warmup_alarms": 0, "warmup_events": 0,
                           "delays": {str(d): [] for d in job.get("drops", [])}}
    events, busy = 0, 0.0
    for name in job.get("fa_streams", []):
        xs = load(directory, name)
        det = make()
        t0 = time.perf_counter()
        out["fa_alarms"] += count_alarms(det, xs)
        busy += time.perf_counter() - t0
        out["fa_events"] += len(xs)
        events += len(xs)
    for seed in job.get("delay_seeds", []):
        warm = load(directory, f"warm_{seed}")
        det = make()
        t0 = time.perf_counter()
        out["warmup_alarms"] += count_alarms(det, warm)
        busy += time.perf_counter() - t0
        out["warmup_events"] += len(warm)
        events += len(warm)
        for k, drop in enumerate(job["drops"]):
            post = load(directory, f"post_{seed}_{k}")
            twin = copy.deepcopy(det)
            t0 = time.perf_counter()
            i = first_alarm(twin, post)
            busy += time.perf_counter() - t0
            events += i + 1 if i >= 0 else len(post)
            out["delays"][str(drop)].append(i if i >= 0 else None)
    out["events"] = events
    out["busy_s"] = busy
    if job.get("timing_stream"):
        xs = load(directory, job["timing_stream"])
        det = make()
        t0 = time.perf_counter()
        count_alarms(det, xs)
        out["ns_per_event"] = (time.perf_counter() - t0) / len(xs) * 1e9
    return out


def main() -> None:
    job = json.load(sys.stdin)
    directory = Path(job["dir"])
    results = {name: run_detector(spec, job, directory) for name, spec in job["detectors"].items()}
    json.dump({"river": river_version, "numpy": np.__version__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
