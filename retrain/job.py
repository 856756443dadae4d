"""The training job's entry point: ``python -m retrain.job --spec SPEC --result RESULT``.

A composition root (STYLE.md section 2): it wires the feedback store, the pure data
and training cores, the MLflow edge and the monitor's profile code (for the new
reference), and is the one module of retrain/ that may import monitor/.

What a run does, in order (docs/retraining.md, "The training job"):

1. open an MLflow run in the experiment ``driftloop/<model>`` named after the job,
   and log the spec, the trigger and every parameter;
2. read the data window from the feedback store, label it with the attribution
   window, clean it (every removal counted and logged) and split it by time;
3. download the base version (the champion) and warm-start from its weights;
4. train (a small hyperparameter search when ``search_trials > 1``), logging every
   epoch's metrics, and the trainer's recalibration (``recalibration.*``);
5. score the challenger and the champion on the same holdout, and compare them
   (``retrain.evaluate.compare``: DeLong's paired AUC test, a paired log-loss
   bootstrap, NDCG@k, calibration, size and scoring latency) into the evaluation
   report that the promotion gate (retrain/promote.py) decides on, logged as
   ``evaluation/report.json`` and ``eval.*`` metrics. The job never promotes;
6. log the model (python_function, models from code, weights as data), the new
   reference profile and the data window; register a new version, tag it, and point
   the alias ``challenger`` at it.

Failure is a result, not a crash: an empty or too small window, one class only, a
loss that goes NaN, a budget spent before any epoch finished, the registry refusing
a write. The run is marked FAILED with the reason, nothing is registered (a version
registered before a later step failed is deleted again), the result file says why
and the process exits 1, so the daemon's tracker turns it into an incident.

Under torchrun only rank 0 trains, logs and registers; the other ranks exit at once
(the reference model trains in minutes on one device; data-parallel training is for
trainers that need it, docs/trainer.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from connectors.logs import setup_logging
from connectors.registry import REFERENCE_PATH, REFERENCE_TAG, ModelRegistry, RegistryError
from connectors.store import FEEDBACKS, PREDICTIONS, FeedbackStore
from monitor.stats.labels import LabelSummary
from monitor.stats.profile import Profile, ProfileSpec
from monitor.stats.reference import Reference
from retrain.dataset import (
    CONTRACT_COLUMNS,
    DatasetError,
    clean,
    label_predictions,
    split_by_time,
    training_frame,
)
from retrain.evaluate import (
    REPORT_PATH,
    EvaluationReport,
    HoldoutWindow,
    ModelScores,
    compare,
    holdout_metrics,
    latencies_ms_per_1000,
    model_size_bytes,
)
from retrain.spec import JobSpec
from retrain.trainer import TrainingError

__all__ = ["ALIAS", "JobResult", "main", "run_job"]

log = logging.getLogger("driftloop.retrain.job")

#: The alias a freshly trained version gets; promotion (issue #6) moves ``champion``.
ALIAS = "challenger"
#: Share of the budget training may use; the rest is for scoring, logging, registering.
_TRAIN_SHARE = 0.8
#: Version tags every registered version carries (docs/mlflow.md).
TAG_JOB = "driftloop.job_id"
TAG_TRIGGER = "driftloop.trigger"
TAG_BASE = "driftloop.base_version"
TAG_WINDOW = "driftloop.data_window"
#: Run tag set when the holdout could not be evaluated (the gate then has no evidence).
TAG_EVALUATION_ERROR = "driftloop.evaluation_error"
#: NDCG's cut-off: the slate sizes recommenders serve are about this long.
_NDCG_K = 10
#: Timed scoring calls per model for the latency guardrail (after one warm-up call),
#: the models in turns.
_LATENCY_REPEATS = 9
_RETRAIN_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What the job reports to the daemon (the result file)."""

    status: str  # "succeeded" | "failed"
    job_id: str
    reason: str | None = None
    code: str | None = None
    model_version: str | None = None
    run_id: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items()}, allow_nan=False,
                          default=str)


class JobFailed(RuntimeError):
    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def _trainer(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError) as exc:
        msg = f"trainer {path!r} cannot be loaded: {exc}"
        raise JobFailed(msg, code="trainer") from None


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        msg = "the job asks for device cuda and this machine has no CUDA device"
        raise JobFailed(msg, code="device")
    return requested


def _finite(d: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if v is not None and math.isfinite(float(v))}


