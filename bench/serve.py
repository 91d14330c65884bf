"""Serving benchmark: HTTP latency and throughput of `mlpaint serve`, against the in-process
model call, for predict and for predict + explain (the page's request: top three digits).

    .venv/bin/python -m bench.serve --bundle .mlpaint/bundles --seconds 20 --runs 3

The server runs as its own process (`mlpaint serve`, each `--workers` count in turn); the
load comes from another process: `wrk` (Debian's package; C, so the load generator takes
little of the 2 cores) with C connections each sending its next request as soon as the last
returns, for a fixed time, or, without wrk, Python threads in this process. Requests are a
real test digit as 784 pixels. The in-process baseline is the same model call without HTTP.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from mlpaint.processes import start_service, stop_service

REPO = Path(__file__).resolve().parents[1]


def _digits(mnist: Path, count: int) -> list[list[int]]:
    from bench.train import _read_idx

    return _read_idx(mnist / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)[:count].tolist()


def _percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2)}


def run_clients(client, clients: int) -> float:
    """Run `client(index)` on `clients` threads at once; the wall time until all return."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def _load(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        nonlocal errors
        session = requests.Session()
        i = index
        while time.monotonic() < deadline:
            start = time.perf_counter()
            response = session.post(url, json=bodies[i % len(bodies)], timeout=30)
            elapsed = time.perf_counter() - start
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors += 1
            i += clients

    wall = run_clients(client, clients)
    return {"clients": clients, "requests": len(latencies), "errors": errors,
            "throughput_rps": round(len(latencies) / wall, 1), **_percentiles(latencies)}


def _wrk(url: str, body: dict, clients: int, seconds: float, workdir: Path) -> dict:
    """Run wrk with a POST body; parse its latency distribution and counts."""
    return run_wrk(url, 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                        f"wrk.body = [[{json.dumps(body)}]]\n", clients, seconds, workdir)


