"""What the server holds: one verified bundle, ready to score and explain, swapped whole."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlpaint.data.pins import N_CLASSES, N_FEATURES
from mlpaint.model import treepredict, treeshap
from mlpaint.model.explain import ClassExplainer
from mlpaint.publishing.bundle import LoadedBundle, current_pointer, load_bundle
from mlpaint.training.algorithms import DigitModel

logger = logging.getLogger(__name__)

# Compiled scores against the bundle's stored LightGBM scores: only summation order differs.
SCORE_TOLERANCE = 1e-9


class ScoreMismatchError(AssertionError):
    """The compiled trees do not score the bundle's gallery as LightGBM did."""


@dataclass
class ServedModel:
    bundle: LoadedBundle
    model: DigitModel
    explainer: ClassExplainer
    trees: treepredict.FlatTrees
    gallery: dict[str, np.ndarray]
    pointer: str | None = None  # the LATEST value it was loaded for, if it followed LATEST

    @classmethod
    def load(cls, uri: str, *, version: str | None = None, cache_dir: Path | None = None
             ) -> ServedModel:
        bundle = load_bundle(uri, version=version, cache_dir=cache_dir)  # verifies hashes
        model = bundle.model()
        # Both compiled structures below are built from one dump of the trees (seconds for
        # a champion's thousands), made before the first request and dropped after.
        dumps = treepredict.dump_trees(model.boosters)
        # One thread per request: uvicorn runs requests concurrently, and spreading each
        # one-row call over every core would oversubscribe them.
        explainer = ClassExplainer(model, parallel=False, paths=treeshap.flatten(
            model.boosters, N_CLASSES, dumps=dumps))
        explainer.explain(np.zeros((1, N_FEATURES), np.float32), [0])  # load the kernel
        # Scores come from the same trees walked in compiled code: LightGBM's predict call
        # costs more than the walk for one row (mlpaint.model.treepredict). Before serving them,
        # they must reproduce the LightGBM scores publishing stored for the gallery digits.
        trees = treepredict.compile_trees(model.boosters, N_CLASSES, dumps=dumps)
        gallery = bundle.gallery()
        error = float(np.abs(treepredict.raw_scores(trees, gallery["features"])
                             - gallery["raw_scores"]).max(initial=0.0))
        if not error <= SCORE_TOLERANCE:
            raise ScoreMismatchError(f"bundle {bundle.info.version}: compiled scores differ "
                                     f"from LightGBM's by {error:.3g}")
        return cls(bundle, model, explainer, trees, gallery, pointer=version)

    @property
    def version(self) -> str:
        return self.bundle.info.version

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.features(pixels)

    def score(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores and probabilities for rows of features (see `features`)."""
        raw = treepredict.raw_scores(self.trees, features)
        return raw, self.model.probabilities(raw)

    def explain(self, features: np.ndarray, labels: list[int]) -> np.ndarray:
        """For one row of features: (len(labels), 785) contributions, the bias last."""
        return self.explainer.explain(features[None, :], labels)[0]

    def gallery_count(self, digit: int) -> int:
        offsets = self.gallery["offsets"]
        return int(offsets[digit + 1] - offsets[digit])

    def gallery_row(self, digit: int, offset: int) -> int:
        return int(self.gallery["offsets"][digit] + offset)


@dataclass
class ModelHolder:
    """The served model behind a lock-free reference: readers take `current` once per
    request; a reload builds the new one completely and then swaps the reference, so no
    request ever sees a half-loaded model."""

    uri: str
    cache_dir: Path | None = None
    current: ServedModel | None = None
    last_error: str | None = None
    #: Told of every model put in service (the first and each swap) and of each failed reload.
    on_serving: Callable[[ServedModel], None] | None = None
    on_failed_reload: Callable[[str], None] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def load_initial(self) -> None:
        self.current = ServedModel.load(self.uri, version=self.latest_version(),
                                        cache_dir=self.cache_dir)
        logger.info("serving bundle %s (model version %s)", self.current.version,
                    self.current.bundle.info.model_version)
        if self.on_serving:
            self.on_serving(self.current)

    def latest_version(self) -> str | None:
        return current_pointer(self.uri)

    def refresh(self) -> bool:
        """Swap in the bundle LATEST names, if it changed. Returns whether it swapped."""
        try:
            latest = self.latest_version()
            if latest is None or (self.current and latest == self.current.pointer):
                return False
            candidate = ServedModel.load(self.uri, version=latest, cache_dir=self.cache_dir)
        except Exception as exc:  # keep serving what we have; report it on /readyz
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning("bundle refresh failed, still serving %s: %s",
                           self.current.version if self.current else None, exc)
            if self.on_failed_reload:
                self.on_failed_reload(self.last_error)
            return False
        self.current, self.last_error = candidate, None
        exempt_from_collection()
        logger.info("now serving bundle %s", candidate.version)
        if self.on_serving:
            self.on_serving(candidate)
        return True

    def watch(self, interval_s: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        thread = threading.Thread(target=loop, name="bundle-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def exempt_from_collection() -> None:
    """Move every object alive now (the imported libraries, the model) out of reach of
    Python's cyclic garbage collector. Left in, they are all rescanned by each full
    collection: hundreds of thousands of objects, a pause of hundreds of milliseconds every
    second or two under load, during which every request waits (seen with `gc.callbacks`;
    bench/serve.py shows it as the p99). Requests' own short-lived objects are still
    collected. Called again after a swap: everything frozen is first let back in, so a full
    collection (one such pause per swap) can free whatever of the old model only a cycle
    kept, and the new model is then exempted too."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def top_labels(probabilities: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-probabilities, kind="stable")[:k]]


ALL_LABELS = list(range(N_CLASSES))
