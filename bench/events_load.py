"""Do open event streams slow /predict? /predict latency with and without N open SSE streams.

    .venv/bin/python -m bench.events_load                    # 200 streams, 2 rounds of 20 s each way
    .venv/bin/python -m bench.events_load --streams 50 --duration 10 --rounds 1

Starts its own API (uvicorn, one process) and worker (``bench.load.Stack``), trains a LeNet-5 for
one epoch on DATA_DIR's MNIST, then starts a long LeNet-5 job so that its event stream is live
(progress at ~4 events/s, an epoch event every few seconds) and measures, alternating
``--rounds`` times: ``--duration`` seconds of /predict with ``--concurrency`` clients and no
stream open, then the same with ``--streams`` clients reading ``GET /jobs/{id}/events`` of the
running job. The stream readers run in a separate process (so their parsing is not counted as
the client's /predict time), each a bare socket (its CPU is reported: on this one machine it
competes with the API). The worker runs at ``--worker-nice`` 19: training would otherwise take
every cycle the API leaves, so /predict's latency would follow the scheduler's split between the
two rather than what the streams cost (in production the worker has a machine or GPU of its own).
It prints and writes (bench/results/events-*.json) p50/p99 latency as the clients saw it and as
the API's own histogram recorded it, requests/s, and the events the streams received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from datetime import UTC, datetime

import httpx
import psutil

from bench.data import mnist_pngs
from bench.host import describe_machine
from bench.load import (
    ROOT,
    Stack,
    add_stack_args,
    predict_load,
    server_buckets,
    server_percentiles,
    train_model,
)

RESULTS = ROOT / "bench" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=200, help="open event streams")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of /predict load per phase")
    parser.add_argument("--rounds", type=int, default=2, help="without/with rounds")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent /predict clients")
    add_stack_args(parser, port=8766)
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=19,
        help="nice value of the worker's processes (training takes every free cycle; 0 to compete as equals)",
    )
    return parser.parse_args()


def read_streams(url: str, n: int, out: mp.Queue, stop: mp.Event) -> None:
    """Child process: ``n`` clients read ``url`` (SSE); puts "ready" once all are open, then, after
    ``stop`` is set, {opened, events, events_per_s, failed, reader_cpu_s_per_s}.

    Each client is a bare asyncio socket that counts ``event:`` fields: as cheap as a reader can
    be, because on this one machine the readers' CPU is taken from the API (browsers would run
    elsewhere). Its own CPU time is reported beside."""
    target = httpx.URL(url)
    request = (
        f"GET {target.raw_path.decode()} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()

    async def run() -> dict:
        opened = 0
        events = 0
        ready = asyncio.Event()

        async def reader() -> None:
            nonlocal opened, events
            stream, writer = await asyncio.open_connection(target.host, target.port)
            try:
                writer.write(request)
                head = await stream.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                opened += 1
                if opened == n:
                    ready.set()
                tail = b""
                while data := await stream.read(65536):
                    data = tail + data
                    events += data.count(b"event:")
                    tail = data[-5:]  # a field name split across two reads is counted once
                    events -= tail.count(b"event:")
            finally:
                writer.close()

        tasks = [asyncio.create_task(reader()) for _ in range(n)]
        await asyncio.wait_for(ready.wait(), 120)
        await asyncio.sleep(2)  # the history replay is over
        out.put("ready")
        counted, start, cpu_start = events, time.monotonic(), time.process_time()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        elapsed, cpu = time.monotonic() - start, time.process_time() - cpu_start
        for task in tasks:
            task.cancel()
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        return {
            "opened": opened,
            "events": events - counted,
            "events_per_s": round((events - counted) / elapsed, 1),
            "failed": len(failed),
            "reader_cpu_s_per_s": round(cpu / elapsed, 3),
        }

    out.put(asyncio.run(run()))


def phase(stack: Stack, model_id: str, images: list[bytes], args: argparse.Namespace) -> dict:
    api = psutil.Process(stack.api.pid)
    before = server_buckets(stack.url)
    cpu_before = sum(api.cpu_times()[:2])
    result = asyncio.run(predict_load(stack.url, model_id, images, args.duration, args.concurrency))
    result["api_cpu_s_per_s"] = round((sum(api.cpu_times()[:2]) - cpu_before) / args.duration, 3)
    result.update(server_percentiles(before, server_buckets(stack.url)))
    result["api_cpu_ms_per_request"] = round(
        1000 * result["api_cpu_s_per_s"] * args.duration / max(result["requests"], 1), 3
    )
    return result


def main() -> int:
    args = parse_args()
    workdir = ROOT / "var" / "events-load" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    stack = Stack(args, workdir)
    rounds = []
    try:
        stack.start()
        worker = psutil.Process(stack.processes[0].pid)
        for process in [worker, *worker.children(recursive=True)]:  # jobs run in these or their children
            process.nice(args.worker_nice)
        model_id = train_model(stack.url)
        images = [data for _, data, _ in mnist_pngs(args.data_dir)]
        job = httpx.post(
            f"{stack.url}/jobs", json={"task": "mnist_lenet5", "hyperparameters": {"epochs": 200}}
        ).json()
        while httpx.get(f"{stack.url}/jobs/{job['id']}").json()["progress"]["stage"] != "training":
            time.sleep(0.5)
        asyncio.run(predict_load(stack.url, model_id, images, 3, args.concurrency))  # warm-up
        events_url = f"{stack.url}/jobs/{job['id']}/events"
        for _ in range(args.rounds):
            without = phase(stack, model_id, images, args)
            context = mp.get_context("fork")  # no second interpreter start-up during the phase
            queue, stop = context.Queue(), context.Event()
            readers = context.Process(target=read_streams, args=(events_url, args.streams, queue, stop))
            readers.start()
            assert queue.get(timeout=180) == "ready"
            with_streams = phase(stack, model_id, images, args)
            stop.set()
            streams = queue.get(timeout=60)
            readers.join(30)
            rounds.append({"without_streams": without, "with_streams": with_streams, "streams": streams})
        httpx.post(f"{stack.url}/jobs/{job['id']}/cancel")
    finally:
        stack.stop()

    def mean(key: str, phase_name: str) -> float:
        values = [r[phase_name][key] for r in rounds if r[phase_name][key] is not None]
        return round(sum(values) / len(values), 2)

    summary = {
        name: {
            key: mean(key, name)
            for key in (
                "p50_ms",
                "p99_ms",
                "mean_ms",
                "requests_per_s",
                "api_cpu_s_per_s",
                "api_cpu_ms_per_request",
            )
        }
        for name in ("without_streams", "with_streams")
    }
    slowdown = {
        key: round(summary["with_streams"][key] / summary["without_streams"][key] - 1, 3)
        for key in ("p50_ms", "mean_ms", "p99_ms", "requests_per_s")
    }
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "command": " ".join(["python -m bench.events_load", *sys.argv[1:]]),
        "streams": args.streams,
        "concurrency": args.concurrency,
        "worker_nice": args.worker_nice,
        "duration_s": args.duration,
        "rounds": rounds,
        "summary": summary,
        "slowdown": slowdown,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"events-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    for name in ("without_streams", "with_streams"):
        s = summary[name]
        print(
            f"{name:16s}: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, mean {s['mean_ms']} ms, "
            f"{s['requests_per_s']}/s; API CPU {s['api_cpu_s_per_s']} s/s, "
            f"{s['api_cpu_ms_per_request']} ms/request"
        )
    print(
        f"with {args.streams} streams: p50 {slowdown['p50_ms']:+.1%}, mean {slowdown['mean_ms']:+.1%}, "
        f"p99 {slowdown['p99_ms']:+.1%}, requests/s {slowdown['requests_per_s']:+.1%}"
    )
    print(f"streams: {[r['streams'] for r in rounds]}")
    print(f"written to {out.relative_to(ROOT)}")
    return 0 if all(r["streams"]["opened"] == args.streams for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
