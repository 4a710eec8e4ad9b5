"""Test data in the real on-disk formats, built from scratch: IDX files, CIFAR-10 python batches,
ImageFolder trees and zips, image bytes in any PIL mode, checkpoints.

The synthetic images are learnable: class k of an N-class set is a bright square (MNIST-like) or
a colour-and-position pattern, so a few epochs separate them and a prediction can be checked.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def digit_image(label: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """uint8 (size, size): dark background with a bright 6x6 square whose place encodes ``label``."""
    image = rng.integers(0, 30, (size, size), dtype=np.uint8)
    row, col = divmod(label, 4)
    top, left = 3 + row * 8, 2 + col * 6
    image[top : top + 6, left : left + 6] = rng.integers(200, 256, (6, 6), dtype=np.uint8)
    return image


def colour_image(label: int, rng: np.random.Generator, size: int = 32, classes: int = 10) -> np.ndarray:
    """uint8 (size, size, 3): class-specific colour in one half, noise elsewhere."""
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 29 + 160) % 256], dtype=np.uint8)
    if label % 2:
        image[: size // 2] = hue
    else:
        image[:, : size // 2] = hue
    return image


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (the MNIST format): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, train: int = 600, test: int = 200, seed: int = 0) -> Path:
    """``root/MNIST/raw`` with the four IDX files of torchvision's layout."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = np.stack([digit_image(int(k), rng) for k in labels])
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return raw


def make_cifar_batches(root: Path, per_batch: int = 100, test: int = 100, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta (pickles of
    dicts with a uint8 'data' array (N, 3072) and a 'labels' list, as the official files)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        labels = [int(k) for k in rng.permutation(np.arange(n) % 10)]
        data = np.stack([colour_image(k, rng).transpose(2, 0, 1).reshape(-1) for k in labels])
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": data,
            "filenames": [f"{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def make_image_folder(
    root: Path,
    name: str,
    splits: dict[str, int],
    classes: list[str],
    size: tuple[int, int] = (32, 32),
    as_zip: bool = False,
    seed: int = 0,
    fmt: str = "JPEG",
) -> Path:
    """An ImageFolder tree ``root/name/<split>/<class>/*.jpg`` (or ``root/name.zip`` of it)."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for split, n in splits.items():
        for i in range(n):
            label = i % len(classes)
            pixels = colour_image(label, rng, size=max(size), classes=len(classes))
            image = Image.fromarray(pixels).resize(size)
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            files[f"{name}/{split}/{classes[label]}/{i:05d}.{ext}"] = image_bytes(image, fmt)
    if as_zip:
        path = root / f"{name}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for member, data in files.items():
                zf.writestr(member, data)
        return path
    for member, data in files.items():
        target = root / member
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root / name


def make_hymenoptera(root: Path, train: int = 24, val: int = 16, as_zip: bool = False) -> Path:
    """The official archive's layout, small: hymenoptera_data/{train,val}/{ants,bees}/*.jpg."""
    return make_image_folder(
        root,
        "hymenoptera_data",
        {"train": train, "val": val},
        ["ants", "bees"],
        size=(300, 260),
        as_zip=as_zip,
    )


def image_bytes(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def make_synthetic_data(root: Path) -> Path:
    """DATA_DIR with all three tasks' datasets, small (MNIST IDX, CIFAR zip, hymenoptera folder)."""
    root.mkdir(parents=True, exist_ok=True)
    make_mnist(root, train=2000, test=300)
    make_image_folder(root, "cifar10-jpg", {"train": 1000, "test": 200}, CIFAR_CLASSES, as_zip=True)
    make_hymenoptera(root)
    return root


def progressive_scan_bomb(width: int, height: int, scans: int) -> bytes:
    """A valid grey progressive JPEG (SOF2) of ``width`` x ``height`` with ``scans`` scans: one DC
    scan, then for each AC coefficient 1..63 a first scan (Al=13) and successive-approximation
    refinements down to Al=0 (at most 1 + 63 * 14 = 883 scans). Every block is flat, so each AC
    scan is a few end-of-band runs: tiny on disk, yet the decoder walks every block once per scan.
    """
    if not 1 <= scans <= 883:
        raise ValueError("scans must be 1..883")
    blocks = -(-width // 8) * (-(-height // 8))

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    def entropy(bits: str) -> bytes:
        bits += "1" * (-len(bits) % 8)  # pad with ones
        data = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
        return data.replace(b"\xff", b"\xff\x00")  # byte stuffing

    def eob_runs(total: int) -> str:
        out = []
        while total:
            run = min(total, 32767)
            r = run.bit_length() - 1  # symbol EOBr: run 2**r + r extra bits
            out.append(format(r, "04b") + (format(run - (1 << r), f"0{r}b") if r else ""))
            total -= run
        return "".join(out)

    dc_table = bytes([0x00]) + bytes([1] + [0] * 15) + bytes([0x00])  # category 0 -> code "0"
    ac_table = bytes([0x10]) + bytes([0, 0, 0, 15] + [0] * 12) + bytes(r << 4 for r in range(15))
    parts = [
        b"\xff\xd8",
        segment(0xDB, b"\x00" + bytes([1] * 64)),
        segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])),
        segment(0xC4, dc_table + ac_table),
        segment(0xDA, bytes([1, 1, 0x00, 0, 0, 0x00])) + entropy("0" * blocks),
    ]
    runs = entropy(eob_runs(blocks))
    done = 1
    for k in range(1, 64):
        for ah, al in [(0, 13)] + [(a, a - 1) for a in range(13, 0, -1)]:
            if done == scans:
                break
            parts.append(segment(0xDA, bytes([1, 1, 0x00, k, k, (ah << 4) | al])) + runs)
            done += 1
    return b"".join(parts) + b"\xff\xd9"


