"""Write a few real test images from DATA_DIR to var/samples/ for trying /predict by hand.

    .venv/bin/python scripts/sample_images.py [DATA_DIR]     (default: $DATA_DIR, else ../shared/datasets)

Writes mnist_<label>.png (first test digits), cifar_<class>.jpg and hymenoptera_<class>.jpg.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    default = os.environ.get("DATA_DIR") or ROOT.parent / "shared" / "datasets"
    data_dir = Path(sys.argv[1] if len(sys.argv) > 1 else default)
    missing = [n for n in ("MNIST/raw/t10k-images-idx3-ubyte", "cifar10-jpg.zip", "hymenoptera_data.zip")
               if not (data_dir / n).exists()]  # fmt: skip
    if missing:
        sys.exit(
            f"{data_dir} lacks {', '.join(missing)}: "
            f"pass the datasets folder, e.g. {sys.argv[0]} /path/to/datasets"
        )
    out = ROOT / "var" / "samples"
    out.mkdir(parents=True, exist_ok=True)
    raw = data_dir / "MNIST" / "raw"
    images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))
    labels = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))
    for i in range(5):
        Image.fromarray(images[i].numpy()).save(out / f"mnist_{labels[i].item()}.png")
    for archive, prefix, name in (
        ("cifar10-jpg.zip", "cifar10-jpg/test/", "cifar"),
        ("hymenoptera_data.zip", "hymenoptera_data/val/", "hymenoptera"),
    ):
        with zipfile.ZipFile(data_dir / archive) as zf:
            seen: set[str] = set()
            for member in sorted(zf.namelist()):
                if member.startswith(prefix) and member.endswith(".jpg"):
                    cls = member[len(prefix) :].split("/")[0]
                    if cls not in seen:
                        seen.add(cls)
                        (out / f"{name}_{cls}.jpg").write_bytes(zf.read(member))
    print("\n".join(sorted(str(p.relative_to(ROOT)) for p in out.iterdir())))


if __name__ == "__main__":
    main()
