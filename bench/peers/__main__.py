"""This API against TorchServe and LitServe, side by side, serving the same checkpoints.

    .venv/bin/python -m bench.peers                 # 1, 8, 32, 128 clients x 15 s, both models (~12 min)
    .venv/bin/python -m bench.peers --quick         # 1 and 32 clients x 5 s (< 4 min)
    .venv/bin/python -m bench.peers --models hymenoptera_resnet18 --servers api litserve --device cuda

Peers: ``pip install -e '.[bench]'`` (TorchServe 0.12 + model archiver, which need Java 17, and
LitServe). A server whose package is missing is skipped with a note.

1. Checkpoints are trained once with the service's own ``worker.training.run_training`` on the
   real data (LeNet-5: one epoch of MNIST; ResNet18: ``weights=none``, one epoch on 32 images --
   serving is measured, not accuracy) and kept in ``var/peers/models`` for later runs.
2. Every server serves the same checkpoint with the service's own decoding and preset
   (``bench/peers/common.py``), with the same CPU budget: ``--workers`` inference processes of
   ``--threads`` torch threads each (this API: ``WEB_CONCURRENCY`` uvicorn processes). Where a peer
   batches (ResNet18), it batches up to ``--batch-size`` requests waiting at most
   ``--batch-delay-ms``.
3. The same real images (MNIST test digits as PNG, hymenoptera val JPEGs) are first sent one by one
   to every server and the answers compared with this API's (top-1 class and its probability).
4. All servers of a model run at once; the same load generator, outside every server, drives one
   at a time at each client count for ``--duration`` seconds after a warm-up, in ``--rounds`` passes
   whose server order rotates, so that the machine's changing load (other users) falls on all
   alike. Per server and client count it records throughput, p50/p99 latency (pooled over the
   rounds), errors, the server's CPU time per request (its whole process tree: a measure that
   other users' load disturbs much less than throughput) and its peak RSS. The load generator
   (``--loadgen``): wrk when it is on PATH (C, one event loop on one thread, every request
   pre-formatted by its Lua script: it costs the machine a small fraction of what the servers
   do), else asyncio httpx in ``--client-processes`` processes (about as much CPU per request as
   the servers, on the same cores: it pulls every ratio toward 1). Either way one keep-alive
   connection per client, multipart bodies built once, a random one per request.

Writes ``bench/results/peers-<time>.json``, prints a table and, as its last line,
``speedup mnist_lenet5 X resnet18 Y``: this API's throughput at 32 clients divided by the best
peer's (``nan`` when not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from bench.data import DEFAULT_DATA_DIR, hymenoptera_jpegs, mnist_pngs
from bench.host import describe_machine

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
WORKDIR = ROOT / "var" / "peers"
MODELS = ("mnist_lenet5", "hymenoptera_resnet18")
SERVERS = ("api", "torchserve", "litserve")
SHORT = {"mnist_lenet5": "mnist_lenet5", "hymenoptera_resnet18": "resnet18"}
TRAIN = {
    "mnist_lenet5": {"epochs": 1},
    "hymenoptera_resnet18": {
        "epochs": 1,
        "weights": "none",
        "mode": "finetune",
        "max_train_samples": 32,
        "batch_size": 16,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 and 32 clients, 5 s each (< 4 min)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="default 1 8 32 128")
    parser.add_argument("--duration", type=float, default=None, help="seconds per client count (15)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of load before measuring (3)")
    parser.add_argument(
        "--loadgen",
        choices=("wrk", "httpx"),
        default=None,
        help="load generator: wrk (C event loop, requests pre-formatted in Lua, durations rounded up "
        "to whole seconds; default when wrk is on PATH) or httpx (asyncio, in --client-processes "
        "Python processes)",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=2,
        help="httpx only: load-generator processes the clients are spread over",
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk only: its threads (event loops)")
    parser.add_argument(
        "--no-pause",
        dest="pause",
        action="store_false",
        help="leave the other servers running while one is driven (by default they are paused with "
        "SIGSTOP: an idle LitServe polls its queues at about a quarter of a core)",
    )
    parser.add_argument("--workers", type=int, default=2, help="inference processes per server")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per inference process")
    parser.add_argument("--batch-size", type=int, default=4, help="peers' max batch for ResNet18")
    parser.add_argument("--batch-delay-ms", type=float, default=10.0, help="peers' max batch wait")
    parser.add_argument("--peer-batch-lenet", action="store_true", help="let the peers batch LeNet-5 too")
    parser.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for this API (repeatable), e.g. INFERENCE_MAX_BATCH=1",
    )
    parser.add_argument(
        "--api-variant",
        action="append",
        default=[],
        metavar="NAME:SETTING=VALUE,...",
        help="also measure this API with these settings, as server api:NAME (repeatable), e.g. "
        "before:WEB_CONCURRENCY=1,INFERENCE_BACKEND=torch",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="inference device")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--port", type=int, default=8770, help="first of the ports used (8770-8779)")
    parser.add_argument("--rounds", type=int, default=None, help="passes over all servers (1 quick, 2 full)")
    parser.add_argument("--retrain", action="store_true", help="train new checkpoints")
    parser.add_argument("--tag", default="", help="a label stored with the results")
    args = parser.parse_args(argv)
    args.clients = args.clients or ([1, 32] if args.quick else [1, 8, 32, 128])
    args.duration = args.duration or (5.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    wrk = shutil.which("wrk")
    if args.loadgen == "wrk" and wrk is None:
        parser.error("--loadgen wrk: no wrk on PATH (apt-get install wrk)")
    if args.loadgen is None:
        args.loadgen = "wrk" if wrk else "httpx"
        args.loadgen_why = f"wrk found at {wrk}" if wrk else "no wrk on PATH (apt-get install wrk)"
    else:
        args.loadgen_why = "chosen with --loadgen"
    return args


# ---------------------------------------------------------------- checkpoints and images


def checkpoint_for(task: str, args: argparse.Namespace) -> str:
    """The model id of a ``bench.peers`` checkpoint of ``task`` (trained now if there is none)."""
    from models_store.checkpoint import CheckpointStore

    store = CheckpointStore(WORKDIR / "models")
    if not args.retrain:
        for info in store.list():
            if info.valid and info.task == task and info.metadata.get("bench") == "peers":
                return info.model_id
    import torch

    from tasks import get_task
    from worker.training import TrainingContext, run_training

    print(f"training a {task} checkpoint with run_training ({TRAIN[task]})", flush=True)
    ctx = TrainingContext(
        device=torch.device("cuda" if args.device == "cuda" else "cpu"),
        data_dir=args.data_dir,
        cache_dir=WORKDIR / "cache",
        resnet18_weights="none",
        show_progress_bar=False,
    )
    start = time.perf_counter()
    result = run_training(task, dict(TRAIN[task]), ctx)
    model_id = f"{task}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    final = result.metrics[-1]
    store.save(
        model_id,
        result.tensors,
        {
            "task": task,
            "created_at": datetime.now(UTC).isoformat(),
            "classes": result.classes,
            "preset": get_task(task).preset.to_dict(),
            "architecture": result.architecture,
            "hyperparameters": TRAIN[task],
            "metrics": {"final": final.model_dump(), "epochs": [m.model_dump() for m in result.metrics]},
            "bench": "peers",
            **result.extra_metadata,
        },
    )
    print(f"  {model_id} in {time.perf_counter() - start:.1f} s, {final.model_dump()}", flush=True)
    return model_id


# ---------------------------------------------------------------- servers


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Server:
    """One server under test: started in its own session, stopped with its whole process group."""

    name = ""
    field = "file"  # multipart field of the image

    def __init__(self, args: argparse.Namespace, task: str, model_id: str, port: int, workdir: Path):
        self.args, self.task, self.model_id, self.port, self.workdir = args, task, model_id, port, workdir
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}-{SHORT[task]}.log"
        self.batching = task == "hymenoptera_resnet18" or args.peer_batch_lenet
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/predict"

    def form(self) -> dict[str, str]:
        return {}

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} is in use; pick other ports with --port")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        self.process = subprocess.Popen(
            self.command(), cwd=self.cwd(), env=self.env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            if self.ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in 300 s; see {self.log_path}")

    def cwd(self) -> Path:
        return ROOT

    def ready(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, self.stop_signal)
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused server (see paused) gets it too
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(20)
        # whatever is left of the group (TorchServe's Python workers, uvicorn's children)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    stop_signal = signal.SIGTERM

    def rss(self) -> int:
        """Resident bytes of the server's whole process tree."""
        if self.process is None:
            return 0
        try:
            root = psutil.Process(self.process.pid)
            total = root.memory_info().rss
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return total
        except psutil.Error:
            return 0

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the server's whole process tree."""
        if self.process is None:
            return 0.0
        total = 0.0
        try:
            root = psutil.Process(self.process.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
        except psutil.Error:
            pass
        return total

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the server's whole process group (no-op once it has exited)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def describe(self) -> str:
        return ""


@contextlib.contextmanager
def paused(servers: list[Server]):
    """Stop ``servers`` (SIGSTOP to each process group) for the duration of the block, and
    continue them after, so that idle servers take no CPU from the one being driven. Each keeps
    its loaded model and sockets; connections are made anew for each measurement."""
    try:
        for server in servers:
            server.signal_group(signal.SIGSTOP)
        yield
    finally:
        for server in servers:
            server.signal_group(signal.SIGCONT)


def idle_cores(server: Server, seconds: float = 5.0) -> float:
    """CPU cores the server's process tree uses while no request arrives (its polling loops)."""
    before = server.cpu_seconds()
    time.sleep(seconds)
    return round((server.cpu_seconds() - before) / seconds, 3)


class ApiServer(Server):
    """This API: uvicorn with ``--workers`` processes (WEB_CONCURRENCY)."""

    name = "api"

    def __init__(self, *a, variant: str = "", settings: list[str] | None = None, **kw):
        if variant:
            self.name = f"api:{variant}"
        super().__init__(*a, **kw)
        extra = dict(item.split("=", 1) for item in [*self.args.api_env, *(settings or [])])
        self.env.update(
            {
                "API_KEYS": "",
                "ENVIRONMENT": "development",
                "MODELS_DIR": str(WORKDIR / "models"),
                "CACHE_DIR": str(WORKDIR / "cache"),
                "REDIS_PREFIX": f"peers-{uuid.uuid4().hex[:8]}",
                "WEB_CONCURRENCY": str(self.args.workers),
                "INFERENCE_THREADS": str(self.args.threads),
                "INFERENCE_DEVICE": self.args.device,
                **extra,
            }
        )
        self.extra = extra

    def form(self) -> dict[str, str]:
        return {"model_id": self.model_id}

    def command(self) -> list[str]:
        workers = self.env["WEB_CONCURRENCY"]
        return [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", workers, "--log-level", "warning", "--no-access-log"]  # fmt: skip

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def describe(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return f"{self.env['WEB_CONCURRENCY']} uvicorn processes {settings}".strip()


class LitServeServer(Server):
    """LitServe 0.2: ``--workers`` inference processes (and as many API server processes)."""

    name = "litserve"
    stop_signal = signal.SIGINT

    def command(self) -> list[str]:
        batch = (
            [
                "--max-batch-size",
                str(self.args.batch_size),
                "--batch-timeout",
                str(self.args.batch_delay_ms / 1000),
            ]
            if self.batching
            else []
        )
        return [
            sys.executable,
            "-m",
            "bench.peers.lit_server",
            "--models-dir",
            str(WORKDIR / "models"),
            "--model-id",
            self.model_id,
            "--port",
            str(self.port),
            "--workers",
            str(self.args.workers),
            "--threads",
            str(self.args.threads),
            "--accelerator",
            self.args.device,
            *batch,
        ]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def describe(self) -> str:
        batch = f", batch {self.args.batch_size} / {self.args.batch_delay_ms:g} ms" if self.batching else ""
        return f"{self.args.workers} workers{batch}"


class TorchServeServer(Server):
    """TorchServe 0.12: Java frontend, ``--workers`` Python workers of the model."""

    name = "torchserve"
    field = "data"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.home = self.workdir / f"torchserve-{SHORT[self.task]}"
        self.model_name = SHORT[self.task]
        # its pid file lives in the temp dir: a private one, so that it never sees another TorchServe
        self.env["TMPDIR"] = str(self.home / "tmp")
        self.env["LOG_LOCATION"] = str(self.home / "logs")
        self.env["METRICS_LOCATION"] = str(self.home / "logs")
        self.env["PYTHONPATH"] = str(ROOT)

    @property
    def predict_url(self) -> str:
        return f"{self.url}/predictions/{self.model_name}"

    def cwd(self) -> Path:
        return self.home

    def command(self) -> list[str]:
        shutil.rmtree(self.home, ignore_errors=True)
        (self.home / "tmp").mkdir(parents=True)
        (self.home / "store").mkdir()
        peer = {
            "root": str(ROOT),
            "models_dir": str(WORKDIR / "models"),
            "model_id": self.model_id,
            "threads": self.args.threads,
        }
        (self.home / "peer.json").write_text(json.dumps(peer))
        archiver = Path(sys.executable).with_name("torch-model-archiver")
        subprocess.run(
            [
                str(archiver),
                "--model-name",
                self.model_name,
                "--version",
                "1.0",
                "--handler",
                str(ROOT / "bench" / "peers" / "ts_handler.py"),
                "--extra-files",
                str(self.home / "peer.json"),
                "--export-path",
                str(self.home / "store"),
                "--force",
            ],
            check=True,
            env=self.env,
        )
        batch = self.args.batch_size if self.batching else 1
        model = {
            self.model_name: {
                "1.0": {
                    "defaultVersion": True,
                    "marName": f"{self.model_name}.mar",
                    "minWorkers": self.args.workers,
                    "maxWorkers": self.args.workers,
                    "batchSize": batch,
                    "maxBatchDelay": int(self.args.batch_delay_ms) if batch > 1 else 1,
                    "responseTimeout": 120,
                }
            }
        }
        (self.home / "config.properties").write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.port}",
                    f"management_address=http://127.0.0.1:{self.port + 1}",
                    f"metrics_address=http://127.0.0.1:{self.port + 2}",
                    f"model_store={self.home / 'store'}",
                    f"load_models={self.model_name}.mar",
                    f"models={json.dumps(model)}",
                    "disable_system_metrics=true",
                    "install_py_dep_per_model=false",
                    "disable_token_authorization=true",
                    "enable_envvars_config=false",
                    "job_queue_size=1000",
                    "default_response_timeout=120",
                    "",
                ]
            )
        )
        launcher = Path(sys.executable).with_name("torchserve")
        return [
            str(launcher),
            "--start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--model-store",
            str(self.home / "store"),
            "--ts-config",
            str(self.home / "config.properties"),
        ]

    def ready(self) -> bool:
        # /ping says Healthy while the Python worker crash-loops: wait for every worker READY
        try:
            response = httpx.get(f"http://127.0.0.1:{self.port + 1}/models/{self.model_name}", timeout=2)
            if response.status_code != 200:
                return False
            workers = response.json()[0]["workers"]
            return len(workers) >= self.args.workers and all(w["status"] == "READY" for w in workers)
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            return False

    def start(self) -> None:
        if not port_free(self.port + 1) or not port_free(self.port + 2):
            raise RuntimeError(f"port {self.port + 1} or {self.port + 2} is in use")
        super().start()

    def describe(self) -> str:
        batch = f", batch {self.args.batch_size} / {self.args.batch_delay_ms:g} ms" if self.batching else ""
        return f"{self.args.workers} workers{batch}"


