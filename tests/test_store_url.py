"""The feedback store on a URL: a local directory (``file://``), fsspec's ``memory://`` and
a real S3-compatible server (``s3://``, tests/s3_fixtures.py).

What must hold on every backend is what ingestion and the training job rely on
(docs/delivery.md): a reader never sees a segment that is not published, publishing is
idempotent, a crash between the state-store commit and the publish is rolled forward on
restart, and every ingested row is read back exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from connectors.events import EventKind
from connectors.state import StateStore
from connectors.store import FEEDBACKS, PREDICTIONS, FeedbackStore, SpillFiles, open_feedback_store
from monitor.config import StorageConfig
from monitor.ingest import Ingestor
from monitor.metrics import Metrics
from retrain.job import _assemble
from retrain.spec import JobSpec, Trigger
from tests.ctr_world import World, write_store
from tests.s3_fixtures import S3Server
from tests.test_ingest import SPEC, Clock, MemoryDeadLetters, Rec, stream

HOUR = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z


@pytest.fixture(params=["file", "memory", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield (tmp_path / "store").as_uri()
    elif request.param == "memory":
        url = f"memory://driftloop-{uuid.uuid4().hex}/store"
        yield url
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        yield request.getfixturevalue("s3_url")


def _objects(url: str) -> list[str]:
    """Every object or file under the store, by the backend's own listing."""
    fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
    return sorted(fs.find(root)) if fs.exists(root) else []


