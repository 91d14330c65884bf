"""Publishing, as plain functions: load a registered model, precompute its explanations, decide
the gate, and build the bundle folder. Orchestration lives in tasks/publish.py."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlpaint.bundle import (
    BUNDLE_ROOT_TAG,
    HISTORY,
    LATEST,
    MANIFEST,
    PUBLISH_LOCK,
    VERSIONS,
    BundleInfo,
    HistoryEntry,
    LatestChange,
    PublishResult,
    bundle_version_id,
    info_json,
    latest_history,
    read_latest,
    record_latest_move,
    write_manifest,
)
from mlpaint.data.pendigits import drawn_test_writers
from mlpaint.data.pins import N_CLASSES
from mlpaint.explain import (
    AdditivityError,
    ClassExplainer,
    DigitMaps,
    check_additivity,
    check_against_reference,
    digit_maps,
    gallery_rows,
    render_digit_maps,
)
from mlpaint.storage import ObjectStore, store_for
from mlpaint.tracking.publication import CHALLENGER, CHAMPION
from mlpaint.training.algorithms import DigitModel
from mlpaint.training.evaluation import PairedComparison, evaluate, predicted_labels

logger = logging.getLogger(__name__)


class PublishSpec(BaseModel):
    """What a publication does: which registered version, where to, and how the gate decides.
    The publish flow's one parameter (the Prefect run form's fields); validated here, once,
    naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str | None = Field(None, description="publish the version registered from this "
                                                 "MLflow run")
    model_version: str | None = Field(None, description="or this version of mnist-digits "
                                                        "(neither: the newest complete one)")
    to: str | None = Field(None, description="a folder or s3://bucket/prefix (default "
                                             "$MLPAINT_BUNDLE_DIR, <$MLPAINT_STORE>/bundles "
                                             "or .mlpaint/bundles)")
    force: bool = Field(False, description="promote even if worse than the champion")
    margin: float = Field(0.0, ge=0, le=1, description="test accuracy the candidate may lose "
                                                       "to the champion and still be promoted")
    retention: int = Field(5, ge=1, description="bundle versions kept at the destination")
    gallery_per_digit: int = Field(50, ge=1, description="explained test digits stored per "
                                                         "digit")
    sources: list[str] | None = Field(None, description="MNIST sources of the official test "
                                                        "set (default: the mirror chain)")
    feedback_store: str | None = Field(None, description="a feedback store whose wild test "
                                       "set the candidate must also not lose on")
    pen_sources: list[str] | None = Field(None, description="pen trajectories of the drawn "
                                          "test set (default: UCI's download, then the copy "
                                          "mlpaint ships)")

    @model_validator(mode="after")
    def _one_version_at_most(self) -> PublishSpec:
        if self.run_id and self.model_version:
            raise ValueError(f"run_id {self.run_id!r} and model_version "
                             f"{self.model_version!r}: name the version one way, not both")
        return self