SERVER_CLASSES = {"api": ApiServer, "torchserve": TorchServeServer, "litserve": LitServeServer}
PORT_OFFSET = {"api": 0, "torchserve": 3, "litserve": 7}


def available(name: str) -> str | None:
    """Why server ``name`` cannot run here, or None."""
    if name == "torchserve":
        if not Path(sys.executable).with_name("torchserve").exists():
            return "torchserve not installed (pip install -e '.[bench]')"
        if shutil.which("java") is None:
            return "no java on PATH (TorchServe needs Java 17)"
    if name == "litserve":
        try:
            import litserve  # noqa: F401
        except ImportError:
            return "litserve not installed (pip install -e '.[bench]')"
    return None


# ---------------------------------------------------------------- load


def bodies_for(server: Server, images: list[tuple[str, bytes, str]]) -> list[tuple[bytes, str]]:
    """Multipart bodies, built once: (bytes, content type)."""
    out = []
    for name, data, content_type in images:
        request = httpx.Request(
            "POST", server.predict_url, files={server.field: (name, data, content_type)}, data=server.form()
        )
        out.append((request.read(), request.headers["content-type"]))
    return out


def answers(server: Server, bodies: list[tuple[bytes, str]]) -> list[dict | None]:
    """One request at a time: each body's top prediction ({index, probability}) or None."""
    out = []
    with httpx.Client(timeout=60) as client:
        for body, content_type in bodies:
            response = client.post(server.predict_url, content=body, headers={"content-type": content_type})
            if response.status_code != 200:
                out.append({"error": f"{response.status_code}: {response.text[:200]}"})
                continue
            top = response.json()["predictions"][0]
            out.append({"index": top["index"], "probability": top["probability"]})
    return out


