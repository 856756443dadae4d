"""The prediction <- feedback join: which predictions earned which label (docs/monitoring.md).

A prediction's label for type T is 1 when feedback of type T for its ``prediction_id``
has an event time within ``[prediction ts, prediction ts + attribution]``, else 0.
The label is final only once the feedback stream's watermark has passed the end of
that interval, so a prediction window ``[s, s + size)`` is joined once the feedback
topic's windows are closed up to ``s + size + attribution`` (`matured`).

Memory. The join runs over persisted window files, one prediction window at a time,
against the feedback of the windows that can still match: ``[s, s + size +
attribution)``. Feedback is the sparse side (a click rate of a few percent), so the
index keeps it, compacted to three columns (id, type code, event time), and evicts a
window as soon as no unjoined prediction window can reach it. Its size is bounded by
feedback rate x (attribution + window size); `FeedbackIndex.nbytes` is exported as a
metric. The prediction side is never held beyond the window being joined.

Feedback that matched no prediction by the time its window is evicted is counted per
type (the contract's "unknown or expired prediction"); it is still in the feedback
store for anyone who wants to look. After a restart the index does not know which
feedback the previous process already matched, so windows loaded then are not
counted (`FeedbackIndex.add(..., count_unmatched=False)`): a restart may undercount
unmatched feedback, never overcount it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["FeedbackIndex", "JoinSpec", "JoinedWindow", "dedupe_predictions", "matured_upto"]


@dataclasses.dataclass(frozen=True)
class JoinSpec:
    """Args:
        attribution_ms: how long after a prediction its feedback still counts.
        label_types: the feedback types that are labels; other types are ignored.
        window_ms: the window size of the stores being joined.
    """

    attribution_ms: int
    label_types: tuple[str, ...]
    window_ms: int

    def __post_init__(self) -> None:
        if self.attribution_ms <= 0:
            msg = f"attribution_ms must be > 0, got {self.attribution_ms}"
            raise ValueError(msg)
        if not self.label_types or len(set(self.label_types)) != len(self.label_types):
            msg = f"label_types must be distinct and non-empty, got {self.label_types}"
            raise ValueError(msg)

    def feedback_windows(self, window_start_ms: int) -> range:
        """Starts of the feedback windows a prediction window can match."""
        end = window_start_ms + self.window_ms + self.attribution_ms
        return range(window_start_ms, end, self.window_ms)

    def matured(self, window_start_ms: int, feedback_closed_upto_ms: int | None) -> bool:
        if feedback_closed_upto_ms is None:
            return False
        return window_start_ms + self.window_ms + self.attribution_ms <= feedback_closed_upto_ms


def matured_upto(spec: JoinSpec, feedback_closed_upto_ms: int | None) -> int | None:
    """End of the newest prediction window whose labels are final."""
    if feedback_closed_upto_ms is None:
        return None
    end = feedback_closed_upto_ms - spec.attribution_ms
    return end - end % spec.window_ms


@dataclasses.dataclass
class _FeedbackWindow:
    ids: pa.Array
    types: np.ndarray  # int8 code into JoinSpec.label_types
    ts: np.ndarray  # int64 epoch ms
    matched: np.ndarray  # bool
    count_unmatched: bool

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.types.nbytes + self.ts.nbytes + self.matched.nbytes)


@dataclasses.dataclass(frozen=True)
class JoinedWindow:
    """One prediction window with its final labels (row order of the input table)."""

    table: pa.Table
    labels: dict[str, np.ndarray]


def dedupe_predictions(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first row of each ``prediction_id``; return (table, duplicates dropped).

    The recommender may resend a prediction (a retried request); counting it twice
    would double its weight in every metric.
    """
    n = table.num_rows
    if n == 0:
        return table, 0
    indexed = pa.table({"id": table.column("prediction_id"), "row": pa.array(np.arange(n))})
    first = indexed.group_by("id", use_threads=False).aggregate([("row", "min")])
    if first.num_rows == n:
        return table, 0
    rows = np.sort(first.column("row_min").to_numpy())
    return table.take(pa.array(rows)), n - len(rows)


def _dedupe_feedback(table: pa.Table) -> tuple[pa.Table, int]:
    """The first row of each (prediction_id, type, ts), and how many others there were."""
    n = table.num_rows
    if n == 0:
        return table, 0
    keys = table.select(["prediction_id", "type", "ts"])
    if pa.types.is_dictionary(keys.column("type").type):
        keys = keys.set_column(1, "type", keys.column("type").cast(pa.string()))
    indexed = keys.append_column("row", pa.array(np.arange(n)))
    first = indexed.group_by(["prediction_id", "type", "ts"], use_threads=False).aggregate([("row", "min")])
    if first.num_rows == n:
        return table, 0
    rows = np.sort(first.column("row_min").to_numpy())
    return table.take(pa.array(rows)), n - len(rows)


