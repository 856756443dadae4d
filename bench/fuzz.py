"""The long fuzz campaign: hostile records through a real broker into the real daemon.

    python -m bench.fuzz [--quick] [--seed N] [--rounds R] [--records N] [--bootstrap HOST:PORT]

Each round draws ``--records`` Hypothesis records per input topic (tests/fuzz_corpus.py,
seed ``N + round``), produces them while the daemon is stopped, starts it again and
waits until it has committed everything and closed its windows; the first round also
carries the crafted corpus (records at every size and depth limit, up to 5 MiB), the
last one the 2099 event times that must come last. After every round the books are
checked over all rounds so far (tests/fuzz_campaign.py): each offset stored once or
dead-lettered once, with the fate the decoder alone gives it, so a restart that
duplicates or loses anything shows. A daemon that exits on its own is a crash: counted,
its log tail printed, and it is started again.

Each round's event times lie in an hour of their own, so no record is late.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from connectors.events import EventKind
from tests.daemon_proc import DaemonProcess
from tests.events_gen import BASE_TS_MS
from tests.fuzz_campaign import (
    LARGE_TOPIC_BYTES,
    Placed,
    Report,
    account,
    log_lines,
    produce,
    read_dead_letters,
    settle,
    stored_ids,
)
from tests.fuzz_corpus import Draft, Limits, crafted, drafts, draw, far_future, render_all

MAX_BYTES = 2 * 1024 * 1024
DEAD_LETTER_BYTES = 1_048_588
PARTITIONS = 2
HOUR_MS = 3_600_000
#: Restarts after crashes within one round before the round is given up.
MAX_RESTARTS = 3


class Campaign:
    """The topics, the daemon and the books of one campaign."""

    def __init__(self, bootstrap: str, workdir: Path) -> None:
        from monitor.testbed.local_kafka import create_topics

        tag = uuid.uuid4().hex[:8]
        self.bootstrap = bootstrap
        self.inputs = {EventKind.PREDICTION: f"fuzz-pred-{tag}", EventKind.FEEDBACK: f"fuzz-fb-{tag}"}
        self.dead_letter = f"fuzz-dlq-{tag}"
        large = {"max.message.bytes": str(LARGE_TOPIC_BYTES)}
        create_topics(bootstrap, {t: PARTITIONS for t in self.inputs.values()}, configs=large)
        create_topics(bootstrap, {self.dead_letter: 1}, configs={"max.message.bytes": str(DEAD_LETTER_BYTES)})
        self.group = f"fuzz-{tag}"
        topics = {"predictions": self.inputs[EventKind.PREDICTION],
                  "feedback": self.inputs[EventKind.FEEDBACK], "dead_letter": self.dead_letter}
        self.daemon = DaemonProcess(workdir, bootstrap, topics, group=self.group,
                                    overrides={"kafka": {"max_message_bytes": MAX_BYTES}})
        self.placed: list[Placed] = []
        self.crashes = 0
        self.exit_codes: list[int] = []

    def round(self, r: int, seed: int, n: int, *, first: bool, last: bool) -> Report:
        """Stop the daemon, produce round ``r``, start it, settle, and check the books."""
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.exit_codes.append(self.daemon.terminate())
        self.placed += produce(self.bootstrap, _records(r, seed, n, first=first, last=last), self.inputs,
                               PARTITIONS)
        self.daemon.start()
        self._settle()
        dead = read_dead_letters(self.bootstrap, self.dead_letter)
        return account(self.placed, dead, stored_ids(self.daemon.store), max_bytes=MAX_BYTES,
                       dead_letter_bytes=DEAD_LETTER_BYTES)

    def _settle(self) -> None:
        for _ in range(MAX_RESTARTS + 1):
            try:
                settle(self.daemon, self.bootstrap, self.group, self.inputs.values(), timeout_s=300)
                return
            except AssertionError as exc:
                assert self.daemon.proc is not None
                if self.daemon.proc.poll() is None:
                    raise
                self.crashes += 1
                print(f"  CRASH (exit {self.daemon.proc.returncode}):\n{exc}", flush=True)
                self.daemon.start()
        raise RuntimeError(f"the daemon crashed {MAX_RESTARTS + 1} times in one round")

    def stop(self) -> None:
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.exit_codes.append(self.daemon.terminate())
        self.daemon.stop_quietly()


def _records(r: int, seed: int, n: int, *, first: bool, last: bool) -> list[Any]:
    """Round ``r``: drawn records, the crafted corpus spread among them in the first
    round, the records that must be last on their topics in the last."""
    mixed: list[Draft] = [*draw(drafts(EventKind.PREDICTION), n, seed),
                          *draw(drafts(EventKind.FEEDBACK), n, seed + 1_000_003)]
    rng = random.Random(seed)
    rng.shuffle(mixed)
    if first:
        for d in crafted(Limits(MAX_BYTES, DEAD_LETTER_BYTES)):
            mixed.insert(rng.randrange(len(mixed) + 1), d)
    return render_all([*mixed, *(far_future() if last else [])], f"fz{r}", BASE_TS_MS + r * HOUR_MS)


def _summary(report: Report) -> str:
    return (f"{report.records:,} records: {report.stored:,} stored, {report.dead_lettered:,} dead-lettered, "
            f"{len(report.unaccounted)} unaccounted, {len(report.problems)} problems")


def run(bootstrap: str, workdir: Path, *, rounds: int, n: int, seed: int) -> dict[str, Any]:
    campaign = Campaign(bootstrap, workdir)
    t0 = time.perf_counter()
    report = Report()
    try:
        for r in range(rounds):
            t = time.perf_counter()
            report = campaign.round(r, seed + r, n, first=r == 0, last=r == rounds - 1)
            print(f"round {r + 1}/{rounds} ({time.perf_counter() - t:.0f} s): {_summary(report)}", flush=True)
            for line in [*report.unaccounted[:5], *report.problems[:10]]:
                print(f"  {line}", flush=True)
    finally:
        campaign.stop()
    clean_exits = campaign.exit_codes.count(0)
    return {
        "bench": "fuzz", "seed": seed, "rounds": rounds, "records_per_topic_per_round": n,
        "records": report.records, "kinds": dict(sorted(report.kinds.items())),
        "crashes": campaign.crashes, "clean_exits": clean_exits,
        "unclean_exits": len(campaign.exit_codes) - clean_exits,
        "dead_letter_reasons": dict(sorted(report.reasons.items())),
        "reference_original_reasons": dict(sorted(report.reference_reasons.items())),
        "stored": report.stored, "dead_lettered": report.dead_lettered,
        "unaccounted": len(report.unaccounted), "problems": len(report.problems),
        "daemon_log_errors": dict(log_lines(campaign.daemon.log_path)),
        "daemon_log_warnings": dict(log_lines(campaign.daemon.log_path, ("warning",))),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 600 records per topic (~1.5 minutes)")
    ap.add_argument("--seed", type=int, default=1, help="Hypothesis seed of the first round")
    ap.add_argument("--rounds", type=int, help="rounds (default 10, quick 3)")
    ap.add_argument("--records", type=int, help="drawn records per topic and round (default 2000, quick 600)")
    ap.add_argument("--bootstrap", help="use this broker instead of starting one")
    ap.add_argument("--workdir", type=Path, help="keep the broker's and the daemon's files (logs) here")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    n = args.records or (600 if args.quick else 2000)
    load_before = os.getloadavg()

    from monitor.testbed.local_kafka import LocalKafka

    with tempfile.TemporaryDirectory(prefix="driftloop-fuzz-") as scratch:
        tmp = args.workdir or Path(scratch)
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker = LocalKafka(tmp / "kafka")
            bootstrap = broker.start()
        try:
            figures = run(bootstrap, tmp / "daemon", rounds=rounds, n=n, seed=args.seed)
        finally:
            if broker is not None:
                broker.stop()
    figures["load_average_1m"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    figures["machine"] = f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}"
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
