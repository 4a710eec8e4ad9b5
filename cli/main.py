"""``imgclf``: the command-line client of the service.

    imgclf train mnist_lenet5 --set epochs=1 --follow
    imgclf jobs ls | jobs show ID [--follow] | jobs cancel ID
    imgclf models ls | models show ID
    imgclf predict digit.png photo.jpg --task mnist_lenet5 --top-k 3

The API is ``IMGCLF_URL`` (default http://127.0.0.1:8000) and the key, when the server has
API_KEYS, ``IMGCLF_API_KEY`` (sent as ``Authorization: Bearer``). An API error is printed as its
status and detail, with exit status 1; so is a followed job that fails or is cancelled.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from cli.client import FINAL_STATUSES, ApiError, Client, eval_accuracy
from cli.follow import follow_job

DEFAULT_URL = "http://127.0.0.1:8000"

app = typer.Typer(
    help="Train and use the image classifiers of an imgclf service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
jobs_app = typer.Typer(help="Training jobs: list, show, cancel.", no_args_is_help=True)
models_app = typer.Typer(help="Trained models (checkpoints): list, show.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")

# Piped output is not squeezed to 80 columns (job and model ids are long); COLUMNS still wins.
PIPE_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
out = Console(highlight=False, width=PIPE_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="IMGCLF_URL", help="Base URL of the API.")] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="IMGCLF_API_KEY", help="API key (when the server has API_KEYS).", show_default=False
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each API answer.")] = 30.0,
) -> None:
    ctx.obj = Client(url, api_key or None, timeout)


def _client(ctx: typer.Context) -> Client:
    return ctx.find_root().obj


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(message, markup=False)
    return typer.Exit(code)


def run(call):
    """Run ``call()``; an API or connection error is printed plainly and exits 1."""
    try:
        return call()
    except ApiError as exc:
        raise fail(f"error: {exc}") from None
    except httpx.HTTPError as exc:
        raise fail(f"error: cannot reach the API at {_url(exc)}: {exc}") from None


def _url(exc: httpx.HTTPError) -> str:
    try:
        return str(exc.request.url.copy_with(path="/", query=None)).rstrip("/")
    except RuntimeError:  # no request attached
        return "?"


def parse_set(values: list[str]) -> dict[str, Any]:
    """``["epochs=1", "mode=finetune", "max_train_samples=null"]`` → ``{"epochs": 1, "mode":
    "finetune", "max_train_samples": None}``: each value parsed as JSON when it is valid JSON,
    kept as a string otherwise. Raises ``typer.BadParameter`` for an item without ``=``."""
    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--set")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


def percent(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def metrics_table(metrics: list[dict[str, Any]], title: str = "Epochs") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("epoch", "lr", "train loss", "train acc", "test/val acc", "time", "images/s"):
        table.add_column(column, justify="right")
    for m in metrics:
        table.add_row(
            str(m.get("epoch")),
            f"{m.get('lr', 0):.3g}",
            f"{m.get('train_loss', float('nan')):.4f}",
            percent(m.get("train_accuracy")),
            percent(eval_accuracy(m)),
            f"{m.get('duration_s', 0):.1f} s",
            f"{m.get('images_per_s', 0):,.0f}",
        )
    return table


def key_values(rows: list[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, "—" if value is None or value == "" else str(value))
    return table


def finish(job: dict[str, Any]) -> None:
    """Print how a followed job ended; exit 1 unless it succeeded."""
    if job.get("metrics"):
        out.print(metrics_table(job["metrics"]))
    if job["status"] != "succeeded":
        reason = f": {job['error']}" if job.get("error") else ""
        raise fail(f"job {job['id']} {job['status']}{reason}")
    final = job["metrics"][-1] if job.get("metrics") else {}
    split = "val" if final.get("val_accuracy") is not None else "test"
    out.print(f"{split} accuracy: {percent(eval_accuracy(final))}")
    out.print(f"model: {job.get('model_id')}")


@app.command()
def train(
    ctx: typer.Context,
    task: Annotated[
        str,
        typer.Argument(
            help="mnist_lenet5, cifar10_dense, hymenoptera_resnet18, or custom_resnet18 with --dataset."
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="A hyperparameter, key=value (value parsed as JSON when it can be: epochs=1 is an int).",
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Show progress until the job ends; exit 1 unless it succeeds."),
    ] = False,
    dataset: Annotated[
        str | None, typer.Option(help="custom_resnet18: the id of an uploaded dataset (GET /datasets).")
    ] = None,
) -> None:
    """Submit a training job."""
    client = _client(ctx)
    hyperparameters = parse_set(set_ or [])
    body = {"task": task, "hyperparameters": hyperparameters} | ({"dataset": dataset} if dataset else {})
    job = run(lambda: client.post_json("/jobs", body))
    out.print(f"job {job['id']} {job['status']} ({task})")
    if follow:
        finish(run(lambda: follow_job(client, job["id"], out)))


@jobs_app.command("ls")
def jobs_ls(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-200).")] = 20,
) -> None:
    """List jobs, newest first."""
    client = _client(ctx)
    params = {"limit": limit} | ({"status": status} if status else {}) | ({"task": task} if task else {})
    page = run(lambda: client.get("/jobs", params=params))
    table = Table(title=f"{len(page['data'])} of {page['count']} jobs", title_justify="left")
    for column in ("id", "task", "status", "epoch", "test/val acc", "created", "model"):
        table.add_column(column, no_wrap=column in ("id", "model"))
    for job in page["data"]:
        progress = job.get("progress") or {}
        last = job["metrics"][-1] if job.get("metrics") else {}
        table.add_row(
            job["id"],
            job["task"],
            job["status"],
            f"{progress.get('epoch', 0)}/{progress.get('epochs', 0)}",
            percent(eval_accuracy(last)),
            (job.get("created_at") or "")[:19].replace("T", " "),
            job.get("model_id") or "—",
        )
    out.print(table)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Follow it until it ends; exit 1 unless it succeeds.")
    ] = False,
) -> None:
    """Show a job: status, progress, hyperparameters, per-epoch metrics."""
    client = _client(ctx)
    job = run(lambda: client.get(f"/jobs/{job_id}"))
    progress = job.get("progress") or {}
    out.print(
        key_values(
            [
                ("id", job["id"]),
                ("task", job["task"]),
                ("status", job["status"]),
                ("stage", progress.get("stage")),
                ("epoch", f"{progress.get('epoch', 0)}/{progress.get('epochs', 0)}"),
                ("created", job.get("created_at")),
                ("started", job.get("started_at")),
                ("finished", job.get("finished_at")),
                ("device", job.get("device")),
                ("attempts", job.get("attempts")),
                ("error", job.get("error")),
                ("model", job.get("model_id")),
                ("hyperparameters", json.dumps(job.get("hyperparameters", {}))),
            ]
        )
    )
    if follow:
        finish(job if job["status"] in FINAL_STATUSES else run(lambda: follow_job(client, job_id, out)))
    elif job.get("metrics"):
        out.print(metrics_table(job["metrics"]))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a queued or running job (a running one stops at its next batch)."""
    client = _client(ctx)
    job = run(lambda: client.post_json(f"/jobs/{job_id}/cancel", None))
    note = " (stops at the next batch)" if job["status"] == "running" else ""
    out.print(f"job {job['id']} {job['status']}{note}")