def run_wrk(url: str, lua: str, clients: int, seconds: float, workdir: Path) -> dict:
    """Run wrk (one thread, `clients` connections) with a Lua script; parse its latency
    distribution and counts."""
    script = workdir / "load.lua"
    script.write_text(lua)
    completed = subprocess.run(
        ["wrk", "-t", "1", "-c", str(clients), "-d", f"{int(seconds)}s", "--latency",
         "-s", str(script), url], capture_output=True, text=True, check=True)
    text = completed.stdout

    def number(pattern: str, default: float = 0.0) -> float:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else default

    def millis(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", text)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    socket_errors = re.findall(r"(?:connect|read|write|timeout) (\d+)", text)
    errors = int(number(r"Non-2xx or 3xx responses: (\d+)")) + sum(map(int, socket_errors))
    # wrk counts 201 Created as success like any 2xx
    return {"clients": clients, "requests": int(number(r"(\d+) requests in")),
            "errors": errors, "throughput_rps": number(r"Requests/sec:\s+([\d.]+)"),
            "p50_ms": round(millis(" 50%"), 2), "p99_ms": round(millis(" 99%"), 2)}


def _in_process(bundle: str, digits: list[list[int]], repeats: int) -> dict:
    """Per digit, interleaved: the server's predict (feature stage + compiled trees), the
    same with LightGBM's own predict on the same model and rows (the bare library), and the
    server's predict + explain of the top three."""
    from mlpaint.serving.model import ModelHolder, top_labels

    holder = ModelHolder(bundle)
    holder.load_initial()
    served = holder.current
    rows = np.asarray(digits, dtype=np.uint8)

    def lightgbm_predict(row: np.ndarray) -> None:
        served.model.predict_proba(served.features(row[None, :]), num_threads=1)

    def predict(row: np.ndarray) -> None:
        served.score(served.features(row[None, :]))

    def predict_and_explain(row: np.ndarray) -> None:
        features = served.features(row[None, :])
        _, probabilities = served.score(features)
        served.explain(features[0], top_labels(probabilities[0], 3))

    calls = {"predict": predict, "predict (LightGBM predict)": lightgbm_predict,
             "predict+explain": predict_and_explain}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(rows[i % len(rows)])
            times[name].append(time.perf_counter() - start)
    results = {name: _percentiles(values) for name, values in times.items()}
    results["predict speed-up over LightGBM (medians)"] = round(
        statistics.median(times["predict (LightGBM predict)"])
        / statistics.median(times["predict"]), 2)
    return results


def _serve_and_load(args: argparse.Namespace, workers: int, digits: list[list[int]],
                    metrics: bool = True) -> list[dict]:
    """Start `mlpaint serve --workers N [--no-metrics]`, load each endpoint at 1 and 16
    clients, stop it."""
    base = f"http://127.0.0.1:{args.port}"
    server = start_service(
        [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle", args.bundle,
         "--port", str(args.port), "--watch-seconds", "0", "--workers", str(workers),
         "--metrics" if metrics else "--no-metrics"],
        base + "/readyz")
    results = []
    try:
        time.sleep(3)  # let every worker finish loading, not just the first to answer
        use_wrk = shutil.which("wrk") is not None
        with tempfile.TemporaryDirectory() as workdir:
            for path in ("/v1/predict", "/v1/explain"):
                bodies = [{"pixels": d} for d in digits]
                for clients in (1, 16):
                    measured = (_wrk(base + path, bodies[0], clients, args.seconds,
                                     Path(workdir)) if use_wrk
                                else _load(base + path, bodies, clients, args.seconds))
                    row = {"workers": workers, "metrics": metrics, "endpoint": path,
                           "load": "wrk" if use_wrk else "python", **measured}
                    print(row, flush=True)
                    results.append(row)
    finally:
        stop_service(server)
    return results


def metrics_overhead(repeats: int) -> dict:
    """What counting one request costs a worker, in prometheus_client's multiprocess mode
    as `mlpaint serve` runs it: the middleware's request counter and latency histogram and
    the answer counter, timed over `repeats` requests, median of 5 batches. Compared with
    the request's own cost (the in-process figures and HTTP latencies above), this bounds
    what metrics take from throughput and latency more tightly than HTTP runs can on a
    noisy machine."""
    import os

    with tempfile.TemporaryDirectory() as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # before prometheus_client loads
        from mlpaint.serving.metrics import ServerMetrics, multiprocess_mode

        metrics = ServerMetrics()
        assert multiprocess_mode()
        batches = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                metrics.requests.labels("POST", "/v1/predict", "200").inc()
                metrics.latency.labels("POST", "/v1/predict").observe(0.001)
                metrics.count_answers("predict", [(3, "ok")])
            batches.append((time.perf_counter() - started) / repeats)
        scrape_started = time.perf_counter()
        metrics.exposition()
        scrape_s = time.perf_counter() - scrape_started
    return {"per_request_us": round(statistics.median(batches) * 1e6, 2),
            "scrape_ms": round(scrape_s * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="server process counts to measure, one after the other")
    parser.add_argument("--runs", type=int, default=3,
                        help="rounds over every worker count; medians are reported")
    parser.add_argument("--metrics", choices=("on", "off", "both"), default="on",
                        help="serve with /metrics counting, without, or both interleaved "
                             "in every run (their cost: the ratios of the medians)")
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="also time what counting one request costs a worker")
    args = parser.parse_args()
    if args.metrics_overhead:
        print("metrics per request", metrics_overhead(20_000), flush=True)
    digits = _digits(args.mnist, 200)
    baseline = _in_process(args.bundle, digits, 200)
    print("in-process", baseline, flush=True)
    results = []
    variants = {"on": [True], "off": [False], "both": [True, False]}[args.metrics]
    for run in range(args.runs):
        for workers in args.workers:  # interleaved, so machine noise hits every count alike
            for metrics in variants:
                results += [{"run": run + 1, **row}
                            for row in _serve_and_load(args, workers, digits, metrics)]
    medians = _medians(results)
    print(json.dumps({"in_process": baseline, "runs": args.runs, "http": results,
                      "medians": medians, "metrics_cost": _metrics_cost(medians)}, indent=1))


def _metrics_cost(medians: list[dict]) -> list[dict]:
    """With metrics over without, per (workers, endpoint, clients): throughput and p99."""
    by_key = {(m["workers"], m["endpoint"], m["clients"], m["metrics"]): m for m in medians}
    return [{"workers": w, "endpoint": e, "clients": c,
             "throughput_on_over_off": round(on["throughput_rps"]
                                             / off["throughput_rps"], 3),
             "p99_on_over_off": round(on["p99_ms"] / off["p99_ms"], 3)}
            for (w, e, c, flag), on in by_key.items()
            if flag and (off := by_key.get((w, e, c, False)))]


def _medians(results: list[dict]) -> list[dict]:
    """Per (workers, metrics, endpoint, clients): the median over runs of each figure; errors
    summed."""
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        groups.setdefault((row["workers"], row["metrics"], row["endpoint"], row["clients"]),
                          []).append(row)
    return [{"workers": workers, "metrics": metrics, "endpoint": endpoint, "clients": clients,
             "runs": len(rows),
             "errors": sum(r["errors"] for r in rows),
             **{key: statistics.median(r[key] for r in rows)
                for key in ("throughput_rps", "p50_ms", "p99_ms")},
             "p99_ms_each_run": [r["p99_ms"] for r in rows]}
            for (workers, metrics, endpoint, clients), rows in groups.items()]


if __name__ == "__main__":
    main()
