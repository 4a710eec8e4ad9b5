"""CPU time per /predict request of one API process: the figure a code-level lever moves.

    .venv/bin/python -m bench.peers --quick                       # first: trains the two checkpoints
    .venv/bin/python -m bench.api_cpu --model mnist_lenet5 --rounds 3
    .venv/bin/python -m bench.api_cpu --model hymenoptera_resnet18 --concurrency 32

Starts this API as one uvicorn process (``app.serve --workers 1``, ``INFERENCE_THREADS=1``) on the
newest checkpoint of ``--model`` in ``var/peers/models`` (the ones ``bench.peers`` trained), sends
3 s of warm-up and then ``--duration`` seconds of ``/predict`` with ``--concurrency`` keep-alive
clients (real MNIST test digits as PNG, or the 153 hymenoptera val JPEGs), ``--rounds`` times, each
round in a fresh process, and prints requests/s, latency and the API process's user + system CPU
seconds per request. Throughput on a shared machine follows the CPU share
the server gets; CPU per request does not, so compare two commits with this. Extra
``KEY=VALUE`` arguments are set in the API's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench.data import DEFAULT_DATA_DIR, hymenoptera_jpegs, mnist_pngs
from bench.load import ROOT, predict_load
from bench.peers.__main__ import ApiServer

WORKDIR = ROOT / "var" / "api-cpu"
MODELS_DIR = ROOT / "var" / "peers" / "models"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["mnist_lenet5", "hymenoptera_resnet18"], default="mnist_lenet5")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per round")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent keep-alive clients")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each in a fresh API process")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where the checkpoints are")
    parser.add_argument("env", nargs="*", help="KEY=VALUE settings for the API")
    return parser.parse_args()


def newest_checkpoint(models_dir: Path, task: str) -> str:
    """The newest ``task`` checkpoint id in ``models_dir``. Raises ``SystemExit`` if none."""
    found = sorted(p.name for p in models_dir.glob(f"{task}-*") if (p / "metadata.json").is_file())
    if not found:
        raise SystemExit(f"no {task} checkpoint in {models_dir}: run python -m bench.peers --quick first")
    return found[-1]


def one_round(args: argparse.Namespace, model_id: str, images: list[bytes]) -> dict:
    """Start the API (``bench.peers.ApiServer``, one process), warm it up, measure ``--duration``
    s of load; the API is stopped after."""
    server_args = argparse.Namespace(workers=1, threads=1, device="cpu", api_env=[], peer_batch_lenet=False)
    settings = [f"MODELS_DIR={args.models_dir}", f"CACHE_DIR={ROOT / 'var' / 'api-cpu' / 'cache'}", *args.env]
    server = ApiServer(server_args, args.model, model_id, args.port, WORKDIR, settings=settings)
    server.start()
    try:
        asyncio.run(predict_load(server.url, model_id, images, 3, args.concurrency))
        before = server.cpu_seconds()
        result = asyncio.run(predict_load(server.url, model_id, images, args.duration, args.concurrency))
        cpu = server.cpu_seconds() - before
    finally:
        server.stop()
    result["cpu_ms_per_request"] = round(1000 * cpu / max(result["requests"], 1), 3)
    return result


def main() -> int:
    args = parse_args()
    model_id = newest_checkpoint(args.models_dir, args.model)
    if args.model == "mnist_lenet5":
        images = [data for _, data, _ in mnist_pngs(args.data_dir)]
    else:
        images = [data for _, data, _ in hymenoptera_jpegs(args.data_dir)]
    for index in range(args.rounds):
        r = one_round(args, model_id, images)
        print(
            f"round {index + 1}: {args.model} {args.concurrency} clients: {r['requests_per_s']} req/s, "
            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}, "
            f"CPU {r['cpu_ms_per_request']} ms/request"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
