"""Serving benchmark: HTTP latency and throughput of `mlpaint serve`, against the in-process
model call, for predict and for predict + explain (the page's request: top three digits).

    .venv/bin/python -m bench.serve --bundle .mlpaint/bundles --seconds 20

The server runs as its own process (uvicorn, one worker); the load comes from another process
(this one), with C concurrent clients each sending its next request as soon as the last
returns, for a fixed time. Requests use real test digits as 784 pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]


def _digits(mnist: Path, count: int) -> list[list[int]]:
    from bench.train import _read_idx

    return _read_idx(mnist / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)[:count].tolist()


def _percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2)}


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

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": errors,
            "throughput_rps": round(len(latencies) / wall, 1), **_percentiles(latencies)}


def _in_process(bundle: str, digits: list[list[int]], repeats: int) -> dict:
    from mlpaint.serving.model import ModelHolder, top_labels

    holder = ModelHolder(bundle)
    holder.load_initial()
    served = holder.current
    rows = np.asarray(digits, dtype=np.uint8)
    results = {}
    for name in ("predict", "predict+explain"):
        times = []
        for i in range(repeats):
            row = rows[i % len(rows)]
            start = time.perf_counter()
            _, probabilities = served.score(row[None, :])
            if name == "predict+explain":
                served.explain(row, top_labels(probabilities[0], 3))
            times.append(time.perf_counter() - start)
        results[name] = _percentiles(times)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()
    digits = _digits(args.mnist, 200)
    baseline = _in_process(args.bundle, digits, 200)
    print("in-process", baseline, flush=True)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlpaint"), "serve", "--bundle", args.bundle,
         "--port", str(args.port), "--watch-seconds", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(300):
            try:
                if requests.get(base + "/readyz", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        results = []
        for path, extra in (("/v1/predict", {}), ("/v1/explain", {})):
            bodies = [{"pixels": d, **extra} for d in digits]
            for clients in (1, 16):
                row = {"endpoint": path, **_load(base + path, bodies, clients, args.seconds)}
                print(row, flush=True)
                results.append(row)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    print(json.dumps({"in_process": baseline, "http": results}, indent=1))


if __name__ == "__main__":
    main()
