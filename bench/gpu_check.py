"""One command for a CUDA host: train every task on the GPU, then time serving there.

    python -m bench.gpu_check                        # everything, < 8 min on an H200
    python -m bench.gpu_check --data-dir /path/to/datasets --skip peers

Steps, each with its own time limit, each skipped with a reason rather than failing the rest:

1. **environment**: torch, CUDA device, and which of the service's packages are importable (a bare
   CUDA image has torch but maybe not FastAPI, Celery or Redis).
2. **train**: every task with the assignment's settings (10 epochs; ResNet18 fine-tune and
   feature extraction with ``weights=none``). Through the real service when it can run -- Redis
   (one answering at ``REDIS_URL``, else ``redis-server`` started on a private port), the API and
   one Celery worker with ``DEVICE=cuda`` and ``INFERENCE_DEVICE=cuda``, jobs submitted with
   ``POST /jobs`` and one ``/predict`` per model -- otherwise directly with
   ``worker.training.run_training`` on ``cuda`` (the function the worker runs), saying why.
3. **benchmark**: ``python -m bench.benchmark --device cuda --skip-reference`` (the product's
   recipes, cold and warm), limited in time.
4. **peers**: the ResNet18 part of ``python -m bench.peers`` with ``--device cuda`` (this API with
   its micro-batcher, in fp32 and with ``INFERENCE_PRECISION=bf16``, and the peers that are
   installed), limited in time.

Prints one table: training seconds per task (``train_s``: inside the training loop, as the job
records it) against the H200 targets (dense < 2 s, LeNet-5 < 5 s, ResNet18 fine-tune < 20 s), the
whole job, accuracy, and the serving throughput; writes JSON under bench/results/.

Data: ``--data-dir`` (default ``DATA_DIR``, else ``shared/datasets`` in the checkout, else
``../shared/datasets``) with MNIST/raw (the ``.gz`` files will do), ``cifar10-jpg.zip`` and
``hymenoptera_data.zip``; a task whose data is missing is skipped and named. Missing Python
packages can be installed from a wheel folder first (``--wheels .whl``: ``pip install --no-index``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGETS_S = {"cifar10_dense": 2.0, "mnist_lenet5": 5.0, "hymenoptera_resnet18/finetune": 20.0}
JOBS = [
    ("cifar10_dense", {}),
    ("mnist_lenet5", {}),
    ("hymenoptera_resnet18/finetune", {"mode": "finetune", "weights": "none"}),
    ("hymenoptera_resnet18/feature_extraction", {"mode": "feature_extraction", "weights": "none"}),
]
SERVICE_MODULES = (
    "fastapi",
    "uvicorn",
    "celery",
    "redis",
    "pydantic_settings",
    "multipart",
    "prometheus_client",
)
SAMPLE = {"cifar10_dense": "cifar", "mnist_lenet5": "mnist", "hymenoptera_resnet18": "hymenoptera"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["service", "benchmark", "peers"])
    parser.add_argument("--wheels", type=Path, default=None, help="install missing packages from here first")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--budget-s", type=float, default=470.0, help="whole run, seconds")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a rehearsal on the CPU: 1 epoch on small subsets, short steps (checks the script, not the GPU)",
    )
    args = parser.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    return args


def job_settings(hp: dict, smoke: bool) -> dict:
    """The assignment's settings, or (``--smoke``) one epoch on a small subset."""
    if not smoke:
        return dict(hp)
    return {**hp, "epochs": 1, "max_train_samples": 32 if hp.get("mode") else 512}


