"""A static HTTP server with fault injection, run as its own process by the tests.

    python -m tests.servers.fault_http ROOT PORT

Paths:
    /files/<path>                 serve ROOT/<path>
    /flaky/<n>/<tag>/<path>       HTTP 503 for the first n requests of <tag>, then serve
    /drop/<n>/<tag>/<path>        for the first n requests of <tag>: announce the full length,
                                  send half the body, close the connection
    /__requests                   JSON: how many requests each path received
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(".")
HITS: Counter[str] = Counter()
TAG_COUNTS: Counter[str] = Counter()
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        return

    def _send_file(self, relative: str, truncate: bool = False) -> None:
        path = (ROOT / relative).resolve()
        if ROOT.resolve() not in path.parents or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if truncate:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_GET(self) -> None:
        with LOCK:
            HITS[self.path] += 1
        parts = self.path.lstrip("/").split("/")
        if parts[0] == "__requests":
            body = json.dumps(dict(HITS)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif parts[0] == "files":
            self._send_file("/".join(parts[1:]))
        elif parts[0] in {"flaky", "drop"} and len(parts) >= 4:
            failures, tag, relative = int(parts[1]), parts[2], "/".join(parts[3:])
            with LOCK:
                TAG_COUNTS[f"{parts[0]}:{tag}:{relative}"] += 1
                attempt = TAG_COUNTS[f"{parts[0]}:{tag}:{relative}"]
            if attempt > failures:
                self._send_file(relative)
            elif parts[0] == "flaky":
                self.send_error(503, "injected failure")
            else:
                self._send_file(relative, truncate=True)
        else:
            self.send_error(404)


def main() -> None:
    global ROOT
    ROOT = Path(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