def _events(n: int, start_ms: int, span_ms: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ts = np.sort(start_ms + rng.integers(0, span_ms, size=n))
    return pa.table({
        "prediction_id": pa.array([f"p-{i}" for i in range(n)]),
        "ts": pa.array(ts, type=pa.timestamp("ms", tz="UTC")),
        "model": pa.array(["ctr"] * n),
        "f.age": pa.array(rng.normal(35, 10, size=n)),
    })


def _ids(table: pa.Table) -> list[str]:
    return sorted(table.column("prediction_id").to_pylist()) if table.num_rows else []


# -- the store on its own --------------------------------------------------------------


def test_published_windows_read_back_whole_and_pruned_by_hour(store_url: str) -> None:
    store = FeedbackStore(store_url)
    events = _events(2_000, T0, 3 * HOUR)
    # Ten-minute windows: 18 segments over three hour partitions (a PUT, a copy and a
    # delete each on an object store).
    written = store.write_windows(PREDICTIONS, events, instance="sim", window_ms=600_000)

    files = store.files(PREDICTIONS)
    assert written == len(files) == 18
    assert all(str(f).endswith(".parquet") for f in files)
    assert not [o for o in _objects(store_url) if o.endswith(".inprogress")]
    assert _ids(store.read(PREDICTIONS)) == _ids(events)

    # One hour in the middle: segments of that hour and of the hour before, no others.
    start, end = T0 + HOUR + 17 * 60_000, T0 + 2 * HOUR
    between = store.files_between(PREDICTIONS, start, end)
    hours = {str(f).split("/hour=", 1)[1][:13] for f in between}
    assert hours == {"2026-01-01T00", "2026-01-01T01"}
    window = store.read_window(PREDICTIONS, start, end)
    ts = events.column("ts").cast(pa.int64()).to_numpy()
    expected = events.filter(pa.array((ts >= start) & (ts < end)))
    assert _ids(window) == _ids(expected) and window.num_rows > 0
    assert store.read_window(PREDICTIONS, T0 + 10 * HOUR, T0 + 11 * HOUR).num_rows == 0
    assert store.read_window(FEEDBACKS, start, end).num_rows == 0


def test_a_file_url_is_the_local_directory_with_its_fsync_and_rename(tmp_path: Path) -> None:
    by_url = FeedbackStore((tmp_path / "store").as_uri())
    assert not by_url.is_object_store and by_url.location == str((tmp_path / "store").resolve())
    by_url.write_windows(PREDICTIONS, _events(50, T0, 60_000), instance="sim", window_ms=60_000)
    by_path = FeedbackStore(tmp_path / "store")
    assert by_path.files(PREDICTIONS) == by_url.files(PREDICTIONS)
    assert isinstance(by_url.files(PREDICTIONS)[0], Path)


def test_a_segment_is_invisible_until_published_and_publish_is_idempotent(store_url: str) -> None:
    store = FeedbackStore(store_url)
    events = _events(300, T0, 60_000)
    path = store.segment_path(PREDICTIONS, T0, "a", 1)
    assert store.write(path, events.schema, [events.slice(0, 100), events.slice(100)]) == 300

    assert store.files(PREDICTIONS) == [] and store.read(PREDICTIONS).num_rows == 0
    assert store.files_between(PREDICTIONS, T0, T0 + 60_000) == []
    assert not store.exists(str(path))

    store.publish(path)
    assert store.exists(str(path))
    with store.open_parquet(str(path)) as f:
        assert f.metadata.num_rows == 300 and f.metadata.num_row_groups == 2
        assert "f.age" in f.schema_arrow.names
    store.publish(path)  # a second publish (a restart's roll-forward) changes nothing
    assert [str(f) for f in store.files(PREDICTIONS)] == [str(path)]
    assert _ids(store.read(PREDICTIONS)) == _ids(events)


def test_registered_paths_still_work_after_a_round_trip_through_path(store_url: str) -> None:
    # monitor/ingest.py hands registered paths back as Path(seg.path), which turns
    # s3://bucket into s3:/bucket; the store must still name the same object.
    store = FeedbackStore(store_url)
    events = _events(10, T0, 60_000)
    path = str(store.segment_path(PREDICTIONS, T0, "a", 1))
    store.write(Path(path), events.schema, [events])
    store.publish(Path(path))
    assert store.exists(Path(path)) and store.exists(path)
    with store.open_parquet(Path(path)) as f:
        assert f.metadata.num_rows == 10
    other = str(store.segment_path(PREDICTIONS, T0, "a", 2))
    store.write(other, events.schema, [events])
    store.discard(Path(other))
    assert not [o for o in _objects(store_url) if o.endswith(".inprogress")]


def test_recover_publishes_registered_segments_and_deletes_only_its_own_unregistered(
        store_url: str) -> None:
    store = FeedbackStore(store_url)
    events = _events(60, T0, 60_000)
    registered = store.segment_path(PREDICTIONS, T0, "a", 1)       # committed, then a crash
    unregistered = store.segment_path(PREDICTIONS, T0, "a", 2)     # written, never committed
    other = store.segment_path(PREDICTIONS, T0, "b", 3)            # another process, mid-checkpoint
    for p in (registered, unregistered, other):
        store.write(p, events.schema, [events])

    restarted = FeedbackStore(store_url)  # a new process: nothing in memory
    assert restarted.recover({str(registered)}, "a") == (1, 1)
    assert [str(f) for f in restarted.files(PREDICTIONS)] == [str(registered)]
    left = [o for o in _objects(store_url) if o.endswith(".inprogress")]
    assert len(left) == 1 and "--b--" in left[0]
    assert restarted.recover({str(registered)}, "a") == (0, 0)
    assert restarted.read(PREDICTIONS).num_rows == 60


def test_on_an_object_store_any_instance_publishes_what_a_lost_replica_committed(store_url: str) -> None:
    store = FeedbackStore(store_url)
    if not store.is_object_store:
        pytest.skip("a local store's files are on the machine that wrote them")
    events = _events(30, T0, 60_000)
    lost = str(store.segment_path(PREDICTIONS, T0, "b", 1))  # b committed it, then b was gone
    store.write(lost, events.schema, [events])
    assert FeedbackStore(store_url).recover({lost}, "a") == (1, 0)
    assert [str(f) for f in store.files(PREDICTIONS)] == [lost]
    assert _objects(store_url) == [fsspec.core.url_to_fs(lost)[1]]  # nothing staged is left


def test_a_crash_between_copy_and_delete_is_published_again_without_harm(store_url: str) -> None:
    store = FeedbackStore(store_url)
    if not store.is_object_store:
        pytest.skip("a local publish is one rename: there is no step in between")
    events = _events(40, T0, 60_000)
    path = str(store.segment_path(PREDICTIONS, T0, "a", 1))
    store.write(path, events.schema, [events])
    [staged] = _objects(store_url)
    # Staged apart from the published tree, so that a restart lists in-flight writes only.
    assert "/_inprogress/predictions/hour=" in staged and staged.endswith(".parquet.inprogress")
    fs, _ = fsspec.core.url_to_fs(store_url, use_listings_cache=False)
    fs.cp_file(staged, path)  # the copy happened, the delete did not
    assert FeedbackStore(store_url).recover({path}, "a") == (1, 0)
    assert not [o for o in _objects(store_url) if o.endswith(".inprogress")]
    assert _ids(store.read(PREDICTIONS)) == _ids(events)


def test_a_failed_write_leaves_no_object_behind(store_url: str) -> None:
    store = FeedbackStore(store_url)
    if not store.is_object_store:
        pytest.skip("locally the partial .inprogress file stays for recover, as before")
    events = _events(40, T0, 60_000)

    def tables() -> Iterator[pa.Table]:
        yield events
        raise OSError("disk of the spill went away")

    with pytest.raises(OSError, match="spill"):
        store.write(store.segment_path(PREDICTIONS, T0, "a", 1), events.schema, tables())
    assert _objects(store_url) == []


# -- the factory -----------------------------------------------------------------------


def test_open_feedback_store_takes_the_url_when_set_else_the_directory(tmp_path: Path) -> None:
    local = open_feedback_store(StorageConfig(data_dir=str(tmp_path / "var")))
    assert not local.is_object_store and local.location == str((tmp_path / "var" / "store").resolve())
    url = f"memory://driftloop-{uuid.uuid4().hex}/store"
    remote = open_feedback_store(StorageConfig(data_dir=str(tmp_path / "var"), store_url=url))
    assert remote.is_object_store and remote.location == url


def test_storage_options_reach_the_filesystem(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # Explicit options instead of the environment (an endpoint or a profile set by a
    # launcher): with no AWS_* variables at all, the store must still reach the server.
    for name in (*s3_server.env(), "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    bucket = s3_server.create_bucket()
    url = f"s3://{bucket}/store"
    store = open_feedback_store(StorageConfig(store_url=url), storage_options=s3_server.storage_options())
    store.write_windows(PREDICTIONS, _events(20, T0, 60_000), instance="sim", window_ms=60_000)
    assert store.read(PREDICTIONS).num_rows == 20


# -- ingestion and training through a URL store ----------------------------------------------


def _ingestor(tmp: Path, url: str, clock: Clock) -> Ingestor:
    state = StateStore(tmp / "state.db", group_id="g", instance="a")
    return Ingestor({"predictions": EventKind.PREDICTION}, SPEC, state=state,
                    store=FeedbackStore(url), spills=SpillFiles(tmp / "spill"),
                    dead_letters=MemoryDeadLetters(), metrics=Metrics(), max_message_bytes=65536,
                    clock_ms=clock)


def test_ingestion_into_a_url_store_reads_every_row_back_exactly_once_across_a_crash(
        store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    recs: list[Rec] = stream(3_000)  # 300 s of event time: 5 windows
    ing = _ingestor(tmp_path, store_url, clock)
    ing.assign([("predictions", 0)])
    ing.ingest("predictions", [(0, recs[:1_200])])
    ing.checkpoint()
    published = len(ing.store.files(PREDICTIONS))
    assert published >= 1

    # The next checkpoint commits, then the process dies before publishing.
    monkeypatch.setattr(ing.store, "publish", lambda path: None)
    ing.ingest("predictions", [(0, recs[1_200:2_500])])
    ing.checkpoint()
    registered = ing.state.segments("predictions")
    assert len(registered) > published
    assert sum(ing.store.exists(s.path) for s in registered) == published
    ing.state.close()

    ing2 = _ingestor(tmp_path, store_url, clock)  # restart: recover rolls forward
    assert ing2.assign([("predictions", 0)]) == {("predictions", 0): 2_500}
    ing2.ingest("predictions", [(0, recs[2_500:])])
    clock.now += SPEC.idle_timeout_ms
    ing2.checkpoint()

    expected = sorted(f"p-{i}" for i in range(3_000))
    assert _ids(FeedbackStore(store_url).read(PREDICTIONS, columns=["prediction_id"])) == expected
    # And by the registry, as the analysis reads windows: every segment published, each
    # row in exactly one of them.
    ids: list[str] = []
    for seg in ing2.state.segments("predictions"):
        assert ing2.store.exists(seg.path)
        with ing2.store.open_parquet(seg.path) as f:
            ids.extend(f.read(columns=["prediction_id"]).column("prediction_id").to_pylist())
            assert f.metadata.num_rows == seg.rows
    assert sorted(ids) == expected
    assert not [o for o in _objects(store_url) if o.endswith(".inprogress")]


def test_the_training_job_reads_the_same_window_from_a_url_as_from_a_directory(
        store_url: str, tmp_path: Path) -> None:
    window = write_store(tmp_path / "local", World(seed=3), rows=4_000, seed=3, model="ctr", span_ms=HOUR)
    # The same events in ten-minute segments (fewer round trips to the server): what the
    # job reads must not depend on how the windows were cut.
    local, remote = FeedbackStore(tmp_path / "local"), FeedbackStore(store_url)
    for kind in (PREDICTIONS, FEEDBACKS):
        remote.write_windows(kind, local.read(kind), instance="copy", window_ms=600_000)
    assert len(remote.files(PREDICTIONS)) == 6 < len(local.files(PREDICTIONS))

    def spec(store: str) -> JobSpec:
        # Predictions of the first half hour, their feedback up to the attribution window later.
        return JobSpec(job_id="job-1", model="ctr", base_version=None, data_start_ms=window[0],
                       data_end_ms=window[0] + HOUR // 2, store=store, tracking_uri="http://unused",
                       trigger=Trigger(kind="manual", model="ctr", reason="test", at_ms=window[1]))

    frame_url, features_url, info_url = _assemble(spec(store_url))
    frame_dir, features_dir, info_dir = _assemble(spec(str(tmp_path / "local")))
    assert info_url == info_dir and features_url == features_dir
    assert 0 < info_url["predictions_read"] < 4_000 and info_url["feedback_read"] > 0
    key = ["prediction_id"]
    a = frame_url.sort_values(key).reset_index(drop=True)
    b = frame_dir.sort_values(key).reset_index(drop=True)
    assert a.equals(b) and a["click"].sum() > 0
