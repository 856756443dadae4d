"""The fuzz campaign against the real daemon: no record stops it, and every record is
either stored once or dead-lettered once, with the fate the decoder alone gives it.

The records (tests/fuzz_corpus.py) are the crafted corpus, spread through a seeded
Hypothesis draw, and produced before the daemon starts, so that every storable event
time is read in one backlog and nothing is late by accident; the checks are in
tests/fuzz_campaign.py. bench/fuzz.py runs the long campaign.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from pathlib import Path

import pytest

from connectors.events import EventKind
from tests.daemon_proc import DaemonProcess
from tests.events_gen import BASE_TS_MS
from tests.fuzz_campaign import (
    LARGE_TOPIC_BYTES,
    TOO_LARGE,
    DeadLetter,
    Placed,
    account,
    log_lines,
    produce,
    read_dead_letters,
    settle,
    stored_ids,
)
from tests.fuzz_corpus import (
    STORED,
    Draft,
    FuzzRecord,
    Limits,
    crafted,
    drafts,
    draw,
    far_future,
    render_all,
    verdict,
)
from tests.kafka_fixtures import TopicFactory

pytestmark = pytest.mark.kafka

#: kafka.max_message_bytes: events of a few MiB are this team's normal.
MAX_BYTES = 2 * 1024 * 1024
#: The dead-letter topic keeps the broker's default, so rejects of the large input
#: topics may not fit it (and go as references).
DEAD_LETTER_BYTES = 1_048_588
LIMITS = Limits(MAX_BYTES, DEAD_LETTER_BYTES)
#: Hypothesis-drawn records per topic (about 8 s of drawing on the 2-core machine).
DRAWN = 800
SEED = 20261208


def campaign(seed: int = SEED, drawn: int = DRAWN) -> list[FuzzRecord]:
    """The crafted corpus at seeded places among the drawn records; the records that
    must be last on their topics (2099 event times) last."""
    mixed: list[Draft] = [*draw(drafts(EventKind.PREDICTION), drawn, seed),
                          *draw(drafts(EventKind.FEEDBACK), drawn, seed + 1)]
    rng = random.Random(seed)
    rng.shuffle(mixed)
    for d in crafted(LIMITS):
        mixed.insert(rng.randrange(len(mixed) + 1), d)
    return render_all([*mixed, *far_future()], "fz", BASE_TS_MS)


def test_the_crafted_corpus_gets_the_verdicts_it_expects() -> None:
    records = render_all([*crafted(LIMITS), *far_future()], "c", BASE_TS_MS)
    wrong = [(r.gen, r.kind.value, r.expect, verdict(r, MAX_BYTES)) for r in records
             if verdict(r, MAX_BYTES) != r.expect]
    assert not wrong
    assert {r.expect for r in records} >= {STORED, "too_deep", "oversized", "non_finite", "empty"}


def test_the_books_catch_a_loss_a_duplicate_and_a_wrong_fate() -> None:
    by_gen = {r.gen: r for r in render_all(crafted(LIMITS), "c", BASE_TS_MS)}
    kept, empty, bad = by_gen["rank_int64_max"], by_gen["empty"], by_gen["score_1e308"]
    placed = [Placed(r, "in", 0, i) for i, r in enumerate((kept, empty, bad))]
    stored = {EventKind.PREDICTION: {kept.uid: 1}}
    letters = [DeadLetter(("in", 0, 1), "empty", None, "empty message value", None, b""),
               DeadLetter(("in", 0, 2), "score_out_of_range", None, "score", bad.key, bad.value)]

    def books(stored: dict, letters: list[DeadLetter]) -> tuple[int, int]:
        report = account(placed, letters, stored, max_bytes=MAX_BYTES, dead_letter_bytes=DEAD_LETTER_BYTES)
        return len(report.unaccounted), len(report.problems)

    assert books(stored, letters) == (0, 0)
    assert books(stored, letters[1:]) == (1, 0)  # lost
    assert books({EventKind.PREDICTION: {kept.uid: 2}}, letters) == (0, 1)  # stored twice
    assert books(stored, [*letters, letters[0]]) == (0, 1)  # dead-lettered twice
    assert books(stored, [*letters, DeadLetter(("in", 0, 0), "late", None, "x", None, b"")]) == (0, 1)
    wrong = dataclasses.replace(letters[1], reason="malformed_json")
    assert books(stored, [letters[0], wrong]) == (0, 1)
    changed = dataclasses.replace(letters[1], value=b"{}")
    assert books(stored, [letters[0], changed]) == (0, 1)


def test_hostile_records_neither_stop_the_daemon_nor_go_unaccounted(
        kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path) -> None:
    large = {"max.message.bytes": str(LARGE_TOPIC_BYTES)}
    topics = {"predictions": topic_factory(2, prefix="fz-pred", configs=large),
              "feedback": topic_factory(2, prefix="fz-fb", configs=large),
              "dead_letter": topic_factory(1, prefix="fz-dlq",
                                           configs={"max.message.bytes": str(DEAD_LETTER_BYTES)})}
    inputs = {EventKind.PREDICTION: topics["predictions"], EventKind.FEEDBACK: topics["feedback"]}
    placed = produce(kafka_bootstrap, campaign(), inputs, partitions=2)
    group = f"fuzz-{uuid.uuid4().hex[:8]}"
    daemon = DaemonProcess(tmp_path, kafka_bootstrap, topics, group=group,
                           overrides={"kafka": {"max_message_bytes": MAX_BYTES}}).start()
    try:
        daemon.wait_ready()
        settle(daemon, kafka_bootstrap, group, inputs.values(), timeout_s=150)
        report = account(placed, read_dead_letters(kafka_bootstrap, topics["dead_letter"]),
                         stored_ids(daemon.store), max_bytes=MAX_BYTES, dead_letter_bytes=DEAD_LETTER_BYTES)
        assert not report.unaccounted, f"{len(report.unaccounted)} unaccounted: {report.unaccounted[:10]}"
        assert not report.problems, "\n".join(report.problems[:20])
        # The corpus reached every fate: stored, copied and referenced dead letters.
        assert report.stored > 100 and report.dead_lettered > 100 and report.reasons[TOO_LARGE] >= 3
        assert daemon.get("/healthz")[0] == 200
        assert not log_lines(daemon.log_path), "handled failures are findings too"
        status = daemon.status()
        assert status is not None and status["dead_letter_references"] == report.reasons[TOO_LARGE]
        ids = stored_ids(daemon.store)
        for kind, name in ((EventKind.PREDICTION, "predictions"), (EventKind.FEEDBACK, "feedbacks")):
            assert daemon.store.read(name).num_rows == sum(ids[kind].values())  # all columns readable
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
