"""MLflow plumbing: where runs go, and the evaluation artifacts every run carries.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite store in `.mlpaint/` under
the working directory, with artifacts beside it. Nothing is configured at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mlpaint.training.evaluation import Evaluation

REGISTERED_MODEL_NAME = "mnist-digits"
LOCAL_STORE_DIR = ".mlpaint"


def resolve_tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    folder = Path.cwd() / LOCAL_STORE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def tracking_client(tracking_uri: str):
    """An MlflowClient whose tracking store is also its model registry."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it if needed. For the local SQLite store its artifacts go
    to `.mlpaint/artifacts`, not to an `mlruns/` folder wherever the command happened to run."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///")).parent
        artifact_location = (store / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def write_evaluation_artifacts(evaluation: Evaluation, folder: Path, title: str) -> list[Path]:
    """confusion_matrix.json (dense and MLDB's sparse form), label_statistics.csv, and a
    heatmap PNG with log-scaled colours, so the few off-diagonal errors stay visible."""
    folder.mkdir(parents=True, exist_ok=True)
    confusion_json = folder / "confusion_matrix.json"
    confusion_json.write_text(json.dumps({
        "rows_are": "actual", "columns_are": "predicted", "matrix": evaluation.confusion,
        "sparse": evaluation.sparse_confusion()}, indent=1))
    statistics_csv = folder / "label_statistics.csv"
    lines = ["label,accuracy,precision,recall,f1,support"]
    lines += [f"{s.label},{s.accuracy:.6f},{s.precision:.6f},{s.recall:.6f},{s.f1:.6f},"
              f"{s.support}" for s in evaluation.labels]
    weighted = evaluation.weighted
    lines.append(f"weighted,{weighted['accuracy']:.6f},{weighted['precision']:.6f},"
                 f"{weighted['recall']:.6f},{weighted['f1']:.6f},{evaluation.rows}")
    statistics_csv.write_text("\n".join(lines) + "\n")
    heatmap = render_confusion_heatmap(evaluation, folder / "confusion_matrix.png", title)
    return [confusion_json, statistics_csv, heatmap]


def render_confusion_heatmap(evaluation: Evaluation, destination: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    matrix = np.asarray(evaluation.confusion)
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    shown = np.ma.masked_equal(matrix, 0)
    image = axis.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(matrix.max(), 2)))
    for actual in range(matrix.shape[0]):
        for predicted in range(matrix.shape[1]):
            if matrix[actual, predicted]:
                axis.text(predicted, actual, str(matrix[actual, predicted]), ha="center",
                          va="center", fontsize=7,
                          color="white" if actual != predicted else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    axis.set_xticks(range(matrix.shape[1]))
    axis.set_yticks(range(matrix.shape[0]))
    axis.set_title(f"{title}: accuracy {evaluation.accuracy:.4f} (log colour scale)")
    figure.colorbar(image, ax=axis, label="count")
    figure.tight_layout()
    figure.savefig(destination, dpi=90)
    plt.close(figure)
    return destination