def _assemble(spec: JobSpec) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """Read, label and clean the window; returns the frame, its features, and what was done."""
    # A URL stays a string: Path() would collapse s3://bucket into s3:/bucket.
    store = FeedbackStore(spec.store)
    preds = store.read_window(PREDICTIONS, spec.data_start_ms, spec.data_end_ms)
    fb = store.read_window(FEEDBACKS, spec.data_start_ms,
                           spec.data_end_ms + spec.attribution_ms, columns=["prediction_id", "type", "ts"])
    if preds.num_rows and "model" in preds.column_names:
        import pyarrow.compute as pc

        preds = preds.filter(pc.equal(preds.column("model"), spec.model))
    labelled = label_predictions(preds, fb, label_types=spec.label_types, attribution_ms=spec.attribution_ms)
    frame = training_frame(labelled)
    features = [c for c in frame.columns if c not in CONTRACT_COLUMNS and c not in spec.label_types]
    if frame.empty:
        frame = frame.assign(ts=pd.Series(dtype="int64"))
    cleaned, report = clean(frame, label=spec.label, features=features)
    info = {"predictions_read": int(preds.num_rows), "feedback_read": int(fb.num_rows),
            "cleaning": report.to_dict(),
            "features": [f for f in features if f not in report.dropped_features]}
    return cleaned, info["features"], info


def _reference(frame: pd.DataFrame, features: Sequence[str], scores: np.ndarray,
               holdout_scores: np.ndarray, holdout: pd.DataFrame, spec: JobSpec, source: str) -> str:
    """The new version's reference: its training data and its scores, in the daemon's
    column names (``f.<feature>``, ``score``), plus its holdout label summary."""
    cols = {f"f.{f}": frame[f].to_numpy() for f in features}
    cols["score"] = scores
    profile = Profile.fit(pd.DataFrame(cols), ProfileSpec(score="score"))
    labels = LabelSummary.from_arrays(
        holdout_scores, {t: holdout[t].to_numpy() for t in spec.label_types}, spec.label)
    return Reference(profile, labels, source).to_json()


def run_job(spec: JobSpec, *, registry: ModelRegistry | None = None) -> JobResult:
    """Run one job to its result (never raises for a failure of the run itself)."""
    t0 = time.monotonic()
    registry = registry or ModelRegistry(spec.tracking_uri, timeout_s=30, max_retries=3)
    trigger = spec.trigger
    try:
        run = registry.start_run(f"driftloop/{spec.model}", spec.job_id, tags={
            "driftloop.job_id": spec.job_id, "driftloop.trigger": trigger.kind,
            "driftloop.trigger_reason": trigger.reason,
            **({"driftloop.incident_id": trigger.incident_id} if trigger.incident_id else {}),
            **({"driftloop.base_version": spec.base_version} if spec.base_version else {})})
    except RegistryError as exc:
        return JobResult("failed", spec.job_id, reason=str(exc), code="registry")
    version: str | None = None
    try:
        with tempfile.TemporaryDirectory(prefix=f"driftloop-{spec.job_id}-") as tmp:
            version, metrics = _train_and_register(spec, registry, run, Path(tmp), t0)
        run.finish("FINISHED")
        log.info("training job succeeded", extra={"fields": {
            "job": spec.job_id, "model": spec.model, "version": version, **metrics}})
        return JobResult("succeeded", spec.job_id, model_version=version, run_id=run.run_id,
                         metrics=metrics)
    except (DatasetError, TrainingError, JobFailed, RegistryError) as exc:
        code = getattr(exc, "reason", None) or getattr(exc, "code", None) or "error"
        if isinstance(exc, RegistryError):
            code = "registry"
        reason = str(exc)
    except Exception as exc:  # a bug: still a clean failure with the traceback in the run
        code, reason = "error", f"{type(exc).__name__}: {exc}"
        log.exception("training job crashed", extra={"fields": {"job": spec.job_id}})
        with contextlib.suppress(RegistryError):
            run.log_text(traceback.format_exc(), "job/traceback.txt")
    if version is not None:
        try:
            registry.delete_version(spec.model, version)
        except RegistryError as exc:
            reason += f"; and version {version} could not be deleted again: {exc}"
    try:
        run.set_tags({"driftloop.status": "failed", "driftloop.failure": code,
                      "driftloop.failure_reason": reason})
        run.finish("FAILED")
    except RegistryError as exc:
        reason += f"; and the run could not be marked failed: {exc}"
    log.error("training job failed", extra={"fields": {"job": spec.job_id, "code": code,
                                                       "reason": reason}})
    return JobResult("failed", spec.job_id, reason=reason, code=str(code), run_id=run.run_id)