class FeedbackIndex:
    """The feedback windows that unjoined prediction windows may still match.

    Example:
        >>> spec = JoinSpec(attribution_ms=60_000, label_types=("click",), window_ms=60_000)
        >>> idx = FeedbackIndex(spec)
        >>> idx.add(0, pa.table({"prediction_id": ["a"], "type": ["click"], "ts": [1_000]}))
        >>> idx.add(60_000, pa.table({"prediction_id": ["b"], "type": ["click"], "ts": [70_000]}))
        >>> preds = pa.table({"prediction_id": ["a", "b"], "ts": [500, 600]})
        >>> idx.join(0, preds).labels["click"].tolist()
        [True, False]
    """

    def __init__(self, spec: JoinSpec) -> None:
        self.spec = spec
        self._codes = {t: i for i, t in enumerate(spec.label_types)}
        self._windows: dict[int, _FeedbackWindow] = {}
        #: Feedback of each type that matched no prediction, over evicted windows.
        self.unmatched = dict.fromkeys(spec.label_types, 0)

    @property
    def windows(self) -> list[int]:
        return sorted(self._windows)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._windows.values())

    @property
    def rows(self) -> int:
        return sum(len(w.ts) for w in self._windows.values())

    def __contains__(self, window_start_ms: int) -> bool:
        return window_start_ms in self._windows

    def add(self, window_start_ms: int, table: pa.Table, *, count_unmatched: bool = True) -> int:
        """Index one closed feedback window (columns prediction_id, type, ts); returns how
        many producer duplicates it dropped.

        A feedback event sent twice (the same prediction, type and time) is one event:
        it labels its prediction once anyway, and must not count twice as unmatched."""
        types = table.column("type")
        if pa.types.is_dictionary(types.type):
            types = types.cast(pa.string())
        known = pc.is_in(types, value_set=pa.array(list(self.spec.label_types)))
        table = table.filter(known)
        table, duplicates = _dedupe_feedback(table)
        codes = np.asarray(pc.index_in(table.column("type").cast(pa.string()),
                                       value_set=pa.array(list(self.spec.label_types))),
                           dtype=np.int8) if table.num_rows else np.zeros(0, np.int8)
        ids = table.column("prediction_id").combine_chunks() if table.num_rows else pa.array([], pa.string())
        ts = np.asarray(table.column("ts"), dtype=np.int64) if table.num_rows else np.zeros(0, np.int64)
        self._windows[window_start_ms] = _FeedbackWindow(
            ids=ids, types=codes, ts=ts, matched=np.zeros(len(ts), dtype=bool),
            count_unmatched=count_unmatched)
        return duplicates

    def evict_before(self, window_start_ms: int) -> None:
        """Drop windows that start before ``window_start_ms``, counting their unmatched feedback."""
        for start in [s for s in self._windows if s < window_start_ms]:
            w = self._windows.pop(start)
            if w.count_unmatched and len(w.ts):
                counts = np.bincount(w.types[~w.matched], minlength=len(self.spec.label_types))
                for t, c in zip(self.spec.label_types, counts, strict=True):
                    self.unmatched[t] += int(c)

    def join(self, window_start_ms: int, predictions: pa.Table) -> JoinedWindow:
        """Labels of one prediction window (columns prediction_id and ts at least).

        Every feedback window in `JoinSpec.feedback_windows` must have been added (an
        empty table for a window without feedback).
        """
        missing = [s for s in self.spec.feedback_windows(window_start_ms) if s not in self._windows]
        if missing:
            msg = f"feedback windows {missing} are not indexed"
            raise KeyError(msg)
        n = predictions.num_rows
        labels = {t: np.zeros(n, dtype=bool) for t in self.spec.label_types}
        parts = [(s, self._windows[s]) for s in self.spec.feedback_windows(window_start_ms)]
        parts = [(s, w) for s, w in parts if len(w.ts)]
        if n == 0 or not parts:
            return JoinedWindow(predictions, labels)
        fb = pa.table({
            "prediction_id": pa.chunked_array([w.ids for _, w in parts]),
            "fb_type": np.concatenate([w.types for _, w in parts]),
            "fb_ts": np.concatenate([w.ts for _, w in parts]),
            "fb_part": np.concatenate([np.full(len(w.ts), i, np.int32) for i, (_, w) in enumerate(parts)]),
            "fb_row": np.concatenate([np.arange(len(w.ts), dtype=np.int64) for _, w in parts]),
        })
        pred = pa.table({
            "prediction_id": predictions.column("prediction_id"),
            "pred_row": pa.array(np.arange(n, dtype=np.int64)),
            "pred_ts": predictions.column("ts"),
        })
        joined = pred.join(fb, "prediction_id", join_type="inner", use_threads=False)
        if joined.num_rows == 0:
            return JoinedWindow(predictions, labels)
        pred_ts = np.asarray(joined.column("pred_ts"), dtype=np.int64)
        fb_ts = np.asarray(joined.column("fb_ts"), dtype=np.int64)
        ok = (fb_ts >= pred_ts) & (fb_ts <= pred_ts + self.spec.attribution_ms)
        rows = np.asarray(joined.column("pred_row"))[ok]
        types = np.asarray(joined.column("fb_type"))[ok]
        for code, t in enumerate(self.spec.label_types):
            labels[t][rows[types == code]] = True
        part = np.asarray(joined.column("fb_part"))[ok]
        fb_row = np.asarray(joined.column("fb_row"))[ok]
        for i, (_, w) in enumerate(parts):
            w.matched[fb_row[part == i]] = True
        return JoinedWindow(predictions, labels)
