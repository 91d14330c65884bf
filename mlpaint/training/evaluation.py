"""One evaluation function for every fold, the final model and the publish gate.

It reproduces MLDB's `classifier.experiment` categorical statistics: per label, one-vs-rest
accuracy (tp+tn)/N, precision, recall, F1 and support; `weightedStatistics` as the
support-weighted means (so weighted recall equals plain accuracy); the confusion matrix in
MLDB's sparse form and as a dense matrix; and aggregates over folds as min/max/mean/std.
`compare_paired` sets two models' answers to the same rows side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mlpaint.data.pins import N_CLASSES

LOG_LOSS_EPS = 1e-15


@dataclass(frozen=True)
class LabelStatistics:
    label: int
    accuracy: float  # one-vs-rest: (tp + tn) / N
    precision: float  # 0.0 when the label is never predicted
    recall: float  # 0.0 when the label never occurs
    f1: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    rows: int
    accuracy: float
    log_loss: float
    labels: list[LabelStatistics]
    weighted: dict[str, float]  # accuracy, precision, recall, f1: support-weighted means
    confusion: list[list[int]]  # confusion[actual][predicted]

    def sparse_confusion(self) -> list[dict[str, int]]:
        """MLDB's form: one entry per non-empty cell."""
        return [{"predicted": p, "actual": a, "count": count}
                for a, row in enumerate(self.confusion) for p, count in enumerate(row) if count]

    def scalar_metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: accuracy, log_loss, weighted_*, and per-label f1."""
        metrics = {"accuracy": self.accuracy, "log_loss": self.log_loss}
        metrics.update({f"weighted_{name}": value for name, value in self.weighted.items()})
        metrics.update({f"label_{s.label}_f1": s.f1 for s in self.labels})
        return metrics

    def to_json(self) -> dict:
        data = asdict(self)
        data["sparse_confusion"] = self.sparse_confusion()
        return data


def predicted_labels(probabilities: np.ndarray) -> np.ndarray:
    """Argmax over classes; a tie goes to the lowest label, deterministically."""
    return np.argmax(probabilities, axis=1)


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray,
                     n_classes: int = N_CLASSES) -> np.ndarray:
    if actual.shape != predicted.shape:
        raise ValueError(f"{actual.shape[0]} actual labels vs {predicted.shape[0]} predictions")
    for name, values in (("actual", actual), ("predicted", predicted)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} labels outside 0..{n_classes - 1}")
    cells = actual.astype(np.int64) * n_classes + predicted.astype(np.int64)
    return np.bincount(cells, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def evaluate(actual: np.ndarray, probabilities: np.ndarray) -> Evaluation:
    """Statistics of class probabilities (rows x classes) against the true labels."""
    actual = np.asarray(actual)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != actual.shape[0]:
        raise ValueError(f"probabilities {probabilities.shape} do not match "
                         f"{actual.shape[0]} labels")
    if actual.size == 0:
        raise ValueError("nothing to evaluate: no rows")
    n_classes = probabilities.shape[1]
    matrix = confusion_matrix(actual, predicted_labels(probabilities), n_classes)
    total = int(matrix.sum())
    true_positive = np.diag(matrix)
    predicted_count = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    per_label = []
    for label in range(n_classes):
        tp = int(true_positive[label])
        fp = int(predicted_count[label]) - tp
        fn = int(support[label]) - tp
        tn = total - tp - fp - fn
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        per_label.append(LabelStatistics(
            label=label, accuracy=_ratio(tp + tn, total), precision=precision, recall=recall,
            f1=_ratio(2 * precision * recall, precision + recall), support=int(support[label])))
    weights = support / total
    weighted = {name: float(sum(w * getattr(s, name) for w, s in zip(weights, per_label,
                                                                      strict=True)))
                for name in ("accuracy", "precision", "recall", "f1")}
    chosen = np.clip(probabilities[np.arange(total), actual], LOG_LOSS_EPS, 1.0)
    return Evaluation(rows=total, accuracy=_ratio(int(true_positive.sum()), total),
                      log_loss=float(-np.mean(np.log(chosen))), labels=per_label,
                      weighted=weighted, confusion=matrix.tolist())


@dataclass(frozen=True)
class Aggregate:
    min: float
    max: float
    mean: float
    std: float  # population std over folds, 0.0 for a single fold


def aggregate(evaluations: Sequence[Evaluation]) -> dict[str, Aggregate]:
    """MLDB's `aggregatedTest`: each scalar metric's min, max, mean and std over folds."""
    if not evaluations:
        raise ValueError("no fold evaluations to aggregate")
    per_metric: dict[str, list[float]] = {}
    for evaluation in evaluations:
        for name, value in evaluation.scalar_metrics().items():
            per_metric.setdefault(name, []).append(value)
    return {name: Aggregate(min(values), max(values), float(np.mean(values)),
                            float(np.std(values)))
            for name, values in per_metric.items()}


@dataclass(frozen=True)
class PairedComparison:
    """Two models' answers to the same rows. Only the rows they disagree on say which is
    better; `p_value` is the exact two-sided sign test (McNemar's) of that split."""

    rows: int
    right_only_first: int
    right_only_second: int
    # The test's trials: digits, each going to the model that reads more of its rows right
    # (one row per digit unless the rows are several renderings of the same digits).
    digits_better_first: int
    digits_better_second: int
    p_value: float

    def summary(self, first: str, second: str) -> str:
        return (f"{self.right_only_first + self.right_only_second} of {self.rows} digits "
                f"read differently, {self.right_only_first} right only with {first} and "
                f"{self.right_only_second} only with {second}, sign test p = "
                f"{self.p_value:.2g}")


def compare_paired(first_right: np.ndarray, second_right: np.ndarray,
                   sources: np.ndarray | None = None) -> PairedComparison:
    """Side by side, whether each of two models read each row right. Renderings of one digit
    (`sources`: the digit each row shows, 0..digits-1) are not independent trials, so the
    test counts digits, not rows, and drops the digits both models read equally well."""
    from scipy.stats import binomtest

    first_right, second_right = np.asarray(first_right, bool), np.asarray(second_right, bool)
    if first_right.shape != second_right.shape:
        raise ValueError(f"{first_right.shape} answers against {second_right.shape}")
    if sources is None:
        sources = np.arange(len(first_right))
    margin = np.bincount(sources, weights=second_right.astype(float) - first_right)
    better_first, better_second = int((margin < 0).sum()), int((margin > 0).sum())
    trials = better_first + better_second
    return PairedComparison(
        rows=len(first_right), right_only_first=int((first_right & ~second_right).sum()),
        right_only_second=int((second_right & ~first_right).sum()),
        digits_better_first=better_first, digits_better_second=better_second,
        p_value=float(binomtest(better_first, trials).pvalue) if trials else 1.0)
