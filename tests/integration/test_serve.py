"""app.serve: WEB_CONCURRENCY API processes that share the connections, and stop together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def _start(stack, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, **stack.env, "API_KEYS": ""}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("app.serve did not answer /healthz")


def _api_children(pid: int) -> set[int]:
    """The API processes (not multiprocessing's resource tracker)."""
    return {
        child.pid
        for child in psutil.Process(pid).children()
        if "resource_tracker" not in " ".join(child.cmdline())
    }


def test_processes_share_keep_alive_connections_and_stop_together(stack):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start(stack, port, workers=2)
    clients: list[httpx.Client] = []
    try:
        _wait_healthy(url, server)
        deadline = time.monotonic() + 60
        while len(pids := _api_children(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(pids) == 2
        time.sleep(5)  # both processes listening (the second may still be starting)
        for _ in range(24):  # keep-alive clients that connect at about the same time
            client = httpx.Client(limits=httpx.Limits(max_connections=1))
            assert client.get(f"{url}/healthz").status_code == 200
            clients.append(client)
        per_process = {pid: 0 for pid in pids}
        for pid in pids:
            for connection in psutil.Process(pid).net_connections(kind="tcp"):
                if connection.status == psutil.CONN_ESTABLISHED and connection.laddr.port == port:
                    per_process[pid] += 1
        assert sum(per_process.values()) == 24
        assert min(per_process.values()) >= 3, per_process  # uvicorn --workers gave one 27 of 32
    finally:
        for client in clients:
            client.close()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert server.returncode == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_taken_port_is_refused(stack):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        server = _start(stack, port, workers=2)
        assert server.wait(60) == 1
        assert b"already in use" in server.stderr.read()
