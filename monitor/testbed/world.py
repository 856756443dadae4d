"""The simulated recommender of ``make demo``: a hidden world, a champion, live traffic.

The demo needs a recommender whose clicks respond to the model it serves, so that a
drift visibly costs clicks and a better model visibly wins them back. This module is
that recommender, speaking the event contract (docs/events.md) to a real Kafka:

* :class:`World` is the hidden truth: items with a category, a quality and a latent
  taste vector; users with an age, a device and a taste vector; a true click model
  (a logistic function of item quality, category appeal that depends on age and
  device, and the user-item taste match). Nothing in it is visible to the models but
  the ids and the features ``age``, ``device`` and ``category``.
* Two phases: ``STABLE``, then ``DRIFTED``, where an older audience arrives
  (covariate drift: ``age`` moves, and 70% of the traffic comes from users never
  seen before) and tastes change (concept drift: category appeal, its age and device
  dependence, item quality and the users' tastes move to new values, partly
  opposed to the old ones). Each phase's base rate is set so that random slates
  get the same CTR in both: what falls after the drift is what the *model* wins.
* :class:`SlatePolicy`: a request scores ``candidates`` random items with the served
  model and shows the top ``shown`` (rank 1, 2, ...); one request in ten shows
  random candidates instead (exploration), so the logs a fine-tune learns from
  also hold items the old model would never pick.
* :func:`bootstrap_champion`: exploration logs of the stable world written to a
  feedback store, the real training job (``python -m retrain.job``) on them, the
  alias ``champion`` on the version, and its reference profile replaced by one of
  its own serving traffic (see the function for why).
* :class:`Recommender`: the live loop. It serves ``models:/NAME@champion`` (loaded
  with ``mlflow.pyfunc.load_model``, reloaded in the background when the alias
  moves, polled every few seconds), produces prediction events with kafka-python
  (batched, lingering), draws clicks from the true model and sends them after a
  delay of a few seconds, and writes what it did, second by second, to a JSON-lines
  stats file that the demo and the benchmark read.

Run it alone (after ``bootstrap``)::

    python -m monitor.testbed.world bootstrap --tracking-uri URI --workdir DIR --seed 1
    python -m monitor.testbed.world serve --kafka HOST:PORT --tracking-uri URI --seed 1 --stats FILE
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["DRIFTED", "STABLE", "Recommender", "ServeSpec", "SlatePolicy", "World", "WorldSpec",
           "bootstrap_champion", "shadow_reference", "train_oracle"]

log = logging.getLogger(__name__)

STABLE, DRIFTED = 0, 1
PHASES = ("stable", "drifted")
DEVICES = np.array(["ios", "android", "web"])
REPO = Path(__file__).resolve().parents[2]
CHAMPION = "champion"
#: Hyperparameters of the bootstrap champion (and of the benchmark's oracle): a small
#: model that trains in seconds on two CPU cores and still learns the world's structure.
BOOTSTRAP_PARAMS: dict[str, Any] = {"max_epochs": 8, "batch_size": 512, "hidden": [32, 16],
                                    "embedding_dim": 8, "buckets": 4096, "patience": 2, "lr": 0.003}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Scorer(Protocol):
    """What serves: an MLflow pyfunc model or a `retrain.ctr.CTRModel`."""

    def predict(self, frame: pd.DataFrame) -> Any: ...


# -- the hidden world -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """The world's size and how far the drift moves it.

    Args:
        seed: every random choice of the world derives from it.
        items, users: catalogue size; users per audience (the stable one and the one
            that arrives with the drift).
        categories, dim: item categories; length of the latent taste vectors.
        target_ctr: CTR of random slates in either phase (sets each phase's base rate).
        rho: correlation of each moved parameter with its old value; negative, so
            that what the old model learned to prefer is now somewhat disliked.
        new_user_share: share of the drifted traffic from the new, older audience.
    """

    seed: int = 1
    items: int = 300
    users: int = 1500
    categories: int = 8
    dim: int = 4
    target_ctr: float = 0.12
    rho: float = -0.3
    new_user_share: float = 0.7

    def __post_init__(self) -> None:
        if self.items < 10 or self.users < 10 or self.categories < 2 or self.dim < 1:
            msg = f"a world needs >= 10 items and users, >= 2 categories, dim >= 1: {self}"
            raise ValueError(msg)
        if not 0.0 < self.target_ctr < 1.0:
            msg = f"target_ctr must be in (0, 1), got {self.target_ctr}"
            raise ValueError(msg)
        if not -1.0 <= self.rho <= 1.0 or not 0.0 <= self.new_user_share <= 1.0:
            msg = f"rho must be in [-1, 1] and new_user_share in [0, 1]: {self}"
            raise ValueError(msg)


def _standardised(x: FloatArray, scale: float) -> FloatArray:
    # Fixed spread whatever the draw: every seed gets a world of the same difficulty.
    return (x - x.mean()) / x.std() * scale


class World:
    """The hidden truth: who the users are, what the items are, who clicks what.

    Example:
        >>> w = World(WorldSpec(seed=3))
        >>> rng = np.random.default_rng(0)
        >>> users = w.draw_users(rng, 5, DRIFTED)
        >>> w.p_click(users, rng.integers(0, w.spec.items, 5), DRIFTED).shape
        (5,)
    """

    def __init__(self, spec: WorldSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 7])
        c, n = spec.categories, spec.users

        def moved(old: FloatArray, scale: float) -> FloatArray:
            fresh = rng.normal(scale=scale, size=old.shape)
            return spec.rho * old + np.sqrt(1 - spec.rho**2) * fresh

        self.item_category = rng.integers(0, c, spec.items)
        self.item_taste = rng.normal(size=(spec.items, spec.dim))
        quality = _standardised(rng.normal(size=spec.items), 0.5)
        appeal = _standardised(rng.normal(size=c), 0.6)
        age_slope = _standardised(rng.normal(size=c), 0.7)
        device = rng.normal(scale=0.3, size=(len(DEVICES), c))
        self._quality = (quality, _standardised(moved(quality, 0.5), 0.5))
        self._appeal = (appeal, _standardised(moved(appeal, 0.6), 0.6))
        self._age_slope = (age_slope, _standardised(moved(age_slope, 0.7), 0.7))
        self._device = (device, moved(device, 0.3))
        # Users 0..n-1: the stable audience, mostly young (mean age ~36); n..2n-1 the
        # audience of the drifted phase (mean ~53). Both span 18-80, so the champion's
        # numeric clipping (its training quantiles) does not hide the new ages entirely.
        self.age = np.round(np.concatenate([18 + 62 * rng.beta(2, 5, n), 18 + 62 * rng.beta(4, 3, n)]))
        self.device = np.concatenate([rng.choice(len(DEVICES), n, p=[0.45, 0.4, 0.15]),
                                      rng.choice(len(DEVICES), n, p=[0.3, 0.3, 0.4])])
        taste = rng.normal(size=(2 * n, spec.dim))
        self._user_taste = (taste, 0.5 * taste + np.sqrt(0.75) * rng.normal(size=taste.shape))
        self._base = (0.0, 0.0)
        self._base = (self._calibrate(STABLE), self._calibrate(DRIFTED))

    def _calibrate(self, phase: int) -> float:
        """The base logit at which random slates of ``phase`` click at ``target_ctr``."""
        probe = np.random.default_rng([self.spec.seed, 8, phase])
        users = self.draw_users(probe, 20_000, phase)
        raw = self._logit(users, probe.integers(0, self.spec.items, 20_000), phase)
        lo, hi = -10.0, 10.0
        for _ in range(60):  # bisection: the mean probability is monotone in the base
            mid = (lo + hi) / 2
            if np.mean(1 / (1 + np.exp(-(raw + mid)))) > self.spec.target_ctr:
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    def draw_users(self, rng: np.random.Generator, k: int, phase: int) -> IntArray:
        n = self.spec.users
        if phase == STABLE:
            return rng.integers(0, n, k)
        new = rng.random(k) < self.spec.new_user_share
        return np.where(new, n + rng.integers(0, n, k), rng.integers(0, n, k))

    def _logit(self, users: IntArray, items: IntArray, phase: int) -> FloatArray:
        cat = self.item_category[items]
        z = (self.age[users] - 45.0) / 15.0
        taste = np.sum(self._user_taste[phase][users] * self.item_taste[items], axis=-1)
        return (self._base[phase] + self._quality[phase][items] + self._appeal[phase][cat]
                + self._age_slope[phase][cat] * z + self._device[phase][self.device[users], cat]
                + 0.5 * taste / np.sqrt(self.spec.dim))

    def p_click(self, users: IntArray, items: IntArray, phase: int) -> FloatArray:
        """The true click probability of showing ``items[i]`` to ``users[i]``."""
        return 1.0 / (1.0 + np.exp(-self._logit(users, items, phase)))

    def features(self, users: IntArray, items: IntArray) -> pd.DataFrame:
        """What a model sees: the ids and the features, by the names events carry."""
        return pd.DataFrame({
            "user_id": np.char.add("u", users.astype(str)),
            "item_id": np.char.add("i", items.astype(str)),
            "age": self.age[users].astype(np.float64),
            "device": DEVICES[self.device[users]],
            "category": np.char.add("c", self.item_category[items].astype(str)),
        })


# -- slates -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SlatePolicy:
    """Score ``candidates`` random items per request, show the top ``shown``.

    ``explore``: the share of requests that show random candidates instead. Without
    it, the logs after a drift hold only what the old model liked, and a fine-tune
    cannot learn that something it never showed is now good.
    """

    candidates: int = 4
    shown: int = 2
    explore: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.shown <= self.candidates:
            msg = f"need 1 <= shown <= candidates, got shown={self.shown}, candidates={self.candidates}"
            raise ValueError(msg)
        if not 0.0 <= self.explore <= 1.0:
            msg = f"explore must be in [0, 1], got {self.explore}"
            raise ValueError(msg)

    def choose(self, scores: FloatArray, rng: np.random.Generator) -> tuple[IntArray, npt.NDArray[np.bool_]]:
        """Column indices ``[requests, shown]`` into the candidates, best first, and
        which requests explored."""
        order = np.argsort(-scores, axis=1, kind="stable")
        explore = rng.random(len(scores)) < self.explore
        if explore.any():
            order[explore] = np.argsort(rng.random((int(explore.sum()), scores.shape[1])), axis=1)
        return order[:, :self.shown], explore


@dataclasses.dataclass
class Slates:
    """What a batch of requests showed: one row per impression."""

    users: IntArray
    items: IntArray
    ranks: IntArray  # 1-based
    requests: IntArray  # index of the request in the batch
    scores: FloatArray
    p: FloatArray  # the true click probability
    request_users: IntArray  # [requests]
    candidates: IntArray  # [requests, candidates]: what was scored
    pick: IntArray  # [requests, shown]: columns of candidates shown
    explored: npt.NDArray[np.bool_]  # [requests]: random slates

    def __len__(self) -> int:
        return len(self.users)


def serve_batch(world: World, policy: SlatePolicy, scorer: Scorer | None, rng: np.random.Generator,
                requests: int, phase: int) -> Slates:
    """``requests`` requests: candidates drawn, scored by ``scorer`` (None: random slates,
    the exploration logs of a recommender without a model yet), the top ones shown."""
    users = world.draw_users(rng, requests, phase)
    cand = rng.integers(0, world.spec.items, (requests, policy.candidates))
    if scorer is None:
        # A recommender without a model logs its prior as the score.
        scores = np.full(cand.shape, world.spec.target_ctr)
        pick = np.tile(np.arange(policy.shown), (requests, 1))
        explored = np.ones(requests, dtype=bool)
    else:
        frame = world.features(np.repeat(users, policy.candidates), cand.ravel())
        scores = np.asarray(scorer.predict(frame), dtype=np.float64).reshape(cand.shape)
        pick, explored = policy.choose(scores, rng)
    items = np.take_along_axis(cand, pick, axis=1).ravel()
    shown_users = np.repeat(users, policy.shown)
    return Slates(users=shown_users, items=items, ranks=np.tile(np.arange(1, policy.shown + 1), requests),
                  requests=np.repeat(np.arange(requests), policy.shown),
                  scores=np.take_along_axis(scores, pick, axis=1).ravel(),
                  p=world.p_click(shown_users, items, phase), request_users=users, candidates=cand, pick=pick,
                  explored=explored)


def click_delays(rng: np.random.Generator, n: int, mean_s: float) -> FloatArray:
    """Seconds from impression to click: a reaction time plus an exponential tail.

    A few clicks come after the attribution window and count as no click, as in
    production; ``mean_s`` is small because the demo compresses time.
    """
    return 0.3 + rng.exponential(mean_s, n)


# -- the bootstrap champion -------------------------------------------------------------


def write_history(store_root: Path, world: World, policy: SlatePolicy, rng: np.random.Generator, *,
                  rows: int, end_ms: int, span_ms: int, model: str, click_delay_s: float) -> tuple[int, int]:
    """Exploration logs of the stable world (random slates) in a feedback store, one
    Parquet segment per minute, published as the daemon publishes them.

    Returns the data window ``[start, end)``.
    """
    import pyarrow as pa

    from connectors.store import FEEDBACKS, PREDICTIONS, FeedbackStore

    slates = serve_batch(world, policy, None, rng, max(1, rows // policy.shown), STABLE)
    n = len(slates)
    start_ms = end_ms - span_ms
    req_ts = np.sort(start_ms + rng.integers(0, span_ms, int(slates.requests.max()) + 1))
    ts = req_ts[slates.requests]
    ids = np.char.add(f"boot{world.spec.seed}-", np.arange(n).astype(str))
    frame = world.features(slates.users, slates.items)
    preds = pa.table({
        "schema": pa.array(["prediction/v1"] * n), "prediction_id": pa.array(ids),
        "ts": pa.array(ts, type=pa.timestamp("ms", tz="UTC")), "model": pa.array([model] * n),
        "model_version": pa.array(["exploration"] * n), "user_id": pa.array(frame["user_id"]),
        "item_id": pa.array(frame["item_id"]), "score": pa.array(slates.scores),
        "rank": pa.array(slates.ranks),
        "request_id": pa.array(np.char.add("boot-r", slates.requests.astype(str))),
        "f.age": pa.array(frame["age"]), "f.device": pa.array(frame["device"]),
        "f.category": pa.array(frame["category"]),
    })
    clicked = rng.random(n) < slates.p
    delay_ms = (click_delays(rng, n, click_delay_s) * 1000).astype(np.int64)
    fb = pa.table({
        "schema": pa.array(["feedback/v1"] * int(clicked.sum())), "prediction_id": pa.array(ids[clicked]),
        "ts": pa.array(ts[clicked] + delay_ms[clicked], type=pa.timestamp("ms", tz="UTC")),
        "type": pa.array(["click"] * int(clicked.sum())),
    })
    store = FeedbackStore(store_root)
    store.write_windows(PREDICTIONS, preds, instance="bootstrap", window_ms=60_000)
    store.write_windows(FEEDBACKS, fb, instance="bootstrap", window_ms=60_000)
    return start_ms, end_ms


def run_training_job(spec: Any, workdir: Path, timeout_s: float = 600.0) -> dict[str, Any]:
    """``python -m retrain.job`` in its own process, as the daemon's local launcher runs it.

    Raises:
        RuntimeError: the job failed; the message has its reason and log tail.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / f"{spec.job_id}.json", workdir / f"{spec.job_id}.result.json"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    log_path = workdir / f"{spec.job_id}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "retrain.job", "--spec", str(spec_path),
                               "--result", str(result_path)], cwd=REPO, stdout=out, stderr=out,
                              timeout=timeout_s, check=False)
    result: dict[str, Any] = json.loads(result_path.read_text()) if result_path.exists() else {}
    if proc.returncode != 0 or result.get("status") != "succeeded":
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        msg = (f"training job {spec.job_id} failed (exit {proc.returncode}): "
               f"{result.get('reason', 'no result file')}\n{tail}")
        raise RuntimeError(msg)
    return result


