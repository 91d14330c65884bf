"""Model behaviour: the drawing styles MNIST's writers rarely use, read by a small model
trained as mlpaint trains (MNIST plus the training writers' pen drawings), against the same
model trained on MNIST alone.

The styles, drawn as trajectories on the tablet and rendered 40 times each as people draw on
the page: a 1 with a lead-in stroke (the continental 1), which MNIST's American writers
almost never draw and a model of MNIST alone reads as a 7; a 9 drawn as a small loop with a
long tail curving left, which it reads as a 3; and 7s with a crossbar or a curved stem. The
model that saw pen drawings reads at least 90% of each style right, and the continental 1
and the looped 9 clearly better than the model of MNIST alone: the pen drawings are what
teaches them, which is why the training flow draws them."""

import numpy as np
import pytest

from mlpaint.data.dataset import table_from_files
from mlpaint.data.fetch import FetchContext, fetch_dataset
from mlpaint.data.integrity import BlobCache, Pins
from mlpaint.data.pendigits import read_pen_file
from mlpaint.images.augment import AugmentSpec
from mlpaint.images.drawing import PenStyle, drawn_digit
from mlpaint.model.features import FeatureStage, apply_feature_stage
from mlpaint.training.algorithms import GbdtConfig, train_model
from mlpaint.training.pen import draw_pen_digits
from mlpaint.training.spec import PenSpec

pytestmark = pytest.mark.model

MNIST_ROWS = 8000
RENDERINGS = 40
SMALL_MODEL = GbdtConfig(rounds=60, params={"learning_rate": 0.3, "num_leaves": 15,
                                            "min_data_in_leaf": 10, "lambda_l2": 1.0,
                                            "max_bin": 63})
# Tablet coordinates (0..500, y up), as UCI's tablet recorded pens.
STYLES = {
    "continental 1": (1, [np.array([[150, 300], [250, 420], [250, 50]])]),
    "looped 9": (9, [np.array([[260, 380], [200, 420], [150, 380], [160, 320], [220, 300],
                               [260, 340], [260, 380], [255, 250], [230, 130], [180, 60],
                               [120, 50]])]),
    "crossbar 7": (7, [np.array([[100, 400], [300, 400], [200, 50]]),
                       np.array([[160, 230], [290, 230]])]),
    "curved-stem 7": (7, [np.array([[100, 400], [300, 400], [260, 320], [215, 220],
                                    [190, 130], [185, 50]])]),
}


def _fit(pixels: np.ndarray, labels: np.ndarray):
    return train_model("lgbm", SMALL_MODEL, apply_feature_stage(FeatureStage.MOMENTS, pixels),
                       labels, feature_stage=FeatureStage.MOMENTS, seed=0, num_threads=2)


@pytest.fixture(scope="module")
def models(shared_mnist, shared_pendigits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("styles-cache")
    fetched = fetch_dataset([str(shared_mnist)], FetchContext(Pins(), BlobCache(cache)))
    train = table_from_files(fetched[next(s for s in fetched if s.value == "train")])
    pixels, labels = np.asarray(train.pixels[:MNIST_ROWS]), train.labels[:MNIST_ROWS]
    pen = read_pen_file(shared_pendigits, origin="shared", sha256="", verified=False)
    drawings = draw_pen_digits(pen, PenSpec(renderings=1), AugmentSpec(copies=0), seed=0)
    with_pen = _fit(np.concatenate([pixels, drawings.train_pixels]),
                    np.concatenate([labels, pen.labels[drawings.train_source]]))
    return {"mnist alone": _fit(pixels, labels), "with pen drawings": with_pen}


def _read_right(model, label: int, strokes) -> float:
    rng = np.random.default_rng(label)
    pixels = np.stack([drawn_digit(strokes, PenStyle(), rng).reshape(-1)
                       for _ in range(RENDERINGS)])
    return float((model.predict_pixels(pixels).argmax(axis=1) == label).mean())


@pytest.mark.parametrize("style", list(STYLES))
def test_a_model_that_saw_pen_drawings_reads_the_style(models, style):
    label, strokes = STYLES[style]
    assert _read_right(models["with pen drawings"], label, strokes) >= 0.9


@pytest.mark.parametrize("style", ["continental 1", "looped 9"])
def test_pen_drawings_are_what_teaches_the_styles_mnist_lacks(models, style):
    label, strokes = STYLES[style]
    alone = _read_right(models["mnist alone"], label, strokes)
    with_pen = _read_right(models["with pen drawings"], label, strokes)
    assert with_pen >= alone + 0.2, (alone, with_pen)
