"""Feedback benchmark: `POST /v1/feedback` under load, and ingesting a large feedback store.

    .venv/bin/python -m bench.feedback serve --bundle .mlpaint/bundles --runs 3
    .venv/bin/python -m bench.feedback ingest --records 100000
    .venv/bin/python -m bench.feedback ingest-s3 --records 5000

`serve`: `mlpaint serve --workers 2` with a fresh local feedback store per run; 16 clients
(`wrk`'s connections, or Python threads in this process with `--load python`) post distinct
drawings, official test digits drawn as the page draws them (280x280 PNG data URLs), for a
fixed time. Afterwards the records in the store are counted against the 201 answers: none may
be lost (and, every drawing being distinct, none can be doubled: a repeat would be the same
record).

`ingest`: a store of N pixel records is written once; then, each in its own process under
`/usr/bin/time -v` (wall time and peak memory), the training snapshot of the store
(`FeedbackSnapshot.of`: list, read, parse, validate) beside `np.load` of the same pixels and
labels from one `.npy` each, the floor any store format could reach.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import requests

from bench.serve import _percentiles, run_clients, run_wrk
from mlpaint.processes import start_service, stop_service

REPO = Path(__file__).resolve().parents[1]


def _test_set(mnist: Path) -> tuple[np.ndarray, np.ndarray]:
    from bench.train import _read_idx

    return (_read_idx(mnist / "t10k-images-idx3-ubyte.gz").reshape(-1, 28, 28),
            _read_idx(mnist / "t10k-labels-idx1-ubyte.gz"))


def _drawing(digit: np.ndarray) -> str:
    from PIL import Image

    big = Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _post_for(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    created = other = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    next_body = iter(range(len(bodies)))

    def client(_: int) -> None:
        nonlocal created, other
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                index = next(next_body, None)
            if index is None:
                return
            start = time.perf_counter()
            response = session.post(url, json=bodies[index], timeout=30)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                if response.status_code == 201:
                    created += 1
                else:
                    other += 1

    wall = run_clients(client, clients)
    return {"clients": clients, "requests": len(latencies), "created": created,
            "errors": other, "throughput_rps": round(len(latencies) / wall, 1),
            **_percentiles(latencies)}


def _rotating_bodies(bodies: list[dict]) -> str:
    """A wrk script that posts the bodies in turn (one wrk thread). Each pass through them
    moves every label on by one, so each post is a new record (a record is its drawing and
    label) for the first ten passes, and a run's 201s can be counted against the store."""
    images = ",\n".join(f"[==[{body['image']}]==]" for body in bodies)
    labels = ",".join(str(body["label"]) for body in bodies)
    return ('local images = {\n' + images + '\n}\nlocal labels = {' + labels + '}\n'
            'local i = 0\nrequest = function()\n  i = i + 1\n'
            '  local k = (i - 1) % #images + 1\n'
            '  local label = (labels[k] + math.floor((i - 1) / #images)) % 10\n'
            '  local body = \'{"image":"\' .. images[k] .. \'","label":\' .. label .. \'}\'\n'
            '  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)\n'
            'end\n')