def compare(reference: list[dict], other: list[dict]) -> dict:
    """Top-1 agreement with this API's answers and the largest probability difference."""
    same = sum(
        1 for a, b in zip(reference, other, strict=True) if "index" in b and a.get("index") == b["index"]
    )
    diffs = [
        abs(a["probability"] - b["probability"])
        for a, b in zip(reference, other, strict=True)
        if "index" in a and "index" in b and a["index"] == b["index"]
    ]
    errors = [b["error"] for b in other if "error" in b]
    return {
        "images": len(reference),
        "same_top1": same,
        "max_probability_diff": max(diffs) if diffs else None,
        "errors": len(errors),
        "error_samples": errors[:3],
    }


async def drive(url: str, bodies: list[tuple[bytes, str]], clients: int, duration: float) -> dict:
    """``clients`` concurrent clients, each one keep-alive connection, for ``duration`` seconds.
    Returns the raw latencies (s), errors and elapsed seconds.

    The clients are built before the clock starts and share one SSL context: building an httpx
    client loads the CA bundle (tens of ms each), which at 128 clients on a busy machine took
    longer than the measurement itself."""
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    context = ssl.create_default_context()
    pool = [httpx.AsyncClient(timeout=60, limits=limits, verify=context) for _ in range(clients)]
    deadline = time.monotonic() + duration

    async def client_loop(seed: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            body, content_type = rng.choice(bodies)
            start = time.perf_counter()
            try:
                response = await client.post(url, content=body, headers={"content-type": content_type})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - start)

    started = time.monotonic()
    try:
        await asyncio.gather(*(client_loop(i, client) for i, client in enumerate(pool)))
    finally:
        for client in pool:
            await client.aclose()
    return {"latencies": latencies, "errors": errors, "elapsed": time.monotonic() - started}


