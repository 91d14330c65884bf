"""Building a bundle: the whole test set's exact explanations, checked for additivity as
serving will read them back, and the folder they are written to with the model."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpaint.data.integrity import IntegrityError
from mlpaint.data.pins import N_CLASSES
from mlpaint.model.explain import (
    AdditivityError,
    ClassExplainer,
    DigitMaps,
    check_additivity,
    check_against_reference,
    digit_maps,
    gallery_rows,
    render_digit_maps,
)
from mlpaint.publishing.bundle import (
    BundleInfo,
    PublishResult,
    bundle_version_id,
    info_json,
    write_manifest,
)
from mlpaint.publishing.gate import GateDecision
from mlpaint.storage import manifest as manifests
from mlpaint.storage.catalog import place_in_cache
from mlpaint.training.algorithms import DigitModel
from mlpaint.training.evaluation import evaluate
from mlpaint.training.keys import content_key, table_key

logger = logging.getLogger(__name__)


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


# --- built bundles kept in this machine's cache -------------------------------------------------

#: Bump when a change to explaining or bundling makes earlier built bundles wrong to reuse.
BUILD_CODE_VERSION = 2
BUILT = "built.json"


def built_bundle_key(model: tuple[str, str, str], test_table: Path, data_fingerprint: dict,
                     per_digit: int) -> str:
    """Everything a built bundle depends on: the registered model (name, version and the
    run id that pins it), the content-keyed test table (its cache folder's last two parts),
    the data fingerprints, the gallery size, the code."""
    return content_key(model=list(model), test_table=table_key(str(test_table)),
                       fingerprint=data_fingerprint, per_digit=per_digit,
                       code=BUILD_CODE_VERSION)


def read_built(folder: Path) -> BuiltBundle | None:
    """The bundle kept in `folder` by an earlier attempt, verified (once per process while
    its files stay unchanged); None if none was kept whole there."""
    if not manifests.is_whole(folder):
        return None
    manifests.verify_folder_once(folder)
    built = json.loads((folder / BUILT).read_text())
    return BuiltBundle(str(folder / "bundle"), BundleInfo(**built["info"]),
                       built["test_accuracy"])


def keep_built(staging: Path, folder: Path, info: BundleInfo,
               test_accuracy: float) -> BuiltBundle:
    """Keep the bundle built in `staging/bundle` at `folder`, whole (its manifest last), so
    a retry or rerun takes it from there instead of explaining the test set again. A
    concurrent run that kept the same bundle first wins; its copy is returned."""
    (staging / BUILT).write_text(json.dumps({"info": asdict(info),
                                             "test_accuracy": test_accuracy}))
    manifests.write_manifest(staging)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if place_in_cache(staging, folder, marker=manifests.MANIFEST):
        manifests.remember_verified(folder)  # hashed just now, by this process
    kept = read_built(folder)
    if kept is None:  # place_in_cache leaves a whole folder there, ours or the winner's
        raise IntegrityError(f"{folder}: no built bundle after placing one")
    return kept


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