def _train_and_register(spec: JobSpec, registry: ModelRegistry, run: Any, tmp: Path,
                        t0: float) -> tuple[str, dict[str, float]]:
    from retrain.search import search

    run.log_params({
        "job_id": spec.job_id, "model": spec.model, "base_version": spec.base_version or "",
        "data_start_ms": spec.data_start_ms, "data_end_ms": spec.data_end_ms,
        "label": spec.label, "attribution_ms": spec.attribution_ms, "seed": spec.seed,
        "search_trials": spec.search_trials, "budget_s": spec.budget_s, "trainer": spec.trainer,
        "trigger": spec.trigger.kind, **{f"param.{k}": v for k, v in spec.params.items()}})
    run.log_text(spec.to_json(), "job/spec.json")

    frame, features, info = _assemble(spec)
    split = split_by_time(frame, label=spec.label, holdout_fraction=spec.holdout_fraction,
                          validation_fraction=spec.validation_fraction, min_rows=spec.min_rows)
    window = {"start_ms": spec.data_start_ms, "end_ms": spec.data_end_ms, "store": spec.store,
              "validation_start_ms": split.validation_start_ms,
              "holdout_start_ms": split.holdout_start_ms, "sizes": split.sizes(), **info}
    run.log_text(json.dumps(window, indent=2), "data/window.json")
    cleaning = info["cleaning"]
    run.log_params({f"data.{k}": v for k, v in split.sizes().items()}
                   | {f"clean.{k}": v for k, v in cleaning.items()})
    log.info("training data assembled", extra={"fields": {
        "job": spec.job_id, **split.sizes(), "cleaning": cleaning}})

    device = _device(spec.device)
    trainer = _trainer(spec.trainer)
    warm: Path | None = None
    if spec.base_version:
        warm = registry.download_model(spec.model, spec.base_version, tmp / "champion")
    deadline = time.time() + spec.budget_s * _TRAIN_SHARE - (time.monotonic() - t0)
    epochs_logged = [0]

    def on_epoch(m: Any) -> None:
        epochs_logged[0] += 1
        run.log_metrics(_finite({"train_loss": m.train_loss, "val_loss": m.val_loss,
                                 "val_auc": m.val_auc, "lr": m.lr, "samples_per_s": m.samples_per_s}),
                        step=epochs_logged[0])

    best, trials = search(trainer, split.train, split.validation, label=spec.label,
                          base_params=dict(spec.params), trials=spec.search_trials, seed=spec.seed,
                          deadline=deadline, warm_start=warm, device=device, on_epoch=on_epoch)
    run.log_text(json.dumps(trials, indent=2, default=str), "training/trials.json")
    model = best.model
    y = split.holdout[spec.label].to_numpy()
    holdout_scores = model.predict(split.holdout)
    challenger = holdout_metrics(y, holdout_scores)
    metrics = {f"holdout_{k}": v for k, v in challenger.items()}
    metrics.update({"best_epoch": float(best.best_epoch), "best_val_loss": float(best.best_val_loss),
                    "trials": float(len(trials))})
    # What recalibration did on its slice (observed / expected before and after, the
    # fitted scale and bias): the holdout's calibration above is the calibrated one.
    metrics.update({f"recalibration.{k}": float(v) for k, v in (best.calibration or {}).items()})
    champion: tuple[Any, np.ndarray, Path] | None = None
    if warm is not None:
        base = trainer.load(warm)
        champion = (base, base.predict(split.holdout), warm)
        metrics.update({f"champion_holdout_{k}": v for k, v in holdout_metrics(y, champion[1]).items()})
    model_dir = tmp / "model"
    model.save(model_dir)  # before the evaluation: its size is a guardrail
    report = _evaluate(spec, split.holdout, y, (model, holdout_scores, model_dir), champion)
    if isinstance(report, EvaluationReport):
        run.log_text(report.to_json(), REPORT_PATH)
        metrics.update(report.metrics())
    else:
        run.set_tags({TAG_EVALUATION_ERROR: report})
    run.log_metrics(_finite(metrics))
    run.log_params({f"best.{k}": v for k, v in dict(best.params).items()} | {"device": device})

    fitted = pd.concat([split.train, split.validation], ignore_index=True)
    reference = _reference(fitted, features, model.predict(fitted), holdout_scores,
                           split.holdout, spec, source=f"training:{spec.job_id}")
    example = split.holdout[[c for c in ["user_id", "item_id", *features] if c in split.holdout]].head(5)
    model_uri, model_id = run.log_model(model_dir, input_example=example, code_dirs=[_RETRAIN_DIR],
                              pip_requirements=_requirements())
    run.log_text(reference, REFERENCE_PATH)

    version = registry.register_version(spec.model, model_uri, run_id=run.run_id, model_id=model_id, tags={
        TAG_JOB: spec.job_id, TAG_TRIGGER: json.dumps(spec.trigger.to_dict()),
        TAG_BASE: spec.base_version or "", TAG_WINDOW: f"{spec.data_start_ms}-{spec.data_end_ms}",
        REFERENCE_TAG: REFERENCE_PATH,
        **{f"driftloop.{k}": f"{v:.6g}" for k, v in _finite(metrics).items()
           if k.startswith(("holdout", "champion"))}},
        description=f"driftloop job {spec.job_id} ({spec.trigger.kind}: {spec.trigger.reason})")
    try:
        registry.set_alias(spec.model, ALIAS, version)
    except RegistryError:
        registry.delete_version(spec.model, version)
        raise
    return version, _finite(metrics)


