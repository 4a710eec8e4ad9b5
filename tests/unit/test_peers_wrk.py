"""``bench.peers``'s wrk load generator: the report parsing (pure, always runs) and ``drive_wrk``
against a real HTTP server (skipped where wrk is not installed; .ci/run installs it)."""

from __future__ import annotations

import http.server
import random
import shutil
import threading
from typing import ClassVar

import pytest

import bench.peers.__main__ as peers
from bench.peers.__main__ import drive_wrk, parse_wrk_report, undo_wrk_correction, wrk_correction


def test_loadgen_is_wrk_where_it_is_installed_else_httpx(monkeypatch):
    monkeypatch.setattr(peers.shutil, "which", lambda name: "/usr/bin/wrk" if name == "wrk" else None)
    assert peers.parse_args([]).loadgen == "wrk"
    assert peers.parse_args(["--loadgen", "httpx"]).loadgen == "httpx"
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    args = peers.parse_args([])
    assert (args.loadgen, args.loadgen_why) == ("httpx", "no wrk on PATH (apt-get install wrk)")
    with pytest.raises(SystemExit):
        peers.parse_args(["--loadgen", "wrk"])


def wrk_correct(histogram: dict[int, int], interval: int) -> dict[int, int]:
    """wrk 4.x's ``stats_correct`` (src/stats.c), transcribed: for every n from 2 * interval up to
    the largest value, its count is added again at n - interval, n - 2 * interval, ... while the
    index is above ``interval``."""
    data = dict(histogram)
    for n in range(2 * interval, max(histogram) + 1):
        count = data.get(n, 0)
        m = n - interval
        while count and m > interval:
            data[m] = data.get(m, 0) + count
            m -= interval
    return data


@pytest.mark.parametrize("seed", range(5))
def test_undo_wrk_correction_inverts_wrk_stats_correct(seed):
    rng = random.Random(seed)
    raw: dict[int, int] = {}
    for _ in range(300):
        value = int(rng.lognormvariate(8, 1)) + 1  # µs, a long tail (most of them well over 2 * interval)
        raw[value] = raw.get(value, 0) + rng.choice([1, 1, 1, 2, 5])
    interval = rng.choice([50, 700, 3000])
    corrected = wrk_correct(raw, interval)
    assert sum(corrected.values()) > sum(raw.values())  # the correction added samples
    assert wrk_correction(raw, interval) == corrected
    assert undo_wrk_correction(corrected, interval) == raw
    assert undo_wrk_correction(raw, 10**9) == raw  # nothing above the interval: nothing to undo


def test_undo_wrk_correction_rejects_a_histogram_it_cannot_have_made():
    with pytest.raises(ValueError):
        undo_wrk_correction({300: 1, 600: 5}, 200)  # 600 would have added 5 at 400: there is none


def report(requests, duration_us, errors, histogram):
    lines = [f"requests {requests}", f"duration_us {duration_us}", "errors " + " ".join(map(str, errors))]
    return "\n".join([*lines, *(f"{value} {count}" for value, count in sorted(histogram.items()))]) + "\n"


def test_parse_wrk_report_expands_the_histogram_and_counts_errors():
    # 6 requests, 2 clients: interval 3_000_000 // (6 // 2) = 1 s; no value reaches 2 s: no correction
    text = report(6, 3_000_000, [0, 0, 0, 2, 0], {1500: 2, 2500: 3, 900_000: 1})
    out = parse_wrk_report(text, clients=2, timeout_s=60)
    assert out["latencies"] == [0.0015, 0.0015, 0.0025, 0.0025, 0.0025, 0.9]
    assert out["errors"] == ["HTTP status >= 400 (wrk keeps no more detail)"] * 2
    assert out["elapsed"] == 3.0
    assert out["wrk"]["requests"] == 6
    assert out["wrk"]["errors"]["status"] == 2


def test_parse_wrk_report_undoes_the_correction_and_keeps_timeouts_and_socket_errors():
    raw = {1000: 3, 1200: 2, 9000: 1}  # 6 recorded requests
    # 7 requests (one over the timeout), 1 client: interval 7000 // 7 = 1000 µs
    corrected = wrk_correct(raw, 1000)
    assert sum(corrected.values()) == 6 + 7  # 9000 adds one at 8000, 7000, ..., 2000
    text = report(7, 7000, [1, 2, 0, 0, 1], corrected)
    out = parse_wrk_report(text, clients=1, timeout_s=60)
    assert out["latencies"] == [0.001] * 3 + [0.0012] * 2 + [0.009, 60]
    assert sorted(out["errors"]) == sorted(
        ["timeout: slower than 60 s", "socket read error", "socket read error", "connect error"]
    )


def test_parse_wrk_report_fails_on_a_histogram_that_does_not_add_up():
    text = report(10, 1_000_000, [0, 0, 0, 0, 0], {1000: 4})
    with pytest.raises(ValueError):
        parse_wrk_report(text, clients=1, timeout_s=60)


# ---------------------------------------------------------------- against a real server

EVERY = 7  # the server answers 500 to every 7th request


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    disable_nagle_algorithm = True
    answered = 0
    failed = 0
    bodies: ClassVar[set[bytes]] = set()
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with Handler.lock:
            Handler.answered += 1
            fail = Handler.answered % EVERY == 0
            Handler.failed += fail
            Handler.bodies.add(self.headers["Content-Type"].encode() + b"|" + body)
        out = b'{"error": "every 7th"}' if fail else b'{"ok": true}'
        self.send_response(500 if fail else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 128 connections at once

    def handle_error(self, request, client_address):
        pass  # wrk resets its connections when it stops


@pytest.fixture
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.answered = Handler.failed = 0
    Handler.bodies = set()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/predict"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
@pytest.mark.parametrize("clients", [1, 128])
def test_drive_wrk_counts_requests_errors_and_latencies(server, clients):
    bodies = [
        (f"--b{i}\r\nContent-Disposition: form-data\r\n\r\n{'x' * 50 * i}\r\n--b{i}--\r\n".encode(),
         f"multipart/form-data; boundary=b{i}")
        for i in range(1, 6)
    ]  # fmt: skip
    out = drive_wrk(server, bodies, clients, 0.5)  # rounded up to 1 s
    requests = out["wrk"]["requests"]
    assert requests > 2 * EVERY
    assert len(out["latencies"]) == requests
    assert all(latency > 0 for latency in out["latencies"])
    assert 0.9 < out["elapsed"] < 3
    # the server answered every request wrk counted, and at most one more per connection (in flight)
    assert requests <= Handler.answered <= requests + clients
    assert len(out["errors"]) == out["wrk"]["errors"]["status"]
    assert Handler.failed - clients <= len(out["errors"]) <= Handler.failed
    assert set(out["errors"]) == {"HTTP status >= 400 (wrk keeps no more detail)"}
    # every body arrived intact with its own content type, and they were mixed
    sent = {content_type.encode() + b"|" + body for body, content_type in bodies}
    assert Handler.bodies <= sent
    assert len(Handler.bodies) > 1