def default_data_dir() -> Path:
    for candidate in (
        os.environ.get("DATA_DIR"),
        ROOT / "shared" / "datasets",
        ROOT.parent / "shared" / "datasets",
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return ROOT / "data"


def has_data(task: str, data_dir: Path) -> bool:
    base = task.split("/")[0]
    if base == "mnist_lenet5":
        raw = data_dir / "MNIST" / "raw"
        return any((raw / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz"))
    if base == "cifar10_dense":
        names = ("cifar-10-batches-py", "cifar10-jpg", "cifar10-jpg.zip", "cifar10", "cifar10.zip")
        return any((data_dir / n).exists() for n in names)
    return any((data_dir / n).exists() for n in ("hymenoptera_data", "hymenoptera_data.zip"))


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def install_wheels(folder: Path) -> str:
    """pip install every wheel of ``folder`` offline into a private target on sys.path."""
    target = Path("/tmp/imgclf-site")
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        return f"no wheels in {folder}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(target),
            *wheels,
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return f"pip install from {folder} failed: {result.stderr[-500:]}"
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return f"installed {len(wheels)} wheels from {folder} into {target}"


def environment() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "missing_for_service": missing(SERVICE_MODULES),
        "redis_server": shutil.which("redis-server"),
        "java": shutil.which("java"),
        "cpus": os.cpu_count(),
    }
    return info


def free_port(port: int) -> int:
    for candidate in range(port, port + 50):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
                return candidate
            except OSError:
                continue
    raise RuntimeError(f"no free port from {port}")


class ServiceStack:
    """Redis (if none answers), the API and one Celery worker on the GPU, under a private prefix."""

    def __init__(self, data_dir: Path, port: int, workdir: Path, device: str = "cuda"):
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        tag = uuid.uuid4().hex[:8]
        self.redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self.port = free_port(port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "API_KEYS": "",
            "ENVIRONMENT": "development",
            "REDIS_PREFIX": f"gpucheck-{tag}",
            "CELERY_QUEUE": f"gpucheck-{tag}",
            "DATA_DIR": str(data_dir),
            "MODELS_DIR": str(workdir / "models"),
            "CACHE_DIR": str(workdir / "cache"),
            "DEVICE": device,
            "INFERENCE_DEVICE": device,
            "RESNET18_WEIGHTS": "none",
            "PYTHONUNBUFFERED": "1",
        }

    def _redis_answers(self, url: str) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
        except Exception:
            return False

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "stack.log", "ab")  # noqa: SIM115 (kept open for the children)
        if not self._redis_answers(self.redis_url):
            server = shutil.which("redis-server")
            if server is None:
                raise RuntimeError(f"no Redis answers at {self.redis_url} and there is no redis-server")
            redis_port = free_port(6390)
            self.processes.append(
                subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(redis_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )
            self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
            deadline = time.monotonic() + 20
            while not self._redis_answers(self.redis_url):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer in 20 s")
                time.sleep(0.2)
        self.env["REDIS_URL"] = self.redis_url
        worker = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--loglevel=WARNING",
            "--concurrency=1",
            "-n",
            f"gpucheck-{uuid.uuid4().hex[:6]}@%h",
        ]
        api = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--log-level",
            "warning",
        ]
        for command in (worker, api):
            self.processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True
                )
            )
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(
                    f"a process of the stack exited at start; see {self.workdir / 'stack.log'}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).json().get("workers"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the stack was not ready in 120 s; see {self.workdir / 'stack.log'}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def train_service(stack: ServiceStack, deadline: float, data_dir: Path, smoke: bool) -> list[dict]:
    import httpx

    rows = []
    for name, hp in JOBS:
        task = name.split("/")[0]
        if not has_data(task, data_dir):
            rows.append({"task": name, "skipped": f"no data for {task} in {data_dir}"})
            continue
        if time.monotonic() > deadline:
            rows.append({"task": name, "skipped": "out of time"})
            continue
        body = {"task": task, "hyperparameters": job_settings(hp, smoke)}
        job = httpx.post(f"{stack.url}/jobs", json=body, timeout=30).json()
        while True:
            record = httpx.get(f"{stack.url}/jobs/{job['id']}", timeout=30).json()
            if record["status"] in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                httpx.post(f"{stack.url}/jobs/{job['id']}/cancel", timeout=30)
                record = {**record, "status": "cancelled (out of time)"}
                break
            time.sleep(0.5)
        final = (record.get("metrics") or [{}])[-1]
        row = {
            "task": name,
            "via": "service",
            "status": record["status"],
            "device": record.get("device"),
            "timings": record.get("timings") or {},
            "accuracy": final.get("test_accuracy") or final.get("val_accuracy"),
            "error": record.get("error"),
            "model_id": record.get("model_id"),
        }
        if record.get("model_id"):
            row["predict"] = predict_once(stack.url, task, record["model_id"], data_dir)
        rows.append(row)
    return rows


def predict_once(url: str, task: str, model_id: str, data_dir: Path) -> str:
    """One /predict with a real test image through the API on the GPU: 'ok <label>' or the error."""
    import httpx

    try:
        from bench.data import hymenoptera_jpegs, mnist_pngs

        if task == "mnist_lenet5":
            name, data, content_type = mnist_pngs(data_dir, 1)[0]
        elif task == "hymenoptera_resnet18":
            name, data, content_type = hymenoptera_jpegs(data_dir)[0]
        else:
            import io

            from PIL import Image

            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (90, 120, 200)).save(buffer, format="PNG")
            name, data, content_type = "blue.png", buffer.getvalue(), "image/png"
        response = httpx.post(
            f"{url}/predict",
            files={"file": (name, data, content_type)},
            data={"model_id": model_id},
            timeout=60,
        )
        if response.status_code != 200:
            return f"{response.status_code}: {response.text[:200]}"
        return f"ok {response.json()['predictions'][0]['label']}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def train_direct(
    deadline: float, data_dir: Path, why: str, workdir: Path, device: str = "cuda", smoke: bool = False
) -> list[dict]:
    import torch

    from worker.training import TrainingContext, run_training

    rows = []
    for name, hp in JOBS:
        task = name.split("/")[0]
        if not has_data(task, data_dir):
            rows.append({"task": name, "skipped": f"no data for {task} in {data_dir}"})
            continue
        if time.monotonic() > deadline:
            rows.append({"task": name, "skipped": "out of time"})
            continue
        ctx = TrainingContext(
            device=torch.device(device),
            data_dir=data_dir,
            cache_dir=workdir / "cache",
            resnet18_weights="none",
            show_progress_bar=False,
        )
        start = time.perf_counter()
        try:
            result = run_training(task, job_settings(hp, smoke), ctx)
            final = result.metrics[-1]
            accuracy = final.test_accuracy if final.test_accuracy is not None else final.val_accuracy
            status, error = "succeeded", None
        except Exception as exc:
            accuracy, status, error = None, "failed", f"{type(exc).__name__}: {exc}"
        ctx.timings["total_s"] = round(time.perf_counter() - start, 3)
        rows.append(
            {
                "task": name,
                "via": f"run_training ({why})",
                "status": status,
                "device": device,
                "timings": ctx.timings,
                "accuracy": accuracy,
                "error": error,
            }
        )
    return rows


