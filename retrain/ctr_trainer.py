"""The reference trainer: fits and fine-tunes :class:`~retrain.ctr.CTRModel`.

Decisions (docs/trainer.md has the user-facing version):

* **Warm start keeps the champion's preprocessor and architecture.** Its weights
  only mean something under the same hashing and normalisation; refitting the
  numeric statistics on fresh data would shift every input under the trained
  weights. Only dropout (a training-time setting) comes from the params.
* **The whole split is transformed once** into tensors on the training device;
  batches are rows picked by a permutation (no DataLoader, no workers), so the
  per-step Python work is a slice, a gather, forward, backward and a step.
* **Fused AdamW** (one kernel over all parameters, CPU and CUDA): the dense update of
  the embedding tables (2**16 rows per field) dominates a step, and on two CPU cores
  the fused kernel took it from 42 ms to 5 ms per step (5 fields, the default sizes).
* **Schedule:** AdamW, linear warmup over ``warmup_fraction`` of all steps, then
  cosine decay to 0 at ``max_epochs`` (per step, ``LambdaLR``). Biases are not
  weight-decayed (decaying an offset only biases the logit).
* **Selection:** early stopping on validation log loss (the quantity the model is
  trained to minimise, and smoother than AUC); the best epoch's weights are kept
  and restored, so the result is never the last, overfitted epoch.
* **A fine-tune is recalibrated** on rows it was not trained on. A fine-tune takes
  large steps on a small fresh window and stops after an epoch or two, while the
  learning rate is still high: its output offset is wherever the last steps left it,
  and large steps magnify the few rows by which one run's window differs from the
  next. The demo's fine-tune (4,000 rows, lr 0.02, batch 128, best epoch 1) came out
  at 1.14 observed / expected positives on its holdout in one run and at 1.35 in
  another, outside the promotion gate's band [0.8, 1.25]: the gate kept the champion
  for it. So the newest ``calibration_fraction`` of the training rows
  (:data:`~retrain.trainer.FINE_TUNE_CALIBRATION_FRACTION` on a warm start; cut at
  an event time) is held out of the gradient steps, and once the best epoch is
  restored a temperature and a bias on the logit are fitted there by Newton's method
  (Platt scaling, :class:`~retrain.ctr.Calibration`). The calibration is part of the
  model, so serving, the job's holdout and the gate all see calibrated scores; its
  scale is positive, so the ranking is the net's. Not the validation rows: early
  stopping chose the epoch on them. Not from scratch by default: such a fit starts
  its output at the base rate's logit and converges at a small learning rate (the
  demo's first champion: 1.03 on its holdout), and a slice would only cost it rows.
  Why 15%: the slice's click rate is what the calibration matches, so its noise is
  the calibration's; on a production window (tens of thousands of rows) 15% knows
  the rate to a few percent and leaves the fit 85% of its rows. On the demo's
  4,000-row window the slice has ~50 clicks (about ±14%), and the fine-tune trained
  on the rest ranked 0.02 AUC worse on its holdout (0.63 against 0.65, mean of 40
  draws of the window). The slice's figures before and after are
  ``FitResult.calibration`` (the job logs them as ``recalibration.*`` metrics).
* **Determinism on CPU:** ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``
  (the caller's random state is untouched), a numpy ``Generator`` seeded with
  ``(seed, epoch)`` per epoch for the shuffle, and ``torch.use_deterministic_algorithms``
  switched on for the fit only. Same data, params and seed give bit-identical
  weights. On CUDA the run is seeded but not bit-reproducible (embedding backward
  accumulates with atomics); it runs the forward pass under bf16 autocast.
* **Non-finite losses stop the run** with the epoch and step named. The per-step
  losses stay on the device and are checked every step on CPU and every 32 steps on
  CUDA (a check is a device sync), so the step named is exact either way.
* **Resumable:** :meth:`CTRTrainer.state_dict` captures the progress at the end of
  the last finished epoch (weights, best weights, optimizer, scheduler, random
  state); after :meth:`CTRTrainer.load_state_dict`, the next ``fit`` with the same
  data, params and seed continues from there and ends with the same weights as an
  uninterrupted run (on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F
from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_numeric_dtype, is_timedelta64_dtype
from scipy.special import expit

from retrain.ctr import Architecture, Calibration, CTRModel, CTRNet, FeatureSpec, Preprocessor
from retrain.dataset import CONTRACT_COLUMNS
from retrain.trainer import EpochMetrics, FitResult, TrainingError, TrainParams, roc_auc

__all__ = ["CTRTrainer", "infer_features", "resolve_device"]

_STATE_VERSION = 1
_EVAL_BATCH = 65_536
# A finiteness check reads the loss back to the host, which stalls a GPU's queue.
_CUDA_CHECK_EVERY = 32


def infer_features(df: pd.DataFrame, label: str, exclude: tuple[str, ...] = ()) -> FeatureSpec:
    """Every column that is not a contract column, the label or excluded is a feature:
    numeric (numbers and booleans) or categorical (the rest). Datetime and timedelta
    columns are skipped: as categories every value would be new, and as numbers they
    would encode the training period, not the user."""
    skip = {*CONTRACT_COLUMNS, label, *exclude}
    numeric: list[str] = []
    categorical: list[str] = []
    for name in df.columns:
        if not isinstance(name, str) or name in skip:
            continue
        dtype = df[name].dtype
        if is_datetime64_any_dtype(dtype) or is_timedelta64_dtype(dtype):
            continue
        (numeric if is_numeric_dtype(dtype) or is_bool_dtype(dtype) else categorical).append(name)
    return FeatureSpec(categorical=tuple(categorical), numeric=tuple(numeric))


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else CPU; asking for CUDA without one fails."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        msg = f"device must be auto, cpu, cuda or cuda:N, got {device!r}"
        raise ValueError(msg) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} requested but torch.cuda.is_available() is False"
        raise ValueError(msg)
    if dev.type not in ("cpu", "cuda"):
        msg = f"device must be auto, cpu, cuda or cuda:N, got {device!r}"
        raise ValueError(msg)
    return dev


def _labels(df: pd.DataFrame, label: str, what: str) -> npt.NDArray[np.float32]:
    if len(df) == 0:
        msg = f"the {what} set is empty"
        raise TrainingError(msg, reason="empty")
    if label not in df.columns:
        msg = f"the {what} set has no label column {label!r}"
        raise TrainingError(msg, reason="missing_label")
    y = pd.to_numeric(df[label], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        value = df[label].iloc[first]
        value = value.item() if isinstance(value, np.generic) else value
        msg = (f"the {what} label {label!r} has {int(bad.sum())} values other than 0/1 "
               f"(first at row {first}: {value!r})")
        raise TrainingError(msg, reason="bad_labels")
    return y.astype(np.float32)


def _calibration_rows(df: pd.DataFrame, fraction: float) -> npt.NDArray[np.bool_]:
    """Which rows are the newest ``fraction`` by event time (``ts``; frame order when
    there is none), cut at an event time so that rows of one instant stay together.
    None at all when the cut would take every row."""
    n = len(df)
    k = int(n * fraction)
    mask = np.zeros(n, dtype=bool)
    if k == 0:
        return mask
    if "ts" in df.columns:
        ts = df["ts"].to_numpy()
        mask = np.asarray(ts >= np.sort(ts)[n - k], dtype=bool)
    else:
        mask[n - k:] = True
    return np.zeros(n, dtype=bool) if mask.all() else mask


def _observed_over_expected(y: npt.NDArray[np.float32], p: npt.NDArray[np.float64]) -> float:
    expected = float(p.sum())
    return float(y.sum()) / expected if expected > 0 else math.nan


def _recalibrate(model: CTRModel, rows: pd.DataFrame,
                 y: npt.NDArray[np.float32]) -> tuple[CTRModel, dict[str, float]]:
    """``model`` with a calibration fitted on ``rows``, and what it changed there."""
    z = model.logits(rows)
    calibration = Calibration.fit(z, y)
    report = {"rows": float(len(y)), "positives": float(y.sum()), "scale": calibration.scale,
              "bias": calibration.bias, "before": _observed_over_expected(y, expit(z)),
              "after": _observed_over_expected(y, expit(calibration.apply(z)))}
    return CTRModel(model.preprocessor, model.net, model.architecture, calibration), report


def _lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            # (step + 1): the very first step already moves, at lr / warmup.
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclasses.dataclass
class _Progress:
    """What the end of an epoch leaves behind, for early stopping and for resuming."""

    epoch: int = 0
    best_epoch: int = 0
    best_val_loss: float = math.inf
    bad_epochs: int = 0
    history: list[EpochMetrics] = dataclasses.field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None
    torch_rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None
    finished: bool = False
    stop_reason: str | None = None


@dataclasses.dataclass
class _Run:
    """The live objects of a fit, kept so :meth:`CTRTrainer.state_dict` can read them."""

    fingerprint: dict[str, Any]
    net: CTRNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: _Progress
    weights: dict[str, torch.Tensor] | None = None  # at the end of the last finished epoch
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None


class CTRTrainer:
    """Trains :class:`~retrain.ctr.CTRModel`; implements :class:`~retrain.trainer.Trainer`.

    Features are ``params["features"]`` when given, else every column of ``train``
    that is not a contract column (:data:`CONTRACT_COLUMNS`), the label, or in
    ``params["exclude"]`` (:func:`infer_features`).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> df = pd.DataFrame({"user_id": rng.integers(0, 50, 400), "item_id": rng.integers(0, 20, 400),
        ...                    "price": rng.normal(size=400), "click": rng.integers(0, 2, 400)})
        >>> result = CTRTrainer().fit(df[:300], df[300:], label="click", seed=0, device="cpu",
        ...                           params={"max_epochs": 2, "buckets": 256, "hidden": [8]})
        >>> result.best_epoch in (1, 2), result.model.predict(df[300:]).shape
        (True, (100,))
    """

    def __init__(self) -> None:
        self._run: _Run | None = None
        self._resume: dict[str, Any] | None = None

    def load(self, directory: Path) -> CTRModel:
        return CTRModel.load(directory)

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, *, label: str, params: Mapping[str, Any],
            seed: int, device: str = "auto", warm_start: Path | None = None,
            on_epoch: Callable[[EpochMetrics], None] | None = None,
            deadline: float | None = None) -> FitResult:
        """See :meth:`retrain.trainer.Trainer.fit`.

        Raises:
            TrainingError: empty or single-class training data, labels other than
                0/1, a non-finite loss, or the deadline before the first epoch ended.
            ValueError: bad params or device.
        """
        p = TrainParams.from_mapping(params)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            msg = f"seed must be an int >= 0, got {seed!r}"
            raise ValueError(msg)
        y_all = _labels(train, label, "training")
        y_val = _labels(val, label, "validation")
        p = dataclasses.replace(p, calibration_fraction=p.resolved_calibration_fraction(
            warm_start=warm_start is not None))
        held = _calibration_rows(train, float(p.calibration_fraction or 0.0))
        calib: tuple[pd.DataFrame, npt.NDArray[np.float32]] | None = None
        if held.any() and y_all[held].min() != y_all[held].max():
            # A slice of one class cannot say how far off the scores are: then its rows
            # train like the others and nothing is recalibrated.
            calib = (train[held], y_all[held])
            train, y_train = train[~held], y_all[~held]
        else:
            y_train = y_all
        if y_train.min() == y_train.max():
            msg = f"the training labels {label!r} are all {int(y_train[0])} ({len(y_train)} rows)"
            raise TrainingError(msg, reason="single_class")
        dev = resolve_device(device)
        resume, self._resume = self._resume, None
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        rng_devices = ([dev.index if dev.index is not None else torch.cuda.current_device()]
                       if dev.type == "cuda" else [])
        try:
            with torch.random.fork_rng(devices=rng_devices):
                if dev.type == "cpu":
                    torch.use_deterministic_algorithms(True)
                return self._fit(train, val, label, y_train, y_val, p, seed, dev, warm_start,
                                 on_epoch, deadline, resume, calib)
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)

    def _fit(self, train: pd.DataFrame, val: pd.DataFrame, label: str, y_train: npt.NDArray[np.float32],
             y_val: npt.NDArray[np.float32], p: TrainParams, seed: int, dev: torch.device,
             warm_start: Path | None, on_epoch: Callable[[EpochMetrics], None] | None,
             deadline: float | None, resume: dict[str, Any] | None,
             calib: tuple[pd.DataFrame, npt.NDArray[np.float32]] | None) -> FitResult:
        torch.manual_seed(seed)
        if warm_start is not None:
            champion = CTRModel.load(warm_start)
            pre = champion.preprocessor
            arch = dataclasses.replace(champion.architecture, dropout=p.dropout)
            net = CTRModel.build_net(pre, arch)
            net.load_state_dict(champion.calibrated_state_dict())
            p = dataclasses.replace(p, embedding_dim=arch.embedding_dim, hidden=arch.hidden,
                                    cross_layers=arch.cross_layers, buckets=pre.buckets,
                                    features=pre.spec)
        else:
            spec = p.features or infer_features(train, label=label, exclude=p.exclude)
            pre = Preprocessor.fit(train, spec, p.buckets)
            arch = Architecture(embedding_dim=p.embedding_dim, hidden=p.hidden,
                                cross_layers=p.cross_layers, dropout=p.dropout)
            net = CTRModel.build_net(pre, arch)
            # Start the output at the base rate's logit: the first epochs then learn
            # structure instead of the mean, and a rare positive class trains stably.
            rate = float(np.clip(y_train.mean(), 1e-4, 1 - 1e-4))
            with torch.no_grad():
                net.head.bias.fill_(math.log(rate / (1 - rate)))
            p = dataclasses.replace(p, features=spec)
        net.to(dev)

        cat_tr, num_tr = (torch.from_numpy(a).to(dev) for a in pre.transform(train))
        cat_va, num_va = (torch.from_numpy(a).to(dev) for a in pre.transform(val))
        yt = torch.from_numpy(y_train).to(dev)
        yv = torch.from_numpy(y_val).to(dev)
        n, bs = len(y_train), p.batch_size
        steps = math.ceil(n / bs)
        total = steps * p.max_epochs
        warmup = math.ceil(p.warmup_fraction * total)

        decay = [t for t in net.parameters() if t.ndim >= 2]
        no_decay = [t for t in net.parameters() if t.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(warmup, total))

        fingerprint = {"seed": seed, "params": p.to_dict(),
                       "rows": [n, len(y_val), 0 if calib is None else len(calib[1])],
                       "preprocessor": pre.to_dict(), "architecture": arch.to_dict(),
                       "warm_start": warm_start is not None}
        progress = _Progress()
        if resume is not None:
            progress = self._restore(resume, fingerprint, net, optimizer, scheduler, dev)
        run = _Run(fingerprint, net, optimizer, scheduler, progress)
        self._run = run
        if resume is not None:
            self._snapshot(run, dev)  # resumed state is the state: state_dict() works at once

        autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                    else contextlib.nullcontext())
        check_every = _CUDA_CHECK_EVERY if dev.type == "cuda" else 1
        sizes = torch.full((steps,), float(bs), device=dev)
        sizes[-1] = n - bs * (steps - 1)

        while not progress.finished and progress.epoch < p.max_epochs:
            epoch = progress.epoch + 1
            perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n)).to(dev)
            losses = torch.zeros(steps, device=dev)
            checked = 0
            net.train()
            t0 = time.perf_counter()
            out_of_time = False
            for step in range(steps):
                idx = perm[step * bs:(step + 1) * bs]
                with autocast:
                    logits = net(cat_tr[idx], num_tr[idx])
                loss = F.binary_cross_entropy_with_logits(logits.float(), yt[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses[step] = loss.detach()
                if step + 1 - checked >= check_every or step == steps - 1:
                    window = losses[checked:step + 1]
                    if not bool(torch.isfinite(window).all()):
                        bad = checked + int(torch.nonzero(~torch.isfinite(window))[0, 0])
                        msg = (f"the training loss is {float(losses[bad])} at epoch {epoch} step "
                               f"{bad + 1} of {steps} (lr {p.lr}); nothing is kept")
                        raise TrainingError(msg, reason="non_finite_loss")
                    checked = step + 1
                if deadline is not None and time.time() >= deadline:
                    out_of_time = True
                    break
            seconds = time.perf_counter() - t0
            if out_of_time:
                # The unfinished epoch's weights were never validated: drop them.
                if progress.best_weights is None:
                    msg = f"the deadline passed during epoch {epoch}, before any epoch finished"
                    raise TrainingError(msg, reason="deadline")
                progress.finished, progress.stop_reason = True, "deadline"
                break

            val_logits = self._logits(net, cat_va, num_va, autocast)
            val_loss = float(F.binary_cross_entropy_with_logits(val_logits, yv))
            if not math.isfinite(val_loss):
                msg = f"the validation loss is {val_loss} at epoch {epoch}"
                raise TrainingError(msg, reason="non_finite_loss")
            val_auc = roc_auc(y_val, torch.sigmoid(val_logits).double().cpu().numpy())
            metrics = EpochMetrics(epoch=epoch, train_loss=float((losses * sizes).sum() / n),
                                   val_loss=val_loss, val_auc=val_auc,
                                   lr=float(scheduler.get_last_lr()[0]), seconds=seconds,
                                   samples_per_s=n / seconds if seconds > 0 else math.inf)
            progress.epoch = epoch
            progress.history.append(metrics)
            if val_loss < progress.best_val_loss:
                progress.best_epoch, progress.best_val_loss = epoch, val_loss
                progress.best_weights = _clone_state(net)
                progress.bad_epochs = 0
            else:
                progress.bad_epochs += 1
            if progress.bad_epochs >= p.patience:
                progress.finished, progress.stop_reason = True, "early_stopping"
            elif epoch == p.max_epochs:
                progress.finished, progress.stop_reason = True, "max_epochs"
            # Snapshot before the callback: if it raises (or the process is killed in
            # it), the state describes this finished epoch exactly.
            self._snapshot(run, dev)
            if on_epoch is not None:
                on_epoch(metrics)

        assert progress.best_weights is not None
        net.load_state_dict(progress.best_weights)
        net.to("cpu")
        model = CTRModel(pre, net, arch)
        calibration = None
        if calib is not None:
            model, calibration = _recalibrate(model, *calib)
        return FitResult(model=model, best_epoch=progress.best_epoch,
                         best_val_loss=progress.best_val_loss, history=tuple(progress.history),
                         stopped_early=progress.stop_reason != "max_epochs",
                         stop_reason=progress.stop_reason or "max_epochs", device=str(dev),
                         params=p.to_dict(), calibration=calibration)

    @staticmethod
    def _logits(net: CTRNet, cat: torch.Tensor, num: torch.Tensor,
                autocast: contextlib.AbstractContextManager[Any]) -> torch.Tensor:
        net.eval()
        out = []
        with torch.inference_mode(), autocast:
            for s in range(0, len(cat), _EVAL_BATCH):
                out.append(net(cat[s:s + _EVAL_BATCH], num[s:s + _EVAL_BATCH]).float())
        return torch.cat(out)

    @staticmethod
    def _snapshot(run: _Run, dev: torch.device) -> None:
        run.progress.torch_rng = torch.get_rng_state()
        run.progress.cuda_rng = torch.cuda.get_rng_state_all() if dev.type == "cuda" else None
        run.weights = _clone_state(run.net)
        run.optimizer_state = copy.deepcopy(run.optimizer.state_dict())
        run.scheduler_state = copy.deepcopy(run.scheduler.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """The progress of the last ``fit`` at the end of its last finished epoch.

        Tensors, numbers, strings, lists and dicts only: it round-trips through
        ``torch.save`` and ``torch.load(weights_only=True)``.
        """
        run = self._run
        if run is None or run.weights is None:
            msg = "no epoch has finished yet: there is no training state to save"
            raise RuntimeError(msg)
        pr = run.progress
        return {
            "version": _STATE_VERSION,
            "fingerprint": copy.deepcopy(run.fingerprint),
            "epoch": pr.epoch, "best_epoch": pr.best_epoch, "best_val_loss": pr.best_val_loss,
            "bad_epochs": pr.bad_epochs, "finished": pr.finished, "stop_reason": pr.stop_reason,
            "history": [m.to_dict() for m in pr.history],
            "weights": {k: v.clone() for k, v in run.weights.items()},
            "best_weights": {k: v.clone() for k, v in (pr.best_weights or {}).items()},
            "optimizer": copy.deepcopy(run.optimizer_state),
            "scheduler": copy.deepcopy(run.scheduler_state),
            "torch_rng": pr.torch_rng.clone() if pr.torch_rng is not None else None,
            "cuda_rng": [t.clone() for t in pr.cuda_rng] if pr.cuda_rng is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the next ``fit`` from ``state`` (it must be called with the same data,
        params and seed; a mismatch is a ValueError naming what differs)."""
        if state.get("version") != _STATE_VERSION:
            msg = f"trainer state version must be {_STATE_VERSION}, got {state.get('version')!r}"
            raise ValueError(msg)
        missing = sorted({"fingerprint", "epoch", "weights", "optimizer", "scheduler"} - set(state))
        if missing:
            msg = f"trainer state lacks {missing}"
            raise ValueError(msg)
        self._resume = dict(state)

    @staticmethod
    def _restore(state: Mapping[str, Any], fingerprint: dict[str, Any], net: CTRNet,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 dev: torch.device) -> _Progress:
        old = state["fingerprint"]
        differ = sorted(k for k in fingerprint.keys() | old.keys() if fingerprint.get(k) != old.get(k))
        if differ:
            msg = f"the trainer state was saved by a different run: {differ} differ"
            raise ValueError(msg)
        net.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        best = {k: v.to(dev) for k, v in state["best_weights"].items()} or None
        return _Progress(epoch=int(state["epoch"]), best_epoch=int(state["best_epoch"]),
                         best_val_loss=float(state["best_val_loss"]),
                         bad_epochs=int(state["bad_epochs"]),
                         history=[EpochMetrics(**m) for m in state["history"]], best_weights=best,
                         torch_rng=state.get("torch_rng"), cuda_rng=state.get("cuda_rng"),
                         finished=bool(state["finished"]), stop_reason=state.get("stop_reason"))
