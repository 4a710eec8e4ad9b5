"""Decoding cost of an upload: ``core.images.decode_image`` and the preset's resize/crop, per image.

    .venv/bin/python -m bench.decode                    # the 153 hymenoptera val JPEGs, 3 passes

Times, on one thread, what every /predict of a photo does before the model (and what the peers
of ``bench.peers`` call too): ``count_jpeg_scans`` (the scan-bomb check), ``decode_image`` (header
checks, decode, EXIF, ICC to sRGB) and the ResNet18 preset's ``to_array`` (Resize(256),
CenterCrop(224)). Prints milliseconds per image, the best of ``--passes`` passes (the first pass
also builds the ICC transforms a cache then keeps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.data import DEFAULT_DATA_DIR, hymenoptera_jpegs
from core.images import DecodeLimits, count_jpeg_scans, decode_image, to_mode
from tasks import get_task


def best_ms(function, items: list, passes: int) -> float:
    """Best of ``passes`` passes over ``items``, milliseconds per item."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return round(1000 * best, 3)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    photos = [data for _, data, _ in hymenoptera_jpegs(args.data_dir)]
    preset = get_task("hymenoptera_resnet18").preset
    decoded = [to_mode(decode_image(data, DecodeLimits())[0], "RGB") for data in photos]
    print(f"{len(photos)} hymenoptera val JPEGs, mean {sum(map(len, photos)) / len(photos) / 1000:.0f} kB")
    print(f"count_jpeg_scans: {best_ms(count_jpeg_scans, photos, args.passes)} ms/image")
    decode_ms = best_ms(lambda data: decode_image(data, DecodeLimits()), photos, args.passes)
    print(f"decode_image:     {decode_ms} ms/image")
    print(f"preset.to_array:  {best_ms(preset.to_array, decoded, args.passes)} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