def _drive_in_process(url: str, bodies: list[tuple[bytes, str]], clients: int, duration: float) -> dict:
    return asyncio.run(drive(url, bodies, clients, duration))


def drive_split(
    url: str, bodies: list[tuple[bytes, str]], clients: int, duration: float, processes: int
) -> dict:
    """``drive`` with the clients spread over ``processes`` load-generator processes (a single
    Python client process saturates before a fast server does); results merged."""
    processes = max(1, min(processes, clients))
    if processes == 1:
        return asyncio.run(drive(url, bodies, clients, duration))
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.starmap(_drive_in_process, [(url, bodies, share, duration) for share in shares])
    return {
        "latencies": [x for part in parts for x in part["latencies"]],
        "errors": [e for part in parts for e in part["errors"]],
        "elapsed": max(part["elapsed"] for part in parts),
    }


# wrk (https://github.com/wg/wrk, 4.x): one C event loop, requests pre-formatted in Lua. The script
# is filled in per run: @DIR@ is the folder of the bodies (1.body, 2.body, ...) and of the report,
# @TYPES@ the table of their content types. done() walks wrk's 1 µs latency histogram with latency(i),
# which scans it from its minimum on every call (distinct values x range): about 0.3 s of CPU after a
# 5 s run at 32 clients, spent after the measured window.
WRK_SCRIPT = """-- written by bench.peers for one wrk run
local dir = [==[@DIR@]==]
local types = @TYPES@
local prepared = {}
local count = 0
local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_id", threads)
end

function init(args)
   for i, content_type in ipairs(types) do
      local file = assert(io.open(dir .. "/" .. i .. ".body", "rb"))
      local body = file:read("*a")
      file:close()
      local headers = {["Content-Type"] = content_type, ["Content-Length"] = #body}
      prepared[i] = wrk.format("POST", wrk.path, headers, body)
   end
   count = #prepared
   math.randomseed(7919 * (thread_id or 1))
end

function request()
   return prepared[math.random(count)]
end

function done(summary, latency, requests)
   local out = assert(io.open(dir .. "/report.txt", "w"))
   local e = summary.errors
   out:write(string.format("requests %d\\nduration_us %d\\n", summary.requests, summary.duration))
   out:write(string.format("errors %d %d %d %d %d\\n", e.connect, e.read, e.write, e.status, e.timeout))
   for i = 1, #latency do
      local value, n = latency(i)
      out:write(string.format("%d %d\\n", value, n))
   end
   out:close()
end
"""


