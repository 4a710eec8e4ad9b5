"""Uploads: every PIL mode, EXIF orientation, transparency, frames, inversion, and refusals."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.images import DecodeLimits, ImageRejected, decode_image, should_invert, to_mode
from tests.factories import image_bytes

MAX = 40_000_000


def open_upload(data: bytes, max_pixels: int = MAX) -> tuple[Image.Image, dict]:
    return decode_image(data, DecodeLimits(max_pixels=max_pixels))


def decode(data: bytes, mode: str) -> Image.Image:
    image, _ = open_upload(data, MAX)
    return to_mode(image, mode)


def _mode_images() -> dict[str, tuple[Image.Image, str]]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    p_transparent = Image.new("P", (16, 16), 0)
    p_transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p_transparent.info["transparency"] = 0
    return {
        "1": (Image.fromarray(gray > 127), "PNG"),
        "L": (Image.fromarray(gray), "PNG"),
        "LA": (Image.new("LA", (16, 16), (100, 255)), "PNG"),
        "P": (Image.fromarray(gray).convert("P"), "PNG"),
        "P+transparency": (p_transparent, "PNG"),
        "RGB": (Image.new("RGB", (16, 16), (10, 200, 30)), "PNG"),
        "RGBA": (Image.new("RGBA", (16, 16), (10, 200, 30, 255)), "PNG"),
        "CMYK": (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "I;16": (Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "I": (Image.fromarray(gray.astype(np.int32) * 257), "TIFF"),
        "F": (Image.fromarray(gray.astype(np.float32) / 255), "TIFF"),
        "LAB": (Image.new("RGB", (16, 16), (200, 30, 40)).convert("LAB"), "TIFF"),
        "YCbCr": (Image.new("RGB", (16, 16), (200, 30, 40)).convert("YCbCr"), "TIFF"),
    }


@pytest.mark.parametrize("name", list(_mode_images()))
@pytest.mark.parametrize("target", ["RGB", "L"])
def test_every_mode_decodes(name, target):
    image, fmt = _mode_images()[name]
    out = decode(image_bytes(image, fmt), target)
    assert out.mode == target and out.size == (16, 16)


def test_lab_keeps_its_colours():
    image, fmt = _mode_images()["LAB"]
    assert np.abs(np.asarray(decode(image_bytes(image, fmt), "RGB")).astype(int) - (200, 30, 40)).max() <= 3


@pytest.mark.parametrize("name", ["I;16", "I", "F"])
def test_high_bit_depth_is_scaled_not_clipped(name):
    image, fmt = _mode_images()[name]
    gray = np.asarray(_mode_images()["L"][0])
    out = np.asarray(decode(image_bytes(image, fmt), "L")).astype(int)
    assert np.abs(out - gray).max() <= 1


@pytest.mark.parametrize("mode,color", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0))])
def test_transparency_becomes_white_not_black(mode, color):
    image = Image.new(mode, (8, 8), color)
    for target in ("RGB", "L"):
        assert np.asarray(decode(image_bytes(image, "PNG"), target)).min() == 255


def test_palette_transparency_is_composited():
    image, _ = _mode_images()["P+transparency"]
    assert np.asarray(decode(image_bytes(image, "PNG"), "L")).min() == 255


def test_exif_orientation_is_applied_first():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 10))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    upload, info = open_upload(image_bytes(image, "JPEG", exif=exif, quality=95), MAX)
    out = to_mode(upload, "RGB")
    assert out.size == (10, 20) and (info["width"], info["height"]) == (10, 20)
    top = np.asarray(out)[2, 5]
    assert top[2] > 200 and top[0] < 60  # the blue left half is now on top


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP"])
def test_multi_frame_uses_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = image_bytes(
        frames[0],
        fmt,
        save_all=True,
        append_images=frames[1:],
        **({"lossless": True} if fmt == "WEBP" else {}),
    )
    pixel = np.asarray(decode(data, "RGB"))[4, 4]
    assert pixel[0] > 200 and pixel[2] < 60


def test_invert_auto_follows_the_border():
    dark_on_light = Image.new("L", (28, 28), 255)
    dark_on_light.paste(0, (10, 5, 18, 23))
    assert should_invert(dark_on_light, "auto")
    light_on_dark = Image.eval(dark_on_light, lambda v: 255 - v)
    assert not should_invert(light_on_dark, "auto")
    assert should_invert(light_on_dark, "true") and not should_invert(dark_on_light, "false")


def test_unreadable_exif_is_ignored_not_refused():
    """A readable JPEG whose EXIF block is garbage is classified as stored."""
    pixels = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    jpeg = image_bytes(Image.fromarray(pixels), "JPEG", dpi=(72, 72))
    payload = b"Exif\x00\x00XXXXgarbage"
    broken = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    image, info = open_upload(broken, MAX)
    assert image.size == (20, 10) and "unreadable" in info["exif"]


def test_empty_upload():
    with pytest.raises(ImageRejected) as info:
        open_upload(b"", MAX)
    assert info.value.status_code == 400


def test_not_an_image():
    with pytest.raises(ImageRejected) as info:
        open_upload(b"%PDF-1.4 definitely not an image" * 10, MAX)
    assert info.value.status_code == 415


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt):
    rng = np.random.default_rng(0)
    data = image_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageRejected) as info:
        open_upload(data[: len(data) // 2], MAX)
    assert info.value.status_code == 422


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with almost no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def test_pixel_bomb_refused_before_decoding():
    with pytest.raises(ImageRejected) as info:
        open_upload(png_header_only(30_000, 30_000), MAX)
    assert info.value.status_code == 413 and "pixels" in info.value.detail
    with pytest.raises(ImageRejected) as info:
        open_upload(png_header_only(2000, 2000), max_pixels=1_000_000)
    assert info.value.status_code == 413
