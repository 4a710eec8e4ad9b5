"""The real datasets (../shared/datasets, or REAL_DATA_DIR). Missing data fails these tests: CI must
not pass by skipping them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CANDIDATES = [REPO.parent / "shared" / "datasets", Path("/work/shared/datasets")]
REQUIRED = ["MNIST/raw/train-images-idx3-ubyte", "cifar10-jpg.zip", "hymenoptera_data.zip"]


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    configured = os.environ.get("REAL_DATA_DIR")
    candidates = [Path(configured)] if configured else CANDIDATES
    for candidate in candidates:
        if all((candidate / name).exists() for name in REQUIRED):
            return candidate
    pytest.fail(
        f"real datasets not found: looked for {REQUIRED} in {[str(c) for c in candidates]}; "
        "set REAL_DATA_DIR or deselect with -m 'not realdata'"
    )
