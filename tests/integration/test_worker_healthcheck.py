"""The Docker worker healthcheck (`python -m worker.healthcheck NAME`) against a real worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def healthcheck(stack, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.healthcheck", name],
        cwd=REPO,
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthy_while_the_worker_runs_and_not_after(stack, start_worker):
    worker = start_worker(stack)
    assert healthcheck(stack, worker.hostname).returncode == 0
    other = healthcheck(stack, "nobody@nowhere")
    assert other.returncode == 1 and "not registered" in other.stderr
    worker.stop()
    gone = healthcheck(stack, worker.hostname)
    assert gone.returncode == 1


def test_unhealthy_when_redis_is_unreachable(stack):
    stack.update(redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5)
    result = healthcheck(stack, "w@h")
    assert result.returncode == 1 and "Redis unreachable" in result.stderr
