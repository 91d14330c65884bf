"""bench.robustness's digit-by-digit comparison of two models on tiny arrays."""

import numpy as np
import pytest

from bench.robustness import paired


def test_only_the_rows_the_models_disagree_on_count():
    first = np.array([True, True, True, False, False, True])
    other = np.array([True, False, True, True, True, True])
    result = paired(first, other)
    assert (result["only_first"], result["only_other"], result["rows"]) == (1, 2, 6)
    assert result["accuracy_difference"] == pytest.approx(1 / 6)
    # 1 against 2 is an even split as far as three coin tosses can tell: p = 1
    assert result["p_value"] == pytest.approx(1.0)


def test_a_lopsided_split_is_significant_and_the_test_is_two_sided():
    rows = 1000
    first = np.ones(rows, dtype=bool)
    other = first.copy()
    other[:20] = False  # 20 rows only the first reads right, none the other way
    # P(X = 0 or X = 20) for X ~ Binomial(20, 1/2)
    expected = 2 * 0.5 ** 20
    assert paired(first, other)["p_value"] == pytest.approx(expected)
    assert paired(other, first)["p_value"] == pytest.approx(expected)
    assert paired(other, first)["accuracy_difference"] == pytest.approx(20 / rows)


def test_identical_answers_are_no_difference():
    right = np.array([True, False, True])
    assert paired(right, right)["p_value"] == 1.0


def test_renderings_of_one_digit_count_once():
    """Three digits drawn twice each: digit 0 right twice with the other model and never
    with the first, digit 1 once each way (a tie, dropped), digit 2 the same for both."""
    sources = np.array([0, 1, 2, 0, 1, 2])
    first = np.array([False, True, True, False, False, True])
    other = np.array([True, False, True, True, True, True])
    result = paired(first, other, sources)
    assert (result["only_first"], result["only_other"]) == (1, 3)  # rows, as they are
    assert (result["digits_better_with_first"], result["digits_better_with_other"]) == (0, 1)
    assert result["p_value"] == pytest.approx(1.0)  # one digit decides nothing
    # counted as rows, the same answers would have looked like a split of 1 against 3
    assert paired(first, other)["digits_better_with_other"] == 3
