"""The gate: a candidate against the champion on the official test set (within a margin),
the wild set (feedback neither trained on) and the drawn test set (pen writers neither
trained on); its decision and the reason that names the numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlpaint.data.pendigits import drawn_test_writers
from mlpaint.tracking.publication import CHALLENGER, CHAMPION
from mlpaint.training.algorithms import DigitModel
from mlpaint.training.evaluation import PairedComparison, evaluate, predicted_labels


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
    """The share of feedback records, by row hash (`mlpaint.feedback.store.wild_rows`), that a
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
