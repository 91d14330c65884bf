"""Drawing-robustness benchmark: MNIST's official test digits redrawn as people draw them on
the page, sent through the app's image path, scored by each model.

    .venv/bin/python -m bench.robustness --bundle old=/tmp/bundles-old \\
        --bundle new=.mlpaint/bundles --digits 2000

Each chosen test digit (a seeded sample) is thinned to its centre line and redrawn on a
280x280 white canvas with a round black pen, in each variation:

| variation | pen | digit height | tilt | where |
|---|---|---|---|---|
| plain | 18 px (the page's pen) | 190-230 px | none | centred |
| thin | 6-9 px | 190-230 px | none | centred |
| thick | 28-36 px | 190-230 px | none | centred |
| tilted | 18 px | 170-210 px | ±(8-20)° | centred |
| small | 12-18 px | 60-90 px | none | anywhere |
| large | 18-24 px | 250-270 px | none | centred |
| off-centre | 18 px | 110-150 px | none | against an edge or a corner |

The pen is drawn as PIL lines and discs along the centre line at twice the canvas size and
shrunk with a box filter (the browser's canvas anti-aliases its strokes the same way); the
PNG goes through `mlpaint.serving.drawings.decode_image`, the function `/v1/predict` decodes an
image with (the drawing preprocessing and the "nothing drawn" check), then the bundle's
feature stage and model, as the server runs them. These images are generated here, seeded,
and never used for training; the training augmentation ("as drawn" in mlpaint/images/augment.py)
redraws digits too, but with a distance-transform pen at 84x84, not this renderer.

`bare` rows score the first bundle's model without the app's drawing preprocessing: the
canvas shrunk to 28x28 as it is, inverted, then the model's feature stage and model.

A second table scores real handwriting that is not MNIST's: the 1,797 digits of UCI's
"Optical Recognition of Handwritten Digits" set that scikit-learn ships
(`sklearn.datasets.load_digits`: written by other people than MNIST's, scanned as 32x32
bitmaps, stored as 8x8 counts of ink), each enlarged to a 280x280 canvas dark on white two
ways: as blocks (nearest) and smoothed (bilinear). They go through the same image path.

A third table scores the drawn test set: the digits of the pen writers that no model trains
on (`mlpaint.images.drawing.drawn_test_set`'s writers, seed and style), each drawn on the page's
canvas by `mlpaint.images.drawing.draw_on_canvas` (the function training draws with), saved as PNG
and sent through the same image path: overall, per digit, per writer and the worst writer,
and how the model's own "not sure" threshold (its card's `low_confidence_below`) splits it.

With two or more bundles, a further table compares each later bundle with the first digit by
digit, on three sets: MNIST's whole official test set (through the bundle's feature stage, as
the publishing gate scores it), the redrawn canvases and UCI's digits. Two models'
accuracies can differ by a few digits in 10,000 and mean nothing; this says whether they do.
It counts the digits only the first bundle reads right and those only the other does, with
the exact two-sided sign test (McNemar's) of that split (`mlpaint.training.evaluation.
compare_paired`, which the publish gate reports too): a p-value of 0.5 or so is no
difference at all, one under 0.05 a difference that rarely comes from chance. A digit's
renderings (7 redrawn variations, UCI's two enlargements) are not independent trials, so
there the test counts digits: each goes to the model that reads more of its renderings right.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlpaint.training.confidence import DEFAULT_LOW_CONFIDENCE_BELOW

REPO = Path(__file__).resolve().parents[1]
CANVAS = 280
SUPERSAMPLE = 2
logger = logging.getLogger("bench.robustness")


@dataclass(frozen=True)
class Variation:
    name: str
    pen: tuple[float, float]
    height: tuple[float, float]
    tilt: tuple[float, float] = (0.0, 0.0)  # degrees, either sign
    anywhere: bool = False
    to_edge: bool = False


VARIATIONS = (
    Variation("plain", (18, 18), (190, 230)),
    Variation("thin", (6, 9), (190, 230)),
    Variation("thick", (28, 36), (190, 230)),
    Variation("tilted", (18, 18), (170, 210), tilt=(8, 20)),
    Variation("small", (12, 18), (60, 90), anywhere=True),
    Variation("large", (18, 24), (250, 270)),
    Variation("off-centre", (18, 18), (110, 150), to_edge=True),
)


def centre_line(digit: np.ndarray) -> np.ndarray:
    """(k, 2) row/col points of the digit's centre line, in 28x28 pixel units."""
    from PIL import Image
    from skimage.morphology import skeletonize

    scale = 4
    large = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale),
                                                     Image.Resampling.BILINEAR)) / 255.0
    return np.argwhere(skeletonize(large > 0.4)) / scale