def wrk_correction(histogram: dict[int, int], interval_us: int) -> dict[int, int]:
    """wrk 4.x's coordinated-omission correction (``stats_correct`` in its src/stats.c) applied to
    a latency histogram ({µs: count}): every value n >= 2 * ``interval_us`` adds its count again
    at n - interval, n - 2 * interval, ... while above ``interval_us``."""
    out = dict(histogram)
    for value, count in histogram.items():
        if value >= 2 * interval_us:
            for lower in range(value - interval_us, interval_us, -interval_us):
                out[lower] = out.get(lower, 0) + count
    return out


def undo_wrk_correction(histogram: dict[int, int], interval_us: int) -> dict[int, int]:
    """wrk 4.x's latency histogram ({µs: count}) as recorded, before its coordinated-omission
    correction (``stats_correct``), which for every recorded value n >= 2 * ``interval_us`` adds
    its count again at n - interval, n - 2 * interval, ... while above ``interval_us``: samples
    of requests never sent (see ``wrk_correction``). Exact inverse, from the top:
    H[t] = H'[t] - sum_k>=1 H[t + k * I]. Raises ValueError when ``histogram`` cannot be the
    result of that correction (checked by applying it again)."""
    tails: dict[int, int] = {}  # value -> sum of the raw counts at value, value + I, value + 2I, ...
    raw: dict[int, int] = {}
    for value in sorted(histogram, reverse=True):
        count = histogram[value]
        if value > interval_us:
            above = tails.get(value + interval_us, 0)
            count -= above
            tails[value] = count + above
        if count < 0:
            raise ValueError(f"not a corrected wrk histogram: {value} µs would have {count} samples")
        if count:
            raw[value] = count
    if wrk_correction(raw, interval_us) != histogram:
        raise ValueError(f"not a wrk histogram corrected with an interval of {interval_us} µs")
    return raw


