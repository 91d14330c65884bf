"""The "not sure" threshold: how it splits answers, and how it is chosen."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlpaint.training.confidence import (
    MAX_MARKED_SHARE,
    THRESHOLD_GRID,
    choose_threshold,
    figures_at,
    top_and_right,
)


def test_top_and_right_reads_the_top_digit_and_its_probability():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    top, right = top_and_right(np.array([1, 2]), probabilities)
    assert top.tolist() == [0.7, 0.5]
    assert right.tolist() == [True, False]


def test_figures_split_at_the_threshold_below_marked_at_or_above_plain():
    top = np.array([0.55, 0.6, 0.9, 0.95])
    right = np.array([False, True, True, False])
    figures = figures_at(top, right, 0.6)
    assert figures.rows == 4
    assert figures.marked_share == 0.25  # only 0.55 is below 0.6
    assert figures.plain_accuracy == pytest.approx(2 / 3)
    assert figures.marked_accuracy == 0.0


def test_an_empty_part_is_nan_and_left_out_of_the_metrics():
    figures = figures_at(np.array([0.9, 0.8]), np.array([True, True]), 0.5)
    assert math.isnan(figures.marked_accuracy)
    assert figures.metrics("drawn") == {"drawn_marked_share": 0.0,
                                        "drawn_plain_accuracy": 1.0}


def _rows(confident_wrong: int, unsure_wrong: int, unsure_right: int, confident_right: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Answers at top probability 0.95 (confident) and 0.7 (unsure)."""
    top = np.repeat([0.95, 0.7, 0.7, 0.95],
                    [confident_wrong, unsure_wrong, unsure_right, confident_right])
    right = np.repeat([False, False, True, True],
                      [confident_wrong, unsure_wrong, unsure_right, confident_right])
    return top, right


def test_the_lowest_threshold_that_meets_the_target_is_chosen():
    # Below 0.71 nothing is marked and 95.5% are right; from 0.71 the 0.7 answers are marked
    # (5%) and the plain ones are 1 - 2/950 right.
    top, right = _rows(confident_wrong=2, unsure_wrong=40, unsure_right=10,
                       confident_right=948)
    choice = choose_threshold(top, right)
    assert choice.target_met
    assert choice.threshold == 0.71
    assert choice.figures.marked_share == pytest.approx(0.05)
    assert choice.figures.plain_accuracy == pytest.approx(948 / 950)
    assert "meets the target" in choice.describe()


def test_a_model_right_often_enough_marks_nothing_at_the_lowest_threshold():
    top, right = _rows(confident_wrong=0, unsure_wrong=0, unsure_right=50, confident_right=950)
    choice = choose_threshold(top, right)
    assert choice.target_met and choice.threshold == THRESHOLD_GRID[0]
    assert choice.figures.marked_share == 0.0


def test_when_the_target_needs_too_many_marked_the_budget_is_spent_and_it_is_said():
    # Marking the 0.7 answers would mark 20%, over the 10% budget: none is marked, and the
    # highest threshold below them (the best plain answers within the budget) is chosen.
    top, right = _rows(confident_wrong=40, unsure_wrong=100, unsure_right=100,
                       confident_right=760)
    choice = choose_threshold(top, right)
    assert not choice.target_met
    assert choice.threshold == 0.7
    assert choice.figures.marked_share <= MAX_MARKED_SHARE
    assert "misses the target" in choice.describe()


def test_a_threshold_needs_rows_to_be_chosen_on():
    with pytest.raises(ValueError, match="no scored drawings"):
        choose_threshold(np.zeros(0), np.zeros(0, bool))


def test_folds_without_held_out_drawings_choose_no_threshold(tmp_path):
    """A fold of a spec without pen renderings scores the drawn test set but holds out no
    writer's drawings: it stored `drawn` rows only, and choosing the threshold on the folds'
    held-out drawings finds none to choose on (the final model keeps the spec's)."""
    from mlpaint.training.fits import read_confidence_rows

    path = tmp_path / "confidence_rows.npz"
    assert read_confidence_rows(path, "heldout")[0].size == 0  # no file at all
    np.savez(path, drawn_top=np.array([0.9, 0.6]), drawn_right=np.array([True, False]))
    top, right = read_confidence_rows(path, "drawn")
    assert top.tolist() == [0.9, 0.6] and right.tolist() == [True, False]
    top, right = read_confidence_rows(path, "heldout")
    assert top.size == 0 and right.size == 0 and right.dtype == bool
