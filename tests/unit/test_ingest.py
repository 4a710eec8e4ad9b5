"""Ingestion of uploaded datasets without Redis or a worker: the class-count limit, and decoding
parity with ``/predict`` (the cache holds exactly the pixels ``/predict`` feeds a model trained
on the dataset)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

import worker.ingest as ingest
from app.api.routes.predict import _check_resized_size
from app.inference import preprocess
from core.config import Settings
from core.images import DecodeLimits, ImageRejected, load_image, open_image
from tasks.base import Preset
from tests.factories import image_bytes
from tests.factories_datasets import class_images, zip_bytes
from worker.ingest import MAX_CLASSES, IngestFailed, build_dataset, load_uploaded

# Class count --------------------------------------------------------------------------------------


def test_more_than_1000_classes_fail_before_any_image_is_decoded(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ingest, "_decode_one", no_decoding)
    folder = tmp_path / "ds"
    folder.mkdir()
    # one (undecodable) file per class: only the layout is looked at
    entries = {f"photos/class{i:04d}/0.png": b"x" for i in range(MAX_CLASSES + 1)}
    (folder / "upload").write_bytes(zip_bytes(entries))
    with pytest.raises(IngestFailed) as failed:
        build_dataset(folder, Settings(_env_file=None))
    assert str(failed.value) == "1001 classes: more than the limit of 1000"
    assert sorted(p.name for p in folder.iterdir()) == ["upload"]  # no cache, no temporary file


def test_the_class_limit_is_inclusive_and_counts_classes_in_both_layouts():
    assert MAX_CLASSES == 1000
    ingest._check_classes({f"c{i}" for i in range(1000)}, "image files")
    with pytest.raises(IngestFailed, match=r"^1234 classes: more than the limit of 1000$"):
        ingest._check_classes({f"c{i}" for i in range(1234)}, "image files")
    with pytest.raises(IngestFailed, match=r"at least 2 class folders .* found 1 \(solo\)"):
        ingest._check_classes({"solo"}, "image files")
    names = [f"{split}/c{i:04d}/0.jpg" for i in range(1001) for split in ("train", "val")]
    plan = ingest.plan_layout([ingest.Member(n, "file", 10, 10) for n in names], 100, 1 << 20)
    assert plan.layout == "train_val"
    assert len({c.cls for c in plan.candidates.values()}) == 1001


# Decoding parity with /predict --------------------------------------------------------------------

MAX_PIXELS = 200_000


def gradient(width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3), different in every direction (so rotations and flips show)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], axis=-1).astype(np.uint8)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return image_bytes(Image.fromarray(gradient(360, 240)), "JPEG", quality=95, exif=exif.tobytes())


def rgba_png() -> bytes:
    pixels = np.dstack([gradient(300, 300), np.zeros((300, 300), np.uint8)])
    pixels[:, 150:, 3] = 255  # left half fully transparent, right half opaque
    pixels[100:200, 150:, 3] = 128  # and a half-transparent band
    return image_bytes(Image.fromarray(pixels, "RGBA"), "PNG")


def png_16_bit() -> bytes:
    y, x = np.mgrid[0:260, 0:280]
    values = (x * 230 + y).astype(np.uint16)  # 0 .. 64,429: beyond 8 bits
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    data = image_bytes(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    return data


def palette_png() -> bytes:
    image = Image.fromarray(gradient(250, 270)).quantize(16)
    image.info["transparency"] = 0  # palette entry 0 is transparent (tRNS)
    data = image_bytes(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    return data


def predict_pixels(data: bytes, preset: Preset, settings: Settings) -> np.ndarray:
    """What ``POST /predict`` feeds a model with ``preset``: its own decoding functions, in order."""
    limits = DecodeLimits.from_settings(settings)
    image, info = open_image(data, limits)
    image = load_image(image, info, limits)
    _check_resized_size(image, preset, settings.max_image_pixels)
    loaded = SimpleNamespace(preset=preset, task="custom_resnet18")
    pixels, inverted, framing = preprocess(loaded, image, "auto", "auto")
    assert inverted is None and framing is None
    return pixels.numpy()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_ingestion_caches_exactly_the_pixels_predict_uses_and_skips_oversized_images(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # decoding sets it: restored
    settings = Settings(_env_file=None, max_image_pixels=MAX_PIXELS)
    files = {
        "train/a/exif.jpg": exif_rotated_jpeg(),
        "train/a/rgba.png": rgba_png(),
        "train/b/gray16.png": png_16_bit(),
        "train/b/palette.png": palette_png(),
        "val/a/big.png": image_bytes(Image.fromarray(gradient(500, 500)), "PNG"),  # 250,000 pixels
        "val/b/strip.png": image_bytes(Image.fromarray(gradient(900, 20)), "PNG"),  # resizes to 11520x256
    }
    files |= {f"val/{k}": v for k, v in class_images({"a": 1, "b": 1}).items()}
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "upload").write_bytes(zip_bytes(files))
    fields = build_dataset(folder, settings)
    assert fields["classes"] == ["a", "b"] and fields["images"] == {"train": 4, "val": 2}
    reasons = {s.path: s.reason for s in fields["skipped"]}
    assert fields["skipped_count"] == 2 and sorted(reasons) == ["val/a/big.png", "val/b/strip.png"]
    assert "500x500 = 250000 pixels, over the limit of 200000" in reasons["val/a/big.png"]
    assert reasons["val/b/strip.png"] == "resizes to 11520x256, over MAX_IMAGE_PIXELS=200000"
    for name in ("val/a/big.png", "val/b/strip.png"):  # /predict refuses them too (413)
        with pytest.raises(ImageRejected) as refused:
            predict_pixels(files[name], ingest.dataset_preset(), settings)
        assert refused.value.status_code == 413

    preset = Preset.from_dict(fields["preset"])  # what a checkpoint trained on it records
    assert preset == ingest.dataset_preset()
    train = load_uploaded(tmp_path, "ds")["train"]  # ImageFolder order: by class, then path
    paths = ["train/a/exif.jpg", "train/a/rgba.png", "train/b/gray16.png", "train/b/palette.png"]
    cached = {p.rsplit("/", 1)[1]: pixels for p, pixels in zip(paths, train.images.numpy(), strict=True)}
    for path in paths:
        name = path.rsplit("/", 1)[1]
        pixels, expected = cached[name], predict_pixels(files[path], preset, settings)
        assert pixels.shape == expected.shape == (3, 224, 224) and pixels.dtype == np.uint8, name
        np.testing.assert_array_equal(pixels, expected, err_msg=name)

    # and what that decoding does, checked independently of it
    raw = Image.open(io.BytesIO(files["train/a/exif.jpg"]))
    upright = preset.to_array(ImageOps.exif_transpose(raw).convert("RGB"))
    assert np.abs(cached["exif.jpg"].astype(int) - upright).max() <= 1  # rotated as displayed
    assert np.abs(cached["exif.jpg"].astype(int) - preset.to_array(raw.convert("RGB"))).mean() > 20
    rgba = cached["rgba.png"]
    assert (rgba[:, :, :100] == 255).all()  # the transparent half is white, not black
    assert not (rgba[:, :, 130:] == 255).all()
    gray = cached["gray16.png"]
    assert gray[0].max() > 200 and (gray[0] == 255).mean() < 0.05  # scaled to 8 bits, not clipped
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    palette = cached["palette.png"]
    assert (palette == 255).all(axis=0).any()  # the transparent palette entry is white