def parse_wrk_report(text: str, clients: int, timeout_s: float) -> dict:
    """The report our wrk script's ``done()`` writes -> ``drive``'s result: ``latencies`` (s, one
    per completed request, ascending), ``errors`` (one string per failed request), ``elapsed``
    (s, wrk's own run time), plus ``wrk`` (its summary: requests, duration_us, error counts).

    The report holds wrk's latency histogram in µs; wrk 4.x "corrects" it for coordinated
    omission with the interval duration / (requests // clients), which is undone here so that
    the latencies are those measured, as ``drive`` records them. Answers of status >= 400 are
    requests with a latency and an error; answers slower than ``timeout_s`` (outside wrk's
    histogram) count at ``timeout_s`` and as errors; socket errors (connect, read, write) count as
    errors without a latency (no request completed), so ``summarise``'s successful requests
    (latencies - errors) err low, never high, when there are any."""
    lines = text.splitlines()
    fields = {line.split()[0]: line.split()[1:] for line in lines[:3]}
    requests = int(fields["requests"][0])
    duration_us = int(fields["duration_us"][0])
    connect, read, write, status, timeout = (int(x) for x in fields["errors"])
    histogram: dict[int, int] = {}
    for line in lines[3:]:
        value, count = (int(float(x)) for x in line.split())
        histogram[value] = histogram.get(value, 0) + count
    recorded = requests - timeout  # wrk records every completed request under its timeout
    if sum(histogram.values()) != recorded:
        per_client = requests // clients
        if not per_client:
            raise ValueError(f"wrk histogram holds {sum(histogram.values())} samples for {recorded} requests")
        histogram = undo_wrk_correction(histogram, duration_us // per_client)
        if sum(histogram.values()) != recorded:
            raise ValueError(
                f"wrk histogram holds {sum(histogram.values())} samples for {recorded} requests "
                "after undoing its correction"
            )
    latencies = [value / 1e6 for value in sorted(histogram) for _ in range(histogram[value])]
    latencies += [timeout_s] * timeout
    errors = (
        ["HTTP status >= 400 (wrk keeps no more detail)"] * status
        + [f"timeout: slower than {timeout_s:g} s"] * timeout
        + ["socket read error"] * read
        + ["socket write error"] * write
        + ["connect error"] * connect
    )
    counts = {"connect": connect, "read": read, "write": write, "status": status, "timeout": timeout}
    summary = {"requests": requests, "duration_us": duration_us, "errors": counts}
    return {"latencies": latencies, "errors": errors, "elapsed": duration_us / 1e6, "wrk": summary}


def wrk_version() -> str:
    """``wrk -v``'s first words, e.g. ``wrk debian/4.1.0-3+b2 [epoll]``, or ``wrk`` when it says none."""
    try:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "wrk"
    return out.split(" Copyright")[0].strip() or "wrk"


def drive_wrk(
    url: str,
    bodies: list[tuple[bytes, str]],
    clients: int,
    duration: float,
    threads: int = 1,
    timeout_s: float = 60.0,
) -> dict:
    """``drive`` with wrk: ``clients`` keep-alive connections on ``threads`` wrk threads (at most
    ``clients``) for ``duration`` seconds rounded up to whole seconds (wrk's unit), each request
    one of ``bodies`` (multipart bytes, content type) at random, pre-formatted by the Lua script
    so that wrk's own CPU per request stays tiny. Returns ``drive``'s dict -- ``latencies`` (s),
    ``errors``, ``elapsed`` (s) -- and ``wrk``, its summary (see ``parse_wrk_report``).
    ``timeout_s`` (s): answers slower than this count as errors. Raises RuntimeError when wrk
    fails or writes no report."""
    seconds = max(1, math.ceil(duration - 1e-6))
    with tempfile.TemporaryDirectory(prefix="peers-wrk-") as tmp:
        folder = Path(tmp)
        for index, (body, _) in enumerate(bodies, 1):
            (folder / f"{index}.body").write_bytes(body)
        types = ", ".join(f"[==[{content_type}]==]" for _, content_type in bodies)
        script = folder / "bodies.lua"
        script.write_text(WRK_SCRIPT.replace("@DIR@", str(folder)).replace("@TYPES@", "{" + types + "}"))
        command = ["wrk", f"-t{max(1, min(threads, clients))}", f"-c{clients}", f"-d{seconds}s",
                   "--timeout", f"{math.ceil(timeout_s)}s", "-s", str(script), url]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + timeout_s + 300, check=False
        )
        report = folder / "report.txt"
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(
                f"wrk exited with {done.returncode} and no report: {(done.stderr or done.stdout)[-500:]}"
            )
        return parse_wrk_report(report.read_text(), clients, math.ceil(timeout_s))


def summarise(clients: int, samples: list[dict]) -> dict:
    """Pooled over the rounds: throughput (successful requests / seconds driven), p50/p99 latency,
    errors, CPU seconds of the server per request, peak RSS."""
    latencies = sorted(x for s in samples for x in s["latencies"])
    errors = [e for s in samples for e in s["errors"]]
    elapsed = sum(s["elapsed"] for s in samples)
    cpu = sum(s["cpu_s"] for s in samples)

    def pct(q: float) -> float | None:
        return (
            round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * q))], 2)
            if latencies
            else None
        )

    ok = len(latencies) - len(errors)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "requests_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "server_cpu_ms_per_request": round(1000 * cpu / len(latencies), 2) if latencies else None,
        "server_cpu_cores": round(cpu / elapsed, 2) if elapsed else None,
        "rounds_req_per_s": [
            round((len(s["latencies"]) - len(s["errors"])) / s["elapsed"], 1) for s in samples
        ],
        "peak_rss_mb": round(max(s["peak_rss"] for s in samples) / 2**20, 1),
        "loadavg": [s["loadavg"] for s in samples],
    }


class RssSampler(threading.Thread):
    def __init__(self, server: Server, interval: float = 0.5):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, self.server.rss())


