"""When an answer says "not sure": the top probability below which a model's answer is
marked `low_confidence`, chosen for each model on drawings by writers it did not train on.

A fixed threshold means something different for every model: a model trained longer or on
other rows spreads its probabilities otherwise. So each training run chooses its own on the
folds' held-out writers' pen drawings and their augmented copies (never on the drawn test
set, which measures the choice, nor on the official test set) and records it on the final
model's card, which the server reads. A fold holds out a few writers, and their renderings
alone can be read far better than other people's (a fold's five writers 99.4% where the
drawn test set's six were 97.4%): a threshold chosen on them alone marked almost nothing
and left plain answers 98% right. The copies, moved and distorted, are harder than any
writer and make the choice err on the side of marking more, as do the fold models, trained
on fewer rows and writers than the final model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The threshold of a model trained without pen drawings to choose one on. Below it the model
#: is torn, most often between two digits that share strokes (4/9, 3/5, 1/7), and the page
#: then names both candidates: saying so beats a confident-looking wrong answer.
DEFAULT_LOW_CONFIDENCE_BELOW = 0.6
#: Plain (unmarked) answers should be right this often ...
PLAIN_ACCURACY_TARGET = 0.99
#: ... while marking no more than this share of all answers.
MAX_MARKED_SHARE = 0.10
# Candidate thresholds, coarse so that a few rows cannot tune it finely: below one half the
# top digit would not even be the likelier of "it" and "any other".
THRESHOLD_GRID = tuple(round(0.5 + 0.01 * step, 2) for step in range(50))


@dataclass(frozen=True)
class ConfidenceFigures:
    """How a threshold splits scored drawings: the share marked, and how often the plain
    and the marked answers are right (NaN for a part with no answers)."""

    threshold: float
    rows: int
    marked_share: float
    plain_accuracy: float
    marked_accuracy: float

    def metrics(self, prefix: str) -> dict[str, float]:
        """The figures as flat metrics, the NaN of an empty part left out."""
        values = {"marked_share": self.marked_share, "plain_accuracy": self.plain_accuracy,
                  "marked_accuracy": self.marked_accuracy}
        return {f"{prefix}_{name}": value for name, value in values.items()
                if not np.isnan(value)}


def top_and_right(labels: np.ndarray, probabilities: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the top probability, and whether the top digit is the label."""
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == labels


def figures_at(top: np.ndarray, right: np.ndarray, threshold: float) -> ConfidenceFigures:
    """`top` and `right` as `top_and_right` gives them, split at `threshold`."""
    marked = top < threshold

    def share_right(part: np.ndarray) -> float:
        return float(right[part].mean()) if part.any() else float("nan")

    return ConfidenceFigures(threshold, int(top.size),
                             float(marked.mean()) if top.size else float("nan"),
                             share_right(~marked), share_right(marked))


@dataclass(frozen=True)
class ConfidenceChoice:
    """The threshold chosen, its figures on the rows it was chosen on, and whether those
    met the targets."""

    figures: ConfidenceFigures
    target_met: bool

    @property
    def threshold(self) -> float:
        return self.figures.threshold

    def describe(self) -> str:
        f = self.figures
        verdict = ("meets" if self.target_met else "misses") + (
            f" the target (plain answers at least {PLAIN_ACCURACY_TARGET:.0%} right, at most "
            f"{MAX_MARKED_SHARE:.0%} marked)")
        return (f"below {f.threshold:.2f}: on {f.rows} drawings of the folds' held-out "
                f"writers and their copies, {f.marked_share:.1%} marked, plain answers "
                f"{f.plain_accuracy:.2%} right; {verdict}")


def choose_threshold(top: np.ndarray, right: np.ndarray, *,
                     plain_target: float = PLAIN_ACCURACY_TARGET,
                     max_marked: float = MAX_MARKED_SHARE) -> ConfidenceChoice:
    """The lowest grid threshold at which plain answers are `plain_target` right while at
    most `max_marked` are marked (the fewest answers marked for that); when none reaches
    it, the highest that marks no more than `max_marked` (the best plain answers within the
    budget), or the lowest of the grid if even that marks more."""
    if not top.size:
        raise ValueError("no scored drawings to choose a threshold on")
    within = []
    for threshold in THRESHOLD_GRID:
        figures = figures_at(top, right, threshold)
        if figures.marked_share > max_marked:
            break
        if figures.plain_accuracy >= plain_target:
            return ConfidenceChoice(figures, target_met=True)
        within.append(figures)
    return ConfidenceChoice(within[-1] if within else figures_at(top, right, THRESHOLD_GRID[0]),
                            target_met=False)
