"""Aggregate ingest throughput of 1, 2 and 3 replicas in one consumer group (issue #8).

Usage: ``python -m bench.replicas [--quick] [--bootstrap HOST:PORT]``

One topic of 8 partitions is filled once; for each replica count a fresh consumer
group of ``driftloop run`` processes in cluster mode (leader lock and summaries on a
shared SQLite state file in one data directory) reads it, from the first partition
assignment until the group's commits equal the end offsets. A bare kafka-python
consumer reads the same topic first, as the yardstick. On a 2-core machine that also
runs the broker, more replicas mostly compete for the same cores: the figures are
per-core costs for the projection in bench/RESULTS.md, not a scaling curve.
The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

import bench.ingest as ingest
from bench.ingest import REPO, _cpu_seconds, bare_consumer, produce

#: Enough partitions for three replicas to get a fair share each.
PARTITIONS = 8


def replicas(bootstrap: str, topic: str, n: int, count: int, workdir: Path) -> dict[str, Any]:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    from monitor.testbed.local_kafka import committed_offsets

    group = f"driftloop-replicas-{uuid.uuid4().hex[:8]}"
    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    ends = {tp.partition: o for tp, o in probe.end_offsets(tps).items()}
    probe.close()
    procs, logs = [], []
    for i in range(count):
        cfg = {
            "instance_id": f"replica-{i}",
            "kafka": {"bootstrap_servers": bootstrap, "group_id": group,
                      "predictions_topic": topic, "feedback_topic": topic + "-feedback",
                      "dead_letter_topic": topic + "-dlq"},
            "storage": {"data_dir": str(workdir)},
            "http": {"port": 0},
            "cluster": {"enabled": True, "leader_timeout_seconds": 10, "poll_seconds": 1},
        }
        path = workdir / f"replica-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log_path = workdir / f"replica-{i}.log"
        logs.append(log_path)
        with open(log_path, "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "monitor.service.cli", "run", "--config",
                                           str(path)], cwd=REPO, stdout=log, stderr=log))
    try:
        t0: float | None = None
        cpu0 = 0.0
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            for p, log_path in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError("replica exited:\n" + log_path.read_text()[-3000:])
            if t0 is None and all(b"partitions assigned" in lp.read_bytes() for lp in logs):
                t0 = time.perf_counter()
                cpu0 = sum(_cpu_seconds(p.pid) for p in procs)
            if t0 is not None and committed_offsets(bootstrap, group, topic) == ends:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("replicas did not finish in time")
        seconds = time.perf_counter() - t0
        cpu = sum(_cpu_seconds(p.pid) for p in procs) - cpu0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    return {"replicas": count, "events_per_s": n / seconds, "seconds": seconds,
            "cpu_us_per_event": cpu / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="300k events (under 2 minutes)")
    ap.add_argument("--events", type=int, help="events in the topic (default 2M, quick 300k)")
    ap.add_argument("--bootstrap", help="use this broker instead of starting one")
    args = ap.parse_args()
    n = args.events or (300_000 if args.quick else 2_000_000)
    ingest.PARTITIONS = PARTITIONS  # the shared producer writes one process per partition

    from monitor.testbed.local_kafka import LocalKafka, create_topics

    results = []
    with tempfile.TemporaryDirectory(prefix="driftloop-replicas-") as tmp:
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker = LocalKafka(Path(tmp) / "kafka")
            bootstrap = broker.start()
        try:
            topic = f"replicas-{uuid.uuid4().hex[:8]}"
            create_topics(bootstrap, {topic: PARTITIONS, topic + "-feedback": PARTITIONS,
                                      topic + "-dlq": 1})
            print(f"producing {n:,} events into {topic} ...", flush=True)
            produce(bootstrap, topic, n)
            bare = bare_consumer(bootstrap, topic, n)
            print(f"bare kafka-python consumer: {bare['events_per_s']:,.0f} events/s", flush=True)
            for count in (1, 2, 3):
                work = Path(tmp) / f"r{count}"
                work.mkdir()
                r = replicas(bootstrap, topic, n, count, work)
                results.append(r)
                print(f"{count} replica(s): {r['events_per_s']:,.0f} events/s, "
                      f"{r['cpu_us_per_event']:.2f} us CPU per event", flush=True)
        finally:
            if broker is not None:
                broker.stop()
    figures = {
        "bench": "replicas", "events": n, "partitions": PARTITIONS,
        "bare_events_per_s": round(bare["events_per_s"]),
        "bare_cpu_us_per_event": round(bare["cpu_us_per_event"], 2),
        "replicas": [{"replicas": r["replicas"], "events_per_s": round(r["events_per_s"]),
                      "cpu_us_per_event": round(r["cpu_us_per_event"], 2)} for r in results],
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}",
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
