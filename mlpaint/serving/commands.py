"""The `mlpaint serve` and `mlpaint feedback` commands: library services, not flows, so they
live in the library; `flows/cli.py` puts them beside the commands that run flows.

Errors are raised with what is wrong and what to do; the CLI turns them into its one-line
`mlpaint: error: …` and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger(__name__)
#: prometheus_client's multiprocess folder (mlpaint.serving.metrics, not imported here: it
#: would import prometheus_client, which reads this variable once, when first imported).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def add_serve_command(subcommands) -> None:
    serve = subcommands.add_parser(
        "serve", help="MLPaint: the drawing page and REST API, from a published bundle",
        description="Loads and verifies the bundle once, then follows its LATEST pointer and "
                    "swaps in newer bundles whole. The page is at /, the API under /v1, its "
                    "OpenAPI page at /docs.")
    serve.add_argument("--bundle", required=True, metavar="URI",
                       help="a bundle folder, s3://bucket/prefix or models:/mnist-digits@champion")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--watch-seconds", type=float, default=5.0,
                       help="how often to look for a newer bundle (0: never)")
    serve.add_argument("--cache-dir", metavar="DIR", help="where S3 bundles are downloaded")
    serve.add_argument("--workers", type=_at_least_one, default=_default_workers(),
                       metavar="N",
                       help="server processes, each holding the model and watching LATEST "
                            "(default: one per available core, at most 4, here "
                            "%(default)s); a request runs on one core, so more processes "
                            "serve more at once")
    serve.add_argument("--feedback-store", metavar="URI|off",
                       help="where POST /v1/feedback appends labelled drawings: a folder or "
                            "s3://bucket/prefix (default $MLPAINT_FEEDBACK_STORE, else a "
                            "'feedback' folder beside the bundle destination); 'off' turns "
                            "the endpoint off (404)")
    serve.add_argument("--feedback-rate", default=None, metavar="N/PERIOD",
                       help="feedback posts one client address may make, e.g. 30/minute "
                            "(the default) or 5/second; counted where "
                            "--rate-limit-storage says")
    serve.add_argument("--rate-limit-storage", default=None, metavar="URI",
                       help="where the feedback rate is counted: memory:// (the default: "
                            "each worker counts alone, so N workers allow N times the rate) "
                            "or redis://host:port (one count shared by every worker and "
                            "every server using it)")
    serve.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                       help="the proxies (addresses or networks, comma-separated, or *) whose "
                            "X-Forwarded-For names the client, so the rate limit sees people "
                            "rather than the proxy (default $FORWARDED_ALLOW_IPS, else "
                            "127.0.0.1; '' trusts none)")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                       help="log a line per request (default: off; at thousands of requests "
                            "a second it costs a fifth of the throughput)")
    serve.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                       help="Prometheus metrics at /metrics, counted across the workers "
                            "(default: on)")
    serve.set_defaults(handler=_run_serve)


def _fresh_metrics_folder() -> None:
    """An empty folder for the workers' Prometheus counts (mlpaint.serving.metrics), in the
    environment every worker inherits: the one given in PROMETHEUS_MULTIPROC_DIR, emptied
    (counts a previous start left would be added to this one's), else a new temporary one."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    if given := os.environ.get(MULTIPROC_DIR_ENV):
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        return
    made = tempfile.mkdtemp(prefix="mlpaint-metrics-")
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    os.environ[MULTIPROC_DIR_ENV] = made


def _default_workers() -> int:
    # Each worker holds its own copy of the model and gallery (tens of MB), hence the cap.
    available = getattr(os, "process_cpu_count", os.cpu_count)() or 1  # 3.13+: affinity-aware
    return max(1, min(4, available))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _run_serve(args: argparse.Namespace) -> int:
    if args.metrics:
        _fresh_metrics_folder()  # before anything imports prometheus_client
    import uvicorn
    from limits import parse as parse_rate
    from limits.storage import storage_from_string

    from mlpaint.serving.app import (
        DEFAULT_FEEDBACK_RATE,
        DEFAULT_RATE_LIMIT_STORAGE,
        ServeSettings,
    )
    from mlpaint.storage.catalog import feedback_store_option

    feedback_rate = args.feedback_rate or DEFAULT_FEEDBACK_RATE
    parse_rate(feedback_rate)  # a malformed rate fails here, not in every worker
    rate_limit_storage = args.rate_limit_storage or DEFAULT_RATE_LIMIT_STORAGE
    if not storage_from_string(rate_limit_storage).check():
        raise ValueError(f"the rate limit storage {rate_limit_storage} does not answer")
    feedback_store = feedback_store_option(args.feedback_store, args.bundle)
    _check_before_serving(args.bundle, args.cache_dir, feedback_store, args.host, args.port)
    settings = ServeSettings(bundle=args.bundle, cache_dir=args.cache_dir,
                             watch_seconds=args.watch_seconds, feedback_store=feedback_store,
                             feedback_rate=feedback_rate,
                             rate_limit_storage=rate_limit_storage, metrics=args.metrics)
    logger.info("feedback: %s", feedback_store or "off")
    os.environ.update(settings.to_environment())  # read back by each worker's app factory
    uvicorn.run("mlpaint.serving.app:app_from_environment", factory=True, host=args.host,
                port=args.port, workers=args.workers, log_level="info",
                access_log=args.access_log, proxy_headers=True,
                forwarded_allow_ips=args.forwarded_allow_ips)
    return 0


def add_feedback_commands(subcommands) -> None:
    feedback = subcommands.add_parser(
        "feedback", help="review the drawings people labelled on the page",
        description="The feedback store is append-only: 'reject' records an exclusion beside "
                    "a record and deletes nothing. IDs may be shortened to a unique prefix "
                    "of 6 or more characters.")
    store_help = ("a folder or s3://bucket/prefix (default $MLPAINT_FEEDBACK_STORE, else the "
                  "'feedback' folder beside the default bundle destination)")
    commands = feedback.add_subparsers(dest="feedback_command", required=True)
    listing = commands.add_parser("list", help="one line per record, newest first")
    listing.add_argument("--rejected", action="store_true", help="only rejected records")
    listing.add_argument("--json", action="store_true", help="a JSON array for scripts")
    show = commands.add_parser("show", help="one record: its fields and the 28x28 digit")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--save-drawing", metavar="FILE",
                      help="write the drawing as received (PNG) to FILE")
    export = commands.add_parser(
        "export", help="accepted records as CSV, the layout `--source *.csv` reads")
    export.add_argument("path", metavar="FILE.csv",
                        help="name it with 'train' or 'test' to use it as that split's source")
    reject = commands.add_parser("reject", help="exclude a record from training")
    reject.add_argument("id")
    reject.add_argument("--reason", default="", metavar="TEXT")
    check = commands.add_parser(
        "check", help="check every record as training relies on it; exit 1 on an error",
        description="Each record parses, is named after its id, still hashes its label and "
                    "drawing, still preprocesses to its pixels, holds a digit, and is not "
                    "the same digit as a record with another label; each rejection names a "
                    "record. Duplicates and dangling rejections are warnings.")
    check.add_argument("--json", action="store_true", help="the whole report as JSON")
    for command in (listing, show, export, reject, check):
        command.add_argument("--store", metavar="URI", help=store_help)
        command.set_defaults(handler=_run_feedback)