def load_served_model(tracking_uri: str, uri: str) -> Scorer:
    """``mlflow.pyfunc.load_model(uri)``: what a recommender without driftloop does."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    # MLflow asks every PythonModel class for type hints on predict when the model's code
    # defines it; ours has a logged signature instead (connectors/mlflow_pyfunc.py says
    # why). A filter alone does not do: load_model sets its own ("once"), so the warnings
    # are recorded here and all but that one passed on.
    with warnings.catch_warnings(record=True) as caught:
        model = mlflow.pyfunc.load_model(uri)
    for w in caught:
        if "type hints to the `predict` method" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model  # type: ignore[no-any-return]


def shadow_reference(world: World, policy: SlatePolicy, scorer: Scorer, rng: np.random.Generator, *,
                     requests: int, attribution_s: float, click_delay_s: float, source: str) -> str:
    """The reference profile of ``scorer`` serving the stable world: the JSON of
    `monitor.analysis.Reference`, as the daemon compares live windows against it.

    Labels are what the daemon will see: a click that arrives after the attribution
    window is no click.
    """
    from monitor.stats.labels import LabelSummary
    from monitor.stats.profile import Profile, ProfileSpec
    from monitor.stats.reference import Reference

    s = serve_batch(world, policy, scorer, rng, requests, STABLE)
    clicked = (rng.random(len(s)) < s.p) & (click_delays(rng, len(s), click_delay_s) <= attribution_s)
    feats = world.features(s.users, s.items)
    frame = pd.DataFrame({"score": s.scores, "f.age": feats["age"], "f.device": feats["device"],
                          "f.category": feats["category"]})
    profile = Profile.fit(frame, ProfileSpec(score="score"))
    labels = LabelSummary.from_arrays(s.scores, {"click": clicked.astype(np.float64)}, primary="click")
    return Reference(profile, labels, source=source).to_json()


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    version: str
    run_id: str
    metrics: dict[str, float]
    reference_ctr: float


def bootstrap_champion(world: World, policy: SlatePolicy, *, tracking_uri: str, model: str, workdir: Path,
                       attribution_s: float, click_delay_s: float, rows: int = 40_000,
                       shadow_requests: int = 20_000, params: dict[str, Any] | None = None,
                       seed: int = 0) -> Bootstrap:
    """The first champion: trained by the real job, promoted by hand, given a reference.

    1. Exploration logs of the stable world (random slates: the recommender has no
       model yet) are written to a feedback store under ``workdir``.
    2. ``python -m retrain.job`` trains from scratch on them, logs the run and
       registers a version with the alias ``challenger``, as any daemon job does.
    3. The alias ``champion`` is set on it through `connectors.registry.ModelRegistry`:
       there is no champion to compare with, so this one promotion is the demo's.
    4. Its reference profile is replaced by one of its own serving traffic. The job
       profiles the training data, and that data was logged by random slates, while
       the champion will show the items it scores highest: higher scores, other
       categories, another click rate. The daemon would rightly report that
       difference as drift in the very first window. A team deploying its first
       model does what this step does: profiles a shadow run of the model on live
       requests before it takes traffic. (A fine-tuned version keeps the job's
       reference; docs/demo.md says what that means after a promotion.)
    """
    from connectors.registry import ModelRegistry
    from retrain.spec import JobSpec, Trigger

    rng = np.random.default_rng([world.spec.seed, 11])
    now_ms = int(time.time() * 1000)
    # Ends a minute ago so that every click of the window (seconds late) is inside it.
    window = write_history(workdir / "store", world, policy, rng, rows=rows, end_ms=now_ms - 60_000,
                           span_ms=3_600_000, model=model, click_delay_s=click_delay_s)
    spec = JobSpec(
        job_id=f"{model}-bootstrap-{world.spec.seed}", model=model, base_version=None,
        data_start_ms=window[0], data_end_ms=window[1], store=str((workdir / "store").resolve()),
        tracking_uri=tracking_uri, attribution_ms=int(attribution_s * 1000),
        trigger=Trigger(kind="manual", model=model, reason="bootstrap: the first champion of the demo",
                        at_ms=now_ms, who="monitor.testbed.world"),
        params=dict(params or BOOTSTRAP_PARAMS), seed=seed, budget_s=300.0, min_rows=1000, device="cpu")
    result = run_training_job(spec, workdir / "jobs")
    version = str(result["model_version"])
    registry = ModelRegistry(tracking_uri)
    registry.set_alias(model, CHAMPION, version)
    scorer = load_served_model(tracking_uri, f"models:/{model}/{version}")
    reference = shadow_reference(world, policy, scorer, np.random.default_rng([world.spec.seed, 12]),
                                 requests=shadow_requests, attribution_s=attribution_s,
                                 click_delay_s=click_delay_s,
                                 source=f"shadow:{shadow_requests} stable requests served by v{version}")
    registry.log_reference(model, version, reference)
    from monitor.stats.reference import Reference

    labels = Reference.from_json(reference).labels
    return Bootstrap(version=version, run_id=str(result["run_id"]),
                     metrics={k: float(v) for k, v in dict(result.get("metrics") or {}).items()},
                     reference_ctr=float("nan") if labels is None else labels.rate("click"))


def train_oracle(world: World, policy: SlatePolicy, out: Path, *, rows: int = 100_000,
                 params: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A model trained from scratch by the reference trainer on plenty of drifted-world
    exploration data: the best the same trainer could do with all the data it wanted.

    The benchmark serves it in the shadow of the live traffic (``--oracle``) to say
    how much of the reachable CTR the fine-tuned champion recovers.
    """
    from retrain.ctr_trainer import CTRTrainer

    rng = np.random.default_rng([world.spec.seed, 13])
    s = serve_batch(world, policy, None, rng, rows // policy.shown, DRIFTED)
    frame = world.features(s.users, s.items)
    frame["click"] = (rng.random(len(s)) < s.p).astype(np.int64)
    cut = int(len(frame) * 0.9)
    fit = CTRTrainer().fit(frame[:cut], frame[cut:], label="click", params=dict(params or BOOTSTRAP_PARAMS),
                           seed=seed, device="cpu")
    fit.model.save(out)
    return out


# -- the live recommender ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """How the live recommender runs.

    Args:
        rate: impressions (prediction events) per second.
        stable_seconds: from the first event to the drift; the onset is aligned to
            ``align_seconds`` after the start of the first event's window (the
            daemon's periods start with the version's first window, so an aligned
            onset starts a period of its own).
        max_seconds: the recommender stops by itself after this long.
        alias_poll_seconds: how often the champion alias is read.
        click_delay_s: mean of the exponential part of the click delay.
    """

    rate: float = 500.0
    stable_seconds: float = 40.0
    align_seconds: float = 2.0
    max_seconds: float = 600.0
    alias_poll_seconds: float = 2.0
    click_delay_s: float = 1.2
    tick_seconds: float = 0.1

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.stable_seconds < 0 or self.max_seconds <= 0:
            msg = f"rate and max_seconds must be > 0 and stable_seconds >= 0: {self}"
            raise ValueError(msg)
        if self.align_seconds <= 0 or self.alias_poll_seconds <= 0 or self.tick_seconds <= 0:
            msg = f"align_seconds, alias_poll_seconds and tick_seconds must be > 0: {self}"
            raise ValueError(msg)


class _Stats:
    """Per-second counts of what was served, appended to a JSON-lines file.

    Clicks are counted at their impression's second, as the simulator drew them (the
    truth, including clicks that come too late for the daemon's attribution), and
    ``p`` sums the true click probabilities: the expected CTR without sampling noise.
    """

    def __init__(self, path: Path) -> None:
        self._out = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._second: int | None = None
        self._row: dict[str, Any] = {}
        # Events also come from the alias watcher's thread.
        self._lock = threading.Lock()

    def _write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()

    def event(self, kind: str, **fields: Any) -> None:
        self._write({"event": kind, "ts": int(time.time() * 1000), **fields})

    def add(self, now_ms: int, phase: int, version: str, slates: Slates, clicked: npt.NDArray[np.bool_],
            oracle_p: float | None) -> None:
        second = now_ms // 1000
        if second != self._second or self._row.get("version") != version:
            self.flush()
            self._second = second
            self._row = {"t": second, "phase": PHASES[phase], "version": version, "impressions": 0,
                         "clicks": 0, "p": 0.0, "oracle_p": None if oracle_p is None else 0.0}
        r = self._row
        r["impressions"] += len(slates)
        r["clicks"] += int(clicked.sum())
        r["p"] += float(slates.p.sum())
        if oracle_p is not None:
            r["oracle_p"] = (r["oracle_p"] or 0.0) + oracle_p

    def flush(self) -> None:
        if self._row.get("impressions"):
            self._write(self._row)
        self._row = {}

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._out.close()


class _Champion:
    """The served model, swapped in the background when the alias moves.

    Loading takes seconds; the old model serves until the new one is ready, as a
    recommender rolling out a model does.
    """

    def __init__(self, tracking_uri: str, model: str, poll_s: float,
                 on_switch: Callable[[str], None]) -> None:
        from connectors.registry import ModelRegistry

        self.tracking_uri, self.model, self.poll_s = tracking_uri, model, poll_s
        self._registry = ModelRegistry(tracking_uri)
        self._on_switch = on_switch
        self._lock = threading.Lock()
        self._served: tuple[str, Scorer] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="champion-alias", daemon=True)
        self.last_error: str | None = None

    def load_now(self) -> None:
        """The first load, in the caller's thread (serving cannot start without it)."""
        if not self._refresh():
            msg = f"no {self.model}@{CHAMPION} in {self.tracking_uri}: bootstrap a champion first"
            raise RuntimeError(msg)
        self._thread.start()

    def current(self) -> tuple[str, Scorer]:
        with self._lock:
            assert self._served is not None
            return self._served

    def _refresh(self) -> bool:
        version = self._registry.version_by_alias(self.model, CHAMPION)
        if version is None:
            return False
        if self._served is not None and self._served[0] == version:
            return True
        scorer = load_served_model(self.tracking_uri, f"models:/{self.model}@{CHAMPION}")
        # The alias may have moved again during the load: serve only a version we know.
        if self._registry.version_by_alias(self.model, CHAMPION) != version:
            return self._served is not None
        with self._lock:
            self._served = (version, scorer)
        self._on_switch(version)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._refresh()
                self.last_error = None
            except Exception as exc:  # a registry blip: keep serving the model we have
                self.last_error = repr(exc)
                log.warning("champion alias check failed; serving on", extra={"fields": {"error": repr(exc)}})

    def stop(self) -> None:
        self._stop.set()