def cpu_load() -> float:
    """The machine's 1-minute load average (other users' work shows here)."""
    return round(os.getloadavg()[0], 2)


def prime(server: Server, bodies: list[tuple[bytes, str]], args: argparse.Namespace) -> float:
    """Load the model in every process of the server before anything is measured: bursts of
    concurrent clients (so that each process gets connections) until a burst's slowest request
    takes under 5 s (models load, and ONNX exports, on first use), at most 60 s. Returns seconds."""
    start = time.monotonic()
    clients = max(8, 4 * args.workers)
    while time.monotonic() - start < 60:
        burst = drive_split(server.predict_url, bodies, clients, 3.0, args.client_processes)
        if burst["latencies"] and max(burst["latencies"]) < 5.0 and not burst["errors"]:
            break
    return round(time.monotonic() - start, 1)


def load(
    url: str, bodies: list[tuple[bytes, str]], clients: int, duration: float, args: argparse.Namespace
) -> dict:
    """``clients`` clients for ``duration`` seconds with the load generator of ``args.loadgen``:
    ``drive_wrk`` or ``drive_split``. Returns ``drive``'s dict (latencies in s, errors, elapsed s)."""
    if args.loadgen == "wrk":
        return drive_wrk(url, bodies, clients, duration, threads=args.wrk_threads)
    return drive_split(url, bodies, clients, duration, args.client_processes)


def loadgen_label(args: argparse.Namespace) -> str:
    """The load generator in words, e.g. ``wrk debian/4.1.0-3+b2 [epoll], 1 thread``."""
    if args.loadgen == "wrk":
        return f"{wrk_version()}, {args.wrk_threads} thread{'s' if args.wrk_threads > 1 else ''}"
    return f"httpx {httpx.__version__} asyncio, {args.client_processes} processes"


def one_level(
    server: Server, bodies: list[tuple[bytes, str]], clients: int, args: argparse.Namespace
) -> dict:
    """One client count on one server: warm-up, then ``args.duration`` seconds measured with
    ``args.loadgen``. Returns ``drive``'s dict plus the server's CPU seconds (``cpu_s``), its peak
    RSS (bytes) and the load average at the start."""
    if args.warmup:
        load(server.predict_url, bodies, clients, args.warmup, args)
    sampler = RssSampler(server)
    sampler.start()
    loadavg = cpu_load()
    cpu_before = server.cpu_seconds()
    sample = load(server.predict_url, bodies, clients, args.duration, args)
    sample["cpu_s"] = server.cpu_seconds() - cpu_before
    sampler.stopped.set()
    sampler.join()
    sample["peak_rss"] = max(sampler.peak, server.rss())
    sample["loadavg"] = loadavg
    return sample


def measure_task(
    servers: list[Server], images: list[tuple[str, bytes, str]], args: argparse.Namespace
) -> list[dict]:
    """Start every server of one model, check their answers against this API's, then drive them
    in turn: for each round and client count, each server (the order rotates every round), so
    that the machine's changing load falls on all of them alike."""
    runs: dict[str, dict] = {}
    bodies: dict[str, list[tuple[bytes, str]]] = {}
    started: list[Server] = []
    try:
        for server in servers:
            print(f"{server.name} serving {server.model_id} ({server.describe()})", flush=True)
        start_s = {}

        def start(server: Server) -> Exception | None:
            began = time.perf_counter()
            try:
                server.start()
            except Exception as exc:  # one broken peer must not lose the others' numbers
                return exc
            finally:
                start_s[server.name] = round(time.perf_counter() - began, 1)
            return None

        # started side by side (they are idle until driven), then checked one by one
        with ThreadPoolExecutor(len(servers)) as pool:
            failures = list(pool.map(start, servers))
        for server, failure in zip(servers, failures, strict=True):
            if failure is not None:
                print(f"  {server.name} failed to start: {failure}", flush=True)
                runs[server.name] = {
                    "server": server.name,
                    "task": server.task,
                    "error": str(failure),
                    "levels": [],
                }
                server.stop()
                continue
            started.append(server)
            bodies[server.name] = bodies_for(server, images)
            runs[server.name] = {
                "server": server.name,
                "task": server.task,
                "model_id": server.model_id,
                "config": server.describe(),
                "start_s": start_s[server.name],
                "answers": answers(server, bodies[server.name][: args.check_images]),
                "prime_s": prime(server, bodies[server.name], args),
                "idle_rss_mb": round(server.rss() / 2**20, 1),
                "idle_cores": idle_cores(server),
                "levels": [],
            }
            print(f"  idle: {runs[server.name]['idle_cores']} cores", flush=True)
            if "api" in runs and server.name != "api" and "answers" in runs["api"]:
                runs[server.name]["agreement"] = compare(runs["api"]["answers"], runs[server.name]["answers"])
                print(f"  agreement with this API: {runs[server.name]['agreement']}", flush=True)
        samples: dict[tuple[str, int], list[dict]] = {}
        for round_index in range(args.rounds):
            for clients in args.clients:
                shift = round_index % max(len(started), 1)
                for server in started[shift:] + started[:shift]:
                    others = [other for other in started if other is not server] if args.pause else []
                    with paused(others):
                        sample = one_level(server, bodies[server.name], clients, args)
                    samples.setdefault((server.name, clients), []).append(sample)
                    ok = len(sample["latencies"]) - len(sample["errors"])
                    print(
                        f"  round {round_index + 1} {server.name:10} {SHORT[server.task]:12} "
                        f"{clients:4d} clients: "
                        f"{ok / sample['elapsed']:7.1f} req/s, errors {len(sample['errors'])}, "
                        f"CPU {1000 * sample['cpu_s'] / max(len(sample['latencies']), 1):.2f} ms/request, "
                        f"load {sample['loadavg']}",
                        flush=True,
                    )
        for server in started:
            runs[server.name]["levels"] = [
                summarise(clients, samples[(server.name, clients)]) for clients in args.clients
            ]
    finally:
        for server in servers:  # also those interrupted while starting
            server.stop()
    return list(runs.values())