def _dir_size(path: Path) -> int:
    return model_size_bytes([f.stat().st_size for f in path.rglob("*") if f.is_file()])


def _evaluate(spec: JobSpec, holdout: pd.DataFrame, y: np.ndarray, challenger: tuple[Any, np.ndarray, Path],
              champion: tuple[Any, np.ndarray, Path] | None) -> EvaluationReport | str:
    """The challenger against the champion (the base version) on the holdout.

    Both models' latency is measured here, in one process on one machine, in turns:
    the ratio the gate checks is then about the models, not the hardware or a burst
    of other work on it. A holdout the statistics cannot use (fewer than two
    positives, say) is not a failed job: the version is still registered, without a
    report (the reason is returned, and becomes a run tag), so the gate keeps the
    champion and a person may still promote it.
    """
    entries = [challenger] if champion is None else [challenger, champion]

    def scores(i: int, version: str | None, latencies: list[float]) -> ModelScores:
        _, p, directory = entries[i]
        return ModelScores(p, version=version, size_bytes=_dir_size(directory),
                           latency_ms_per_1000=latencies[i])

    groups = None
    if "request_id" in holdout.columns and holdout["request_id"].notna().any():
        groups = holdout["request_id"].to_numpy(dtype=object)
    ts = holdout["ts"].to_numpy()
    window = HoldoutWindow(int(ts.min()), int(ts.max()))
    try:
        ms = latencies_ms_per_1000([e[0].predict for e in entries], holdout, _LATENCY_REPEATS)
        return compare(y, scores(0, None, ms),
                       None if champion is None else scores(1, spec.base_version, ms),
                       model=spec.model, window=window, groups=groups, k=_NDCG_K, seed=spec.seed)
    except ValueError as exc:
        log.warning("the holdout could not be evaluated", extra={"fields": {"job": spec.job_id,
                                                                           "reason": str(exc)}})
        return f"the holdout could not be evaluated: {exc}"


def _requirements() -> list[str]:
    """The scoring environment of a registered model: what the loader imports."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "pandas", "mlflow")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain.job", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="the job spec (JSON)")
    parser.add_argument("--result", required=True, type=Path, help="where to write the result (JSON)")
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("DRIFTLOOP_LOG_LEVEL", "INFO"))
    if int(os.environ.get("RANK", "0")) != 0:
        log.info("not rank 0: this rank has nothing to do", extra={"fields": {"rank": os.environ["RANK"]}})
        return 0
    try:
        spec = JobSpec.from_json(args.spec.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        result = JobResult("failed", args.spec.stem, reason=f"bad job spec {args.spec}: {exc}", code="spec")
    else:
        result = run_job(spec)
    tmp = args.result.with_name(args.result.name + ".tmp")
    if str(args.result) == "/dev/termination-log":  # a Kubernetes pod reports through it
        args.result.write_text(result.to_json(), encoding="utf-8")
    else:
        tmp.write_text(result.to_json(), encoding="utf-8")
        os.replace(tmp, args.result)
    return 0 if result.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