def bmp_v5(pixels: np.ndarray, alpha: int) -> bytes:
    """A 32-bit BMP with a BITMAPV5HEADER and bit-field masks including an alpha mask, as many
    Windows programs write them: ``pixels`` uint8 (H, W, 3) RGB, every alpha byte set to ``alpha``."""
    height, width, _ = pixels.shape
    bgra = np.concatenate([pixels[..., ::-1], np.full((height, width, 1), alpha, np.uint8)], axis=2)
    data = bgra[::-1].tobytes()  # bottom-up rows
    masks = struct.pack("<4I", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    header = struct.pack("<IiiHHIIiiII", 124, width, height, 1, 32, 3, len(data), 2835, 2835, 0, 0)
    header += masks + b"BGRs" + bytes(36) + bytes(12) + struct.pack("<4I", 4, 0, 0, 0)
    assert len(header) == 124
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + header + data


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def icc_profile(
    space: str, colorants: list[tuple[float, float, float]] | None = None, gamma: float = 2.2
) -> bytes:
    """A minimal ICC v2 display profile built from scratch (lcms reads it).

    ``space="RGB "``: matrix/TRC profile with the given red, green, blue colorants (XYZ, D50) and
    one gamma for all channels; ``space="GRAY"``: gray TRC with ``gamma``.
    """
    d50 = (0.9642, 1.0, 0.8249)

    def xyz(v):
        return b"XYZ " + bytes(4) + b"".join(_s15(c) for c in v)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    text = b"made-from-scratch test profile\x00"
    desc = (
        b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4) + bytes(4) + bytes(3) + bytes(67)
    )
    tags = [(b"desc", desc), (b"wtpt", xyz(d50))]
    if space == "GRAY":
        tags.append((b"kTRC", curve))
    else:
        for sig, colorant in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants, strict=True):
            tags.append((sig, xyz(colorant)))
        tags += [(b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    entries, blobs = [], b""
    for sig, blob in tags:
        blob += bytes(-len(blob) % 4)
        entries.append(struct.pack(">4sII", sig, offset + len(blobs), len(blob)))
        blobs += blob
    size = offset + len(blobs)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"none", 0x02100000, b"mntr", space.encode(), b"XYZ ")
        + bytes(12)
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8 + 4)
        + b"".join(_s15(c) for c in d50)
        + bytes(4 + 16 + 28)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + blobs


# sRGB's colorants adapted to D50, in the order R, G, B
SRGB_COLORANTS = [(0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)]


def gif_with_frames(screen: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF built by hand: a ``screen`` (width, height) with a 4-colour global palette and one
    frame per (left, top, width, height), each filled with colour 1, LZW-coded without
    compression (a clear code every two pixels keeps codes 3 bits wide)."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", *screen, 0x81, 0, 0))
    out += bytes([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 255])  # 4 colours
    for left, top, width, height in frames:
        out += b"\x2c" + struct.pack("<HHHHB", left, top, width, height, 0) + b"\x02"
        codes = []
        for i in range(width * height):
            if i % 2 == 0:
                codes.append(4)  # clear
            codes.append(1)
        codes.append(5)  # end of information
        value = sum(code << (3 * i) for i, code in enumerate(codes))
        data = value.to_bytes((3 * len(codes) + 7) // 8, "little")
        for start in range(0, len(data), 255):
            block = data[start : start + 255]
            out += bytes([len(block)]) + block
        out += b"\x00"
    return bytes(out + b"\x3b")
