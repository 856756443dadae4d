"""The monitor's analysis stage: closed windows in, statistics and incidents out.

Ingestion (monitor/ingest.py) makes windows durable; this stage reads them back from
the feedback store once they are final and runs the statistics on them, in two
passes with their own progress pointers:

* **drift**, on every closed prediction window: each (model, version)'s rows are
  summarised against its reference profile (monitor/stats/profile.py, monitor/stats/drift.py)
  and the per-feature flags go through the k-of-m persistence rule;
* **performance**, on every *matured* prediction window (labels final, see
  monitor/join.py): the window is joined with its feedback, its label summary feeds
  the per-event CUSUM bank at once and the period's drop tests when the period
  (``performance_period``, 15 minutes by default) is complete.

Both passes turn their verdicts into `Signal`s for the incident book. Each window's
results, its detector states, the progress pointer and the incidents it touched are
committed in one state-store transaction, so a crash repeats a window's analysis or
not at all: aggregates and incidents stay effectively-once, like the store beneath.

References follow the model: for each (model, version) the stage looks for a stored
reference (the state store, then the configured `References` source: a directory or
the MLflow registry), and otherwise bootstraps one from the first
``bootstrap_seconds`` of that version's own traffic and says so (log, /status).

This runs on a thread of its own with its own state-store connection, so ingestion
never waits for the statistics; numpy and Arrow release the GIL for the heavy parts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from connectors.state import IncidentRow, MonitorCommit, StateStore
from connectors.store import FeedbackStore
from connectors.summaries import SummaryStore
from monitor.detectors.sequential import AdaptiveBernoulliCUSUM
from monitor.incidents import Incident, IncidentBook, Outcome, Severity, Signal, Transition
from monitor.join import FeedbackIndex, JoinSpec, dedupe_predictions, matured_upto
from monitor.metrics import Metrics
from monitor.stalls import ProgressWatch, Stage
from monitor.stats.drift import DriftDecider, DriftSpec, compare
from monitor.stats.labels import LabelSummary, exchangeable_labels
from monitor.stats.performance import PerformanceSpec, evaluate
from monitor.stats.profile import Profile, ProfileSpec
from monitor.stats.reference import Reference

__all__ = ["Analysis", "AnalysisSpec", "DirectoryReferences", "NotYet", "References"]

log = logging.getLogger(__name__)

#: Rows per batch when streaming a window from Parquet: bounds the stage's memory.
BATCH_ROWS = 262_144
_NO_BOUND = 2**62
#: How long window summaries are kept after the leader decided their window.
SUMMARY_RETENTION_MS = 24 * 3600 * 1000
_PRED_COLUMNS = ["prediction_id", "ts", "model", "model_version", "score"]
_PROFILE_KEYS = frozenset({"model", "model_version", "score"})


@dataclasses.dataclass(frozen=True)
class AnalysisSpec:
    """Everything the stage needs to know, resolved from the config."""

    window_ms: int
    join: JoinSpec
    primary_label: str
    period_ms: int
    bootstrap_ms: int
    bootstrap_max_rows: int
    resolve_after: int
    drift: DriftSpec
    performance: PerformanceSpec
    #: A metric is decided dropped when its test fires in k of the last m periods.
    performance_k: int
    performance_m: int
    sequential: bool
    arl0_events: float
    cusum_drops: tuple[float, ...]
    labels_stall_ms: int
    profile: ProfileSpec = dataclasses.field(default_factory=lambda: ProfileSpec(score="score"))
    #: A bootstrapped reference needs this many of the version's predictions (drift) and
    #: matured rows (labels) as well as bootstrap_ms of its traffic: a quiet start
    #: (9 rows, no click) would otherwise be the yardstick for good.
    bootstrap_min_rows: int = 500
    #: ... and this many positive primary labels for a label reference.
    bootstrap_min_labels: int = 20
    #: A stage with closed windows waiting and no progress for this long is stalled:
    #: /readyz degrades and a ``monitor_stalled`` incident pages.
    stall_ms: int = 900_000


class References(Protocol):
    """Where reference profiles of model versions come from (a directory, MLflow)."""

    def lookup(self, model: str, version: str) -> Reference | None: ...


class DirectoryReferences:
    """``<root>/<model>/<version>/reference.json`` as written by `Reference.to_json`.

    For deployments without a model registry, and what the MLflow source caches to.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def lookup(self, model: str, version: str) -> Reference | None:
        path = self.root / model / version / "reference.json"
        if not path.exists():
            return None
        ref = Reference.from_json(path.read_text())
        return dataclasses.replace(ref, source=f"file:{path}")


@dataclasses.dataclass
class _Version:
    """Durable per-(model, version) state: detectors and accumulators."""

    first_window: int
    decider: dict[str, Any] | None = None
    perf_decider: dict[str, Any] | None = None
    label_ref: dict[str, Any] | None = None
    label_ref_start: int | None = None
    label_ref_done: bool = False
    period_start: int | None = None
    period: dict[str, Any] | None = None
    cusum: dict[str, Any] | None = None
    cusum_alarms_in_period: int = 0
    last_window: int = 0
    #: Predictions seen in decided windows while the version had no drift reference.
    rows: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> _Version:
        return cls(**json.loads(text))