def accuracy(model: DigitModel, pixels: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of a model on pixel rows, through the one evaluation function."""
    return evaluate(labels, model.predict_pixels(pixels)).accuracy


def right_answers(model: DigitModel, pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Whether a model reads each pixel row as its label (ties to the lowest digit, as
    `evaluate` breaks them)."""
    return predicted_labels(model.predict_pixels(pixels)) == labels


@dataclass(frozen=True)
class WildScores:
    """Candidate and champion on the same wild test set (feedback never trained on)."""

    rows: int
    candidate_accuracy: float
    champion_accuracy: float | None
    share: float | None = None  # of the store's records by row hash (`gate_wild_share`)


def held_out_wild_share(run_params: dict[str, str]) -> float:
    """The share of feedback records, by row hash (`mlpaint.feedback.wild_rows`), that a
    training run never trained on, from its recorded spec: its wild test set's
    (`feedback.wild_share`), or all of them for a run that trained on no feedback."""
    if run_params.get("feedback.store", "null") == "null":
        return 1.0
    return float(run_params["feedback.wild_share"])


def gate_wild_share(candidate_params: dict[str, str],
                    champion_params: dict[str, str] | None) -> float:
    """The wild rows the gate scores: those neither run trained on. The wild buckets of a
    smaller share lie within a larger one's, and a run trains only on records outside its
    own, so the smaller share's records are held out by both, whether they were in the
    store when either trained or came later. A champion whose run is not in this registry
    (a served bundle from another) is taken to hold out what the candidate does."""
    share = held_out_wild_share(candidate_params)
    if champion_params is not None:
        share = min(share, held_out_wild_share(champion_params))
    return share


@dataclass(frozen=True)
class DrawnScores:
    """Candidate and champion on the same drawn test set: pen drawings of writers neither
    model trained on."""

    rows: int
    writers: int
    candidate_accuracy: float
    champion_accuracy: float


def held_out_writers(run_params: dict[str, str], writers: list[int]) -> frozenset[int]:
    """The pen writers a training run never trained on, from its recorded spec: those of its
    drawn test set (`pen.test_share`), or every writer for a run that drew none (trained
    before pen drawings, or with `pen.renderings: 0`)."""
    if int(run_params.get("pen.renderings", "0")) == 0:
        return frozenset(writers)
    return drawn_test_writers(writers, float(run_params["pen.test_share"]))


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    alias: str
    candidate_accuracy: float
    champion_accuracy: float | None
    champion_version: str | None
    margin: float
    forced: bool
    reason: str
    wild: WildScores | None = None
    # Champion (first) and candidate (second), digit by digit on the official test set.
    paired: PairedComparison | None = None
    drawn: DrawnScores | None = None


def decide(candidate_accuracy: float, champion_accuracy: float | None,
           champion_version: str | None, *, margin: float, force: bool,
           wild: WildScores | None = None, champion_name: str | None = None,
           paired: PairedComparison | None = None,
           drawn: DrawnScores | None = None) -> GateDecision:
    """Promote unless the candidate is worse than the champion by more than `margin` on the
    official test set, or any worse on the wild set (drawings people made and labelled) or on
    the drawn test set (pen drawings of writers), neither of which either model trained on.
    A flood of wrong labels therefore cannot crown a model that reads MNIST worse, nor a
    model that reads MNIST a little better but real drawings worse. `force` promotes
    regardless. The reason names the
    champion by `champion_name`, else as registry version `champion_version`, and, given the
    two models' answers side by side (`paired`), how many test digits they read differently
    and whether that split is more than chance: a few digits in 10,000 often are not, and
    the operator choosing a margin should know."""
    if champion_accuracy is None:
        promote, reason = True, "no champion yet"
    else:
        test_ok = candidate_accuracy >= champion_accuracy - margin
        reason = (f"official test accuracy {candidate_accuracy:.4f} against the champion's "
                  f"{champion_accuracy:.4f} ({champion_name or f'version {champion_version}'}"
                  f", margin {margin:.4f}): "
                  + ("not worse" if test_ok else "worse by more than the margin"))
        if paired is not None:
            reason += f"; {paired.summary('the champion', 'the candidate')}"
        wild_ok = True
        if wild is not None and wild.rows and wild.champion_accuracy is not None:
            wild_ok = wild.candidate_accuracy >= wild.champion_accuracy
            reason += (f"; wild accuracy {wild.candidate_accuracy:.4f} against "
                       f"{wild.champion_accuracy:.4f} on {wild.rows} feedback drawings "
                       "neither trained on: " + ("not worse" if wild_ok else "worse"))
        drawn_ok = True
        if drawn is not None and drawn.rows:
            drawn_ok = drawn.candidate_accuracy >= drawn.champion_accuracy
            reason += (f"; drawn accuracy {drawn.candidate_accuracy:.4f} against "
                       f"{drawn.champion_accuracy:.4f} on {drawn.rows} pen drawings of "
                       f"{drawn.writers} writers neither trained on: "
                       + ("not worse" if drawn_ok else "worse"))
        promote = test_ok and wild_ok and drawn_ok
    forced = force and not promote
    if forced:
        promote, reason = True, f"forced by the operator; otherwise: {reason}"
    return GateDecision(promote, CHAMPION if promote else CHALLENGER, candidate_accuracy,
                        champion_accuracy, champion_version, margin, forced, reason, wild,
                        paired, drawn)


@dataclass(frozen=True)
class Explanations:
    maps: DigitMaps
    gallery: dict[str, np.ndarray]
    max_additivity_error: float
    test_accuracy: float


def explain_test_set(model: DigitModel, features: np.ndarray, pixels: np.ndarray,
                     labels: np.ndarray, row_hash: np.ndarray, row_keys: list[str], *,
                     per_digit: int) -> Explanations:
    """Exact contributions over the whole test set: per-digit mean maps (each row explained
    for its own label only, a tenth of the work of all ten classes), and a gallery of
    `per_digit` examples per digit with scores and all ten classes' contributions (float32
    where it holds them exactly enough), each checked for additivity against the model's raw
    score."""
    raw = model.raw_scores(features)
    own = ClassExplainer(model).explain_own_class(features, labels)
    check_additivity(own[:, None, :], raw[np.arange(len(labels)), labels][:, None])
    maps = digit_maps(own, labels)
    chosen = gallery_rows(labels, row_hash, per_digit)
    order = np.concatenate([chosen[d] for d in range(N_CLASSES)])
    exact = ClassExplainer(model).explain(features[order], list(range(N_CLASSES)))
    check_against_reference(model, features[order], exact)
    stored = _stored_contributions(exact, raw[order])
    gallery = {
        "digit": labels[order].astype(np.uint8),
        "row_key": np.asarray([row_keys[i] for i in order]),
        "pixels": np.asarray(pixels[order], dtype=np.uint8),
        "features": np.asarray(features[order], dtype=np.float32),
        "raw_scores": raw[order],
        "probabilities": model.probabilities(raw[order]).astype(np.float32),
        "contributions": stored,
        "offsets": np.cumsum([0] + [len(chosen[d]) for d in range(N_CLASSES)]),
    }
    # The check that matters: what serving will read back.
    error = check_additivity(stored, raw[order])
    return Explanations(maps, gallery, error, evaluate(labels, model.probabilities(raw)).accuracy)


def _stored_contributions(exact: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """The gallery's contributions as serving will read them back: float32 (half the
    bytes), unless float32 cannot hold them to the additivity tolerance. A model whose raw
    scores run into the thousands (boosting without regularisation on near-duplicate rows)
    has contributions whose float32 rounding alone exceeds it; those are kept as float64."""
    as_float32 = exact.astype(np.float32)
    try:
        check_additivity(as_float32, raw)
    except AdditivityError:
        logger.warning("explanations: float32 cannot hold this model's contributions to the "
                       "additivity tolerance (raw scores up to %.3g); the gallery keeps "
                       "them as float64", float(np.abs(raw).max()))
        return exact
    return as_float32


def build_bundle_folder(staging: Path, model: DigitModel, explanations: Explanations, *,
                        model_name: str, model_version: str, run_id: str,
                        metrics: dict[str, float], data_fingerprint: dict[str, str]
                        ) -> BundleInfo:
    created = time.time()
    model.save(staging / "model")
    folder = staging / "explanations"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "mean_contributions.npy", explanations.maps.mean)
    np.save(folder / "mean_abs_contributions.npy", explanations.maps.mean_abs)
    render_digit_maps(explanations.maps.mean, folder / "mean_contributions.png",
                      "mean contribution to each digit's score (green raises, red lowers)",
                      signed=True)
    render_digit_maps(explanations.maps.mean_abs, folder / "mean_abs_contributions.png",
                      "mean |contribution| to each digit's score", signed=False)
    gallery_path = staging / "gallery" / "gallery.npz"
    gallery_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(gallery_path, **explanations.gallery)
    info = BundleInfo(
        version=bundle_version_id(model_version, created), model_name=model_name,
        model_version=model_version, mlflow_run_id=run_id, algorithm=model.algorithm,
        labels=[str(d) for d in range(N_CLASSES)], metrics=metrics,
        data_fingerprint=data_fingerprint,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        gallery={"per_digit": int(np.diff(explanations.gallery["offsets"]).min()),
                 "rows": len(explanations.gallery["digit"]),
                 "bytes": gallery_path.stat().st_size,
                 "max_additivity_error": explanations.max_additivity_error})
    (staging / "bundle.json").write_text(info_json(info))
    write_manifest(staging)
    return info


@dataclass(frozen=True)
class BuiltBundle:
    """A bundle built and verified in `staging`, not yet uploaded anywhere."""

    staging: str
    info: BundleInfo
    test_accuracy: float


@dataclass(frozen=True)
class PublishReport:
    """What a publication did: the version, its bundle, the gate's decision."""

    model_version: str
    run_id: str
    bundle: PublishResult
    decision: GateDecision
    gallery_bytes: int

    def to_json(self) -> dict:
        return {"model_version": self.model_version, "mlflow_run_id": self.run_id,
                "bundle": asdict(self.bundle), "gate": asdict(self.decision),
                "gallery_bytes": self.gallery_bytes}


# --- rollback ---------------------------------------------------------------------------------

class RollbackError(ValueError):
    """A rollback that cannot be done as asked; the message says what to do instead."""


@dataclass(frozen=True)
class RollbackResult:
    destination: str
    entry: HistoryEntry
    champion_alias: str | None  # the model version `champion` names now; None: not moved

    def to_json(self) -> dict:
        return {"destination": self.destination, **self.entry.to_json(),
                "champion_alias": self.champion_alias}


def _previous_latest(store: ObjectStore, current: str | None) -> str:
    """The bundle LATEST named before the current one became LATEST, from the history."""
    made_current = [e for e in latest_history(store) if e.bundle_version == current]
    if not made_current or not made_current[-1].previous:
        raise RollbackError(f"{store.describe(HISTORY)}: no bundle before {current} is "
                            "recorded; name one with --bundle-version")
    return made_current[-1].previous


def rollback(destination: str, *, bundle_version: str | None, reason: str, by: str,
             tracking_client=None) -> RollbackResult:
    """Point LATEST back at `bundle_version` (default: the one it named before the current
    one), record why in the history, and, where `tracking_client` is given and the registry's
    model version was published to this destination, move its `champion` alias to that
    bundle's model version: all under the destination's publish lock, so no publisher moves
    either in between. Nothing is built or uploaded; a server following LATEST swaps to it."""
    store = store_for(destination)
    with store.lock(PUBLISH_LOCK):
        current = read_latest(store)
        target = bundle_version or _previous_latest(store, current)
        if target == current:
            raise RollbackError(f"{store.describe(LATEST)} already names {target}")
        info_bytes = store.get_bytes(f"{VERSIONS}/{target}/bundle.json")
        if info_bytes is None or store.get_bytes(f"{VERSIONS}/{target}/{MANIFEST}") is None:
            kept = ", ".join(store.list_folders(VERSIONS)) or "none"
            raise RollbackError(f"{store.describe(VERSIONS)}: no whole bundle {target} is kept "
                                f"here (kept: {kept})")
        info = BundleInfo(**json.loads(info_bytes))
        store.put_bytes(LATEST, (target + "\n").encode())
        entry = record_latest_move(store, target, current, LatestChange(
            "rollback", reason or f"rolled back from {current}", by=by,
            model_version=info.model_version))
        alias = (_move_champion_alias(tracking_client, info, store)
                 if tracking_client is not None else None)
    logger.info("%s: LATEST %s -> %s (rollback)", store.describe(), current, target)
    return RollbackResult(store.describe(), entry, alias)


def _move_champion_alias(client, info: BundleInfo, store: ObjectStore) -> str | None:
    """Give `champion` to the model version this bundle was made from, if the registry
    records its bundle at this destination (a staging destination leaves it alone)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version(info.model_name, info.model_version)
    except MlflowException as exc:
        logger.warning("the registry has no %s version %s (%s): alias not moved",
                       info.model_name, info.model_version, exc)
        return None
    root = version.tags.get(BUNDLE_ROOT_TAG)
    if root is None or store_for(root).describe() != store.describe():
        return None
    client.set_registered_model_alias(info.model_name, CHAMPION, info.model_version)
    return info.model_version
