"""The MLflow pyfunc face of a multi-booster `DigitModel` (a bagged ensemble), so it can be
logged, registered and loaded like the single-booster LightGBM models."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np

from mlpaint.training.algorithms import DigitModel


class DigitModelPyfunc(mlflow.pyfunc.PythonModel):
    """Input: feature rows (after the model's feature stage). Output: class probabilities."""

    def load_context(self, context) -> None:
        self.model = DigitModel.load(Path(context.artifacts["digit_model"]))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        return self.model.predict_proba(np.asarray(model_input, dtype=np.float32))
