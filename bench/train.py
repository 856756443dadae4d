"""Training throughput of the reference CTR model against a plain torch MLP.

    python -m bench.train [--quick] [--rows N] [--epochs E] [--device auto|cpu|cuda]

Side by side in one run, on the same synthetic click data, the same pre-transformed
tensors and the same device:

* ``driftloop``: ``CTRTrainer.fit`` with the default architecture (hashed embeddings,
  2**16 buckets per field, a DCN-v2 cross network beside a (128, 64) MLP), AdamW
  with warmup and cosine decay, per-step finiteness checks, validation and early
  stopping bookkeeping every epoch. Samples/s are the trainer's own per-epoch figure
  (training steps only, validation excluded).
* ``peer``: the floor, the simplest model of the same embedding sizes: the same
  tables feeding an MLP of the same widths, the same fused AdamW at a constant rate
  (torch's default, unfused AdamW is several times slower here: the dense update of
  the embedding tables dominates a CPU step), a bare loop
  over the same tensors (``randperm`` and slicing, nothing else). Run before and
  after driftloop, averaged.

The ratio is the cost of the cross network and of the training loop's machinery.
On CUDA both run the forward pass under bf16 autocast. The last line of output is
one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from retrain.ctr import FeatureSpec, Preprocessor
from retrain.ctr_trainer import CTRTrainer, resolve_device
from retrain.trainer import TrainParams

CATEGORICAL = ("country", "device", "category")
NUMERIC = ("price", "age", "dwell", "is_new")


def make_clicks(n: int, seed: int = 0) -> pd.DataFrame:
    """A logistic click model over ids, three categoricals and four numerics."""
    r = np.random.default_rng(seed)
    n_users, n_items = 200_000, 20_000
    user_eff, item_eff = r.normal(0, 0.7, n_users), r.normal(0, 0.7, n_items)
    users, items = r.integers(0, n_users, n), r.integers(0, n_items, n)
    country, device, category = r.integers(0, 30, n), r.integers(0, 4, n), r.integers(0, 200, n)
    log_price, age = r.normal(3, 0.8, n), r.integers(18, 80, n).astype(np.float64)
    dwell, is_new = r.exponential(20, n), r.random(n) < 0.2
    logit = (-1.5 + user_eff[users] + item_eff[items] + 0.02 * (country % 7) - 0.6 * (log_price - 3)
             + 0.3 * (device == 1) * (log_price - 3) + 0.01 * (age - 45) + 0.4 * is_new)
    click = (r.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    age[r.random(n) < 0.05] = np.nan
    return pd.DataFrame({"user_id": users, "item_id": items, "country": country.astype(str),
                         "device": device.astype(str), "category": category.astype(str),
                         "price": np.exp(log_price), "age": age, "dwell": dwell, "is_new": is_new,
                         "click": click})


class PlainMLP(nn.Module):
    """The peer: the same embedding tables, an MLP of the same widths, one logit."""

    def __init__(self, n_fields: int, n_numeric: int, buckets: int, dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(buckets, dim) for _ in range(n_fields))
        layers: list[nn.Module] = []
        width = n_fields * dim + 2 * n_numeric
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        x = torch.cat([e(cat[:, j]) for j, e in enumerate(self.embeddings)] + [num], dim=1)
        return self.mlp(x).squeeze(1)


def peer(cat: np.ndarray, num: np.ndarray, y: np.ndarray, p: TrainParams, epochs: int,
         dev: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = PlainMLP(cat.shape[1], num.shape[1] // 2, p.buckets, p.embedding_dim, p.hidden).to(dev)
    # The same fused AdamW as the trainer: the optimiser is not what this compares.
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay, fused=True)
    cat_t, num_t = torch.from_numpy(cat).to(dev), torch.from_numpy(num).to(dev)
    y_t = torch.from_numpy(y.astype(np.float32)).to(dev)
    n, bs = len(y), p.batch_size
    rates = []
    for _ in range(epochs):
        _sync(dev)
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=dev)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            with _autocast(dev):
                logits = model(cat_t[idx], num_t[idx])
            loss = F.binary_cross_entropy_with_logits(logits.float(), y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(dev)
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": statistics.median(rates), "epochs": rates, "final_loss": float(loss.detach())}


def _autocast(dev: torch.device) -> Any:
    if dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k rows, 2 epochs (under 2 minutes)")
    ap.add_argument("--rows", type=int, help="training rows (default 1M, quick 100k)")
    ap.add_argument("--epochs", type=int, help="epochs per model (default 3, quick 2)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    args = ap.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    epochs = args.epochs or (2 if args.quick else 3)
    dev = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {device_name}{' (bf16 autocast)' if dev.type == 'cuda' else ''}, "
          f"torch threads {torch.get_num_threads()}, {rows:,} training rows, {epochs} epochs", flush=True)

    data = make_clicks(rows + rows // 10)
    train, val = data.iloc[:rows], data.iloc[rows:]
    # patience above the epoch count: every epoch runs, as in the peer.
    params = TrainParams(max_epochs=epochs, patience=epochs + 1)
    spec = FeatureSpec(categorical=CATEGORICAL, numeric=NUMERIC)

    t0 = time.perf_counter()
    pre = Preprocessor.fit(train, spec, params.buckets)
    cat, num = pre.transform(train)
    transform_rows_per_s = rows / (time.perf_counter() - t0)
    print(f"preprocessing (fit + transform): {transform_rows_per_s:,.0f} rows/s", flush=True)
    y = train["click"].to_numpy()

    peer1 = peer(cat, num, y, params, epochs, dev)
    print(f"peer (plain MLP):  {peer1['samples_per_s']:,.0f} samples/s", flush=True)
    fit_params = {**params.to_dict(), "features": spec.to_dict()}
    t0 = time.perf_counter()
    result = CTRTrainer().fit(train, val, label="click", params=fit_params, seed=0, device=str(dev),
                              warm_start=None, on_epoch=None, deadline=None)
    fit_seconds = time.perf_counter() - t0
    ours = statistics.median(m.samples_per_s for m in result.history)
    print(f"driftloop CTR:     {ours:,.0f} samples/s (val AUC {result.history[-1].val_auc:.3f}, "
          f"fit {fit_seconds:.1f} s incl. preprocessing and validation)", flush=True)
    peer2 = peer(cat, num, y, params, epochs, dev)
    print(f"peer (plain MLP):  {peer2['samples_per_s']:,.0f} samples/s", flush=True)

    model = result.model
    t0 = time.perf_counter()
    model.predict(val)
    predict_rows_per_s = len(val) / (time.perf_counter() - t0)
    peer_rate = (peer1["samples_per_s"] + peer2["samples_per_s"]) / 2
    figures = {
        "bench": "train", "rows": rows, "epochs": epochs, "batch_size": params.batch_size,
        "device": device_name, "bf16_autocast": dev.type == "cuda", "threads": torch.get_num_threads(),
        "fields": pre.n_fields, "numeric": pre.n_numeric, "buckets": params.buckets,
        "parameters": model.n_parameters,
        "driftloop_samples_per_s": round(ours),
        "driftloop_epochs_samples_per_s": [round(m.samples_per_s) for m in result.history],
        "peer_samples_per_s": round(peer_rate),
        "peer_runs_samples_per_s": [round(peer1["samples_per_s"]), round(peer2["samples_per_s"])],
        "ratio_vs_peer": round(ours / peer_rate, 3),
        "driftloop_val_auc": round(result.history[-1].val_auc, 4),
        "preprocess_rows_per_s": round(transform_rows_per_s),
        "predict_cpu_rows_per_s": round(predict_rows_per_s),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}, "
                   f"torch {torch.__version__}",
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
