"""A fit's progress: what its watchers hear while it trains, and its learning curve."""

import itertools
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prefect.futures import PrefectConcurrentFuture

from mlpaint.training.algorithms import BaggedBoostingConfig, GbdtConfig, train_model
from mlpaint.training.progress import (
    AtMostEvery,
    EveryTenth,
    FitMonitor,
    FitProgress,
    FitStoppedError,
)
from tasks.progress import WAKE_SECONDS, as_completed_waking


@pytest.fixture(scope="module")
def blobs():
    """Ten overlapping blobs: hard enough that the score moves from round to round."""
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1.5, size=(10, 8))
    labels = np.repeat(np.arange(10), 80)
    features = (centres[labels] + rng.normal(0, 1.0, size=(800, 8))).astype(np.float32)
    return features[::2], labels[::2], features[1::2], labels[1::2]


PARAMS = {"num_leaves": 7, "min_data_in_leaf": 5}


def test_a_fit_reports_its_rounds_and_its_watched_rows_score(blobs):
    train_x, train_y, watched_x, watched_y = blobs
    heard: list[FitProgress] = []
    monitor = FitMonitor("fold-0", 40, [heard.append], watched="held-out rows",
                         report_every=7)
    model = train_model("lgbm", GbdtConfig(rounds=40, params=PARAMS), train_x, train_y,
                        feature_stage="raw", seed=0, num_threads=1, monitor=monitor,
                        watched_rows=(watched_x, watched_y))
    # Every 7th round and the last.
    assert [p.rounds_done for p in heard] == [7, 14, 21, 28, 35, 40]
    assert [p.round for p in monitor.curve] == [7, 14, 21, 28, 35, 40]
    assert all(p.rounds_total == 40 and p.fit == "fold-0" for p in heard)
    # The last point is the finished model's own score on the watched rows.
    predicted = model.predict_proba(watched_x).argmax(axis=1)
    assert monitor.curve[-1].accuracy == pytest.approx((predicted == watched_y).mean())
    # It learned as it went: the log-loss of its last point is well below its first.
    assert monitor.curve[-1].log_loss < 0.8 * monitor.curve[0].log_loss
    seconds = [p.seconds for p in monitor.curve]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert "held-out rows: accuracy" in heard[-1].describe()


def test_watching_a_fit_does_not_change_what_it_trains(blobs):
    train_x, train_y, watched_x, watched_y = blobs
    config = GbdtConfig(rounds=20, params=PARAMS)
    plain = train_model("lgbm", config, train_x, train_y, feature_stage="raw", seed=0,
                        num_threads=1)
    watched = train_model("lgbm", config, train_x, train_y, feature_stage="raw", seed=0,
                          num_threads=1, monitor=FitMonitor("final", 20),
                          watched_rows=(watched_x, watched_y))
    assert np.array_equal(plain.raw_scores(watched_x), watched.raw_scores(watched_x))


@pytest.mark.parametrize("config", [
    GbdtConfig(rounds=1000, params=PARAMS),
    BaggedBoostingConfig(bags=3, bag_train_fraction=0.7, min_rounds=2, max_rounds=1000,
                         params=PARAMS)], ids=["gbdt", "bagged"])
def test_a_fit_stops_at_the_round_after_its_run_ends(blobs, config):
    """The stop is asked after every round, not only at reports: the fit ends at the round
    after the one during which its run ended."""
    train_x, train_y, watched_x, watched_y = blobs
    heard: list[FitProgress] = []
    rounds_done = itertools.count(1)
    monitor = FitMonitor("fold-2", config.total_rounds, [heard.append], report_every=100,
                         should_stop=lambda: next(rounds_done) > 12)
    with pytest.raises(FitStoppedError, match="fold-2: stopped after round 13 of "):
        train_model("lgbm", config, train_x, train_y, feature_stage="raw", seed=0,
                    num_threads=1, monitor=monitor, watched_rows=(watched_x, watched_y))
    assert heard == []  # it stopped long before its first report