def _run_feedback(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlpaint.feedback.store import FeedbackStore, write_csv
    from mlpaint.storage.catalog import default_feedback_store

    store = FeedbackStore.at(args.store or default_feedback_store())
    if args.feedback_command == "list":
        rejected = store.rejections()
        rows = []
        for record in store.records():
            if args.rejected and record.id not in rejected:
                continue
            row = record.summary()
            row["rejected"] = record.id in rejected
            row["reject_reason"] = rejected[record.id].reason if row["rejected"] else None
            rows.append(row)
        rows.sort(key=lambda row: row["received_at"], reverse=True)
        if args.json:
            print(json.dumps(rows))
            return 0
        for row in rows:
            answered = "-" if row["answered_digit"] is None else row["answered_digit"]
            flag = " REJECTED" if row["rejected"] else ""
            print(f"{row['id']}  label {row['label']}  answered {answered}  "
                  f"{row['received_at']}  bundle {row['bundle_version'] or '-'}{flag}")
        print(f"{len(rows)} records in {store.describe()}", file=sys.stderr)
    elif args.feedback_command == "show":
        record = store.get(args.id)
        rejection = store.rejections().get(record.id)
        if args.save_drawing:
            if record.drawing is None:
                raise ValueError(f"{record.id} was posted as pixels: there is no drawing")
            Path(args.save_drawing).write_bytes(record.drawing)
        if args.json:
            print(json.dumps({**record.summary(), "pixels": record.pixels.tolist(),
                              "rejected": rejection is not None,
                              "reject_reason": rejection.reason if rejection else None}))
            return 0
        for key, value in record.summary().items():
            print(f"{key}: {value}")
        if rejection:
            print(f"rejected: {rejection.rejected_at} ({rejection.reason or 'no reason'})")
        shades = " .:-=+*#%@"
        for row in record.pixels.reshape(28, 28):
            print("".join(shades[int(v) * (len(shades) - 1) // 255] for v in row))
    elif args.feedback_command == "export":
        count = write_csv(store.accepted(), Path(args.path))
        print(f"{count} accepted records written to {args.path}")
    elif args.feedback_command == "reject":
        record_id, new = store.reject(args.id, args.reason)
        print(f"{record_id} rejected" + ("" if new else " (it already was)"))
    elif args.feedback_command == "check":
        from mlpaint.feedback.checks import check_feedback_store

        report = check_feedback_store(store)
        print(json.dumps(report.to_json()) if args.json else "\n".join(report.lines()))
        return 0 if report.passed else 1
    return 0


def _check_before_serving(bundle: str, cache_dir: str | None, feedback_store: str | None,
                          host: str, port: int) -> None:
    """What would otherwise fail inside uvicorn's workers, as a lifespan traceback and a
    zero exit status a supervisor takes for a clean stop: the port, the bundle (verified
    file by file, which also fills the download cache the workers then reuse) and the
    feedback store. Each failure raises with what is wrong and what to do."""
    import errno
    import socket
    from pathlib import Path

    from mlpaint.publishing.bundle import current_pointer, load_bundle
    from mlpaint.storage.stores import store_for

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"port {port} on {host} is in use: stop what holds it or "
                              "choose another with --port") from exc
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    try:
        load_bundle(bundle, version=current_pointer(bundle),
                    cache_dir=Path(cache_dir) if cache_dir else None)
    except Exception as exc:
        raise RuntimeError(f"cannot serve {bundle}: {exc}. Publish a model there (mlpaint "
                           "train --publish-to URI, or mlpaint publish --to URI), or serve "
                           "another with --bundle") from exc
    if feedback_store:
        try:
            store_for(feedback_store).check_writable()
        except OSError as exc:
            raise OSError(f"feedback store: {exc}. Fix it, choose another with "
                          "--feedback-store, or turn feedback off with --feedback-store off"
                          ) from exc
