"""How fast the demo's loop closes, and how much of the lost CTR it wins back.

    python -m bench.demo [--quick] [--seeds 1 2 3 4 5]

For each seed (5 by default; ``--quick``: seed 1 only), on a fresh Kafka broker and one
MLflow server shared by the seeds (a model name per seed):

1. **An oracle**: the reference trainer (`retrain.ctr_trainer.CTRTrainer`, the bootstrap
   champion's hyperparameters) trained from scratch on 100k exploration impressions of
   the *drifted* world: what the same trainer reaches with all the new-world data it
   wants, instead of the 20 s the daemon's fine-tune gets.
2. **The loop**, `monitor.demo.loop.run_loop` headless, exactly as ``make demo`` runs it, with
   the oracle scored in the shadow of every live request: for the same users and the same
   candidates, which slate it would have shown and its true click probability.

Per seed, from the drift onset: seconds to the first drift detection, to the first alert
at the webhook receiver, to the first drop detection, to the promotion, to the new
champion serving, to recovery (a 5 s CTR at 80% of the pre-drift CTR); the training job's
duration; and the CTRs: measured before the drift, of the champion after it, of the new
champion after the switch, the last as a share of the pre-drift CTR and, on expected
clicks of the same requests, of the oracle's. Then the median and the spread (min, max)
over the seeds. The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

#: The new champion serves 30 s (the demo: 20 s), so that its CTR is measured on ~14k impressions.
SERVE_AFTER_SWITCH_S = 30.0
FIGURES = ("detect_s", "alert_s", "drop_s", "retrain_job_s", "promotion_s", "served_s", "recovery_s",
           "ctr_pre", "ctr_drifted", "ctr_recovered", "recovered_vs_pre", "recovered_vs_oracle")


def _since(result: Any, name: str) -> float | None:
    from monitor.demo.loop import timeline

    onset = result.onset_ms
    at = next((m.at_ms for m in timeline(result) if m.name == name), None)
    return None if at is None or onset is None else round((at - onset) / 1000, 1)


def _echo(seed: int, line: str) -> None:
    if not line.startswith("["):  # the loop's alerts and milestones, not its status lines
        print(f"  s{seed} {line}", flush=True)


def run_seed(seed: int, root: Path, tracking_uri: str) -> dict[str, Any]:
    from monitor.demo.loop import TOPICS, LoopSpec, ctr_figures, run_loop, timeline
    from monitor.testbed import world as simulate
    from monitor.testbed.local_kafka import LocalKafka, create_topics

    work = root / f"seed-{seed}"
    world = simulate.World(simulate.WorldSpec(seed=seed))
    t0 = time.perf_counter()
    oracle = simulate.train_oracle(world, simulate.SlatePolicy(), work / "oracle", seed=seed)
    oracle_s = time.perf_counter() - t0
    print(f"seed {seed}: oracle trained in {oracle_s:.0f}s", flush=True)
    kafka = LocalKafka(work / "kafka")
    bootstrap = kafka.start()
    try:
        create_topics(bootstrap, {TOPICS["predictions"]: 4, TOPICS["feedback"]: 4, TOPICS["dead_letter"]: 1})
        t0 = time.perf_counter()
        result = run_loop(LoopSpec(seed=seed, serve_after_switch_seconds=SERVE_AFTER_SWITCH_S), workdir=work,
                          kafka=bootstrap, tracking_uri=tracking_uri, model=f"ctr-s{seed}", oracle=oracle,
                          echo=lambda line: _echo(seed, line))
        loop_s = time.perf_counter() - t0
    finally:
        kafka.stop()
    c = ctr_figures(result)
    moments = {m.name: m for m in timeline(result)}
    start, end = moments["retrain start"].at_ms, moments["retrain end"].at_ms
    moves = [who for _, _, who in result.champion_moves if who != "bootstrap"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    out = {
        "seed": seed, "problem": result.problem, "promoted_by": moves[0] if moves else None,
        "detect_s": _since(result, "first drift detection"),
        "alert_s": _since(result, "first alert received"),
        "drop_s": _since(result, "first drop detection"),
        "retrain_job_s": None if start is None or end is None else round((end - start) / 1000, 1),
        "promotion_s": _since(result, "promotion"), "served_s": _since(result, "new champion served"),
        "recovery_s": _since(result, "recovery"),
        "ctr_pre": c["pre_drift"], "ctr_drifted": c["drifted"], "ctr_recovered": c["recovered"],
        "recovered_vs_pre": ratio(c["recovered"], c["pre_drift"]),
        "recovered_vs_oracle": ratio(c.get("recovered_expected"), c.get("oracle_expected")),
        "recovered_expected": c.get("recovered_expected"), "oracle_expected": c.get("oracle_expected"),
        "false_alarms": [m.detail for m in timeline(result) if m.name == "false alarm before onset"],
        "oracle_train_s": round(oracle_s, 1), "loop_s": round(loop_s, 1),
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Median, min and max of each figure over the seeds where it exists."""
    out: dict[str, dict[str, float | None]] = {}
    for key in FIGURES:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        out[key] = {"median": round(statistics.median(values), 4) if values else None,
                    "min": min(values) if values else None, "max": max(values) if values else None,
                    "n": len(values)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one seed (about 4 minutes)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 1 2 3 4 5 (quick: 1)")
    args = ap.parse_args()
    seeds = args.seeds or ([1] if args.quick else [1, 2, 3, 4, 5])

    from monitor.testbed.local_kafka import fetch
    from monitor.testbed.local_mlflow import LocalMlflow

    fetch()  # the one-time Maven download, before any clock starts
    rows = []
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-demo-") as tmp:
        root = Path(tmp)
        with LocalMlflow(root / "mlflow") as server:
            for seed in seeds:
                row = run_seed(seed, root, server.tracking_uri)
                rows.append(row)
                print(f"seed {seed}: " + ", ".join(f"{k} {row[k]}" for k in (
                    "detect_s", "alert_s", "drop_s", "promotion_s", "recovery_s", "recovered_vs_pre",
                    "recovered_vs_oracle", "promoted_by", "problem")), flush=True)
    figures = {
        "bench": "demo", "seeds": seeds, "summary": summarise(rows), "per_seed": rows,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}",
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
