"""Load test: /predict under concurrent clients, and a burst of job submissions, against a real stack.

    .venv/bin/python -m bench.load                       # own stack: API + worker, Redis from REDIS_URL
    .venv/bin/python -m bench.load --duration 10 --jobs 20 --concurrency 8   # a quick run

By default it starts its own API (uvicorn) and worker with a private Redis key prefix, trains a
LeNet-5 for one epoch on DATA_DIR's MNIST, then:

1. drives ``POST /predict`` with ``--concurrency`` clients for ``--duration`` seconds, each sending
   real MNIST test digits, sampling the API process's RSS every 0.5 s;
2. submits ``--jobs`` training jobs, checks every one is listed, cancels them all and waits until
   each reaches a final status.

It prints requests served, errors, p50/p99 latency (as the clients saw it, and inside the API from
its own Prometheus histogram: on a small machine the Python client competes with the server for
the same cores), the API's peak RSS and its growth over the run, and the job accounting, and
writes them as JSON under bench/results/. Exit status 1 if
any request failed or any job is unaccounted for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.data import DEFAULT_DATA_DIR, mnist_pngs
from bench.host import describe_machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of /predict load")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent /predict clients")
    parser.add_argument("--jobs", type=int, default=200, help="job submissions")
    add_stack_args(parser, port=8765)
    return parser.parse_args()


def add_stack_args(parser: argparse.ArgumentParser, port: int) -> None:
    """The options of a benchmark that starts its own ``Stack``: ``--data-dir`` (DATA_DIR),
    ``--redis-url`` (REDIS_URL) and the API's ``--port`` (default ``port``)."""
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--port", type=int, default=port)


class Stack:
    """API and worker subprocesses with a private key prefix and queue."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        tag = uuid.uuid4().hex[:8]
        self.env = {
            **{k: v for k, v in os.environ.items() if k.upper() != "API_KEYS"},  # its clients send no key
            "API_KEYS": "",
            "ENVIRONMENT": "development",
            "REDIS_URL": args.redis_url,
            "REDIS_PREFIX": f"load-{tag}",
            "CELERY_QUEUE": f"load-{tag}",
            "DATA_DIR": str(args.data_dir),
            "MODELS_DIR": str(workdir / "models"),
            "CACHE_DIR": str(workdir / "cache"),
        }
        self.url = f"http://127.0.0.1:{args.port}"
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.port = args.port

    def start(self) -> None:
        with socket.socket() as probe:  # as uvicorn binds; a taken port must not lead to another API
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError:
                raise RuntimeError(f"port {self.port} is in use; pick a free one with --port") from None
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "stack.log", "ab")  # noqa: SIM115 (kept open for the children)
        worker = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=WARNING"]
        api = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(self.port),
               "--log-level", "warning"]  # fmt: skip
        self.processes.append(subprocess.Popen(worker, cwd=ROOT, env=self.env, stdout=log, stderr=log))
        self.api = subprocess.Popen(api, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.processes.append(self.api)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.api.poll() is not None:  # e.g. the port was taken: never drive someone else's API
                raise RuntimeError(f"its API exited at start; see {self.workdir / 'stack.log'}")
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2).json()
                if ready.get("workers"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"stack did not start; see {self.workdir / 'stack.log'}")

    def stop(self) -> None:
        """Stop the processes and delete this run's Redis keys (its job records and queue)."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        client = redis.Redis.from_url(self.env["REDIS_URL"])
        keys = list(client.scan_iter(f"{self.env['REDIS_PREFIX']}:*", count=1000))
        if keys:
            client.delete(*keys)