@models_app.command("ls")
def models_ls(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-200).")] = 50,
) -> None:
    """List trained models, newest first."""
    client = _client(ctx)
    params = {"limit": limit} | ({"task": task} if task else {})
    page = run(lambda: client.get("/models", params=params))
    table = Table(title=f"{len(page['data'])} of {page['count']} models", title_justify="left")
    for column in ("id", "task", "test/val acc", "epochs", "aliases", "created", "valid"):
        table.add_column(column, no_wrap=column == "id")
    for model in page["data"]:
        final = (model.get("metrics") or {}).get("final") or {}
        table.add_row(
            model["id"],
            model.get("task") or "—",
            percent(eval_accuracy(final)),
            str(final.get("epoch", "—")),
            ", ".join(model.get("aliases") or []) or "—",
            (model.get("created_at") or "")[:19].replace("T", " "),
            "yes" if model.get("valid") else f"no: {model.get('error')}",
        )
    out.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, model_id: Annotated[str, typer.Argument(help="Model id.")]) -> None:
    """Show a model: metrics, hyperparameters and, when the server has it, its evaluation."""
    client = _client(ctx)
    model = run(lambda: client.get(f"/models/{model_id}"))
    final = (model.get("metrics") or {}).get("final") or {}
    out.print(
        key_values(
            [
                ("id", model["id"]),
                ("task", model.get("task")),
                ("valid", "yes" if model.get("valid") else f"no: {model.get('error')}"),
                ("test/val accuracy", percent(eval_accuracy(final))),
                ("created", model.get("created_at")),
                ("size", f"{model.get('size_bytes', 0):,} bytes"),
                ("job", model.get("job_id")),
                ("aliases", ", ".join(model.get("aliases") or [])),
                ("classes", ", ".join(model.get("classes") or [])),
                ("hyperparameters", json.dumps(model.get("hyperparameters", {}))),
            ]
        )
    )
    evaluation = model.get("evaluation")
    if evaluation:
        table = Table(
            title=f"Evaluation on {evaluation['split']}: accuracy {percent(evaluation['accuracy'])}",
            title_justify="left",
        )
        for column in ("class", "precision", "recall", "f1", "support"):
            table.add_column(column, justify="right")
        for row in evaluation["per_class"]:
            table.add_row(
                row["class"],
                f"{row['precision']:.3f}",
                f"{row['recall']:.3f}",
                f"{row['f1']:.3f}",
                str(row["support"]),
            )
        out.print(table)


@app.command()
def predict(
    ctx: typer.Context,
    files: Annotated[
        list[Path], typer.Argument(help="Image files.", exists=True, dir_okay=False, readable=True)
    ],
    task: Annotated[str | None, typer.Option(help="Use the newest valid model of this task.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Use this model id.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Use the production (else newest) model of this uploaded dataset.")
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="With --task or --dataset: the model carrying this alias.")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes per image (1-100).")] = 3,
) -> None:
    """Classify images: one line per file, `FILE: label (probability), ...`; exit 1 if any failed."""
    if not task and not model and not dataset:
        raise typer.BadParameter("give --task, --model or --dataset", param_hint="--task/--model/--dataset")
    client = _client(ctx)
    optional = {"task": task, "model_id": model, "dataset": dataset, "alias": alias}
    form = {"top_k": str(top_k)} | {name: value for name, value in optional.items() if value}
    failed = 0
    for path in files:
        try:
            result = client.predict(path, form)
        except (ApiError, httpx.HTTPError) as exc:
            failed += 1
            reason = str(exc) if isinstance(exc, ApiError) else f"cannot reach the API at {_url(exc)}: {exc}"
            err.print(f"{path}: error: {reason}", markup=False)
            continue
        labels = ", ".join(f"{p['label']} ({percent(p['probability'], 1)})" for p in result["predictions"])
        out.print(f"{path}: {labels}", markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
