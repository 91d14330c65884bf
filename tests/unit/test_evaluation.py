"""The statistics against confusion matrices worked out by hand."""

import math

import numpy as np
import pytest

from mlpaint.training.evaluation import aggregate, evaluate, predicted_labels


def _one_hot(predicted, n_classes=3):
    probabilities = np.full((len(predicted), n_classes), 0.1)
    probabilities[np.arange(len(predicted)), predicted] = 0.8
    return probabilities


def test_three_class_example_by_hand():
    # actual:    0 0 0 1 1 2
    # predicted: 0 0 1 1 2 2
    # confusion[actual][predicted] = [[2,1,0],[0,1,1],[0,0,1]]
    actual = np.array([0, 0, 0, 1, 1, 2])
    result = evaluate(actual, _one_hot([0, 0, 1, 1, 2, 2]))
    assert result.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert result.accuracy == pytest.approx(4 / 6)
    zero, one, two = result.labels
    # label 0: tp=2 fp=0 fn=1 tn=3
    assert (zero.precision, zero.recall, zero.accuracy) == (1.0, pytest.approx(2 / 3),
                                                            pytest.approx(5 / 6))
    assert zero.f1 == pytest.approx(0.8)
    # label 1: tp=1 fp=1 fn=1 tn=3
    assert (one.precision, one.recall, one.accuracy) == (0.5, 0.5, pytest.approx(4 / 6))
    # label 2: tp=1 fp=1 fn=0 tn=4
    assert (two.precision, two.recall, two.f1) == (0.5, 1.0, pytest.approx(2 / 3))
    assert [s.support for s in result.labels] == [3, 2, 1]
    # weighted recall is plain accuracy; weighted accuracy as MLDB's notebook printed it
    assert result.weighted["recall"] == pytest.approx(result.accuracy)
    assert result.weighted["accuracy"] == pytest.approx((3 * 5 / 6 + 2 * 4 / 6 + 1 * 5 / 6) / 6)
    assert result.log_loss == pytest.approx(-math.log(0.8 / 1.0) * 4 / 6 - math.log(0.1) * 2 / 6)
    assert {"predicted": 1, "actual": 0, "count": 1} in result.sparse_confusion()
    assert len(result.sparse_confusion()) == 5


def test_label_never_predicted_and_never_present():
    actual = np.array([0, 0, 1])
    result = evaluate(actual, _one_hot([0, 0, 0]))  # 1 and 2 never predicted; 2 never occurs
    one, two = result.labels[1], result.labels[2]
    assert (one.precision, one.recall, one.f1, one.support) == (0.0, 0.0, 0.0, 1)
    assert (two.precision, two.recall, two.f1, two.support) == (0.0, 0.0, 0.0, 0)
    assert two.accuracy == 1.0  # every row is a true negative for label 2
    assert all(math.isfinite(v) for v in result.weighted.values())


def test_ties_go_to_the_lowest_label():
    probabilities = np.array([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45]])
    assert predicted_labels(probabilities).tolist() == [0, 1]


def test_log_loss_is_finite_for_a_zero_probability():
    result = evaluate(np.array([1]), np.array([[1.0, 0.0, 0.0]]))
    assert math.isfinite(result.log_loss) and result.log_loss > 30


def test_aggregate_over_folds():
    first = evaluate(np.array([0, 1]), _one_hot([0, 1]))
    second = evaluate(np.array([0, 1]), _one_hot([0, 0]))
    stats = aggregate([first, second])["accuracy"]
    assert (stats.min, stats.max, stats.mean, stats.std) == (0.5, 1.0, 0.75, 0.25)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="no rows"):
        evaluate(np.array([], dtype=int), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="do not match"):
        evaluate(np.array([0, 1]), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="actual labels outside"):
        evaluate(np.array([5]), np.zeros((1, 3)))


def test_confusion_heatmap_colours_counts_on_a_log_scale_and_leaves_zeros_white(tmp_path):
    from PIL import Image

    from mlpaint.tracking.runs import (
        _CELL,
        _LEFT_BAND,
        _TITLE_BAND,
        render_confusion_heatmap,
        viridis,
    )

    actual = np.array([0] * 100 + [1] * 10 + [1] + [2])
    predicted = np.array([0] * 100 + [1] * 10 + [0] + [2])
    evaluation = evaluate(actual, _one_hot(predicted, n_classes=10))
    heatmap = render_confusion_heatmap(evaluation, tmp_path / "confusion.png", "fold 1")
    drawn = np.asarray(Image.open(heatmap).convert("RGB"))

    def fill(actual_label: int, predicted_label: int) -> np.ndarray:
        # Inside the cell's corner, clear of the count drawn at its centre.
        return drawn[_TITLE_BAND + actual_label * _CELL + 2,
                     _LEFT_BAND + predicted_label * _CELL + 2]

    assert (fill(0, 0) == viridis(1.0)).all()  # the largest count tops the scale
    assert (fill(1, 1) == viridis(0.5)).all()  # 10 of 100: half way up, on a log scale
    assert (fill(1, 0) == viridis(0.0)).all() and (fill(2, 2) == viridis(0.0)).all()  # 1
    assert (fill(0, 1) == 255).all() and (fill(9, 9) == 255).all()  # no count: white
    assert not np.array_equal(fill(0, 0), fill(1, 1))