def _key(model: str, version: str) -> str:
    return f"{model}@{version}"


class Analysis:
    """The analysis stage. Call `step` whenever windows may have closed.

    Args:
        spec: thresholds and periods.
        state: a state-store connection of its own (this runs on its own thread).
        pred_topic: the predictions topic (its closed windows are analysed).
        feedback_topic: the feedback topic.
        read_segment: opens a segment path as a ParquetFile (the feedback store).
        references: an external reference source, or None.
        metrics: the daemon's metrics.
    """

    def __init__(self, spec: AnalysisSpec, state: StateStore, pred_topic: str, feedback_topic: str,
                 references: References | None, metrics: Metrics, *,
                 summaries: SummaryStore | None = None, cluster: bool = False,
                 leader: bool = True, store: FeedbackStore | None = None) -> None:
        self.spec = spec
        self.state = state
        self.instance = state.instance
        #: Segments are read by their registered paths, on a directory or an object store.
        self.store = store if store is not None else FeedbackStore(Path("."))
        self.summaries = summaries if summaries is not None else SummaryStore(
            getattr(state, "url", None) or state.path, group_id=state.group_id)
        #: Replicas share the work (docs/scale-out.md): feedback that matches no
        #: prediction *of this replica* may match another's, so it is not counted.
        self.cluster = cluster
        #: Only the leader decides; every replica summarises what it stored.
        self.leader = leader
        self._waiting: dict[str, Any] = {}
        self.pred_topic = pred_topic
        self.feedback_topic = feedback_topic
        self.references = references
        self.metrics = metrics
        self.index = FeedbackIndex(spec.join)
        open_incidents = [Incident.from_json(r.body) for r in state.incidents(status="firing",
                                                                               limit=10_000)]
        self.book = IncidentBook(spec.resolve_after, open_incidents)
        self._refs: dict[str, Reference | None] = {}
        #: Versions whose reference was looked for in vain during the current drift window.
        self._refs_missed: set[str] = set()
        self._versions: dict[str, _Version] = {}
        self.last_error: str | None = None
        #: Stalled stages and why (`watch`): what /readyz reports.
        self.stalls: dict[str, str] = {}
        self._watch = ProgressWatch(spec.stall_ms)
        self._stall_checked_upto = -1
        #: A step failed: what deciding holds in memory may be ahead of the store.
        self._stale = False
        self._submitted: list[tuple[list[Signal], list[tuple[str, int, dict[str, Any]]],
                                    Callable[[], None] | None]] = []
        self._submit_lock = threading.Lock()
        #: Called with (model, version, window start, window end, summary, primary labels)
        #: for each version of each matured window, on this thread, after the commit: the
        #: live comparisons of promotion (monitor/promotion.py) listen here. A listener
        #: must be quick and must not raise (hand the data to another thread).
        self.label_listeners: list[Callable[[str, str, int, int, LabelSummary, np.ndarray], None]] = []
        self._refresh_incident_gauge()

    def submit(self, signals: Sequence[Signal] = (),
               resolve: Sequence[tuple[str, int, dict[str, Any]]] = (), *,
               on_committed: Callable[[], None] | None = None) -> None:
        """Evidence from outside the windows (the retraining controller's failed jobs),
        committed by the next `step` on the analysis thread: the incident book has one
        writer. ``resolve`` holds (fingerprint, at_ms, evidence) of incidents that ended.
        ``on_committed`` is called on the analysis thread once they are durable, never
        if the process dies first: the submitter then submits them again."""
        with self._submit_lock:
            self._submitted.append((list(signals), list(resolve), on_committed))

    def _commit_submitted(self) -> None:
        with self._submit_lock:
            pending, self._submitted = self._submitted, []
        for i, (signals, resolve, on_committed) in enumerate(pending):
            try:
                outcomes = [self.book.resolve(fp, at, ev) for fp, at, ev in resolve]
                self._commit({}, signals, extra=outcomes)
            except BaseException:
                # The store failed: this one and the rest are tried again at the next
                # step, ahead of anything submitted since (a signal seen twice by the
                # book is one incident).
                with self._submit_lock:
                    self._submitted[:0] = pending[i:]
                raise
            if on_committed is not None:
                on_committed()

    # -- progress --------------------------------------------------------------------

    def _pointer(self, name: str) -> int | None:
        v = self.state.monitor_value(name)
        return None if v is None else int(v)

    def become_leader(self) -> None:
        """Take over deciding: the previous leader changed incidents and detector states
        since this replica last looked, so they are read afresh from the state store."""
        self._reload_decisions()
        self.leader = True

    def _reload_decisions(self) -> None:
        """Drop what deciding holds in memory (the incident book, detector states,
        references) and read it from the state store again.

        Deciding changes these before its commit, so a step that fails part-way leaves
        them ahead of the store. Retrying the window on top of them would apply it twice:
        an incident opened by the failed step is already open, and the retry writes no
        ``firing`` transition, so nobody is paged; a CUSUM would count the window's labels
        twice. The store holds exactly what was committed."""
        open_incidents = [Incident.from_json(r.body) for r in self.state.incidents(status="firing",
                                                                                   limit=10_000)]
        self.book = IncidentBook(self.spec.resolve_after, open_incidents)
        self._versions.clear()
        self._refs.clear()
        self._refs_missed.clear()
        self._stall_checked_upto = -1
        self._stale = False
        self._refresh_incident_gauge()

    def step(self, budget_s: float = 5.0) -> int:
        """Summarise and (on the leader) decide what became final; return windows done.

        Stops after ``budget_s`` so that a long backlog does not delay shutdown; the
        next call continues where this one stopped.
        """
        deadline = time.monotonic() + budget_s
        if self.leader and self._stale:
            self._reload_decisions()
        not_yet: NotYet | None = None
        try:
            if self.leader:
                self._commit_submitted()
            pred_view = self.summaries.view(self.pred_topic)
            fb_view = self.summaries.view(self.feedback_topic)
            done = 0
            for summarise in (self._summarise_drift_windows, self._summarise_join_windows):
                # A window whose file is not in place holds up its own pass only: a
                # segment lost from the store must not stop drift along with the join.
                try:
                    done += summarise(pred_view, fb_view, deadline)
                except NotYet as exc:
                    not_yet = not_yet or exc
            if self.leader and time.monotonic() <= deadline:
                done += self._decide(pred_view, fb_view, deadline)
        except BaseException:
            # Whatever failed, deciding may have changed its state without committing it.
            self._stale = True
            raise
        if not_yet is not None and not done:
            raise not_yet
        return done

    # -- summarising: every replica, over the windows it stored --------------------------

    def _summarise_drift_windows(self, pred_view: Any, fb_view: Any, deadline: float) -> int:
        done = 0
        # Whether a window is final here is `closed_for`'s to say (closed, or orphaned
        # and written out), not a bound on the query.
        bound = _NO_BOUND
        drift_upto = self._pointer("drift_upto")
        first = None if drift_upto is None else drift_upto - 1
        have = self.summaries.summarised("drift", self.instance, first or 0)
        for start in self.summaries.own_windows(self.pred_topic, self.instance, first, bound):
            if start in have or not pred_view.closed_for(self.instance, start):
                continue
            if not self._summarise_drift(start, drift_upto):
                break
            done += 1
            if time.monotonic() > deadline:
                return done
        return done

    def _summarise_join_windows(self, pred_view: Any, fb_view: Any, deadline: float) -> int:
        done = 0
        matured = matured_upto(self.spec.join, fb_view.closed_upto())
        if matured is None or time.monotonic() > deadline:
            return done
        join_upto = self._pointer("join_upto")
        first = None if join_upto is None else join_upto - 1
        have = self.summaries.summarised("join", self.instance, first or 0)
        for start in self.summaries.own_windows(self.pred_topic, self.instance, first, matured):
            if start in have or not pred_view.closed_for(self.instance, start):
                continue
            self._summarise_join(start, join_upto)
            done += 1
            if time.monotonic() > deadline:
                return done
        return done

    # -- deciding: the leader, over merged summaries ------------------------------------

    def _decide(self, pred_view: Any, fb_view: Any, deadline: float) -> int:
        done = 0
        pred_closed = pred_view.closed_upto()
        if pred_closed is None:
            return 0
        drift_upto = self._pointer("drift_upto")
        self._waiting = {}
        for start in self.state.segment_windows(self.pred_topic,
                                                None if drift_upto is None else drift_upto - 1,
                                                pred_closed):
            if drift_upto is not None and start < drift_upto:
                continue
            parts = self._parts("drift", start)
            if parts is None:
                break
            self._decide_drift(start, parts)
            done += 1
            if time.monotonic() > deadline:
                return done
        fb_closed = fb_view.closed_upto()
        matured = matured_upto(self.spec.join, fb_closed)
        join_upto = self._pointer("join_upto")
        if matured is not None:
            limit = min(matured, pred_closed)
            for start in self.state.segment_windows(self.pred_topic,
                                                    None if join_upto is None else join_upto - 1,
                                                    limit):
                if join_upto is not None and start < join_upto:
                    continue
                parts = self._parts("join", start)
                if parts is None:
                    break
                self._decide_join(start, parts)
                done += 1
                if time.monotonic() > deadline:
                    return done
        self._labels_stalled(pred_closed, fb_closed)
        self.metrics.analysis_lag.labels("drift").set(
            max(0, pred_closed - (self._pointer("drift_upto") or pred_closed)) / 1000)
        self.metrics.analysis_lag.labels("join").set(
            max(0, (matured or 0) - (self._pointer("join_upto") or matured or 0)) / 1000)
        if done:
            # A day of summaries stays for inspection; older ones are history.
            upto = min(self._pointer("drift_upto") or 0, self._pointer("join_upto") or 0)
            if upto:
                self.summaries.prune(upto - SUMMARY_RETENTION_MS)
        return done

    def _parts(self, stage: str, start: int) -> list[dict[str, Any]] | None:
        """Every summary a window is owed, or None while some replica's is missing."""
        owed = self.summaries.segment_instances(self.pred_topic, start)
        got = self.summaries.get(stage, start)
        missing = sorted(owed - set(got))
        if missing:
            self._waiting[stage] = {"window": _iso(start), "replicas": missing}
            return None
        return [json.loads(got[i]) for i in sorted(owed)]

    # -- reading windows -----------------------------------------------------------------

    def _batches(self, topic: str, start: int, columns: list[str] | None,
                 paths: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """A window's rows: every replica's segments, or only ``paths``."""
        if paths is None:
            paths = [seg.path for seg in self.state.segments_of_window(topic, start)]
        for name in paths:
            if not self.store.exists(name):
                # Registered but not yet renamed into place: the ingest thread publishes
                # right after its commit; the next step sees it.
                msg = f"segment {name} is registered but not published yet"
                raise NotYet(msg)
            with self.store.open_parquet(name) as f:
                names = f.schema_arrow.names
                # None: what a profile needs (ids, ranks and user columns are never read).
                cols = ([c for c in names if c in _PROFILE_KEYS or c.startswith("f.")] if columns is None
                        else [c for c in columns if c in names])
                for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                    yield pa.Table.from_batches([batch])

    def _read(self, topic: str, start: int, columns: list[str],
              paths: Sequence[str] | None = None) -> pa.Table:
        tables = list(self._batches(topic, start, columns, paths))
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        return pa.concat_tables(tables, promote_options="permissive")

    # -- references ----------------------------------------------------------------------

    def _reference(self, model: str, version: str, *, external: bool = True) -> Reference | None:
        """The version's reference: cached, in the state store, or (``external``) from
        the configured source, stored on first sight so every replica uses the same one.
        Deciding never looks outside: it uses what the summaries were made against."""
        key = _key(model, version)
        cached = self._refs.get(key)
        # A version without a reference yet is asked for again on each drift window, not
        # once per process: the registry may have been down, or the reference logged
        # after the version went live. Bootstrapping (after bootstrap_ms) ends the search.
        if cached is not None or (external and key in self._refs_missed):
            return cached
        stored = self.state.monitor_value(f"ref/{key}")
        ref = Reference.from_json(stored) if stored is not None else None
        if ref is None and not external:
            return None
        if ref is None and self.references is not None:
            try:
                ref = self.references.lookup(model, version)
            except Exception as exc:  # a registry outage must not stop monitoring
                log.warning("reference lookup failed; will retry on the next window, and "
                            "bootstrap if it still fails by then",
                            extra={"fields": {"model": key, "error": repr(exc)}})
            if ref is not None:
                self.state.commit_monitor(MonitorCommit(values={f"ref/{key}": ref.to_json()}))
                log.info("reference loaded", extra={"fields": {"model": key, "source": ref.source}})
        if ref is None:
            self._refs_missed.add(key)
        self._refs[key] = ref
        return ref

    def _bootstrap(self, model: str, version: str, first: int, end: int) -> Reference:
        """Fit a reference from this version's traffic in windows [first, end)."""
        windows = [w for w in self.state.segment_windows(self.pred_topic, first - 1, end)]
        total = sum(s.rows for w in windows for s in self.state.segments_of_window(self.pred_topic, w))
        share = min(1.0, self.spec.bootstrap_max_rows / max(total, 1))
        rng = np.random.default_rng(first)
        frames = []
        for w in windows:
            for t in self._batches(self.pred_topic, w, None):
                t = _version_rows(t, model, version)
                if share < 1.0 and t.num_rows:
                    t = t.filter(pa.array(rng.random(t.num_rows) < share))
                frames.append(_features_frame(t))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"score": []})
        profile = Profile.fit(df, self.spec.profile)
        source = (f"bootstrap:{len(df)} rows of windows "
                  f"[{_iso(first)}, {_iso(end)}) of the version's own traffic")
        log.warning("no reference profile for this model version: bootstrapped one from live "
                    "traffic", extra={"fields": {"model": _key(model, version), "rows": len(df),
                                                 "from": _iso(first), "to": _iso(end)}})
        return Reference(profile, None, source)

    # -- drift -----------------------------------------------------------------------

    def _version(self, key: str, start: int) -> _Version:
        v = self._versions.get(key)
        if v is None:
            stored = self.state.monitor_value(f"version/{key}")
            v = _Version.from_json(stored) if stored is not None else _Version(first_window=start)
            self._versions[key] = v
        return v

    def _may_lack_reference(self, key: str, start: int, drift_upto: int | None) -> bool:
        """Whether a summary of window ``start`` without a reference for ``key`` is what
        the leader will want: a reference it bootstraps while deciding window W applies
        from the next window on, so a replica ahead of the leader's decisions must not
        summarise past the first window that could be bootstrapped at, and waits there
        instead (the leader can always catch up: the earlier windows' summaries exist).

        Where the version's traffic has a gap, the window it bootstraps at is the first
        one after the gap; that window itself must be summarised without a reference,
        or the leader would wait for a summary that waits for the leader (a sparse
        canary, a quiet night: it froze every model's drift analysis for good)."""
        undecided = self.state.segment_windows(self.pred_topic,
                                               None if drift_upto is None else drift_upto - 1, start)
        if not undecided:
            # The leader decided every window before ``start``: a bootstrapped
            # reference would be in the state store already.
            return True
        stored = self.state.monitor_value(f"version/{key}")
        if stored is not None:
            first = _Version.from_json(stored).first_window
        else:
            # Seen in no decided window: it first appears at or after drift_upto.
            first = drift_upto if drift_upto is not None else self.summaries.first_window(self.pred_topic)
        if first is None:
            return False
        return start <= first + self.spec.bootstrap_ms - self.spec.window_ms

    def _summarise_drift(self, start: int, drift_upto: int | None) -> bool:
        """This replica's share of a prediction window: per version, its rows and their
        profile against the version's reference (bins of the reference, so shares add).
        False: postponed, the leader may still bootstrap a reference this window needs."""
        self._refs_missed.clear()
        rows: dict[str, int] = {}
        sources: dict[str, str | None] = {}
        profiles: dict[str, Profile] = {}
        paths = self.summaries.own_segments(self.pred_topic, self.instance, start)
        for batch in self._batches(self.pred_topic, start, None, paths):
            for (model, version), part in _by_version(batch):
                key = _key(model, version)
                rows[key] = rows.get(key, 0) + part.num_rows
                ref = self._reference(model, version)
                sources[key] = None if ref is None else ref.source
                if ref is None:
                    if not self._may_lack_reference(key, start, drift_upto):
                        return False
                    continue
                s = ref.profile.summarise(_features_frame(part))
                profiles[key] = profiles[key] + s if key in profiles else s
        body = {"versions": {k: {"rows": n, "reference": sources[k],
                                 "profile": profiles[k].to_dict() if k in profiles else None}
                             for k, n in rows.items()}}
        self.summaries.put("drift", start, self.instance, json.dumps(body))
        return True

    def _decide_drift(self, start: int, parts: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        end = start + self.spec.window_ms
        values: dict[str, str] = {"drift_upto": str(end)}
        signals: list[Signal] = []
        summaries: dict[str, Profile] = {}
        refs: dict[str, Reference] = {}
        partial: set[str] = set()
        rows: dict[str, int] = {}
        for part in parts:
            for key, d in sorted(part["versions"].items()):
                model, version = key.split("@", 1)
                v = self._version(key, start)
                v.last_window = start
                rows[key] = rows.get(key, 0) + int(d["rows"])
                ref = self._reference(model, version, external=False)
                if ref is None:
                    continue
                if d["profile"] is None or d["reference"] != ref.source:
                    # A replica summarised against another reference (it had none yet):
                    # this window cannot be compared as a whole.
                    partial.add(key)
                    continue
                refs[key] = ref
                s = Profile.from_dict(d["profile"])
                summaries[key] = summaries[key] + s if key in summaries else s
        for key in sorted(self._versions):
            v = self._versions[key]
            if v.last_window != start:
                continue
            model, version = key.split("@", 1)
            ref = refs.get(key)
            if key in partial:
                log.info("drift of this window skipped: a replica summarised it without the "
                         "version's reference", extra={"fields": {"model": key, "window": _iso(start)}})
                values[f"version/{key}"] = v.to_json()
                continue
            if ref is None:
                v.rows += rows.get(key, 0)
                if (end - v.first_window >= self.spec.bootstrap_ms
                        and v.rows >= self.spec.bootstrap_min_rows):
                    ref = self._bootstrap(model, version, v.first_window, end)
                    self._refs[key] = ref
                    values[f"ref/{key}"] = ref.to_json()
                values[f"version/{key}"] = v.to_json()
                continue
            report = compare(ref.profile, summaries[key], self.spec.drift)
            decider = self.spec.drift.build(v.decider)
            drifting = decider.update(report.flags)
            v.decider = decider.state_dict()
            values[f"version/{key}"] = v.to_json()
            signals.extend(_drift_signals(model, version, start, end, report, drifting, ref,
                                          summaries[key]))
        self._commit(values, signals)
        self.metrics.windows_analysed.labels("drift").inc()
        self.metrics.analysis_seconds.labels("drift").observe(time.perf_counter() - t0)

    # -- labels and performance ----------------------------------------------------------

    def _summarise_join(self, start: int, join_upto: int | None) -> None:
        """This replica's predictions of a matured window joined with the feedback of
        every replica (feedback is read whole: its prediction may be anyone's)."""
        spec = self.spec
        end = start + spec.window_ms
        for fs in spec.join.feedback_windows(start):
            if fs not in self.index:
                fb = self._read(self.feedback_topic, fs, ["prediction_id", "type", "ts"])
                # Unmatched feedback is counted only where every prediction window that
                # could match it is still to be joined by this process.
                earliest = fs - spec.join.attribution_ms - spec.window_ms
                dups = self.index.add(fs, fb, count_unmatched=not self.cluster and (
                    join_upto is None or earliest >= join_upto))
                if dups:
                    self.metrics.duplicate_feedback.inc(dups)
        paths = self.summaries.own_segments(self.pred_topic, self.instance, start)
        preds, dups = dedupe_predictions(self._read(self.pred_topic, start, _PRED_COLUMNS, paths))
        if dups:
            self.metrics.duplicate_predictions.inc(dups)
        joined = self.index.join(start, preds)
        before = dict(self.index.unmatched)
        self.index.evict_before(end)
        for t, c in self.index.unmatched.items():
            if c > before[t]:
                self.metrics.feedback_unmatched.labels(t).inc(c - before[t])
        self.metrics.join_index_bytes.set(self.index.nbytes)
        versions = {}
        for (model, version), idx in _version_indices(preds):
            scores = np.asarray(preds.column("score").take(pa.array(idx)), dtype=np.float64)
            labels = {t: y[idx] for t, y in joined.labels.items()}
            versions[_key(model, version)] = LabelSummary.from_arrays(
                scores, labels, spec.primary_label).to_dict()
        self.summaries.put("join", start, self.instance, json.dumps({"versions": versions}))

    def _decide_join(self, start: int, parts: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        spec = self.spec
        end = start + spec.window_ms
        merged: dict[str, LabelSummary] = {}
        for part in parts:
            for key, d in part["versions"].items():
                s = LabelSummary.from_dict(d)
                merged[key] = merged[key] + s if key in merged else s
        values: dict[str, str] = {"join_upto": str(end)}
        signals: list[Signal] = []
        heard: list[tuple[str, str, LabelSummary, np.ndarray]] = []
        for key in sorted(merged):
            summary = merged[key]
            model, version = key.split("@", 1)
            v = self._version(key, start)
            for t in spec.join.label_types:
                self.metrics.label_rate.labels(model, version, t).set(summary.rate(t))
            # The window's labels in an order that depends on nothing but the window and
            # the counts: the same for one replica or many (docs/statistics.md).
            y = exchangeable_labels(summary.n, summary.positives.get(spec.primary_label, 0),
                                    seed=(start, key))
            signals.extend(self._performance(model, version, v, start, end, summary, y))
            values[f"version/{key}"] = v.to_json()
            heard.append((model, version, summary, y))
        self._commit(values, signals)
        for listener in self.label_listeners:
            for model, version, summary, y in heard:
                try:
                    listener(model, version, start, end, summary, y)
                except Exception:
                    log.exception("a label listener failed", extra={"fields": {"model": model}})
        self.metrics.windows_analysed.labels("join").inc()
        self.metrics.analysis_seconds.labels("join").observe(time.perf_counter() - t0)

    def _label_reference(self, model: str, version: str, v: _Version) -> LabelSummary | None:
        ref = self._reference(model, version, external=False)
        if ref is not None and ref.labels is not None:
            return ref.labels
        if v.label_ref_done and v.label_ref is not None:
            return LabelSummary.from_dict(v.label_ref)
        return None

    def _performance(self, model: str, version: str, v: _Version, start: int, end: int,
                     summary: LabelSummary, y: np.ndarray) -> list[Signal]:
        spec = self.spec
        ref = self._label_reference(model, version, v)
        if ref is None:
            # Bootstrap the label reference from the version's first matured windows.
            acc = summary if v.label_ref is None else LabelSummary.from_dict(v.label_ref) + summary
            v.label_ref = acc.to_dict()
            v.label_ref_start = start if v.label_ref_start is None else v.label_ref_start
            if (end - v.label_ref_start >= spec.bootstrap_ms and acc.n >= spec.bootstrap_min_rows
                    and acc.positives.get(spec.primary_label, 0) >= spec.bootstrap_min_labels):
                v.label_ref_done = True
                log.warning("no label reference for this model version: bootstrapped one from "
                            "its first matured windows", extra={"fields": {
                                "model": _key(model, version), "rows": acc.n,
                                "rate": acc.rate(spec.primary_label)}})
            return []
        signals: list[Signal] = []
        # The per-event CUSUM: sees every matured label at once, pages before the period ends.
        p0 = ref.rate(spec.primary_label)
        if spec.sequential and 0.0 < p0 < 1.0:
            bank = AdaptiveBernoulliCUSUM(p0, spec.arl0_events, spec.cusum_drops)
            if v.cusum is not None and v.cusum.get("p0") == p0:
                bank.load_state_dict(v.cusum)
            if bank.update_many(y) >= 0 or bank.drift_detected:
                v.cusum_alarms_in_period += 1
                signals.append(Signal(
                    "performance_drop", model, f"cusum:{spec.primary_label}", True, start, end,
                    Severity.CRITICAL,
                    summary=(f"{spec.primary_label} rate fell below the reference {p0:.4g} "
                             f"(sequential test, drop of about {max(bank.detected_drops):.0%})"),
                    evidence={"version": version, "reference_rate": p0,
                              "window_rate": summary.rate(spec.primary_label),
                              "detected_drops": list(bank.detected_drops),
                              "arl0_events": spec.arl0_events}))
                bank.reset()
            v.cusum = bank.state_dict()
        # The period's drop tests.
        period = summary if v.period is None else LabelSummary.from_dict(v.period) + summary
        v.period_start = start if v.period_start is None else v.period_start
        if end - v.period_start < spec.period_ms:
            v.period = period.to_dict()
            return signals
        report = evaluate(ref.to_reference(), period.to_window_metrics(), spec.performance)
        decider = DriftDecider(spec.performance_k, spec.performance_m)
        if v.perf_decider is not None:
            decider.load_state_dict(v.perf_decider)
        fired = decider.update({t.metric: t.fired for t in report.tests})
        v.perf_decider = decider.state_dict()
        for t in report.tests:
            signals.append(Signal(
                "performance_drop", model, t.metric, t.metric in fired, v.period_start, end,
                Severity.CRITICAL,
                summary=(f"{t.metric} of {model} v{version}: {t.observed:.4g} against the "
                         f"reference {t.reference:.4g} ({t.relative_change:+.1%}, {t.test}, "
                         f"adjusted p {t.p_adjusted:.2g}, {period.n} predictions)"),
                evidence={"version": version, **t.to_dict(), "rows": period.n,
                          "reference_source": "bootstrap" if v.label_ref_done else "reference"}))
        if not any(s.subject.startswith("cusum:") for s in signals):
            signals.append(Signal("performance_drop", model, f"cusum:{spec.primary_label}",
                                  v.cusum_alarms_in_period > 0, v.period_start, end,
                                  Severity.CRITICAL))
        v.period, v.period_start, v.cusum_alarms_in_period = None, None, 0
        return signals

    def _labels_stalled(self, pred_closed: int, fb_closed: int | None) -> None:
        """Labels that stop maturing are an incident: the feedback pipeline is down, and
        every label-based metric is blind until it is back."""
        if pred_closed <= self._stall_checked_upto:
            return
        self._stall_checked_upto = pred_closed
        first = self._pointer("join_upto") or self._pointer("first_pred_window")
        if first is None:
            self._commit({"first_pred_window": str(pred_closed)}, [])
            return
        horizon = (fb_closed if fb_closed is not None else first) + self.spec.join.attribution_ms
        lag = pred_closed - horizon
        firing = lag > self.spec.labels_stall_ms
        open_fp = "data_quality/*/labels:stalled" in self.book.open
        if firing or open_fp:
            self._commit({}, [Signal(
                "data_quality", "*", "labels:stalled", firing, pred_closed - self.spec.window_ms,
                pred_closed, Severity.WARNING,
                summary=(f"feedback on {self.feedback_topic!r} is {lag / 60_000:.0f} min behind "
                         "predictions: labels are not maturing"),
                evidence={"prediction_closed_upto": _iso(pred_closed),
                          "feedback_closed_upto": None if fb_closed is None else _iso(fb_closed)})])

    # -- watching the stages themselves --------------------------------------------------

    def watch(self, now_s: float | None = None) -> dict[str, str]:
        """Whether drift and join are making progress (monitor/stalls.py); returns the
        stalled passes' reasons (also in `stalls`, for /readyz).

        Called after every step, failed or not, so that a pass that cannot move never
        looks like a quiet one. Leader only: it commits ``monitor_stalled`` incidents.
        """
        now_s = time.monotonic() if now_s is None else now_s
        if not self.leader:
            return {}
        if self._stale:
            self._reload_decisions()
        pred_closed = self.summaries.view(self.pred_topic).closed_upto()
        matured = matured_upto(self.spec.join, self.summaries.view(self.feedback_topic).closed_upto())
        bounds = {"drift": pred_closed,
                  "join": None if matured is None or pred_closed is None else min(matured, pred_closed)}
        stalls: dict[str, str] = {}
        signals: list[Signal] = []
        for name, bound in bounds.items():
            pointer = self._pointer(f"{name}_upto")
            waited = self._waiting.get(name) or {}
            stage = Stage(name, pointer, bound,
                          [] if bound is None else self.state.segment_windows(
                              self.pred_topic, None if pointer is None else pointer - 1, bound),
                          [r for r in waited.get("replicas", []) if r != self.instance],
                          waited.get("window"))
            idle_s = self._watch.idle_s(stage, now_s)
            signal = self._watch.signal(stage, idle_s, last_error=self.last_error, iso=_iso)
            self.metrics.stage_idle.labels(name).set(idle_s)
            self.metrics.stage_stalled.labels(name).set(int(signal.firing))
            if signal.firing:
                stalls[name] = signal.summary
            if signal.firing or signal.fingerprint in self.book.open:
                signals.append(signal)
        self.stalls = stalls
        if signals:
            self._commit({}, signals)
        return stalls

    # -- incidents and persistence -------------------------------------------------------

    def _commit(self, values: dict[str, str], signals: list[Signal],
                extra: Sequence[Outcome] = ()) -> None:
        outcome = self.book.observe(_merge_by_fingerprint(signals))
        for o in extra:
            outcome = Outcome([*outcome.transitions, *o.transitions], [*outcome.touched, *o.touched])
        rows = tuple(IncidentRow(i.id, i.fingerprint, i.status, i.opened_ms, i.updated_ms,
                                 i.to_json()) for i in outcome.touched)
        events = tuple((t.incident.id, t.transition, t.incident.to_json())
                       for t in outcome.transitions)
        self.state.commit_monitor(MonitorCommit(values=values, incidents=rows, events=events))
        for t in outcome.transitions:
            self._announce(t)
        if outcome.transitions:
            self._refresh_incident_gauge()

    def _announce(self, t: Transition) -> None:
        inc = t.incident
        self.metrics.incident_transitions.labels(inc.kind, t.transition).inc()
        level = (logging.INFO if t.transition == "resolved" or inc.severity == Severity.INFO.label
                 else logging.WARNING)
        log.log(level, f"incident {t.transition}: {inc.summary or inc.fingerprint}",
                extra={"fields": {"incident": inc.id, "severity": inc.severity,
                                  "fingerprint": inc.fingerprint}})

    def _refresh_incident_gauge(self) -> None:
        self.metrics.incidents_firing.clear()
        for inc in self.book.open.values():
            self.metrics.incidents_firing.labels(inc.kind, inc.severity).inc()

    def status(self) -> dict[str, Any]:
        # Copies first: this runs on the HTTP thread while the analysis thread works.
        refs = {k: (None if r is None else r.source) for k, r in dict(self._refs).items()}
        return {
            "drift_upto": _iso_or_none(self._pointer("drift_upto")),
            "join_upto": _iso_or_none(self._pointer("join_upto")),
            "references": refs,
            "role": "leader" if self.leader else "follower",
            "waiting_for": dict(self._waiting),
            "stalled": dict(self.stalls),
            "join_index_rows": self.index.rows,
            "feedback_unmatched": dict(self.index.unmatched),
            "last_error": self.last_error,
        }


class NotYet(RuntimeError):
    """The window's files are not all in place yet; try again on the next step."""


# -- helpers ------------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()


def _iso_or_none(ms: int | None) -> str | None:
    return None if ms is None else _iso(ms)


def _version_rows(t: pa.Table, model: str, version: str) -> pa.Table:
    mask = pc.and_(pc.equal(t.column("model").cast(pa.string()), model),
                   pc.equal(t.column("model_version").cast(pa.string()), version))
    return t.filter(mask)


def _version_indices(t: pa.Table) -> list[tuple[tuple[str, str], np.ndarray]]:
    """Row indices of each (model, version) in ``t``."""
    if t.num_rows == 0:
        return []
    models = t.column("model").cast(pa.string()).to_numpy(zero_copy_only=False)
    versions = t.column("model_version").cast(pa.string()).to_numpy(zero_copy_only=False)
    keys = pd.MultiIndex.from_arrays([models, versions])
    codes, uniques = pd.factorize(keys)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    return [((str(uniques[i][0]), str(uniques[i][1])), order[bounds[i]:bounds[i + 1]])
            for i in range(len(uniques))]


def _by_version(t: pa.Table) -> list[tuple[tuple[str, str], pa.Table]]:
    return [(k, t.take(pa.array(idx))) for k, idx in _version_indices(t)]


def _features_frame(t: pa.Table) -> pd.DataFrame:
    """The columns a profile describes: the score and every ``f.`` feature."""
    cols = [c for c in t.column_names if c == "score" or c.startswith("f.")]
    return t.select(cols).to_pandas()


def _drift_signals(model: str, version: str, start: int, end: int, report: Any,
                   drifting: frozenset[str], ref: Reference,
                   window: Profile | None = None) -> list[Signal]:
    out = []
    for f in report.features:
        kind = "prediction_drift" if f.kind == "score" else "feature_drift"
        moved = f.feature in drifting
        out.append(Signal(
            kind, model, f.feature, moved, start, end, Severity.WARNING,
            summary=(f"{f.feature} drifted: PSI {f.psi:.3f}, JS {f.js:.3f}, "
                     f"adjusted p {f.p_adjusted:.2g}" if moved else ""),
            evidence={"version": version, "psi": f.psi, "js": f.js, "wasserstein": f.wasserstein,
                      "p_value": f.p_value, "p_adjusted": f.p_adjusted, "rows": f.rows,
                      "flagged_this_window": f.drifting, "reference": ref.source,
                      **_bins(ref.profile, window, f.feature)}))
    for q in report.quality:
        out.append(Signal(
            "data_quality", model, f"{q.feature}:{q.check}", q.firing, start, end, Severity.WARNING,
            summary=(f"{q.feature}: {q.check.replace('_', ' ')} {q.value:.2%} "
                     f"(reference {q.reference:.2%})" if q.firing else ""),
            evidence={"version": version, "value": q.value, "reference": q.reference,
                      "p_value": q.p_value, "p_adjusted": q.p_adjusted}))
    return out


def _bins(ref: Profile, window: Profile | None, name: str) -> dict[str, Any]:
    """The reference's and the window's bin counts of one feature: what the drift report
    (monitor/reports.py) plots. A few dozen numbers per feature."""
    if window is None:
        return {}
    r = ref.score if name == ref.score_column else ref.numeric.get(name)
    w = window.score if name == window.score_column else window.numeric.get(name)
    if r is not None and w is not None:
        return {"edges": list(r.edges), "reference_counts": list(r.counts),
                "window_counts": list(w.counts)}
    rc, wc = ref.categorical.get(name), window.categorical.get(name)
    if rc is not None and wc is not None:
        return {"categories": [*rc.categories, "(other)"], "reference_counts": list(rc.counts),
                "window_counts": list(wc.counts)}
    return {}


def _merge_by_fingerprint(signals: list[Signal]) -> list[Signal]:
    """One signal per fingerprint and evaluation: two live versions of one model report
    on the same feature, and one firing must not be cancelled by the other's clean one."""
    best: dict[str, Signal] = {}
    for s in signals:
        seen = best.get(s.fingerprint)
        if seen is None or (s.firing and not seen.firing) or (
                s.firing and seen.firing and s.severity > seen.severity):
            best[s.fingerprint] = s
    return list(best.values())


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
