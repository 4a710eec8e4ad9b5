"""Benchmark: the assignment's reference loop against the product's recipe, side by side.

    .venv/bin/python -m bench.benchmark                 # full: 10 epochs, full data, all tasks
    .venv/bin/python -m bench.benchmark --quick         # 1 epoch on subsets, for a smoke run
    .venv/bin/python -m bench.benchmark --tasks mnist_lenet5 --epochs 2 --device cuda

For each task (and both ResNet18 modes) it runs, each in a fresh process:

1. the reference loop (``bench/reference.py``): torchvision dataset + per-sample transforms +
   DataLoader, as the assignment did;
2. the product's recipe, cold: ``worker.training.run_training`` (the code the Celery worker runs)
   with its dataset cache (and ResNet feature cache) deleted first, so decoding is included;
3. the product's recipe again, warm: the on-disk caches now exist.

It prints one table and writes every measurement as JSON under bench/results/: training images/s
(images / seconds inside the training loop), total wall time of the job (data, training,
evaluation; process start excluded), final train and test/val accuracy, peak RSS of the process
and, on CUDA, peak GPU memory. Data: DATA_DIR or ../shared/datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.data import DEFAULT_DATA_DIR
from bench.host import describe_machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "var" / "bench"
CASES = [
    ("cifar10_dense", None),
    ("mnist_lenet5", None),
    ("hymenoptera_resnet18", "finetune"),
    ("hymenoptera_resnet18", "feature_extraction"),
]
QUICK_SAMPLES = {"cifar10_dense": 10_000, "mnist_lenet5": 10_000, "hymenoptera_resnet18": 64}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the assignment's 10)")
    parser.add_argument("--quick", action="store_true", help="1 epoch on training subsets")
    parser.add_argument("--tasks", nargs="*", default=None, help="subset of tasks (default: all)")
    parser.add_argument("--modes", nargs="*", default=None, help="ResNet18 modes (default: both)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--resnet-weights", default="none", choices=["none", "IMAGENET1K_V1", "local"])
    parser.add_argument("--skip-reference", action="store_true", help="only the product runs")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also train seeds 1..N-1 (reference and warm product) and report the mean accuracy",
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    return parser.parse_args()


# One measurement, in its own process --------------------------------------------------------


def run_one(spec: dict) -> dict:
    import torch

    from worker.data import clear_memory_cache
    from worker.runner import select_device

    device = select_device(spec["device"])
    data_dir, cache_dir = Path(spec["data_dir"]), Path(spec["cache_dir"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    if spec["impl"] == "reference":
        from bench.reference import run_reference

        out = run_reference(spec["task"], spec["hyperparameters"], data_dir, WORK / "extracted", device)
        final = out["metrics"][-1]
        result = {
            "train_images": out["train_images"],
            "train_s": out["train_s"],
            "wall_s": out["wall_s"],
            "train_accuracy": final["train_accuracy"],
            "eval_accuracy": final["eval_accuracy"],
            "epochs": [round(m["eval_accuracy"], 4) for m in out["metrics"]],
        }
    else:
        from worker.training import TrainingContext, run_training

        clear_memory_cache()
        ctx = TrainingContext(
            device=device,
            data_dir=data_dir,
            cache_dir=cache_dir,
            resnet18_weights=spec["resnet_weights"],
            resnet18_weights_file=os.environ.get("RESNET18_WEIGHTS_FILE"),
            show_progress_bar=False,
        )
        out = run_training(spec["task"], spec["hyperparameters"], ctx)
        final = out.metrics[-1]
        result = {
            "train_images": out.train_size * len(out.metrics),
            "train_s": ctx.timings.get("train_s", 0.0),
            "wall_s": time.perf_counter() - started,
            "train_accuracy": final.train_accuracy,
            "eval_accuracy": final.test_accuracy if final.test_accuracy is not None else final.val_accuracy,
            "epochs": [round(m.test_accuracy or m.val_accuracy or 0, 4) for m in out.metrics],
            "timings": ctx.timings,
        }
    result.update(
        {
            "images_per_s": result["train_images"] / max(result["train_s"], 1e-9),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
    )
    return result


def measure(spec: dict) -> dict:
    """Run ``spec`` in a fresh Python process and return its result (process start not timed)."""
    command = [sys.executable, "-m", "bench.benchmark", "--run-one", json.dumps(spec)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['impl']} {spec['task']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Orchestration ------------------------------------------------------------------------------


def hyperparameters(task: str, mode: str | None, args: argparse.Namespace) -> dict:
    hp: dict = {}
    if args.epochs:
        hp["epochs"] = args.epochs
    if args.quick:
        hp["epochs"] = args.epochs or 1
        hp["max_train_samples"] = QUICK_SAMPLES[task]
    if mode:
        hp["mode"] = mode
    if task == "hymenoptera_resnet18":
        hp["weights"] = args.resnet_weights
    return hp


def clear_product_cache(cache_dir: Path, task: str) -> None:
    shutil.rmtree(cache_dir / "datasets" / task, ignore_errors=True)
    if task == "hymenoptera_resnet18":
        shutil.rmtree(cache_dir / "features", ignore_errors=True)


def summarize(task: str, mode: str | None, runs: dict) -> dict:
    ref, cold, warm = runs.get("reference"), runs["cold"], runs["warm"]
    row = {
        "task": task,
        "mode": mode or "",
        "epochs": len(warm["epochs"]),
        "device": warm["device"],
        "threads": warm["threads"],
        "product_img_s_warm": warm["images_per_s"],
        "product_img_s_cold": cold["images_per_s"],
        "product_wall_cold_s": cold["wall_s"],
        "product_wall_warm_s": warm["wall_s"],
        "product_train_acc": warm["train_accuracy"],
        "product_eval_acc": warm["eval_accuracy"],
        "product_peak_rss_mb": max(cold["peak_rss_mb"], warm["peak_rss_mb"]),
        "product_gpu_peak_mb": warm["gpu_peak_mb"],
    }
    for impl, first in (("reference", "reference"), ("product", "warm")):
        accuracies = [
            run["eval_accuracy"]
            for key, run in runs.items()
            if key == first or key.startswith(f"{first}_seed")
        ]
        if len(accuracies) > 1:
            row[f"{impl}_eval_acc_seeds"] = accuracies
            row[f"{impl}_eval_acc_mean"] = sum(accuracies) / len(accuracies)
    if ref:
        row.update(
            {
                "reference_img_s": ref["images_per_s"],
                "reference_wall_s": ref["wall_s"],
                "reference_train_acc": ref["train_accuracy"],
                "reference_eval_acc": ref["eval_accuracy"],
                "reference_peak_rss_mb": ref["peak_rss_mb"],
                "reference_gpu_peak_mb": ref["gpu_peak_mb"],
                "speedup_img_s_warm": warm["images_per_s"] / ref["images_per_s"],
                "speedup_wall_cold": ref["wall_s"] / cold["wall_s"],
                "speedup_wall_warm": ref["wall_s"] / warm["wall_s"],
                "eval_acc_diff_points": 100 * (warm["eval_accuracy"] - ref["eval_accuracy"]),
            }
        )
    return row


def print_table(rows: list[dict]) -> None:
    columns = [
        ("task", "task", "{}"),
        ("mode", "mode", "{}"),
        ("ep", "epochs", "{}"),
        ("device", "device", "{}"),
        ("thr", "threads", "{}"),
        ("ref img/s", "reference_img_s", "{:,.1f}"),
        ("prod img/s", "product_img_s_warm", "{:,.1f}"),
        ("x img/s", "speedup_img_s_warm", "{:.2f}x"),
        ("ref wall", "reference_wall_s", "{:.1f}s"),
        ("prod cold", "product_wall_cold_s", "{:.1f}s"),
        ("prod warm", "product_wall_warm_s", "{:.1f}s"),
        ("x cold", "speedup_wall_cold", "{:.2f}x"),
        ("x warm", "speedup_wall_warm", "{:.2f}x"),
        ("ref train", "reference_train_acc", "{:.2%}"),
        ("prod train", "product_train_acc", "{:.2%}"),
        ("ref test", "reference_eval_acc", "{:.2%}"),
        ("prod test", "product_eval_acc", "{:.2%}"),
        ("ref RSS", "reference_peak_rss_mb", "{:.0f}MB"),
        ("prod RSS", "product_peak_rss_mb", "{:.0f}MB"),
        ("ref GPU", "reference_gpu_peak_mb", "{:.0f}MB"),
        ("prod GPU", "product_gpu_peak_mb", "{:.0f}MB"),
    ]
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def main() -> int:
    args = parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0
    data_dir = args.data_dir or DEFAULT_DATA_DIR
    cache_dir = WORK / "cache"
    cases = [
        (t, m)
        for t, m in CASES
        if (not args.tasks or t in args.tasks) and (not m or not args.modes or m in args.modes)
    ]
    started = datetime.now(UTC)
    command = " ".join(["python -m bench.benchmark", *sys.argv[1:]])
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": describe_machine(),
        "runs": [],
        "rows": [],
    }
    for task, mode in cases:
        hp = hyperparameters(task, mode, args)
        base = {"task": task, "hyperparameters": hp, "device": args.device, "data_dir": str(data_dir),
                "cache_dir": str(cache_dir), "resnet_weights": args.resnet_weights}  # fmt: skip
        runs = {}
        label = f"{task}{' ' + mode if mode else ''}"
        if not args.skip_reference:
            print(f"[{label}] reference loop ...", flush=True)
            runs["reference"] = measure({**base, "impl": "reference"})
        clear_product_cache(cache_dir, task)
        print(f"[{label}] product, cold ...", flush=True)
        runs["cold"] = measure({**base, "impl": "product"})
        print(f"[{label}] product, warm ...", flush=True)
        runs["warm"] = measure({**base, "impl": "product"})
        for seed in range(1, args.seeds):
            seeded = {**base, "hyperparameters": {**hp, "seed": seed}}
            print(f"[{label}] seed {seed} ...", flush=True)
            if not args.skip_reference:
                runs[f"reference_seed{seed}"] = measure({**seeded, "impl": "reference"})
            runs[f"warm_seed{seed}"] = measure({**seeded, "impl": "product"})
        report["runs"].append({"task": task, "mode": mode, "hyperparameters": hp, **runs})
        report["rows"].append(summarize(task, mode, runs))
    print()
    box = report["machine"]
    print(f"{report['date']}  {box['cpu']} ({box['cpus']} CPUs), GPU {box['gpu']}, torch {box['torch']}")
    print_table(report["rows"])
    for row in report["rows"]:
        if "product_eval_acc_seeds" in row:
            ref_seeds = ", ".join(f"{a:.2%}" for a in row.get("reference_eval_acc_seeds", []))
            prod_seeds = ", ".join(f"{a:.2%}" for a in row["product_eval_acc_seeds"])
            print(
                f"{row['task']} {row['mode']}: test/val accuracy by seed: reference [{ref_seeds}] "
                f"mean {row.get('reference_eval_acc_mean', float('nan')):.2%}; product [{prod_seeds}] "
                f"mean {row['product_eval_acc_mean']:.2%}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"benchmark-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