def draw_canvas(points: np.ndarray, variation: Variation, rng: np.random.Generator) -> bytes:
    """The digit's centre line drawn with a round pen on a white canvas, as PNG bytes."""
    from PIL import Image, ImageDraw

    pen = rng.uniform(*variation.pen)
    height = rng.uniform(*variation.height)
    tilt = np.deg2rad(rng.uniform(*variation.tilt) * rng.choice([-1, 1]))
    centred = points - (points.min(axis=0) + points.max(axis=0)) / 2
    span = max(np.ptp(points[:, 0]), 1.0)
    xy = centred[:, ::-1] * (height / span)  # (x, y) canvas units about the centre
    rotation = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    xy = xy @ rotation.T
    margin = pen / 2 + 2
    low, high = xy.min(axis=0), xy.max(axis=0)
    room_low, room_high = margin - low, CANVAS - margin - high  # where the centre may go
    if variation.anywhere:
        centre = rng.uniform(room_low, np.maximum(room_low, room_high))
    elif variation.to_edge:
        corner = rng.integers(0, 3, 2)  # per axis: low edge, middle or high edge
        corner[rng.integers(0, 2)] = rng.choice([0, 2])  # at least one axis at an edge
        centre = np.where(corner == 0, room_low, np.where(corner == 2, room_high,
                                                          CANVAS / 2))
    else:
        centre = np.full(2, CANVAS / 2)
    xy = (xy + centre) * SUPERSAMPLE
    width = pen * SUPERSAMPLE
    image = Image.new("L", (CANVAS * SUPERSAMPLE, CANVAS * SUPERSAMPLE), 255)
    draw = ImageDraw.Draw(image)
    # Neighbouring centre-line points are joined by pen strokes; a disc at each point gives
    # the round caps and joins of the page's pen.
    index = {tuple(p): i for i, p in enumerate(np.rint(points * 4).astype(int))}
    for (r, c), i in index.items():
        for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
            j = index.get((r + dr, c + dc))
            if j is not None:
                draw.line([tuple(xy[i]), tuple(xy[j])], fill=0, width=round(width))
        x, y = xy[i]
        draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=0)
    canvas = image.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def bare_pixels(png: bytes) -> np.ndarray:
    """The canvas shrunk to 28x28 as it is and inverted: no cropping, scaling or centring."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        small = image.convert("L").resize((28, 28), Image.Resampling.BOX)
    return (255 - np.asarray(small, dtype=np.uint8)).reshape(784)


def _official_test_set(mnist: Path) -> tuple[np.ndarray, np.ndarray]:
    from bench.train import _read_idx

    return (_read_idx(mnist / "t10k-images-idx3-ubyte.gz"),
            _read_idx(mnist / "t10k-labels-idx1-ubyte.gz"))


def generate(images: np.ndarray, chosen: np.ndarray, seed: int) -> dict[str, list[bytes]]:
    """PNG canvases per variation, for the chosen test rows."""
    lines = [centre_line(images[i]) for i in chosen]
    canvases = {}
    for number, variation in enumerate(VARIATIONS):
        rng = np.random.default_rng([seed, number])
        canvases[variation.name] = [draw_canvas(points, variation, rng) for points in lines]
    return canvases


REAL_SETS = {"uci-blocks": "NEAREST", "uci-smooth": "BILINEAR"}


def real_handwriting() -> tuple[dict[str, list[bytes]], np.ndarray]:
    """PNG canvases of UCI's handwritten digits (see the module's docstring), per
    enlargement, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = (255 - digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # 0..16 counts
    canvases = {}
    for name, resampling in REAL_SETS.items():
        canvases[name] = []
        for image in ink:
            buffer = io.BytesIO()
            Image.fromarray(image).resize((CANVAS, CANVAS), Image.Resampling[resampling]).save(
                buffer, format="PNG")
            canvases[name].append(buffer.getvalue())
    return canvases, digits.target


def pen_table(pen: Path | None):
    """The pen trajectories at `pen` (UNIPEN text), or, when it is None or no file, the copy
    mlpaint ships."""
    from mlpaint.data.pendigits import PenTable, packaged_pen_copy, parse_unipen

    text = (pen.read_text() if pen is not None and pen.is_file()
            else gzip.decompress(packaged_pen_copy().read_bytes()).decode("ascii"))
    origin = str(pen) if pen is not None else "packaged"
    return PenTable.from_digits(parse_unipen(text.splitlines(), origin), origin=origin,
                                sha256="", verified=False)


def pen_canvases(table, rows: np.ndarray, seed: int) -> list[bytes]:
    """PNG canvases of `table`'s pen trajectories at `rows`, each drawn as the page draws a
    stroke, in the drawn test set's pen style, rendered with `seed`."""
    from mlpaint.images.drawing import DRAWN_TEST_STYLE, draw_on_canvas, rendering_rng

    keys = table.row_keys
    pngs = []
    for row in rows.tolist():
        canvas = draw_on_canvas(table.strokes(row), DRAWN_TEST_STYLE,
                                rendering_rng(seed, 0, keys[row]))
        buffer = io.BytesIO()
        canvas.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def drawn_test_canvases(pen: Path, test_share: float = 0.2
                        ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """PNG canvases of the drawn test set (see the module's docstring), their labels and
    writers, from the pen trajectories at `pen` (UNIPEN text, or the copy mlpaint ships)."""
    from mlpaint.images.drawing import DRAWN_TEST_SEED, drawn_test_rows

    table = pen_table(pen)
    rows = drawn_test_rows(table, test_share)
    return pen_canvases(table, rows, DRAWN_TEST_SEED), table.labels[rows], table.writers[rows]


def decode_canvases(pngs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 784) uint8 digits and whether each held a drawing, through the function the
    server decodes an uploaded image with."""
    from mlpaint.serving.drawings import decode_image

    decoded = [decode_image(data_url(png)) for png in pngs]
    return (np.stack([digit.reshape(784) for digit, _ in decoded]),
            np.array([was_drawn for _, was_drawn in decoded]))


def score_bundle(served, canvases: dict[str, list[bytes]], labels: np.ndarray,
                 *, bare: bool = False,
                 right: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Accuracy per set of canvases and overall, for a loaded `ServedModel`; `right`, when
    given, receives whether each canvas was read right, per set."""
    results = {}
    for name, pngs in canvases.items():
        if bare:
            pixels = np.stack([bare_pixels(png) for png in pngs])
            drawn = np.ones(len(pngs), dtype=bool)
        else:
            pixels, drawn = decode_canvases(pngs)
        _, probabilities = served.score(served.features(pixels))
        results[name] = summarise(probabilities, labels, drawn, len(pngs),
                                  served.model.low_confidence_below)
        if right is not None:
            right[name] = (probabilities.argmax(axis=1) == labels) & drawn
    rows = sum(r["rows"] for r in results.values())
    results["overall"] = {"accuracy": sum(r["accuracy"] * r["rows"] for r in results.values())
                          / rows, "rows": rows}
    return results


def paired(first_right: np.ndarray, other_right: np.ndarray,
           sources: np.ndarray | None = None) -> dict:
    """`compare_paired` of the first model against another, with the accuracy difference."""
    from mlpaint.training.evaluation import compare_paired

    comparison = compare_paired(first_right, other_right, sources)
    return {**asdict(comparison), "accuracy_difference":
            (comparison.right_only_second - comparison.right_only_first) / comparison.rows}


def _paired_markdown(first: str, comparisons: dict[str, dict[str, dict]]) -> str:
    lines = [f"| model against {first} | set | rows | right only with {first} | "
             "right only with the model | difference | digits better with each | "
             "sign test p |", "|---|---|---|---|---|---|---|---|"]
    for model, sets in comparisons.items():
        for name, c in sets.items():
            lines.append(f"| {model} | {name} | {c['rows']} | {c['right_only_first']} | "
                         f"{c['right_only_second']} | "
                         f"{100 * c['accuracy_difference']:+.2f} points | "
                         f"{c['digits_better_first']} : {c['digits_better_second']} | "
                         f"{c['p_value']:.3g} |")
    return "\n".join(lines)


def summarise(probabilities: np.ndarray, labels: np.ndarray, drawn: np.ndarray,
              rows: int, low_confidence_below: float = DEFAULT_LOW_CONFIDENCE_BELOW) -> dict:
    """Accuracy (a "nothing drawn" answer counts as wrong), and how often answers below and
    above the model's low-confidence line are right."""
    predicted = probabilities.argmax(axis=1)
    right = (predicted == labels) & drawn
    confident = probabilities.max(axis=1) >= low_confidence_below
    return {
        "accuracy": float(right.mean()), "rows": rows, "nothing_drawn": int((~drawn).sum()),
        "low_confidence_below": low_confidence_below,
        "low_confidence_share": float((~confident & drawn).mean()),
        "accuracy_when_confident": float(right[confident].mean()) if confident.any() else None,
        "accuracy_when_low_confidence": float(right[~confident].mean())
        if (~confident).any() else None,
        "per_digit": {int(d): float(right[labels == d].mean()) for d in range(10)},
    }


def _markdown(report: dict[str, dict[str, dict]], names: list[str]) -> str:
    lines = ["| model | " + " | ".join(names) + " | overall | worst |",
             "|---|" + "---|" * (len(names) + 2)]
    for model, results in report.items():
        cells = [f"{100 * results[n]['accuracy']:.2f}%" for n in names]
        worst = min(names, key=lambda n: results[n]["accuracy"])
        lines.append(f"| {model} | " + " | ".join(cells) +
                     f" | **{100 * results['overall']['accuracy']:.2f}%** | {worst} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", required=True, metavar="NAME=URI",
                        help="a published bundle (folder, s3://, models:/) to score; "
                             "repeatable; the first also gives the bare row")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--pen", type=Path,
                        default=REPO.parent / "shared/data/pendigits/pendigits-orig.tra",
                        help="pen trajectories of the drawn test set (default: ../shared's; "
                             "where that is missing, the copy mlpaint ships)")
    parser.add_argument("--digits", type=int, default=2000,
                        help="official test digits drawn in every variation")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, help="also write the full report here")
    parser.add_argument("--save-examples", type=Path,
                        help="write the first 5 canvases of each variation as PNG files here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    images, labels = _official_test_set(args.mnist)
    chosen = np.sort(np.random.default_rng(args.seed).choice(len(labels), args.digits,
                                                              replace=False))
    canvases = generate(images, chosen, args.seed)
    logger.info("drew %d digits in %d variations", args.digits, len(VARIATIONS))
    if args.save_examples:
        args.save_examples.mkdir(parents=True, exist_ok=True)
        for name, pngs in canvases.items():
            for i, png in enumerate(pngs[:5]):
                (args.save_examples / f"{name}-{i}-label{labels[chosen[i]]}.png").write_bytes(png)
    from mlpaint.serving.model import ServedModel

    report = {}
    # Each bundle is loaded once (8,000 trees flattened and checked) and scores every table.
    models = {name: ServedModel.load(uri)
              for name, uri in (item.partition("=")[::2] for item in args.bundle)}
    # Per model and set, whether each row was read right: for the paired comparison.
    right: dict[str, dict[str, np.ndarray]] = {name: {} for name in models}
    for name, served in models.items():
        report[name] = score_bundle(served, canvases, labels[chosen], right=right[name])
        logger.info("%s: overall %.4f", name, report[name]["overall"]["accuracy"])
        _, probabilities = served.score(served.features(images.reshape(-1, 784)))
        right[name]["official test"] = probabilities.argmax(axis=1) == labels
    first_name, first_model = next(iter(models.items()))
    report[f"bare ({first_name})"] = score_bundle(first_model, canvases, labels[chosen],
                                                  bare=True)
    print(_markdown(report, [v.name for v in VARIATIONS]))
    real, real_labels = real_handwriting()
    real_report = {name: score_bundle(served, real, real_labels, right=right[name])
                   for name, served in models.items()}
    real_report[f"bare ({first_name})"] = score_bundle(first_model, real, real_labels,
                                                       bare=True)
    print("\nReal handwriting, not MNIST (UCI's digits):\n")
    print(_markdown(real_report, list(REAL_SETS)))
    for name, results in real_report.items():
        print(f"{name} per digit ({', '.join(REAL_SETS)}):", {
            digit: [round(results[s]["per_digit"][digit], 3) for s in REAL_SETS]
            for digit in range(10)})
    confident = {name: statistics.fmean(
        r[v.name]["accuracy_when_confident"] or 0 for v in VARIATIONS)
        for name, r in report.items() if not name.startswith("bare")}
    print("\nmean accuracy of answers marked confident, per model:",
          {k: round(v, 4) for k, v in confident.items()})
    pen_pngs, pen_labels, pen_writers = drawn_test_canvases(args.pen)
    drawn_report = {name: score_bundle(served, {"drawn": pen_pngs}, pen_labels,
                                       right=right[name])
                    for name, served in models.items()}
    print(f"\nThe drawn test set ({len(pen_labels)} pen drawings of "
          f"{len(set(pen_writers.tolist()))} held-out writers):\n")
    print(_drawn_markdown(drawn_report, right, pen_labels, pen_writers))
    comparisons = _compare_with_first(right, [v.name for v in VARIATIONS], list(REAL_SETS))
    if comparisons:
        print(f"\nDigit by digit, against {first_name}:\n")
        print(_paired_markdown(first_name, comparisons))
    if args.json:
        args.json.write_text(json.dumps({"redrawn": report, "real": real_report,
                                         "drawn": drawn_report, "paired": comparisons},
                                        indent=1))


def _drawn_markdown(report: dict[str, dict], right: dict[str, dict[str, np.ndarray]],
                    labels: np.ndarray, writers: np.ndarray) -> str:
    """Per model: overall, each digit, the worst writer (and who) on the drawn test set,
    and its "not sure" line: the threshold, the share of answers it marks, how often the
    plain ones are right."""
    lines = ["| model | overall | " + " | ".join(str(d) for d in range(10)) +
             " | worst writer | not sure below | marked | plain right |",
             "|---|---|" + "---|" * 14]
    for model, results in report.items():
        drawn = results["drawn"]
        per_writer = {int(w): float(right[model]["drawn"][writers == w].mean())
                      for w in np.unique(writers)}
        worst = min(per_writer, key=per_writer.get)
        lines.append(f"| {model} | **{100 * drawn['accuracy']:.2f}%** | " + " | ".join(
            f"{100 * drawn['per_digit'][d]:.1f}%" for d in range(10)) +
            f" | {100 * per_writer[worst]:.1f}% (writer {worst}) | "
            f"{drawn['low_confidence_below']:.2f} | {100 * drawn['low_confidence_share']:.1f}% "
            f"| {100 * (drawn['accuracy_when_confident'] or 0):.2f}% |")
    return "\n".join(lines)


def _compare_with_first(right: dict[str, dict[str, np.ndarray]], redrawn_sets: list[str],
                        real_sets: list[str]) -> dict[str, dict[str, dict]]:
    """Every later model against the first, on the official test set, on all the redrawn
    canvases together and on all of UCI's digits together (each set of canvases holds the
    same digits in the same order, so a row's digit is its place within its set)."""
    def joined(model: str, sets: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [right[model][name] for name in sets]
        return np.concatenate(rows), np.concatenate([np.arange(len(r)) for r in rows])

    def compare(first: str, other: str, sets: list[str]) -> dict:
        (first_right, sources), (other_right, _) = joined(first, sets), joined(other, sets)
        return paired(first_right, other_right, sources)

    first, *others = right
    return {other: {"official test": compare(first, other, ["official test"]),
                    "redrawn": compare(first, other, redrawn_sets),
                    "UCI": compare(first, other, real_sets),
                    "drawn": compare(first, other, ["drawn"])}
            for other in others}


if __name__ == "__main__":
    main()
