"""End-to-end ingest throughput and memory against a real broker.

    python -m bench.ingest [--quick] [--events N] [--bootstrap HOST:PORT]

Side by side in one run, on the same pre-filled topic (4 partitions, ~300-byte
prediction/v1 events):

* ``bare``: a kafka-python consumer in a group reading values as bytes and nothing
  else (the ceiling for any kafka-python application), run before and after
  driftloop, averaged;
* ``driftloop``: the real daemon process (``driftloop run``), from partition
  assignment until its Kafka commits equal the end offsets, which it only makes
  after the rows they cover are durable (store segments or spills) and recorded in
  the state store. Its peak RSS (VmHWM) is read from /proc.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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

import msgspec
import yaml

REPO = Path(__file__).resolve().parents[1]
BASE_TS_MS = 1_767_225_600_000
PARTITIONS = 4


def _event(i: int) -> dict[str, Any]:
    # ~300 bytes, like the events the design's measurements used.
    return {
        "schema": "prediction/v1", "prediction_id": f"bench-{i:010d}",
        "ts": BASE_TS_MS + i, "model": "ctr-reference", "model_version": "17",
        "user_id": f"user-{(i * 7919) % 1_000_003}", "item_id": f"item-{(i * 104729) % 50_021}",
        "score": ((i * 2654435761) % 1000) / 1000, "rank": i % 20 + 1,
        "request_id": f"req-{i // 20}",
        "features": {"age": 18 + i % 60, "price": (i % 1000) / 10, "dwell": (i % 77) / 7,
                     "country": ("de", "fr", "us", "br", "in")[i % 5],
                     "device": ("ios", "android", "web")[i % 3], "is_new": i % 9 == 0},
    }


def _produce_part(bootstrap: str, topic: str, start: int, stop: int, partition: int) -> None:
    from kafka import KafkaProducer

    enc = msgspec.json.Encoder()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, batch_size=512 * 1024,
                             acks=1)
    for i in range(start, stop):
        producer.send(topic, value=enc.encode(_event(i)), partition=partition)
    producer.flush(timeout=600)
    producer.close()


def produce(bootstrap: str, topic: str, n: int) -> float:
    """Fill ``topic`` with ``n`` events, one producer process per partition."""
    t0 = time.perf_counter()
    per = n // PARTITIONS
    procs = []
    ctx = mp.get_context("spawn")
    for p in range(PARTITIONS):
        start, stop = p * per, (p + 1) * per if p < PARTITIONS - 1 else n
        proc = ctx.Process(target=_produce_part, args=(bootstrap, topic, start, stop, p))
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"producer exited with {proc.exitcode}")
    return n / (time.perf_counter() - t0)


def bare_consumer(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    """Consume ``n`` values as bytes in a fresh group: the kafka-python ceiling."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=f"bare-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=2000,
        fetch_max_wait_ms=20)
    consumer.subscribe([topic])
    got = 0
    nbytes = 0
    t0: float | None = None
    cpu0 = 0.0
    while got < n:
        batch = consumer.poll(timeout_ms=500)
        if batch and t0 is None:
            t0 = time.perf_counter()
            cpu0 = time.process_time()
        for records in batch.values():
            got += len(records)
            nbytes += sum(len(r.value) for r in records)
    assert t0 is not None
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    consumer.commit()
    consumer.close()
    return {"events_per_s": got / seconds, "seconds": seconds, "mean_bytes": nbytes / got,
            "cpu_us_per_event": cpu / got * 1e6}


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def driftloop_daemon(bootstrap: str, topic: str, n: int, workdir: Path) -> dict[str, Any]:
    """Run ``driftloop run`` over the topic; time from assignment to full commit."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    from monitor.testbed.local_kafka import committed_offsets

    group = f"driftloop-bench-{uuid.uuid4().hex[:8]}"
    cfg = {
        "instance_id": "bench",
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group,
                  "predictions_topic": topic, "feedback_topic": topic + "-feedback",
                  "dead_letter_topic": topic + "-dlq"},
        "storage": {"data_dir": str(workdir)},
        "http": {"port": 0},
        "logging": {"level": "INFO"},
    }
    cfg_path = workdir / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    ends = {tp.partition: o for tp, o in probe.end_offsets(tps).items()}
    probe.close()
    log_path = workdir / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "monitor.service.cli", "run", "--config",
                                 str(cfg_path)], cwd=REPO, stdout=log, stderr=log)
    rss_samples = []
    try:
        t_assigned: float | None = None
        cpu0 = 0.0
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + log_path.read_text()[-3000:])
            rss_samples.append(_vm_rss_mb(proc.pid))
            if t_assigned is None and b"partitions assigned" in log_path.read_bytes():
                t_assigned = time.perf_counter()
                cpu0 = _cpu_seconds(proc.pid)
            if t_assigned is not None and committed_offsets(bootstrap, group, topic) == ends:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("daemon did not finish in time")
        seconds = time.perf_counter() - t_assigned
        cpu = _cpu_seconds(proc.pid) - cpu0
        peak = _vm_hwm_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    dlq = log_path.read_text().count('"dead-letter')
    return {"events_per_s": n / seconds, "seconds": seconds, "peak_rss_mb": peak,
            "cpu_us_per_event": cpu / n * 1e6,
            "rss_mb_at_quarters": [round(rss_samples[int(len(rss_samples) * q)], 1)
                                   for q in (0.25, 0.5, 0.75)] if rss_samples else [],
            "exit_code": code, "dead_letter_log_lines": dlq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="300k events (under 2 minutes)")
    ap.add_argument("--events", type=int, help="events in the topic (default 5M, quick 300k)")
    ap.add_argument("--bootstrap", help="use this broker instead of starting one")
    args = ap.parse_args()
    n = args.events or (300_000 if args.quick else 5_000_000)

    from monitor.testbed.local_kafka import LocalKafka, create_topics

    with tempfile.TemporaryDirectory(prefix="driftloop-bench-") as tmp:
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker = LocalKafka(Path(tmp) / "kafka")
            bootstrap = broker.start()
        try:
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            create_topics(bootstrap, {topic: PARTITIONS, topic + "-feedback": PARTITIONS,
                                      topic + "-dlq": 1})
            print(f"producing {n:,} events into {topic} ...", flush=True)
            produce_rate = produce(bootstrap, topic, n)
            print(f"  produced at {produce_rate:,.0f} events/s", flush=True)
            bare1 = bare_consumer(bootstrap, topic, n)
            print(f"bare kafka-python consumer: {bare1['events_per_s']:,.0f} events/s", flush=True)
            work = Path(tmp) / "daemon"
            work.mkdir()
            dl = driftloop_daemon(bootstrap, topic, n, work)
            print(f"driftloop end to end:       {dl['events_per_s']:,.0f} events/s, "
                  f"peak RSS {dl['peak_rss_mb']:.0f} MB", flush=True)
            bare2 = bare_consumer(bootstrap, topic, n)
            print(f"bare kafka-python consumer: {bare2['events_per_s']:,.0f} events/s", flush=True)
        finally:
            if broker is not None:
                broker.stop()
    bare_rate = (bare1["events_per_s"] + bare2["events_per_s"]) / 2
    figures = {
        "bench": "ingest", "events": n, "partitions": PARTITIONS,
        "mean_event_bytes": round(bare1["mean_bytes"], 1),
        "bare_events_per_s": round(bare_rate),
        "bare_runs_events_per_s": [round(bare1["events_per_s"]), round(bare2["events_per_s"])],
        "driftloop_events_per_s": round(dl["events_per_s"]),
        "ratio_vs_bare": round(dl["events_per_s"] / bare_rate, 3),
        # CPU per event (all threads of the consuming process): steadier than rates on
        # a shared machine; the bare consumer's is the mean of its two runs.
        "bare_cpu_us_per_event": round((bare1["cpu_us_per_event"] + bare2["cpu_us_per_event"]) / 2, 2),
        "driftloop_cpu_us_per_event": round(dl["cpu_us_per_event"], 2),
        "driftloop_peak_rss_mb": round(dl["peak_rss_mb"], 1),
        "driftloop_rss_mb_at_quarters": dl["rss_mb_at_quarters"],
        "driftloop_exit_code": dl["exit_code"],
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}",
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