def test_bagged_boosting_counts_its_rounds_across_its_bags(blobs):
    train_x, train_y, _, _ = blobs
    config = BaggedBoostingConfig(bags=3, bag_train_fraction=0.7, min_rounds=2, max_rounds=10,
                                  params=PARAMS)
    assert config.total_rounds == 30
    heard: list[FitProgress] = []
    monitor = FitMonitor("final", config.total_rounds, [heard.append], report_every=5)
    train_model("bbdt", config, train_x, train_y, feature_stage="raw", seed=0, num_threads=1,
                monitor=monitor)
    assert [p.rounds_done for p in heard] == [5, 10, 15, 20, 25, 30]
    assert heard[-1].fraction == 1.0
    # Each bag's own held-out rows are scored, so every report carries a score.
    assert all(p.latest is not None for p in heard)


def test_time_left_is_the_pace_so_far():
    clock = itertools.count(0.0, 10.0).__next__  # each call ten seconds on
    heard: list[FitProgress] = []
    monitor = FitMonitor("fold-1", 100, [heard.append], clock=clock)
    first = monitor.report(25, {"multi_logloss": 0.5, "multi_error": 0.1})
    assert first.seconds == 10.0 and first.seconds_left == pytest.approx(30.0)
    assert first.describe() == ("fold-1: round 25 of 100 (25%), watched rows: accuracy 0.9000, "
                                "log-loss 0.5000, about 30 s left")
    assert monitor.report(100, None).describe() == "fold-1: round 100 of 100 (100%)"
    assert FitProgress("f", 0, 10, 0.0, "rows", None).seconds_left is None


def _progress(done: int, total: int = 100) -> FitProgress:
    return FitProgress("fit", done, total, float(done), "rows", None)


def test_every_tenth_passes_one_report_per_tenth_and_the_last():
    passed: list[int] = []
    watch = EveryTenth(lambda p: passed.append(p.rounds_done))
    for done in range(3, 101, 3):
        watch(_progress(done))
    watch(_progress(100))
    assert passed == [12, 21, 30, 42, 51, 60, 72, 81, 90, 100]


def test_at_most_every_holds_back_reports_that_come_too_soon():
    now = [0.0]
    passed: list[int] = []
    watch = AtMostEvery(lambda p: passed.append(p.rounds_done), 2.0, clock=lambda: now[0])
    for done, at in [(1, 0.0), (2, 0.5), (3, 1.9), (4, 2.0), (5, 2.1), (10, 2.2)]:
        now[0] = at
        watch(_progress(done, 10))
    assert passed == [1, 4, 10]  # the last one always


def test_the_wait_for_fits_ends_on_a_signal_a_fit_thread_received():
    """The kernel may hand a process's signal to any thread. Delivered to a fit's thread,
    it reaches the main thread's wait for the fits within a wake interval, not when a fit
    ends (prefect's `as_completed` waits here until the fit returns, 20 s)."""
    class SignalledError(Exception):
        pass

    def interrupt(signum, frame):
        raise SignalledError

    started, release = threading.Event(), threading.Event()
    fit_thread: list[int] = []

    def fit() -> int:
        fit_thread.append(threading.get_ident())
        started.set()
        release.wait(20)
        return 1

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = PrefectConcurrentFuture(uuid.uuid4(), pool.submit(fit))
            assert started.wait(10)
            threading.Timer(0.3, signal.pthread_kill, (fit_thread[0], signal.SIGUSR1)).start()
            began = time.monotonic()
            try:
                with pytest.raises(SignalledError):
                    list(as_completed_waking([future]))
                assert time.monotonic() - began < 0.3 + 2 * WAKE_SECONDS + 1
            finally:
                release.set()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_wait_for_fits_yields_each_future_once_as_it_completes():
    gates = [threading.Event() for _ in range(3)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [PrefectConcurrentFuture(uuid.uuid4(), pool.submit(gate.wait, 10))
                   for gate in gates]
        order = []
        waiting = as_completed_waking([*futures, futures[0]])
        for index in (2, 0, 1):
            gates[index].set()
            order.append(next(waiting))
        assert order == [futures[2], futures[0], futures[1]]
        assert list(waiting) == []
