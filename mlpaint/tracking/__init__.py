"""Everything mlpaint reads from and writes to MLflow: where runs go (`store`), the model
registry (`registry`), any run's evaluation artifacts, datasets and resources (`runs`), and
a training experiment's parent, fold and summary records (`experiment`), and the
registry's side of publishing (`publication`). Every call goes through an explicit
`MlflowClient`; nothing sets MLflow's process-wide tracking URI."""

from mlpaint.tracking.registry import (
    MODEL_PACKAGES,
    REGISTERED_MODEL_NAME,
    RUN_COMPLETE,
    RUN_INCOMPLETE,
    RUN_STATE_TAG,
    RegisteredModel,
    log_digit_model,
    mark_complete,
)
from mlpaint.tracking.runs import (
    FLOW_RUN_TAG,
    FLOW_RUN_URL_TAG,
    DatasetUse,
    end_open_runs,
    log_datasets,
    peak_rss_megabytes,
    recording_resources,
    render_confusion_heatmap,
    write_evaluation_artifacts,
)
from mlpaint.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    SQLITE_PREFIX,
    TrackingStoreError,
    ensure_experiment,
    prepare_sqlite_store,
    prepare_store_meanwhile,
    resolve_tracking_uri,
    tracking_client,
)

__all__ = [
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "FLOW_RUN_TAG", "FLOW_RUN_URL_TAG",
    "MODEL_PACKAGES", "REGISTERED_MODEL_NAME", "RUN_COMPLETE", "RUN_INCOMPLETE", "RUN_STATE_TAG",
    "SQLITE_PREFIX", "DatasetUse", "RegisteredModel", "TrackingStoreError", "end_open_runs",
    "ensure_experiment", "log_datasets", "log_digit_model", "mark_complete",
    "peak_rss_megabytes", "prepare_sqlite_store", "prepare_store_meanwhile",
    "recording_resources", "render_confusion_heatmap", "resolve_tracking_uri",
    "tracking_client", "write_evaluation_artifacts",
]
