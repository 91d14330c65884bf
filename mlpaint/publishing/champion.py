"""The gate's evidence: which champion a candidate is weighed against, and both models'
scores on the official test set, the wild set and the drawn test set. `gate_candidate`
gathers them and lets `decide` rule; the publish flow's task only wraps it.

The champion is the registry's `champion` version. Where the registry names none (a new
MLflow store publishing to an existing destination), it is the model of the bundle the
destination's LATEST names, which people are being served: a worse model must not replace
it because the registry forgot it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mlpaint.data.dataset import load_table
from mlpaint.data.pendigits import PenTable, load_pen_table
from mlpaint.feedback.store import FeedbackSnapshot, FeedbackStore, wild_rows
from mlpaint.images.drawing import DRAWING_CODE_VERSION, DrawnTestSet, drawn_set_of_writers
from mlpaint.publishing.build import BuiltBundle
from mlpaint.publishing.bundle import BundleIntegrityError, current_pointer, load_bundle
from mlpaint.publishing.gate import (
    DrawnScores,
    GateDecision,
    WildScores,
    accuracy,
    decide,
    gate_wild_share,
    held_out_writers,
    right_answers,
)
from mlpaint.storage.manifest import is_whole, load_arrays, save_arrays
from mlpaint.tracking import REGISTERED_MODEL_NAME, tracking_client
from mlpaint.tracking.publication import (
    CHAMPION,
    CandidateRef,
    load_registered_model,
    version_with_alias,
)
from mlpaint.training.algorithms import DigitModel, ModelFormatError
from mlpaint.training.evaluation import compare_paired
from mlpaint.training.keys import content_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateInputs:
    """What the gate weighs a candidate on, besides the two models: the official test
    table, the feedback store whose wild set counts (None: none), the pen table whose
    held-out writers' drawings count (None: none), and where drawn sets and served bundles
    are kept on this machine."""

    test_table: Path
    cache_dir: Path
    feedback_store: str | None = None
    pen_table: Path | None = None


def gate_candidate(candidate: CandidateRef, built: BuiltBundle, inputs: GateInputs, *,
                   margin: float, force: bool, tracking_uri: str,
                   destination: str) -> GateDecision:
    """Score the champion on the same official test set as the candidate's built bundle
    was (and, given a feedback store, both on its records neither trained on; given pen
    trajectories, both on the drawings of the writers neither trained on, each as the runs'
    recorded specs say), and decide. The candidate's test accuracy and model come from its
    built bundle, not from the registry again."""
    candidate_accuracy = built.test_accuracy
    client = tracking_client(tracking_uri)
    champion = version_with_alias(client, REGISTERED_MODEL_NAME, CHAMPION)
    champion_version = str(champion.version) if champion else None
    champion_name = None
    if champion_version == candidate.version:
        return decide(candidate_accuracy, candidate_accuracy, champion_version,
                      margin=margin, force=force)
    if champion is not None:
        try:
            model = load_registered_model(REGISTERED_MODEL_NAME, champion_version,
                                          tracking_uri)
        except ModelFormatError:
            if not force:
                raise
            # An operator replacing a champion that an older mlpaint registered: it cannot
            # be scored, and the decision says so rather than "no champion yet".
            return GateDecision(
                True, CHAMPION, candidate_accuracy, None, champion_version, margin, True,
                f"forced by the operator; champion version {champion_version} was "
                "registered by an older mlpaint and cannot be scored")
    else:
        model, champion_name = served_model(destination, inputs.cache_dir)
    if model is None:
        return decide(candidate_accuracy, None, champion_version, margin=margin, force=force,
                      champion_name=champion_name)
    table = load_table(inputs.test_table)
    candidate_model = DigitModel.load(Path(built.staging) / "model")
    champion_right = right_answers(model, table.pixels, table.labels)
    paired = compare_paired(champion_right,
                            right_answers(candidate_model, table.pixels, table.labels))
    candidate_params = client.get_run(candidate.run_id).data.params
    champion_params = (client.get_run(client.get_model_version(
        REGISTERED_MODEL_NAME, champion_version).run_id).data.params
        if champion is not None else None)
    wild = drawn = None
    if inputs.feedback_store:
        wild = wild_scores(candidate_model, model, inputs.feedback_store,
                           gate_wild_share(candidate_params, champion_params))
    if inputs.pen_table:
        drawn = drawn_scores(candidate_model, model, inputs.pen_table, candidate_params,
                             champion_params, inputs.cache_dir)
    return decide(candidate_accuracy, float(champion_right.mean()), champion_version,
                  margin=margin, force=force, wild=wild, champion_name=champion_name,
                  paired=paired, drawn=drawn)


def served_model(destination: str, cache_dir: Path) -> tuple[DigitModel | None, str | None]:
    """The model of the bundle LATEST names at `destination` (a remote one copied into
    `cache_dir`), and how a decision names it; (None, None) where nothing is served there
    yet, or what is cannot be read (a server could not load it either: replacing it can
    only help)."""
    served = current_pointer(destination)
    if served is None:
        return None, None
    try:
        bundle = load_bundle(destination, version=served, cache_dir=cache_dir)
        model = bundle.model()
    except (BundleIntegrityError, ModelFormatError, FileNotFoundError) as exc:
        logger.warning("gate: the bundle %s that LATEST names at %s cannot be read (%s); "
                       "gating as if nothing were served", served, destination, exc)
        return None, None
    return model, (f"the served bundle {served}, model version {bundle.info.model_version} "
                   "of the registry that published it")


def wild_scores(candidate_model: DigitModel, champion_model: DigitModel,
                feedback_store: str, share: float) -> WildScores:
    """Both models on the feedback store's records, as it is now, in the wild buckets of
    `share` (`gate_wild_share`: those neither model trained on)."""
    snapshot = FeedbackSnapshot.of(FeedbackStore.at(feedback_store))
    wild = wild_rows(snapshot.row_hash, share)
    if not wild.any():
        return WildScores(0, 0.0, None, share)
    pixels, labels = snapshot.pixels[wild], snapshot.labels[wild]
    return WildScores(int(wild.sum()), accuracy(candidate_model, pixels, labels),
                      accuracy(champion_model, pixels, labels), share)


_DRAWN_ARRAYS = ("pixels", "labels", "writers")  # DrawnTestSet's fields


def drawn_set(table: PenTable, writers: frozenset[int], cache_dir: Path) -> DrawnTestSet:
    """`drawn_set_of_writers`, kept in `cache_dir` by the trajectories, the writers and the
    drawing code, as a folder written whole and verified when read (its manifest): every
    publication gates on it, and drawing thousands of digits takes seconds."""
    key = content_key(pen=table.meta.sha256, writers=sorted(writers), code=DRAWING_CODE_VERSION)
    folder = cache_dir / "drawn-sets" / key
    if is_whole(folder):
        return DrawnTestSet(**load_arrays(folder, _DRAWN_ARRAYS))
    drawn = drawn_set_of_writers(table, writers)
    save_arrays(folder, {name: getattr(drawn, name) for name in _DRAWN_ARRAYS})
    return drawn


def drawn_scores(candidate_model: DigitModel, champion_model: DigitModel, pen_table: Path,
                 candidate_params: dict[str, str], champion_params: dict[str, str] | None,
                 cache_dir: Path) -> DrawnScores | None:
    """Both models on the pen drawings of the writers neither trained on, as each run's
    recorded spec says (`held_out_writers`). A champion whose run is not in this registry
    (a served bundle from another) is taken to have trained on whatever the candidate did
    not hold out: the comparison can then favour the champion, never the candidate."""
    table = load_pen_table(pen_table)
    writers = sorted(set(table.writers.tolist()))
    held_out = held_out_writers(candidate_params, writers)
    if champion_params is not None:
        held_out &= held_out_writers(champion_params, writers)
    if not held_out:
        return None
    drawn = drawn_set(table, held_out, cache_dir)
    return DrawnScores(len(drawn.labels), len(held_out),
                       accuracy(candidate_model, drawn.pixels, drawn.labels),
                       accuracy(champion_model, drawn.pixels, drawn.labels))