class MemorySampler(threading.Thread):
    """RSS of one process every ``interval`` seconds: (seconds since start, bytes)."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stopped.wait(self.interval):
            self.samples.append((time.monotonic() - start, self.process.memory_info().rss))


def train_model(url: str) -> str:
    job = httpx.post(f"{url}/jobs", json={"task": "mnist_lenet5", "hyperparameters": {"epochs": 1}}).json()
    while True:
        current = httpx.get(f"{url}/jobs/{job['id']}").json()
        if current["status"] in ("succeeded", "failed", "cancelled"):
            if current["status"] != "succeeded":
                raise RuntimeError(f"training the model for the load test failed: {current['error']}")
            return current["model_id"]
        time.sleep(1)


async def predict_load(
    url: str, model_id: str, images: list[bytes], duration: float, concurrency: int
) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration
    # Multipart bodies built once, so the client spends its CPU on sending, not on encoding.
    bodies = []
    for data in images:
        request = httpx.Request(
            "POST", url, files={"file": ("d.png", data, "image/png")}, data={"model_id": model_id}
        )
        bodies.append((request.read(), request.headers["content-type"]))

    async def client_loop(seed: int) -> None:
        # One client (one keep-alive connection) per simulated user: a shared pool of 32
        # connections costs httpx more CPU per request than the API spends serving it.
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=1)) as client:
            while time.monotonic() < deadline:
                body, content_type = rng.choice(bodies)
                start = time.perf_counter()
                try:
                    response = await client.post(
                        f"{url}/predict", content=body, headers={"content-type": content_type}
                    )
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "requests_per_s": round(len(latencies) / duration, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2) if ordered else None,
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2)
        if ordered
        else None,
        "mean_ms": round(1000 * statistics.fmean(ordered), 2) if ordered else None,
    }


async def job_burst(url: str, n: int) -> dict:
    body = {"task": "mnist_lenet5", "hyperparameters": {"epochs": 1, "max_train_samples": 64}}
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/jobs", json=body) for _ in range(n)))
        accepted = [r.json()["id"] for r in responses if r.status_code == 202]
        errors = [f"{r.status_code}: {r.text[:200]}" for r in responses if r.status_code != 202]
        listed = set()
        offset = 0
        while True:
            page = (await client.get(f"{url}/jobs", params={"offset": offset, "limit": 200})).json()
            listed |= {job["id"] for job in page["data"]}
            offset += 200
            if offset >= page["count"]:
                break
        for job_id in accepted:
            await client.post(f"{url}/jobs/{job_id}/cancel")
        deadline = time.monotonic() + 300
        final: dict[str, str] = {}
        while time.monotonic() < deadline and len(final) < len(accepted):
            for job_id in accepted:
                if job_id not in final:
                    status = (await client.get(f"{url}/jobs/{job_id}")).json()["status"]
                    if status in ("succeeded", "failed", "cancelled"):
                        final[job_id] = status
            await asyncio.sleep(0.5)
    return {
        "submitted": n,
        "accepted": len(accepted),
        "errors": len(errors),
        "error_samples": errors[:5],
        "listed": len(listed & set(accepted)),
        "final": {s: list(final.values()).count(s) for s in sorted(set(final.values()))},
        "unaccounted": sorted(set(accepted) - set(final) | (set(accepted) - listed)),
    }


def server_buckets(url: str) -> dict[float, float]:
    """Cumulative bucket counts of the API's own /predict latency histogram (Prometheus)."""
    text = httpx.get(f"{url}/metrics").text
    buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != "imgclf_http_request_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("route") == "/predict":
                buckets[float(sample.labels["le"])] = sample.value
    return buckets


def server_percentiles(before: dict[float, float], after: dict[float, float]) -> dict:
    """p50/p99 of the API's processing time between two scrapes, as histogram bucket bounds (ms)."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = counts[-1][1] if counts else 0
    result = {"server_requests": int(total)}
    for name, q in (("server_p50_ms_at_most", 0.5), ("server_p99_ms_at_most", 0.99)):
        bound = next((le for le, n in counts if total and n >= q * total), None)
        result[name] = None if bound is None else round(bound * 1000, 1)
    return result


def memory_summary(samples: list[tuple[float, int]], duration: float) -> dict:
    if not samples:
        return {}
    window = max(duration * 0.2, 1.0)
    first = [rss for t, rss in samples if t <= window]
    last = [rss for t, rss in samples if t >= samples[-1][0] - window]
    return {
        "peak_rss_mb": round(max(rss for _, rss in samples) / 2**20, 1),
        "rss_first_20pct_mb": round(statistics.median(first) / 2**20, 1),
        "rss_last_20pct_mb": round(statistics.median(last) / 2**20, 1),
        "growth_mb": round((statistics.median(last) - statistics.median(first)) / 2**20, 1),
    }


def main() -> int:
    args = parse_args()
    workdir = ROOT / "var" / "load" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    stack = Stack(args, workdir)
    try:
        stack.start()
        model_id = train_model(stack.url)
        images = [data for _, data, _ in mnist_pngs(args.data_dir)]
        asyncio.run(predict_load(stack.url, model_id, images, 3, args.concurrency))  # warm-up
        sampler = MemorySampler(stack.api.pid)
        sampler.start()
        before = server_buckets(stack.url)
        predict = asyncio.run(predict_load(stack.url, model_id, images, args.duration, args.concurrency))
        predict.update(server_percentiles(before, server_buckets(stack.url)))
        sampler.stopped.set()
        memory = memory_summary(sampler.samples, args.duration)
        jobs = asyncio.run(job_burst(stack.url, args.jobs))
    finally:
        stack.stop()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "command": " ".join(["python -m bench.load", *sys.argv[1:]]),
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "predict": predict,
        "api_memory": memory,
        "jobs": jobs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"load-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"/predict: {predict['requests']} requests in {args.duration:.0f} s with {args.concurrency} clients "
        f"({predict['requests_per_s']}/s), errors {predict['errors']}, "
        f"p50 {predict['p50_ms']} ms, p99 {predict['p99_ms']} ms as the client saw them; "
        f"in the API: p50 <= {predict['server_p50_ms_at_most']} ms, "
        f"p99 <= {predict['server_p99_ms_at_most']} ms"
    )
    print(
        f"API RSS: peak {memory.get('peak_rss_mb')} MB; median of the first 20 % "
        f"{memory.get('rss_first_20pct_mb')} MB, of the last 20 % {memory.get('rss_last_20pct_mb')} MB "
        f"(growth {memory.get('growth_mb')} MB)"
    )
    print(
        f"POST /jobs: {jobs['accepted']}/{jobs['submitted']} accepted, errors {jobs['errors']}, "
        f"listed {jobs['listed']}, final {jobs['final']}, unaccounted {len(jobs['unaccounted'])}"
    )
    print(f"written to {out.relative_to(ROOT)}")
    return 1 if predict["errors"] or jobs["errors"] or jobs["unaccounted"] else 0


if __name__ == "__main__":
    sys.exit(main())