class Recommender:
    """Serves live traffic to Kafka until stopped or ``spec.max_seconds`` pass.

    Args:
        world, policy: the truth and the slates.
        kafka: bootstrap servers.
        tracking_uri, model: where the champion is.
        topics: ``(predictions, feedback)``.
        stats: the JSON-lines file of per-second counts and events (start, onset,
            serving VERSION, stop).
        oracle: a model directory (`train_oracle`) scored in the shadow of every
            request: the CTR its slates would have had on the same traffic.
    """

    def __init__(self, world: World, policy: SlatePolicy, spec: ServeSpec, *, kafka: str, tracking_uri: str,
                 model: str, topics: tuple[str, str], stats: Path, oracle: Path | None = None) -> None:
        self.world, self.policy, self.spec = world, policy, spec
        self.kafka, self.tracking_uri, self.model, self.topics = kafka, tracking_uri, model, topics
        self.stats = _Stats(stats)
        self.oracle: Scorer | None = None
        if oracle is not None:
            from retrain.ctr import CTRModel

            self.oracle = CTRModel.load(oracle)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> dict[str, int]:
        import msgspec
        from kafka import KafkaProducer

        enc = msgspec.json.Encoder()
        spec, world = self.spec, self.world
        rng = np.random.default_rng([world.spec.seed, 21])
        champion = _Champion(self.tracking_uri, self.model, spec.alias_poll_seconds,
                             lambda v: self.stats.event("serving", version=v))
        champion.load_now()
        producer = KafkaProducer(bootstrap_servers=self.kafka, linger_ms=20, batch_size=128 * 1024,
                                 acks=1, client_id="driftloop-simulator")
        pred_topic, fb_topic = self.topics
        pending: list[tuple[int, str]] = []  # (due ms, prediction id): clicks on their way
        t0 = time.time()
        t0_ms = int(t0 * 1000)
        align_ms = int(spec.align_seconds * 1000)
        onset_ms = t0_ms - t0_ms % align_ms + int(spec.stable_seconds * 1000)
        self.stats.event("start", onset_ms=onset_ms, rate=spec.rate, seed=world.spec.seed)
        announced = False
        sent = {"predictions": 0, "feedback": 0}
        owed = 0.0
        n = 0
        next_tick = last_tick = t0
        try:
            while not self._stop.is_set() and time.time() - t0 < spec.max_seconds:
                now_ms = int(time.time() * 1000)
                phase = DRIFTED if now_ms >= onset_ms else STABLE
                if phase == DRIFTED and not announced:
                    announced = True
                    self.stats.event("onset", onset_ms=onset_ms)
                # Requests are owed by the clock, not by the tick: a tick that comes late
                # (two busy cores) serves a bigger batch, up to half a second's worth.
                tick_now = time.time()
                owed += spec.rate / self.policy.shown * min(0.5, tick_now - last_tick)
                last_tick = tick_now
                requests, owed = int(owed), owed - int(owed)
                if requests:
                    version, scorer = champion.current()
                    slates = serve_batch(world, self.policy, scorer, rng, requests, phase)
                    clicked = rng.random(len(slates)) < slates.p
                    delays = click_delays(rng, len(slates), spec.click_delay_s)
                    oracle_p = None if self.oracle is None else self._oracle_p(slates, phase)
                    feats = world.features(slates.users, slates.items)
                    ages, devices, cats = (feats["age"].tolist(), feats["device"].tolist(),
                                           feats["category"].tolist())
                    uids, iids = feats["user_id"].tolist(), feats["item_id"].tolist()
                    for j in range(len(slates)):
                        pid = f"s{world.spec.seed}-{n + j}"
                        producer.send(pred_topic, key=uids[j].encode(), value=enc.encode({
                            "schema": "prediction/v1", "prediction_id": pid, "ts": now_ms,
                            "model": self.model, "model_version": version, "user_id": uids[j],
                            "item_id": iids[j], "score": float(slates.scores[j]),
                            "rank": int(slates.ranks[j]),
                            "request_id": f"r{world.spec.seed}-{now_ms}-{int(slates.requests[j])}",
                            "features": {"age": ages[j], "device": devices[j], "category": cats[j]}}))
                        if clicked[j]:
                            heapq.heappush(pending, (now_ms + int(delays[j] * 1000), pid))
                    n += len(slates)
                    sent["predictions"] += len(slates)
                    self.stats.add(now_ms, phase, version, slates, clicked, oracle_p)
                while pending and pending[0][0] <= now_ms:
                    due, pid = heapq.heappop(pending)
                    producer.send(fb_topic, key=pid.encode(), value=enc.encode({
                        "schema": "feedback/v1", "prediction_id": pid, "ts": due, "type": "click"}))
                    sent["feedback"] += 1
                next_tick = max(next_tick + spec.tick_seconds, time.time())
                self._stop.wait(max(0.0, next_tick - time.time()))
        finally:
            champion.stop()
            self.stats.event("stop", sent=sent)
            self.stats.close()
            producer.flush(timeout=30)
            producer.close(timeout=30)
        return sent

    def _oracle_p(self, slates: Slates, phase: int) -> float:
        """Expected clicks had the oracle chosen the slates of these very requests: same
        users, same candidates, and the same requests exploring with the same picks."""
        assert self.oracle is not None
        users, cand = slates.request_users, slates.candidates
        frame = self.world.features(np.repeat(users, cand.shape[1]), cand.ravel())
        scores = np.asarray(self.oracle.predict(frame), dtype=np.float64).reshape(cand.shape)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :self.policy.shown]
        order[slates.explored] = slates.pick[slates.explored]
        items = np.take_along_axis(cand, order, axis=1).ravel()
        return float(self.world.p_click(np.repeat(users, self.policy.shown), items, phase).sum())


