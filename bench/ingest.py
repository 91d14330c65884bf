"""Ingestion benchmark: mlpaint's fetch + verify + parse + join of full MNIST, cold (from a
local moto S3 server) and warm (from the cache), beside bare-numpy baselines, in one run.

    .venv/bin/python -m bench.ingest --runs 5 [--mnist ../shared/data/mnist]

Every measurement is its own subprocess, so peak memory (ru_maxrss, what `/usr/bin/time -v`
reports as "Maximum resident set size") belongs to that measurement alone. Each subprocess
reports the wall time of the work itself (imports excluded) and its peak RSS growth over
the RSS it had after imports. Runs interleave the variants, so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlpaint.processes import start_service, stop_service

logger = logging.getLogger("bench.ingest")

REPO = Path(__file__).resolve().parents[1]
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")
RAW_ARRAY_BYTES = 60_000 * 784 + 60_000 + 10_000 * 784 + 10_000
BUCKET = "bench-mnist"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- the measured work, one variant per subprocess -----------------------------------------

def _bare_parse(mnist: Path) -> int:
    """The baseline: gunzip the four local files and view them as numpy arrays."""
    import numpy as np

    total = 0
    for name in FILES:
        data = gzip.decompress((mnist / f"{name}.gz").read_bytes())
        offset = 16 if "images" in name else 8
        array = np.frombuffer(data, dtype=np.uint8, offset=offset)
        total += array.size
    return total


def _bare_s3(_: Path) -> int:
    """Bare boto3 download + gunzip + numpy: the cold baseline."""
    import boto3
    import numpy as np

    s3 = boto3.client("s3")
    total = 0
    for name in FILES:
        body = s3.get_object(Bucket=BUCKET, Key=f"mnist/{name}.gz")["Body"].read()
        data = gzip.decompress(body)
        array = np.frombuffer(data, dtype=np.uint8, offset=16 if "images" in name else 8)
        total += array.size
    return total


def _mlpaint(cache_dir: Path) -> int:
    from mlpaint.data.dataset import table_from_files
    from mlpaint.data.fetch import FetchContext, fetch_dataset
    from mlpaint.data.integrity import BlobCache, Pins

    fetched = fetch_dataset([f"s3://{BUCKET}/mnist/"], FetchContext(Pins(), BlobCache(cache_dir)))
    tables = [table_from_files(files) for files in fetched.values()]
    return sum(t.pixels.size + t.labels.size for t in tables)


VARIANTS = {"bare-parse": _bare_parse, "bare-s3": _bare_s3, "mlpaint-cold": _mlpaint,
            "mlpaint-warm": _mlpaint}


def _worker(variant: str, path: Path) -> None:
    # Import what the variant needs before the clock starts: we time the work, not imports.
    import boto3  # noqa: F401
    import numpy  # noqa: F401

    import mlpaint.data.dataset
    import mlpaint.data.fetch  # noqa: F401

    rss_before = _rss_mib()
    start = time.perf_counter()
    elements = VARIANTS[variant](path)
    seconds = time.perf_counter() - start
    if elements != RAW_ARRAY_BYTES:
        raise SystemExit(f"{variant}: parsed {elements} values, expected {RAW_ARRAY_BYTES}")
    print(json.dumps({"variant": variant, "seconds": seconds, "elements": elements,
                      "peak_rss_mib": _rss_mib(), "peak_growth_mib": _rss_mib() - rss_before}))


# --- the driver ----------------------------------------------------------------------------

def _run_variant(variant: str, path: Path, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "bench.ingest", "--worker", variant, str(path)]
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                               check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def use_moto(port: int) -> None:
    """Point this process (and the processes it starts) at a moto server on `port`: its
    endpoint and the dummy credentials it accepts."""
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})


def _start_moto(port: int, log: Path) -> subprocess.Popen:
    moto = Path(sys.executable).parent / "moto_server"
    return start_service([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                         f"http://127.0.0.1:{port}/moto-api/", log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--port", type=int, default=50123)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import boto3

    use_moto(args.port)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="mlpaint-bench-") as workdir:
        moto = _start_moto(args.port, Path(workdir) / "moto.log")
        try:
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket=BUCKET)
            for name in FILES:
                s3.upload_file(str(args.mnist / f"{name}.gz"), BUCKET, f"mnist/{name}.gz")
            results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for run in range(args.runs):
                cache = Path(workdir) / f"cache-{run}"
                for variant in VARIANTS:  # cold before warm: warm reuses the cold run's cache
                    path = args.mnist if variant == "bare-parse" else cache
                    results[variant].append(_run_variant(variant, path, env))
                logger.info("run %d/%d: %s", run + 1, args.runs,
                            ", ".join(f"{v} {r[-1]['seconds']:.3f}s"
                                      for v, r in results.items()))
        finally:
            stop_service(moto)

    median = {v: statistics.median(r["seconds"] for r in rs) for v, rs in results.items()}
    growth = {v: statistics.median(r["peak_growth_mib"] for r in rs) for v, rs in results.items()}
    peak = {v: statistics.median(r["peak_rss_mib"] for r in rs) for v, rs in results.items()}
    raw_mib = RAW_ARRAY_BYTES / 2**20
    print(f"\nmedians of {args.runs} runs (each variant its own process, interleaved)")
    print("| variant | wall s | peak RSS MiB | peak growth MiB | growth / raw arrays |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        print(f"| {variant} | {median[variant]:.3f} | {peak[variant]:.0f} | "
              f"{growth[variant]:.0f} | {growth[variant] / raw_mib:.2f}x |")
    print(f"\nraw arrays: {raw_mib:.1f} MiB")
    warm_ratio = median["mlpaint-warm"] / median["bare-parse"]
    print(f"warm / bare-parse: {warm_ratio:.2f}x (target <= 1.5)")
    print(f"cold / bare-s3:    {median['mlpaint-cold'] / median['bare-s3']:.2f}x")


if __name__ == "__main__":
    main()
