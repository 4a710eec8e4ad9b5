"""/datasets: the reference datasets' images, as the models see them."""

from __future__ import annotations

import random
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from app.api.deps import SettingsDep
from app.figures import PNG, image_png, run_bounded, samples_png
from app.schemas import error_responses
from tasks import get_task, list_tasks
from worker.data import DatasetCorrupt, DatasetNotFound, SplitItems, read_items

router = APIRouter(prefix="/datasets", tags=["datasets"])


def dataset_tasks() -> dict[str, str]:
    """Dataset name -> the (first) task that trains on it, whose preset and loader serve it."""
    found: dict[str, str] = {}
    for task in list_tasks():
        found.setdefault(get_task(task).dataset, task)
    return found


DatasetName = Annotated[str, Path(max_length=64, description="Dataset: mnist, cifar10 or hymenoptera.")]


def task_of(name: str, split: str | None = None) -> str:
    """The task whose preset and loader serve dataset ``name``; 404 for an unknown dataset or split."""
    known = dataset_tasks()
    task = known.get(name)
    if task is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no dataset {name!r}; known: {', '.join(sorted(known))}"
        )
    splits = ("train", get_task(task).eval_split)
    if split is not None and split not in splits:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"dataset {name} has no split {split!r}; it has {', '.join(splits)}"
        )
    return task


def _read(settings, name: str, task: str, split: str, pick) -> SplitItems:
    try:
        return read_items(task, split, settings.data_dir, settings.cache_dir, pick)
    except DatasetNotFound as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"dataset {name} is not available on this server: {exc}"
        ) from None
    except DatasetCorrupt as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {name} cannot be read: {exc}") from None


@router.get(
    "/{name}/samples.png",
    response_class=Response,
    summary="A grid of sample images with their class names",
    responses=PNG
    | error_responses(_404="Unknown dataset or split.", _409="The dataset's files are missing."),
)
async def samples(
    name: DatasetName,
    settings: SettingsDep,
    split: Annotated[
        str, Query(max_length=16, description="train, or test (val for hymenoptera).")
    ] = "train",
    n: Annotated[int, Query(ge=1, le=100, description="Images in the grid.")] = 25,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1, description="Which images: a seeded random choice.")] = 0,
) -> Response:
    """`n` images chosen at random (seeded) from the split, after the task's preprocessing (for
    hymenoptera the 224 x 224 centre crop), each titled with its class name. The grid is
    ceil(sqrt(n)) columns wide; each tile is 120 x 144 pixels."""
    task = task_of(name, split)

    def pick(size: int) -> list[int]:
        return random.Random(seed).sample(range(size), min(n, size))

    def draw() -> bytes:
        items = _read(settings, name, task, split, pick)
        if not len(items.indices):
            raise HTTPException(status.HTTP_409_CONFLICT, f"the {split} split of {name} is empty")
        return samples_png(items.images, [items.classes[int(label)] for label in items.labels])

    return Response(await run_bounded(draw), media_type="image/png", headers={"Cache-Control": "max-age=60"})


@router.get(
    "/{name}/images/{split}/{index}",
    response_class=Response,
    summary="One dataset image as PNG",
    responses=PNG
    | error_responses(_404="Unknown dataset, split or index.", _409="The dataset's files are missing."),
)
async def image(
    name: DatasetName,
    split: Annotated[str, Path(max_length=16, description="train, or test (val for hymenoptera).")],
    index: Annotated[int, Path(ge=0, description="Index in the split, in the dataset loader's order.")],
    settings: SettingsDep,
) -> Response:
    """The image as the model saw it: the uint8 tensor after the task's resize and crop (28 x 28
    grey for MNIST, 32 x 32 RGB for CIFAR-10, 224 x 224 RGB for hymenoptera). The index is the one
    in an evaluation's `mistakes`; the class name is in the `X-Class` header (percent-encoded)."""
    task = task_of(name, split)

    def pick(size: int) -> list[int]:
        if index >= size:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"the {split} split of {name} has {size} images; no index {index}"
            )
        return [index]

    def read() -> tuple[bytes, str]:
        items = _read(settings, name, task, split, pick)
        return image_png(items.images[0]), items.classes[int(items.labels[0])]

    data, label = await run_bounded(read)
    return Response(
        data, media_type="image/png", headers={"X-Class": quote(label), "Cache-Control": "max-age=60"}
    )
