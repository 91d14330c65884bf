"""Two models' answers to the same rows, side by side (mlpaint.training.evaluation), as the
publish gate and bench.robustness report them."""

import numpy as np
import pytest

from bench.robustness import paired
from mlpaint.training.evaluation import compare_paired


def test_only_the_rows_the_models_disagree_on_count():
    first = np.array([True, True, True, False, False, True])
    second = np.array([True, False, True, True, True, True])
    result = compare_paired(first, second)
    assert (result.right_only_first, result.right_only_second, result.rows) == (1, 2, 6)
    # 1 against 2 is an even split as far as three coin tosses can tell: p = 1
    assert result.p_value == pytest.approx(1.0)
    assert result.summary("the champion", "the candidate") == (
        "3 of 6 digits read differently, 1 right only with the champion and 2 only with "
        "the candidate, sign test p = 1")


def test_a_lopsided_split_is_significant_and_the_test_is_two_sided():
    rows = 1000
    first = np.ones(rows, dtype=bool)
    second = first.copy()
    second[:20] = False  # 20 rows only the first reads right, none the other way
    # P(X = 0 or X = 20) for X ~ Binomial(20, 1/2)
    expected = 2 * 0.5 ** 20
    assert compare_paired(first, second).p_value == pytest.approx(expected)
    assert compare_paired(second, first).p_value == pytest.approx(expected)
    assert paired(second, first)["accuracy_difference"] == pytest.approx(20 / rows)


def test_identical_answers_are_no_difference():
    right = np.array([True, False, True])
    assert compare_paired(right, right).p_value == 1.0


def test_renderings_of_one_digit_count_once():
    """Three digits drawn twice each: digit 0 right twice with the second model and never
    with the first, digit 1 once each way (a tie, dropped), digit 2 the same for both."""
    sources = np.array([0, 1, 2, 0, 1, 2])
    first = np.array([False, True, True, False, False, True])
    second = np.array([True, False, True, True, True, True])
    result = compare_paired(first, second, sources)
    assert (result.right_only_first, result.right_only_second) == (1, 3)  # rows, as they are
    assert (result.digits_better_first, result.digits_better_second) == (0, 1)
    assert result.p_value == pytest.approx(1.0)  # one digit decides nothing
    # counted as rows, the same answers would have looked like a split of 1 against 3
    assert compare_paired(first, second).digits_better_second == 3


def test_answers_to_different_rows_are_refused():
    with pytest.raises(ValueError):
        compare_paired(np.ones(3, bool), np.ones(4, bool))
