"""Runs the API in ``WEB_CONCURRENCY`` uvicorn processes that share the load evenly.

    python -m app.serve --host 127.0.0.1 --port 8000 [--workers N]

``uvicorn --workers N`` shares one listening socket between its processes, and whichever
process wakes first accepts the waiting connections: with keep-alive clients that connect at
about the same time, one process ended up with 27 of 32 connections and the API used one core
of two. Here every process listens on its own socket with ``SO_REUSEPORT``, so the kernel spreads
new connections over the processes evenly. The parent checks first that the port is free (a
plain bind), restarts a process that dies, and on SIGTERM or SIGINT stops them all (each one
gracefully, as uvicorn does) before it exits.

With ``PROMETHEUS_MULTIPROC_DIR`` set (scripts/up.sh, the Docker image), the parent creates that
folder and deletes the metric files of earlier runs before it starts the processes, so that
``/metrics`` sums this run's processes only, whichever of them answers.

Long request heads: uvicorn's httptools parser cannot split URLs of 64 KiB or more (its offsets
are 16-bit) and uvicorn answered them with a plain-text ``400 Invalid HTTP request received.``;
here such URLs reach the API, whose answer is its JSON 414 (URLs over 8 KiB). The request line
and headers together are bounded by ``MAX_HEAD_BYTES`` (1 MiB; httptools alone keeps any amount
in memory): past it the answer is a JSON 431 and the connection is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import uvicorn

log = logging.getLogger("app.serve")
BACKLOG = 2048  # uvicorn's default
MAX_HEAD_BYTES = 1 << 20  # request line and headers: past this, 431 (README, "HTTP semantics")
_PARSE_URL_MAX = 0xFFFF  # httptools.parse_url fails on longer URLs (16-bit offsets)


def _http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with long request heads handled (see the module's docstring);
    uvicorn's h11 protocol (``h11_max_incomplete_event_size`` bounds the head) without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without its [standard] extras
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol

    class LongHeadHttpToolsProtocol(HttpToolsProtocol):
        _in_head = True  # the bytes received belong to a request line or headers
        _head_bytes = 0

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)  # on_headers_complete resets the count
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                body = json.dumps(
                    {"detail": f"the request line and headers are over {MAX_HEAD_BYTES} bytes"}
                ).encode()
                self.transport.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
                )
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            url = self.url
            if len(url) <= _PARSE_URL_MAX:
                super().on_headers_complete()
                return
            target = url.partition(b"#")[0]
            if not target.startswith(b"/") and b"://" in target:  # absolute form
                target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
            raw_path, _, query = target.partition(b"?")
            path = raw_path.decode("ascii")  # as uvicorn: an error here is its 400
            self.url = b"/"  # for parse_url; the request's task is created but has not run yet
            super().on_headers_complete()
            self.url = url
            self.scope["path"] = self.root_path + (urllib.parse.unquote(path) if "%" in path else path)
            self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
            self.scope["query_string"] = query

        def on_message_complete(self) -> None:
            self._in_head = True  # what follows is the next request's head
            super().on_message_complete()

    return LongHeadHttpToolsProtocol


def prepare_metrics_dir() -> None:
    """Create ``PROMETHEUS_MULTIPROC_DIR`` (when set) and delete the metric files left there by
    earlier runs: prometheus-client's multiprocess mode sums every ``*.db`` file in it."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound without ``SO_REUSEPORT`` (as uvicorn binds: SO_REUSEADDR, so
    connections in TIME_WAIT do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _serve(host: str, port: int, log_level: str, access_log: bool) -> None:
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        http=_http_protocol(),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    uvicorn.Server(config).run(sockets=[_listen(host, port)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=None, help="default: WEB_CONCURRENCY (core/config.py)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.workers is None:
        from core.config import get_settings

        args.workers = get_settings().web_concurrency
    if not port_free(args.host, args.port):
        log.error("port %d on %s is already in use", args.port, args.host)
        return 1
    prepare_metrics_dir()  # after the port check: a refused start leaves a running API's files alone
    target_args = (args.host, args.port, args.log_level, not args.no_access_log)
    if args.workers == 1:
        _serve(*target_args)
        return 0
    context = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processes = []
    for _ in range(args.workers):
        process = context.Process(target=_serve, args=target_args, daemon=False)
        process.start()
        processes.append(process)
    log.info(
        "API on %s:%d in %d processes %s", args.host, args.port, args.workers, [p.pid for p in processes]
    )
    while not stopping:
        for i, process in enumerate(processes):
            if not process.is_alive() and not stopping:
                log.warning("API process %s exited (%s); starting another", process.pid, process.exitcode)
                processes[i] = context.Process(target=_serve, args=target_args, daemon=False)
                processes[i].start()
        time.sleep(0.5)
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: uvicorn finishes the requests in flight
    deadline = time.monotonic() + 20
    for process in processes:
        process.join(max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
