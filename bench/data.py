"""Real images and archives the benchmarks send, read from ``DATA_DIR`` (``../shared/datasets``):
MNIST test digits as PNG, the hymenoptera val JPEGs as stored, and hymenoptera_data.zip re-packed
as a dataset upload."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

from PIL import Image

# DATA_DIR (read at import), else the shared folder beside the checkout
DEFAULT_DATA_DIR = Path(
    os.environ.get("DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "datasets"
)


def mnist_pngs(data_dir: Path, n: int = 200) -> list[tuple[str, bytes, str]]:
    """Every 50th MNIST test digit, at most ``n``, as PNG: (file name, bytes, content type).
    Reads ``MNIST/raw/t10k-images-idx3-ubyte`` (or its ``.gz``)."""
    from torchvision.datasets.mnist import read_image_file

    raw = data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images = read_image_file(str(raw if raw.exists() else raw.with_suffix(".gz")))
    out = []
    for i in range(0, min(len(images), 50 * n), 50):
        buffer = io.BytesIO()
        Image.fromarray(images[i].numpy()).save(buffer, format="PNG")
        out.append((f"mnist_{i}.png", buffer.getvalue(), "image/png"))
    return out


def hymenoptera_jpegs(data_dir: Path) -> list[tuple[str, bytes, str]]:
    """All 153 hymenoptera val JPEGs, as stored (from ``hymenoptera_data/`` or the zip):
    (file name, bytes, content type)."""
    folder = data_dir / "hymenoptera_data" / "val"
    if folder.is_dir():
        paths = sorted(folder.glob("*/*.jpg"))
        return [(p.name, p.read_bytes(), "image/jpeg") for p in paths]
    with zipfile.ZipFile(data_dir / "hymenoptera_data.zip") as archive:
        names = sorted(n for n in archive.namelist() if "/val/" in n and n.lower().endswith(".jpg"))
        return [(Path(n).name, archive.read(n), "image/jpeg") for n in names]


def repack_hymenoptera(source: Path, layout: str) -> bytes:
    """The official hymenoptera_data.zip re-packed as a dataset upload: a stored zip, in memory,
    the same bytes on every call.

    ``layout="train_val"``: ``photos/train/<class>/...`` and ``photos/val/<class>/...`` (one
    enclosing folder, as a zipped folder has). ``layout="class_folders"``: ``<class>/<file>``
    with train and val merged (names prefixed by the split, so none collide).
    """
    with zipfile.ZipFile(source) as zf, io.BytesIO() as buffer:
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as out:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if info.is_dir() or len(parts) != 4:
                    continue
                _, split, cls, name = parts
                key = f"photos/{split}/{cls}/{name}" if layout == "train_val" else f"{cls}/{split}_{name}"
                out.writestr(zipfile.ZipInfo(key, date_time=(2020, 1, 1, 0, 0, 0)), zf.read(info))
        return buffer.getvalue()