def bench_serve(args: argparse.Namespace) -> None:
    images, labels = _test_set(args.mnist)
    print("drawing the test digits as PNGs…", flush=True)
    bodies = [{"image": _drawing(images[i]), "label": int(labels[i])} for i in range(len(labels))]
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as scratch:
            store = Path(scratch) / "feedback"
            base = f"http://127.0.0.1:{args.port}"
            server = start_service(
                [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle",
                 args.bundle, "--port", str(args.port), "--watch-seconds", "0", "--workers",
                 str(args.workers), "--feedback-store", str(store), "--feedback-rate",
                 "1000000/minute"], base + "/readyz")
            try:
                time.sleep(3)  # every worker loaded, not just the first to answer
                offset = run * 3000 % len(bodies)  # distinct drawings in every run
                rotated = bodies[offset:] + bodies[:offset]
                if args.load == "wrk":
                    measured = run_wrk(base + "/v1/feedback", _rotating_bodies(rotated),
                                       args.clients, args.seconds, Path(scratch))
                    measured["created"] = measured["requests"] - measured["errors"]
                else:
                    measured = _post_for(base + "/v1/feedback", rotated, args.clients,
                                         args.seconds)
            finally:
                stop_service(server)
            stored = len(list((store / "records").glob("*.json")))
            # wrk stops counting at its deadline while up to `clients` requests are still in
            # flight; the server completes and stores those too. So: stored may exceed the
            # counted 201s by at most `clients`, and must never fall below them.
            row = {"run": run + 1, "workers": args.workers, "load": args.load, **measured,
                   "records_stored": stored,
                   "lost": max(0, measured["created"] - stored),
                   "stored_beyond_counted": stored - measured["created"]}
            print(row, flush=True)
            results.append(row)
    print(json.dumps({"runs": results, "median": {
        key: statistics.median(r[key] for r in results)
        for key in ("throughput_rps", "p50_ms", "p99_ms")},
        "p99_ms_each_run": [r["p99_ms"] for r in results],
        "errors": sum(r["errors"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "stored_beyond_counted": [r["stored_beyond_counted"] for r in results]}, indent=1))


def _write_records(root: str, start: int, stop: int, seed: int) -> int:
    from mlpaint.feedback.store import FeedbackRecord, FeedbackStore

    rng = np.random.default_rng(seed + start)
    store = FeedbackStore.at(root)
    for i in range(start, stop):
        store.add(FeedbackRecord.new(label=i % 10, pixels=rng.integers(
            0, 256, 784, dtype=np.uint8), answered_digit=(i + 1) % 10))
    return stop - start


def _write_store(root: str, records: int) -> int:
    """`records` random pixel records written to the store at `root` by 2 processes."""
    chunk = records // 8
    with ProcessPoolExecutor(2) as pool:
        return sum(pool.map(_write_records, [root] * 8, [i * chunk for i in range(8)],
                            [(i + 1) * chunk for i in range(8)], [0] * 8))


def _timed(code: str) -> dict:
    """Run `code` in a fresh Python under /usr/bin/time -v: wall seconds, peak RSS."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, check=True)
    fields = dict(line.strip().split(": ", 1) for line in done.stderr.splitlines()
                  if ": " in line)
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"]
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"seconds": round(seconds, 2),
            "peak_mb": round(int(fields["Maximum resident set size (kbytes)"]) / 1024, 1),
            "out": done.stdout.strip()}


def bench_ingest(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        root = str(Path(scratch) / "feedback")
        started = time.perf_counter()
        written = _write_store(root, args.records)
        print(f"wrote {written} records in {time.perf_counter() - started:.1f} s", flush=True)
        npy = Path(scratch) / "arrays"
        npy.mkdir()
        snapshot_code = (
            "from mlpaint.feedback.store import FeedbackSnapshot, FeedbackStore\n"
            f"s = FeedbackSnapshot.of(FeedbackStore.at({root!r}))\n"
            "print(s.pixels.shape, int(s.labels.sum()), s.digest[:12])\n"
            f"import numpy as np; np.save({str(npy / 'pixels.npy')!r}, s.pixels); "
            f"np.save({str(npy / 'labels.npy')!r}, s.labels)")
        rows = []
        for run in range(args.runs):
            snapshot = _timed(snapshot_code)
            arrays = _timed(
                "import numpy as np\n"
                f"p = np.load({str(npy / 'pixels.npy')!r}); "
                f"l = np.load({str(npy / 'labels.npy')!r})\n"
                "print(p.shape, int(l.sum()))")
            rows.append({"run": run + 1, "snapshot": snapshot, "npy": arrays})
            print(rows[-1], flush=True)
        print(json.dumps({"records": written, "runs": rows, "median": {
            "snapshot_seconds": statistics.median(r["snapshot"]["seconds"] for r in rows),
            "snapshot_peak_mb": statistics.median(r["snapshot"]["peak_mb"] for r in rows),
            "npy_seconds": statistics.median(r["npy"]["seconds"] for r in rows),
            "npy_peak_mb": statistics.median(r["npy"]["peak_mb"] for r in rows)}}, indent=1))


def bench_ingest_s3(args: argparse.Namespace) -> None:
    """`FeedbackSnapshot.of` on a store under an s3:// prefix (the moto server on loopback),
    reading one record at a time against `READ_THREADS` at a time: the same store, the same
    code, alternating, each in a fresh process."""
    import boto3

    from bench.ingest import _start_moto, use_moto

    use_moto(args.port)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        moto = _start_moto(args.port, Path(scratch) / "moto.log")
        try:
            boto3.client("s3").create_bucket(Bucket="bench-feedback")
            root = "s3://bench-feedback/feedback"
            written = _write_store(root, args.records)
            times: dict[str, list[float]] = {"1": [], "threads": []}
            for _ in range(args.runs):
                for name, setting in (("1", "1"), ("threads", "feedback.READ_THREADS")):
                    run = _timed(
                        "import mlpaint.feedback.store as feedback\n"
                        f"feedback.READ_THREADS = {setting}\n"
                        f"s = feedback.FeedbackSnapshot.of(feedback.FeedbackStore.at({root!r}))\n"
                        "print(len(s.ids), feedback.READ_THREADS)")
                    times[name].append(run["seconds"])
                    print(name, run, flush=True)
        finally:
            stop_service(moto)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({"records": written, "seconds": times, "medians": medians,
                      "speedup": round(medians["1"] / medians["threads"], 2)}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--bundle", required=True)
    serve.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    serve.add_argument("--seconds", type=float, default=10)
    serve.add_argument("--clients", type=int, default=16)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--port", type=int, default=8792)
    serve.add_argument("--runs", type=int, default=3)
    serve.add_argument("--load", choices=["wrk", "python"], default="wrk",
                       help="wrk (C, Debian's package: the load takes little CPU) or Python "
                            "threads in this process")
    ingest = commands.add_parser("ingest")
    ingest.add_argument("--records", type=int, default=100_000)
    ingest.add_argument("--runs", type=int, default=3)
    ingest.add_argument("--scratch", default=None, help="where the store is written")
    ingest_s3 = commands.add_parser("ingest-s3")
    ingest_s3.add_argument("--records", type=int, default=5_000)
    ingest_s3.add_argument("--runs", type=int, default=3)
    ingest_s3.add_argument("--port", type=int, default=50133)
    ingest_s3.add_argument("--scratch", default=None)
    args = parser.parse_args()
    {"serve": bench_serve, "ingest": bench_ingest, "ingest-s3": bench_ingest_s3}[args.command](
        args)


if __name__ == "__main__":
    main()
