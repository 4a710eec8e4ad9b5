"""Shared fixtures: the real Redis, isolated settings, real Celery worker processes, the API.

Every test stack gets its own Redis key prefix and Celery queue, so tests never see each other's
jobs and never touch anything else on the shared Redis. If nothing answers on 127.0.0.1:6379, a
private ``redis-server`` is started for the session (and only that one is stopped).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from core.config import Settings
from tests.factories import make_synthetic_data

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


class RedisServer:
    """A private ``redis-server`` on a free port (for fault tests and machines without Redis)."""

    def __init__(self, directory: Path, port: int | None = None, persistent: bool = False):
        self.port = port or free_port()
        self.directory = directory
        self.persistent = persistent  # append-only file, as in docker-compose.yml: survives restarts
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS)
    if redis_answers(url):
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


class Stack:
    """Settings of one isolated test stack, as environment variables and as ``Settings``."""

    def __init__(self, root: Path, redis_url: str, **overrides: object):
        self.root = root
        tag = uuid.uuid4().hex[:10]
        self.env: dict[str, str] = {
            "ENVIRONMENT": "development",
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": f"test-{tag}",
            "CELERY_QUEUE": f"training-{tag}",
            "DATA_DIR": str(root / "data"),
            "MODELS_DIR": str(root / "models"),
            "CACHE_DIR": str(root / "cache"),
            "RESNET18_WEIGHTS": "none",
            "JOB_LEASE_TTL_S": "30",
            "REAPER_INTERVAL_S": "2",
            "TORCH_HOME": str(root / "torch"),
        }
        self.update(**overrides)

    def update(self, **overrides: object) -> None:
        for key, value in overrides.items():
            self.env[key.upper()] = ",".join(value) if isinstance(value, list) else str(value)

    def settings(self) -> Settings:
        return Settings(_env_file=None, **{k.lower(): v for k, v in self.env.items() if k != "TORCH_HOME"})

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["REDIS_URL"], decode_responses=True)

    def cleanup_redis(self) -> None:
        client = self.redis()
        try:
            keys = list(client.scan_iter(f"{self.env['REDIS_PREFIX']}:*", count=1000))
            if keys:
                client.delete(*keys)
        except redis.exceptions.RedisError:
            pass


@pytest.fixture
def make_stack(tmp_path, redis_url) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(**overrides: object) -> Stack:
        url = str(overrides.pop("redis_url", redis_url))
        stack = Stack(tmp_path / f"stack{len(stacks)}", url, **overrides)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.cleanup_redis()


@pytest.fixture
def stack(make_stack) -> Stack:
    return make_stack()


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """Small datasets of all three tasks in their real layouts (built once per session)."""
    return make_synthetic_data(tmp_path_factory.mktemp("synthetic") / "data")


class ChildProcess:
    """A service process started in its own session, so that it and its children stop together."""

    process: subprocess.Popen | None = None

    def kill(self) -> None:
        """SIGKILL the whole process group (e.g. a worker and its pool child), as a crash would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL after 20 s."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class WorkerProcess(ChildProcess):
    """A real ``celery worker`` process of a stack (prefork, concurrency 1)."""

    def __init__(self, stack: Stack, name: str | None = None, extra_env: dict[str, str] | None = None):
        self.stack = stack
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None
        self.log_path = stack.root / f"{self.name}.log"

    @property
    def hostname(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def start(self, wait: bool = True, preexec: Callable[[], None] | None = None) -> WorkerProcess:
        self.stack.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.stack.env, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker.celery_app",
                    "worker",
                    "--loglevel=INFO",
                    "-n",
                    self.hostname,
                    "--without-mingle",
                    "--without-gossip",
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        key = f"{self.stack.env['REDIS_PREFIX']}:worker:{self.hostname}"
        client = self.stack.redis()
        deadline = time.monotonic() + timeout
        while not client.exists(key):
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def start_worker() -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(stack: Stack, preexec: Callable[[], None] | None = None, **kwargs) -> WorkerProcess:
        worker = WorkerProcess(stack, **kwargs)
        workers.append(worker)
        return worker.start(preexec=preexec)

    yield start
    for worker in workers:
        worker.stop()


class ApiProcess(ChildProcess):
    """A real uvicorn process serving the API of a stack (for restart and streaming tests)."""

    def __init__(self, stack: Stack, port: int | None = None):
        self.stack = stack
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = stack.root / f"api-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        import httpx

        self.stack.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.stack.env}
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--port",
            str(self.port),
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)


@contextmanager
def served_stack(root: Path, redis_url: str, data_dir: Path) -> Iterator[tuple[Stack, ApiProcess]]:
    """A stack under ``root`` with a real worker and a real uvicorn API (streaming needs a
    server), stopped and its Redis keys deleted on exit: yields (stack, api)."""
    stack = Stack(root, redis_url, data_dir=data_dir)
    worker = WorkerProcess(stack).start()
    api = ApiProcess(stack).start()
    try:
        yield stack, api
    finally:
        api.stop()
        worker.stop()
        stack.cleanup_redis()


@pytest.fixture
def start_api() -> Iterator[Callable[..., ApiProcess]]:
    apis: list[ApiProcess] = []

    def start(stack: Stack, **kwargs) -> ApiProcess:
        api = ApiProcess(stack, **kwargs)
        apis.append(api)
        return api.start()

    yield start
    for api in apis:
        api.stop()


@contextmanager
def api_client(stack: Stack, **headers: str):
    """A TestClient on a fresh app of ``stack`` (lifespan run, real Redis)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(stack.settings()), headers=headers) as client:
        yield client


def wait_for(
    predicate: Callable[[], object], timeout: float = 60, interval: float = 0.1, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def wait_for_status(client, job_id: str, statuses: set[str], timeout: float = 120) -> dict:
    def done():
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(done, timeout, what=f"job {job_id} to reach {statuses}")