# ---------------------------------------------------------------- report


def level_of(run: dict, clients: int) -> dict | None:
    return next((level for level in run["levels"] if level["clients"] == clients), None)


def speedups(runs: list[dict], clients: int = 32) -> dict[str, float]:
    """Per task: this API's throughput at ``clients`` / the best peer's."""
    out = {}
    for task in MODELS:
        ours = [level_of(r, clients) for r in runs if r["task"] == task and r["server"] == "api"]
        peers = [
            level_of(r, clients) for r in runs if r["task"] == task and not r["server"].startswith("api")
        ]
        ours = [x for x in ours if x]
        peers = [x for x in peers if x]
        if ours and peers:
            best = max(p["requests_per_s"] for p in peers)
            out[task] = round(ours[0]["requests_per_s"] / best, 2) if best else math.inf
        else:
            out[task] = math.nan
    return out


def table(runs: list[dict]) -> str:
    header = (
        "| model | server | config | clients | req/s | p50 ms | p99 ms | errors | CPU ms/req | peak RSS MB "
        "| top-1 as API |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        agree = run.get("agreement")
        same = f"{agree['same_top1']}/{agree['images']}" if agree else "(reference)"
        for level in run["levels"]:
            lines.append(
                f"| {SHORT[run['task']]} | {run['server']} | {run['config']} | {level['clients']} "
                f"| {level['requests_per_s']:.1f} | {level['p50_ms']} | {level['p99_ms']} "
                f"| {level['errors']} "
                f"| {level['server_cpu_ms_per_request']} | {level['peak_rss_mb']:.0f} | {same} |"
            )
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the finally blocks resume and stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.check_images = 20 if args.quick else 100
    args.loadgen_label = loadgen_label(args)
    print(f"load generator: {args.loadgen_label} ({args.loadgen_why})", flush=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir = WORKDIR / "runs" / stamp
    runs: list[dict] = []
    skipped: dict[str, str] = {}
    for name in args.servers:
        why = available(name)
        if why:
            skipped[name] = why
            print(f"skipping {name}: {why}", flush=True)
    servers_ok = [name for name in args.servers if name not in skipped]
    failed = False
    for task in args.models:
        model_id = checkpoint_for(task, args)
        images = mnist_pngs(args.data_dir) if task == "mnist_lenet5" else hymenoptera_jpegs(args.data_dir)
        # this API first: its answers are the reference the peers are compared with
        servers = [
            SERVER_CLASSES[name](args, task, model_id, args.port + PORT_OFFSET[name], workdir)
            for name in sorted(servers_ok, key=lambda n: n != "api")
        ]
        for index, spec in enumerate(args.api_variant):
            variant, _, settings = spec.partition(":")
            port = args.port + 10 + index
            servers.append(
                ApiServer(args, task, model_id, port, workdir, variant=variant, settings=settings.split(","))
            )
        task_runs = measure_task(servers, images, args)
        failed |= any("error" in run for run in task_runs)
        runs.extend(task_runs)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "command": " ".join(["python -m bench.peers", *(argv if argv is not None else sys.argv[1:])]),
        "tag": args.tag,
        "loadgen": args.loadgen,
        "loadgen_detail": args.loadgen_label,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "skipped": skipped,
        "loadavg_end": cpu_load(),
        "runs": [{k: v for k, v in r.items() if k != "answers"} for r in runs],
        "speedup_at_32_clients": speedups(runs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"peers-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"load generator: {args.loadgen_label}; {args.duration:g} s per level, {args.rounds} round(s)")
    print(table([r for r in runs if r["levels"]]))
    print(f"written to {out.relative_to(ROOT)}")
    ratio = result["speedup_at_32_clients"]
    print(f"speedup mnist_lenet5 {ratio['mnist_lenet5']} resnet18 {ratio['hymenoptera_resnet18']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