def run_step(command: list[str], timeout: float, log: Path) -> dict:
    """A benchmark step in a subprocess, limited to ``timeout`` seconds; its last lines."""
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1))
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code = "timeout"
    log.write_text(output)
    return {
        "command": " ".join(command),
        "exit": code,
        "seconds": round(time.monotonic() - start, 1),
        "tail": output.strip().splitlines()[-25:],
    }


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    end = started + args.budget_s
    data_dir = args.data_dir or default_data_dir()
    workdir = ROOT / "var" / "gpu_check" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    notes = []
    if args.wheels:
        notes.append(install_wheels(args.wheels))
    env = environment()
    print(f"environment: {json.dumps(env)}", flush=True)
    if not env["cuda"] and not args.smoke:
        print("no CUDA device: this check is for a GPU host (--smoke rehearses it on the CPU)", flush=True)
        return 2
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": env,
        "notes": notes,
    }

    # 2. training, through the service if it can run
    train_deadline = started + 0.55 * args.budget_s
    why = None
    if "service" in args.skip:
        why = "--skip service"
    elif env["missing_for_service"]:
        why = f"missing packages {', '.join(env['missing_for_service'])}"
    rows: list[dict] = []
    if why is None:
        stack = ServiceStack(data_dir, args.port, workdir, args.device)
        try:
            stack.start()
            rows = train_service(stack, train_deadline, data_dir, args.smoke)
        except Exception as exc:
            why = f"service did not start: {exc}"
        finally:
            stack.stop()
    if why is not None:
        print(f"training with run_training directly: {why}", flush=True)
        try:
            rows = train_direct(train_deadline, data_dir, why, workdir, args.device, args.smoke)
        except ImportError as exc:
            rows = [{"task": "all", "skipped": f"cannot import the training code: {exc}"}]
    result["training"] = rows

    # 3. product benchmark on the GPU
    steps = {}
    left = end - time.monotonic()
    if "benchmark" not in args.skip and left > 60:
        command = [
            sys.executable,
            "-m",
            "bench.benchmark",
            "--device",
            args.device,
            "--skip-reference",
            "--data-dir",
            str(data_dir),
            *(["--quick"] if args.smoke else []),
        ]
        steps["benchmark"] = run_step(command, min(left * 0.5, 180), workdir / "benchmark.log")
    # 4. ResNet18 serving side by side on the GPU
    left = end - time.monotonic()
    if "peers" not in args.skip and left > 45 and has_data("hymenoptera_resnet18", data_dir):
        command = [
            sys.executable,
            "-m",
            "bench.peers",
            "--models",
            "hymenoptera_resnet18",
            "--device",
            args.device,
            "--clients",
            "1",
            "32",
            "--duration",
            "8",
            "--rounds",
            "1",
            "--workers",
            "1",
            "--api-variant",  # bfloat16 (opt-in, other maths) beside fp32
            "bf16:INFERENCE_PRECISION=bf16",
            "--data-dir",
            str(data_dir),
        ]
        steps["peers"] = run_step(command, left - 10, workdir / "peers.log")
    result["steps"] = steps
    result["seconds"] = round(time.monotonic() - started, 1)

    print()
    print("| task | via | status | train_s | target | whole job s | accuracy | /predict |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['task']} | skipped: {row['skipped']} | | | | | | |")
            continue
        train_s = row["timings"].get("train_s")
        target = TARGETS_S.get(row["task"])
        verdict = "" if target is None or train_s is None else ("met" if train_s < target else "MISSED")
        target_text = f"< {target:g} s {verdict}" if target else ""
        accuracy = f"{row['accuracy']:.2%}" if isinstance(row.get("accuracy"), float) else "-"
        print(
            f"| {row['task']} | {row['via']} | {row['status']} | {train_s} | {target_text} | "
            f"{row['timings'].get('total_s')} | {accuracy} | {row.get('predict', '-')} |"
        )
        if row.get("error"):
            print(f"|   error: {row['error']} |")
    for name, step in steps.items():
        print(f"\n{name}: exit {step['exit']} in {step['seconds']} s ({step['command']})")
        print("\n".join(step["tail"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gpu-check-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten to {out.relative_to(ROOT)}; total {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
