"""What every stored artefact of a training run depends on, in one module. Each key is
`content_key` of the inputs it names, so runs with the same inputs share the artefact, and a
change to any of them (a code version included) makes a new one.

- `features/` (`features_key`): the table, the stage, the row limit, the feature code.
- `augmented/` (`augmented_key`): the table, the stage, the limit, the augmentation, the
  seed, the augmentation and feature code.
- `feedback-matrices/` (`feedback_key`): the snapshot's digest, the stage, the wild share,
  the augmentation, the seed, the code.
- `pen-matrices/` (`pen_matrix_key`): the pen table, the pen spec, the stage, the limit, the
  augmentation, the seed, the drawing, augmentation and feature code.
- `base-models/` (`base_model_key`): the registered version and the run that made it.
- `fits/` (`fold_fit_key`, `final_fit_key`): the spec, the algorithm, the keys of its
  inputs, the model it continues, the fit code and LightGBM's version.

Tables are keyed where they are made, by the hashes of the files they were parsed from
(`mlpaint.data.dataset.table_cache_key`); a table's URI ends with that key and its split.
"""

from __future__ import annotations

import hashlib
import json

import lightgbm

from mlpaint.images.augment import AUGMENT_CODE_VERSION, AugmentSpec
from mlpaint.images.drawing import DRAWING_CODE_VERSION
from mlpaint.model.feature_stages import FEATURE_CODE_VERSION, FeatureStage
from mlpaint.storage.catalog import uri_name
from mlpaint.training.algorithms import BaggedBoostingConfig, GbdtConfig
from mlpaint.training.spec import ExperimentSpec, PenSpec

#: Bump when a change to training or evaluation makes earlier stored fits wrong to reuse.
FIT_CODE_VERSION = "5"  # 5: folds score their held-out writers' drawings, rows kept


def content_key(**inputs: object) -> str:
    """The key of an artefact made from `inputs` (JSON values): their canonical JSON,
    hashed."""
    material = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def table_key(table: str) -> str:
    """A table's content key, `<its files' key>/<split>`, from its URI."""
    return "/".join(table.rstrip("/").rsplit("/", 2)[-2:])


def features_key(table: str, stage: FeatureStage, limit: int | None) -> str:
    """A split's (first `limit`) rows through a feature stage."""
    return content_key(table=table_key(table), stage=stage.value, limit=limit,
                       feature_code=FEATURE_CODE_VERSION)


def augmented_key(table: str, stage: FeatureStage, limit: int | None,
                  augment: AugmentSpec, seed: int) -> str:
    """Augmented copies of a split's (first `limit`) rows through a feature stage."""
    return content_key(table=table_key(table), stage=stage.value, limit=limit, seed=seed,
                       augment=augment.model_dump(mode="json"), code=AUGMENT_CODE_VERSION,
                       feature_code=FEATURE_CODE_VERSION)


def feedback_key(snapshot_digest: str, stage: FeatureStage, wild_share: float,
                 augment: AugmentSpec, seed: int) -> str:
    """A feedback snapshot split into its training part (augmented) and its wild test set,
    through a feature stage."""
    return content_key(digest=snapshot_digest, stage=stage.value, seed=seed,
                       wild_share=wild_share, augment=augment.model_dump(mode="json"),
                       code=AUGMENT_CODE_VERSION, feature_code=FEATURE_CODE_VERSION)


def pen_matrix_key(table: str, pen: PenSpec, stage: FeatureStage, limit: int | None,
                   augment: AugmentSpec, seed: int) -> str:
    """Pen drawings rendered from a pen table (its first `limit` digits) and through a
    feature stage: the pen spec counts but where the trajectories came from and how much
    they weigh in training, which change no drawing."""
    return content_key(table=table_key(table), stage=stage.value, limit=limit, seed=seed,
                       augment=augment.model_dump(mode="json"),
                       pen=pen.model_dump(mode="json", exclude={"sources", "weight"}),
                       code=AUGMENT_CODE_VERSION, drawing_code=DRAWING_CODE_VERSION,
                       feature_code=FEATURE_CODE_VERSION)


def base_model_key(run_id: str, version: str) -> str:
    """A registered version's model: a version of a run never changes."""
    return content_key(run_id=run_id, version=version)


def _fit_key(name: str, spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
             inputs: list[str], base: str | None) -> str:
    """What a fit's result depends on: its name, the spec (less the experiment's name, where
    the data and feedback came from, and whether a final fit follows, none of which changes
    this fit), the algorithm's configuration, the stored folders of its inputs (each named
    by its own key), the model it continues (`base`, its stored folder) and how (a warm
    start that found none to continue trains what the spec without it would), and the code
    and LightGBM versions."""
    warm_start = ({"warm_start": {"base": uri_name(base), **spec.warm_start.model_dump(
        mode="json", exclude={"alias"})}} if base else {})
    return content_key(
        fit=name, code=FIT_CODE_VERSION, lightgbm=lightgbm.__version__,
        spec=spec.model_dump(mode="json", exclude={
            "experiment": True, "sources": True, "final_fit": True, "feedback": {"store"},
            "pen": {"sources"}, "warm_start": True}),
        config=config.model_dump(mode="json"), inputs=[uri_name(uri) for uri in inputs],
        **warm_start)


def fold_fit_key(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                 fold_index: int, inputs: list[str]) -> str:
    """Fold `fold_index`'s fit, on the stored matrices at `inputs` (the training split's
    features, then its augmented rows, feedback and pen drawings where the run has them)."""
    return _fit_key(f"fold-{fold_index}", spec, config, inputs, None)


def final_fit_key(spec: ExperimentSpec, config: GbdtConfig | BaggedBoostingConfig,
                  inputs: list[str], base: str | None) -> str:
    """The final model's fit, on the stored matrices at `inputs` (the training and test
    splits' features, then augmented rows, feedback and pen drawings where the run has
    them), continuing the model stored at `base` if any."""
    return _fit_key("final", spec, config, inputs, base)
