"""Runs the API in ``WEB_CONCURRENCY`` uvicorn processes that share the load evenly.

    python -m app.serve --host 127.0.0.1 --port 8000 [--workers N]

``uvicorn --workers N`` shares one listening socket between its processes, and whichever
process wakes first accepts the waiting connections: with keep-alive clients that connect at
about the same time, one process ended up with 27 of 32 connections and the API used one core
of two. Here every process listens on its own socket with ``SO_REUSEPORT``, so the kernel spreads
new connections over the processes evenly. The parent checks first that the port is free (a
plain bind), restarts a process that dies, and on SIGTERM or SIGINT stops them all (each one
gracefully, as uvicorn does) before it exits.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import socket
import sys
import time

import uvicorn

log = logging.getLogger("app.serve")
BACKLOG = 2048  # uvicorn's default


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
        "app.main:create_app", factory=True, host=host, port=port, log_level=log_level, access_log=access_log
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
