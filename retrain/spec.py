"""A training job, as data: what a launcher runs and what the run records.

A :class:`JobSpec` is everything a training run needs to be reproduced: the model and
the version it warm-starts from, the data window, the hyperparameters (or the search
over them), the seed, the time budget and why it was started. The daemon writes it to
a JSON file; the launcher (retrain/launch.py) hands the file to the entry point
(``python -m retrain.job --spec FILE``), wherever that runs: a local process, torchrun,
a Kubernetes pod. Nothing else is passed, so a run can be repeated from its spec alone
(it is logged to MLflow with the run).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["TRIGGER_KINDS", "JobSpec", "Trigger"]

#: Why a job was started: an incident, the cron schedule, a person.
TRIGGER_KINDS = ("incident", "schedule", "manual")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class Trigger:
    """What asked for a training run.

    Args:
        kind: one of :data:`TRIGGER_KINDS`.
        model: the registered model name.
        reason: one line for people (the incident's summary, the cron expression, the
            operator's words).
        at_ms: when the trigger happened (epoch ms).
        incident_id: the incident, for ``kind="incident"``.
        incident_kind: its kind (``performance_drop``, ``feature_drift``, ...).
        who: the person, for ``kind="manual"``.
    """

    kind: str
    model: str
    reason: str
    at_ms: int
    incident_id: str | None = None
    incident_kind: str | None = None
    who: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TRIGGER_KINDS:
            msg = f"trigger kind must be one of {TRIGGER_KINDS}, got {self.kind!r}"
            raise ValueError(msg)
        if not self.model:
            msg = "trigger model must be a non-empty model name"
            raise ValueError(msg)
        if self.kind == "incident" and not self.incident_id:
            msg = "an incident trigger needs incident_id"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trigger:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One training run (docs/retraining.md).

    Args:
        job_id: unique, also the run name in MLflow and the Kubernetes Job's name suffix.
        model: the registered model to produce a new version of.
        base_version: the version to warm-start from (the champion when the job was
            made); None trains from scratch.
        data_start_ms, data_end_ms: the prediction window ``[start, end)`` read from the
            feedback store; every prediction in it has matured labels.
        store: the feedback store's root (a local path; an fsspec URL in production).
        tracking_uri: the MLflow tracking server.
        label: the label type the model predicts (``click``).
        label_types: every label type the store's feedback may carry.
        attribution_ms: the join's attribution window (the monitor's, so labels agree).
        params: hyperparameters for the trainer; with ``search_trials > 1`` the
            centre of the search.
        search_trials: hyperparameter trials when the budget allows (1: no search).
        seed: every random choice of the run derives from it.
        budget_s: wall-clock budget of the whole run; the launcher's timeout is a
            little longer.
        trigger: why the run was started.
        trainer: ``module:Class`` of the trainer (docs/trainer.md).
        min_rows: fewer clean labelled rows than this fail the run (nothing registered).
        holdout_fraction, validation_fraction: the newest slices by event time.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    """

    job_id: str
    model: str
    base_version: str | None
    data_start_ms: int
    data_end_ms: int
    store: str
    tracking_uri: str
    trigger: Trigger
    label: str = "click"
    label_types: tuple[str, ...] = ("click",)
    attribution_ms: int = 30 * 60_000
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    search_trials: int = 1
    seed: int = 0
    budget_s: float = 1800.0
    trainer: str = "retrain.ctr_trainer:CTRTrainer"
    min_rows: int = 1000
    holdout_fraction: float = 0.2
    validation_fraction: float = 0.1
    device: str = "auto"

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.job_id):
            msg = f"job_id {self.job_id!r} must match {_ID_RE.pattern}"
            raise ValueError(msg)
        if self.data_end_ms <= self.data_start_ms:
            msg = (f"data window is empty: data_end_ms {self.data_end_ms} <= data_start_ms "
                   f"{self.data_start_ms}")
            raise ValueError(msg)
        if self.label not in self.label_types:
            msg = f"label {self.label!r} is not one of label_types {self.label_types}"
            raise ValueError(msg)
        if self.attribution_ms <= 0:
            msg = f"attribution_ms must be > 0, got {self.attribution_ms}"
            raise ValueError(msg)
        if self.search_trials < 1:
            msg = f"search_trials must be >= 1, got {self.search_trials}"
            raise ValueError(msg)
        if self.budget_s <= 0:
            msg = f"budget_s must be > 0, got {self.budget_s}"
            raise ValueError(msg)
        if self.min_rows < 1:
            msg = f"min_rows must be >= 1, got {self.min_rows}"
            raise ValueError(msg)
        for name in ("holdout_fraction", "validation_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 0.5:
                msg = f"{name} must be in (0, 0.5), got {v}"
                raise ValueError(msg)
        if self.device not in ("auto", "cpu", "cuda"):
            msg = f"device must be auto, cpu or cuda, got {self.device!r}"
            raise ValueError(msg)
        if ":" not in self.trainer:
            msg = f"trainer must be 'module:Class', got {self.trainer!r}"
            raise ValueError(msg)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["label_types"] = list(self.label_types)
        d["params"] = dict(self.params)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Parse a spec; an unknown or missing key is a ValueError naming it."""
        d = json.loads(text)
        if not isinstance(d, dict):
            msg = "a job spec is a JSON object"
            raise ValueError(msg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            msg = f"job spec: unknown keys {unknown}"
            raise ValueError(msg)
        try:
            d["trigger"] = Trigger.from_dict(d["trigger"])
            d["label_types"] = tuple(d.get("label_types", ("click",)))
            return cls(**d)
        except KeyError as exc:
            msg = f"job spec: missing key {exc.args[0]!r}"
            raise ValueError(msg) from None
        except TypeError as exc:
            msg = f"job spec: {exc}"
            raise ValueError(msg) from None
