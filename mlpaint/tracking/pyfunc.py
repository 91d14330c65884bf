"""The MLflow face of a `DigitModel`: a pyfunc that takes pixels, not features.

The model applies its own feature stage (recorded in its model.json), so whoever loads it
from the registry — `mlflow.pyfunc.load_model`, `mlflow models serve`, a batch job — sends
what a drawing is (PIXEL_INPUT) and gets what the app shows, with no knowledge of the
feature stage.

It is logged as code (MLflow's "models from code"): the registered model holds
`pyfunc_code.py`, which names this class, and the DigitModel's own files; no pickled Python
object, so it loads where pickle deserialisation is refused
(`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np

from mlpaint.data.pins import N_CLASSES, N_FEATURES
from mlpaint.training.algorithms import PIXEL_INPUT, DigitModel

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
# The file MLflow logs as the model's code: it sets an instance of DigitModelPyfunc as the
# model when MLflow loads it, and is never imported by mlpaint itself.
MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")


def pixel_signature():
    """Rows of 784 pixels in, ten probabilities out; the pixel convention in the names."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, N_FEATURES), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, N_CLASSES), OUTPUT_NAME)]))


def _pixels(model_input) -> np.ndarray:
    if isinstance(model_input, dict):  # a named-tensor request: {"pixels": [...]}
        model_input = model_input[INPUT_NAME]
    if hasattr(model_input, "to_numpy"):  # a DataFrame of 784 columns
        model_input = model_input.to_numpy()
    return np.asarray(model_input)


class DigitModelPyfunc(mlflow.pyfunc.PythonModel):
    __doc__ = f"Input: {PIXEL_INPUT}. Output: (rows, 10) float32 probabilities of 0..9."

    def load_context(self, context) -> None:
        self.model = DigitModel.load(Path(context.artifacts["digit_model"]))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        return self.model.predict_pixels(_pixels(model_input)).astype(np.float32)
