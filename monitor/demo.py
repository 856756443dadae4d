"""``make demo`` (for now: ingestion and monitoring, the first half of the loop).

Starts a local single-node Kafka, the daemon as a child process, and a small
simulated recommender that serves predictions and sends feedback in real time, with
about 1% malformed events mixed in. Halfway through, its traffic drifts: the users
get older and click a third less than the scores predict. Prints what the daemon
reports while it runs (events, dead letters, incidents as they fire) and, at the end,
what reached the feedback store, what went to the dead-letter topic and why, and the
incidents the monitor raised. Every process it starts is stopped before it exits.

The full loop of issue #7 (drift, alert, retrain, promotion, recovery) replaces this
when the later parts exist.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import msgspec
import yaml

from connectors.kafka_local import LocalKafka, create_topics
from connectors.store import FeedbackStore

REPO = Path(__file__).resolve().parents[1]
_enc = msgspec.json.Encoder()


def _status(port: int) -> dict | None:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.load(r)  # type: ignore[no-any-return]
    except OSError:
        return None


def _bad_event(rng: random.Random, i: int) -> bytes:
    return rng.choice([
        b'{"schema": "prediction/v1", "prediction_id": ',
        _enc.encode({"schema": "prediction/v1", "prediction_id": f"bad-{i}", "ts": int(time.time() * 1000),
                     "model": "ctr", "model_version": "1", "user_id": "u", "item_id": "i",
                     "score": 1.7, "features": {}}),
        _enc.encode({"schema": "prediction/v2", "prediction_id": f"bad-{i}"}),
        b"\xff\xfe\x00",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=90.0, help="how long the recommender runs")
    ap.add_argument("--rate", type=int, default=400, help="predictions per second")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    from kafka import KafkaProducer

    with tempfile.TemporaryDirectory(prefix="driftloop-demo-") as tmp:
        work = Path(tmp)
        print("starting a local Kafka (KRaft, single node) ...", flush=True)
        kafka = LocalKafka(work / "kafka")
        bootstrap = kafka.start()
        daemon = None
        try:
            create_topics(bootstrap, {"predictions": 4, "feedback": 4, "driftloop.dead-letter": 1})
            port = 18080 + rng.randrange(1000)
            cfg = {"instance_id": "demo", "kafka": {"bootstrap_servers": bootstrap},
                   "windows": {"size_seconds": 10, "allowed_lateness_seconds": 2,
                               "idle_timeout_seconds": 5},
                   "storage": {"data_dir": str(work / "driftloop")},
                   "http": {"port": port},
                   # Demo time scales: 10 s windows, labels final 10 s after a prediction,
                   # references bootstrapped from the first 30 s, drop tests every 20 s.
                   "monitor": {"label_types": ["click"], "attribution_seconds": 10,
                               "bootstrap_seconds": 30, "resolve_after": 2,
                               "labels_stall_seconds": 60,
                               "performance": {"period_seconds": 20, "k": 1, "m": 1},
                               "sequential": {"arl0_events": 1e6}}}
            (work / "driftloop.yaml").write_text(yaml.safe_dump(cfg))
            print(f"starting the daemon (http://127.0.0.1:{port}/status) ...", flush=True)
            log = open(work / "daemon.log", "wb")  # noqa: SIM115
            daemon = subprocess.Popen([sys.executable, "-m", "monitor.cli", "run", "--config",
                                       str(work / "driftloop.yaml")], cwd=REPO, stdout=log,
                                      stderr=log)
            producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)
            print(f"simulated recommender: {args.rate} predictions/s for {args.seconds:.0f}s, "
                  "~1% malformed, ~5% clicked", flush=True)
            t0 = time.time()
            drift_at = t0 + args.seconds / 2
            i = sent_bad = 0
            announced: set[str] = set()
            next_report = t0 + 5
            while time.time() - t0 < args.seconds:
                now_ms = int(time.time() * 1000)
                drifted = time.time() >= drift_at
                for _ in range(args.rate // 10):
                    i += 1
                    if rng.random() < 0.01:
                        producer.send("predictions", _bad_event(rng, i))
                        sent_bad += 1
                        continue
                    score = rng.betavariate(2, 30)
                    producer.send("predictions", _enc.encode({
                        "schema": "prediction/v1", "prediction_id": f"p{i}", "ts": now_ms,
                        "model": "ctr", "model_version": "1", "user_id": f"u{rng.randrange(500)}",
                        "item_id": f"i{rng.randrange(200)}", "score": score,
                        "features": {"age": rng.randrange(18, 70) + (12 if drifted else 0),
                                     "device": rng.choice(["ios", "android", "web"])}}))
                    if rng.random() < (0.65 * score if drifted else score):
                        producer.send("feedback", _enc.encode({
                            "schema": "feedback/v1", "prediction_id": f"p{i}",
                            "ts": now_ms + rng.randrange(200, 3000), "type": "click"}))
                time.sleep(0.1)
                if time.time() >= next_report:
                    next_report += 5
                    s = _status(port)
                    if s:
                        print(f"  t={time.time() - t0:4.0f}s in={s['events_in']} "
                              f"stored={s['events_stored']} dead-lettered={s['dead_letters']}",
                              flush=True)
                        for inc in s["incidents"]["firing"]:
                            if inc["id"] not in announced:
                                announced.add(inc["id"])
                                print(f"  INCIDENT {inc['severity']}: {inc['summary'] or inc['fingerprint']}",
                                      flush=True)
            producer.flush()
            producer.close()
            print("recommender stopped; waiting for the last windows to close ...", flush=True)
            # The last windows close, then their labels mature (attribution 10 s).
            time.sleep(cfg["windows"]["idle_timeout_seconds"] + 15)  # type: ignore[index]
            status = _status(port)
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            store = FeedbackStore(work / "driftloop" / "store")
            preds = store.read("predictions")
            fbs = store.read("feedbacks")
            print("\nresult")
            print(f"  predictions sent: {i - sent_bad} valid + {sent_bad} malformed")
            print(f"  feedback store:   {preds.num_rows} predictions, {fbs.num_rows} feedback events "
                  f"in {len(store.files('predictions')) + len(store.files('feedbacks'))} Parquet files")
            if status:
                reasons = Counter({k.split("/", 1)[1]: int(v) for k, v in status["dead_letters"].items()})
                print(f"  dead-lettered:    {dict(reasons)}")
            if status:
                print(f"  reference:        {status['monitor']['references']}")
                incidents = status["incidents"]["firing"] + status["incidents"]["recently_resolved"]
                print(f"  incidents:        {len(incidents)}")
                for inc in incidents:
                    print(f"    [{inc['status']}] {inc['fingerprint']}: {inc['summary']}")
            print(f"  daemon exit code after SIGTERM: {code}")
            ok = preds.num_rows == i - sent_bad and code == 0
            print("  every valid prediction stored exactly once:",
                  "yes" if ok and len(preds.column("prediction_id").unique()) == preds.num_rows else "NO")
            return 0 if ok else 1
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
            kafka.stop()


if __name__ == "__main__":
    sys.exit(main())
