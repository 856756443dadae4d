"""The MLflow python_function entry point of every model driftloop registers.

MLflow logs this file as the model's code ("models from code"): nothing is pickled
into the model, so loading ``models:/NAME@champion`` runs this file and reads the
weights as data. The model's own directory (the artifact ``model``) holds
``driftloop_model.json``, which names the loader, ``module:Class`` (for the reference
model ``retrain.ctr:CTRModel``), whose ``load(directory)`` returns an object with
``predict(frame) -> probabilities``. The loader's package travels with the model
(``code_paths``), so a recommender scores the model without driftloop installed
(docs/trainer.md).

This file must stay importable on its own: MLflow executes it in the scoring
process, where only the model's code directory is on the path.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

#: The file in a model directory that names its loader.
MANIFEST = "driftloop_model.json"


class DriftloopModel(PythonModel):  # type: ignore[misc]
    """Scores a DataFrame of (user_id, item_id, features) with the registered model."""

    def load_context(self, context: Any) -> None:
        directory = Path(context.artifacts["model"])
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        module, _, name = str(manifest["loader"]).partition(":")
        loader = getattr(importlib.import_module(module), name)
        self._model = loader.load(directory)

    # No type hints on predict: MLflow reads them as a schema and warns about Any; the
    # signature logged with the model is the schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return np.asarray(self._model.predict(frame), dtype=np.float64)


set_model(DriftloopModel())