# -- command line -----------------------------------------------------------------------


def _world_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seed", type=int, default=1, help="the world, the traffic and the clicks")
    ap.add_argument("--tracking-uri", required=True, help="the MLflow tracking server")
    ap.add_argument("--model", default="ctr", help="the registered model name")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitor.testbed.world", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("bootstrap", help="train, register and promote the first champion")
    _world_args(boot)
    boot.add_argument("--workdir", type=Path, required=True)
    boot.add_argument("--attribution-seconds", type=float, default=6.0)
    serve = sub.add_parser("serve", help="serve live traffic to Kafka")
    _world_args(serve)
    serve.add_argument("--kafka", required=True, help="bootstrap servers")
    serve.add_argument("--predictions-topic", default="predictions")
    serve.add_argument("--feedback-topic", default="feedback")
    serve.add_argument("--rate", type=float, default=ServeSpec.rate, help="impressions per second")
    serve.add_argument("--stable-seconds", type=float, default=ServeSpec.stable_seconds)
    serve.add_argument("--align-seconds", type=float, default=ServeSpec.align_seconds)
    serve.add_argument("--max-seconds", type=float, default=ServeSpec.max_seconds)
    serve.add_argument("--alias-poll-seconds", type=float, default=ServeSpec.alias_poll_seconds)
    serve.add_argument("--stats", type=Path, required=True, help="JSON-lines file of per-second counts")
    serve.add_argument("--oracle", type=Path, help="a model directory to score in the shadow")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="simulate: %(message)s")
    world, policy = World(WorldSpec(seed=args.seed)), SlatePolicy()
    if args.command == "bootstrap":
        b = bootstrap_champion(world, policy, tracking_uri=args.tracking_uri, model=args.model,
                               workdir=args.workdir, attribution_s=args.attribution_seconds,
                               click_delay_s=ServeSpec.click_delay_s, seed=args.seed)
        print(json.dumps(dataclasses.asdict(b)))
        return 0
    rec = Recommender(world, policy, ServeSpec(
        rate=args.rate, stable_seconds=args.stable_seconds, align_seconds=args.align_seconds,
        max_seconds=args.max_seconds, alias_poll_seconds=args.alias_poll_seconds),
        kafka=args.kafka, tracking_uri=args.tracking_uri, model=args.model,
        topics=(args.predictions_topic, args.feedback_topic), stats=args.stats, oracle=args.oracle)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: rec.stop())
    sent = rec.run()
    print(json.dumps(sent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
