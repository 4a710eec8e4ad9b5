"""Uploads: every PIL mode, EXIF orientation, transparency, frames, inversion, and refusals."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.images import (
    MAX_FRAMES,
    DecodeLimits,
    ImageRejected,
    count_jpeg_scans,
    decode_image,
    frame_digit,
    load_image,
    open_image,
    should_invert,
    tiff_compressions,
    to_mode,
)
from tests.factories import (
    SRGB_COLORANTS,
    bmp_v5,
    gif_with_frames,
    icc_profile,
    image_bytes,
    progressive_scan_bomb,
)

MAX = 40_000_000
REPO = Path(__file__).resolve().parents[2]


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


# Cost: JPEG scans and the decode budget -------------------------------------------------------

CASES = REPO / "tests" / "cases"  # the QA case files, kept with the tests


def test_scans_are_counted_from_the_bytes():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert count_jpeg_scans(image_bytes(photo, "JPEG")) == 1
    assert 2 < count_jpeg_scans(image_bytes(photo, "JPEG", progressive=True)) < 20
    assert count_jpeg_scans(progressive_scan_bomb(64, 64, 883)) == 883
    exif = Image.Exif()
    exif[0x010E] = "a description with \xff\xda bytes in it"
    assert count_jpeg_scans(image_bytes(photo, "JPEG", exif=exif)) == 1  # segments are skipped


def test_progressive_scan_bomb_is_refused_before_decoding():
    """The case's kind: 6000 x 6000, 883 scans, 134 KB; decoding takes 13-70 s."""
    bomb = progressive_scan_bomb(6000, 6000, 883)
    assert len(bomb) < 140_000
    start = time.perf_counter()
    with pytest.raises(ImageRejected) as info:
        open_upload(bomb)
    assert time.perf_counter() - start < 1.0
    assert info.value.status_code == 413 and "883 scans" in info.value.detail
    assert "MAX_JPEG_SCANS" in info.value.detail


def test_the_case_file_itself_is_refused():
    case = CASES / "progressive_scanbomb_6000.jpg"
    start = time.perf_counter()
    with pytest.raises(ImageRejected) as info:
        open_upload(case.read_bytes())
    assert time.perf_counter() - start < 1.0
    assert info.value.status_code == 413


def test_decode_cost_budget_refuses_many_scans_over_many_pixels():
    """Under the scan cap but over the cost budget (pixels x scans): refused, not decoded."""
    limits = DecodeLimits(max_decode_cost=100_000_000)
    with pytest.raises(ImageRejected) as info:
        open_image(progressive_scan_bomb(2000, 2000, 400), limits)  # 1.6e9 pixel-scans
    assert info.value.status_code == 413 and "MAX_DECODE_COST" in info.value.detail
    image, info_ = open_image(progressive_scan_bomb(2000, 2000, 20), limits)  # 8e7: decoded
    assert info_["scans"] == 20 and info_["cost"] == 80_000_000
    assert load_image(image, info_, limits).size == (2000, 2000)


def test_cost_of_other_formats_is_their_pixels():
    _, info = open_image(image_bytes(Image.new("RGB", (300, 200)), "PNG"))
    assert info["cost"] == 60_000 and "scans" not in info


# Pixel limit for every format and every frame -------------------------------------------------

ACCEPTED = {"PNG": {}, "JPEG": {}, "GIF": {}, "TIFF": {}, "WEBP": {"lossless": True}, "BMP": {}}


@pytest.mark.parametrize("fmt", list(ACCEPTED))
def test_pixel_limit_holds_for_every_accepted_format(fmt):
    data = image_bytes(Image.new("RGB", (300, 300), (10, 20, 30)), fmt, **ACCEPTED[fmt])
    with pytest.raises(ImageRejected) as info:
        open_image(data, DecodeLimits(max_pixels=10_000))
    assert info.value.status_code == 413 and "90000 pixels" in info.value.detail
    assert Image.MAX_IMAGE_PIXELS == 10_000  # Pillow's own check uses the service's limit
    assert open_upload(data)[0].size == (300, 300)


def test_pillow_bomb_error_inside_open_is_413():
    """Pillow refuses > 2 x MAX_IMAGE_PIXELS inside Image.open (a WebP canvas, before our check)."""
    data = image_bytes(Image.new("RGB", (300, 300)), "WEBP")
    with pytest.raises(ImageRejected) as info:
        open_image(data, DecodeLimits(max_pixels=1000))
    assert info.value.status_code == 413


@pytest.mark.parametrize("fmt", ["TIFF", "MPO", "GIF"])
def test_a_huge_later_frame_is_refused(fmt):
    """First frame small, a later one over the limit: refused from the headers, whatever frame
    is used."""
    small, big = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (300, 300), (0, 0, 255))
    limits = DecodeLimits(max_pixels=10_000)
    if fmt == "GIF":  # a second frame placed far outside the 8 x 8 screen grows the canvas
        data, expected = gif_with_frames((8, 8), [(0, 0, 8, 8), (5000, 0, 8, 8)]), "5008x8"
    else:
        data, expected = image_bytes(small, fmt, save_all=True, append_images=[big]), "300x300"
    image, info = open_image(data)
    assert info["frames"] == 2 and image.size == (8, 8)
    with pytest.raises(ImageRejected) as rejected:
        open_image(data, limits)
    assert rejected.value.status_code == 413 and "frame 2 of 2" in rejected.value.detail
    assert expected in rejected.value.detail


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP", "GIF"])
def test_too_many_frames_is_413(fmt):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(MAX_FRAMES + 1)]
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    with pytest.raises(ImageRejected) as info:
        open_image(data)
    assert info.value.status_code == 413 and "frames" in info.value.detail
    _, ok = open_image(image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:3], **params))
    assert ok["frames"] == 3


# Allow-list -----------------------------------------------------------------------------------


def eps_bytes() -> bytes:
    """An EPS file: Pillow would hand it to Ghostscript when installed."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
        b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    )


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PCX", "PPM", "TGA", "SGI", "JPEG2000", "DDS", "QOI"])
def test_formats_outside_the_allow_list_are_415(fmt):
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    data = eps_bytes() if fmt == "EPS" else image_bytes(image, fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    with pytest.raises(ImageRejected) as info:
        open_upload(data)
    assert info.value.status_code == 415 and "PNG, JPEG, GIF, TIFF, WebP, BMP" in info.value.detail


def test_tiff_compression_this_build_cannot_decode_is_415_not_corrupt():
    """ThunderScan-compressed TIFF: libtiff cannot decode it here (nor can Pillow write one)."""
    assert "thunderscan" not in " ".join(tiff_compressions()) and "tiff_lzw" in tiff_compressions()
    data = bytearray(image_bytes(Image.new("RGB", (16, 16), (1, 2, 3)), "TIFF", compression="tiff_lzw"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 259:  # Compression
            data[entry + 8 : entry + 10] = struct.pack("<H", 32809)
    with pytest.raises(ImageRejected) as info:
        open_upload(bytes(data))
    assert info.value.status_code == 415 and "tiff_thunderscan" in info.value.detail


def test_missing_decoder_is_415_not_corrupt(monkeypatch):
    """A Pillow built without libjpeg raises 'decoder jpeg not available' on load."""
    data = image_bytes(Image.new("RGB", (16, 16)), "JPEG")
    monkeypatch.delattr(Image.core, "jpeg_decoder")
    with pytest.raises(ImageRejected) as info:
        open_upload(data)
    assert info.value.status_code == 415 and "decoder jpeg not available" in info.value.detail


# The picture a viewer shows: zero alpha, ICC profiles -----------------------------------------


def digit_seven() -> np.ndarray:
    """uint8 (28, 28, 3): a white 7 on black."""
    image = Image.new("L", (28, 28), 0)
    draw = ImageDraw.Draw(image)
    draw.line([(7, 6), (21, 6), (12, 23)], fill=255, width=3)
    return np.repeat(np.asarray(image)[..., None], 3, axis=2)


def test_bmp_whose_alpha_is_zero_everywhere_is_opaque():
    """The case: a BMP v5 with an alpha mask whose every byte is 0 shows the digit, like its twin
    with alpha 255 (it used to be composited onto white and the digit vanished)."""
    pixels = digit_seven()
    zero, _ = open_upload(bmp_v5(pixels, alpha=0))
    opaque, _ = open_upload(bmp_v5(pixels, alpha=255))
    for mode in ("L", "RGB"):
        assert np.array_equal(np.asarray(to_mode(zero, mode)), np.asarray(to_mode(opaque, mode)))
    assert np.asarray(to_mode(zero, "L")).max() == 255 and np.asarray(to_mode(zero, "L")).min() == 0
    half = bmp_v5(pixels, alpha=0)[:-4] + b"\x00\x00\x00\x80"  # one pixel half transparent: kept
    assert open_upload(half)[0].mode == "RGBA"


def test_case_bmp_files_decode_alike():
    zero, opaque = CASES / "bmp_v5_alpha_zero_digit7.bmp", CASES / "bmp_v5_alpha_ff_digit7.bmp"
    assert np.array_equal(
        np.asarray(decode(zero.read_bytes(), "L")), np.asarray(decode(opaque.read_bytes(), "L"))
    )


def test_fully_transparent_png_is_still_transparent():
    """Zero alpha means opaque only in BMP; a PNG's alpha is honoured (viewers show nothing)."""
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode(image_bytes(image, "PNG"), "L")).min() == 255


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP"])
def test_icc_profile_is_converted_to_srgb(fmt):
    """A profile whose red primary is sRGB's green: stored (255, 0, 0) is displayed green."""
    swapped = icc_profile("RGB ", [SRGB_COLORANTS[1], SRGB_COLORANTS[0], SRGB_COLORANTS[2]])
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = image_bytes(Image.new("RGB", (8, 8), (255, 0, 0)), fmt, icc_profile=swapped, **params)
    image, info = open_upload(data)
    red, green, blue = np.asarray(to_mode(image, "RGB"))[4, 4].astype(int)
    assert green > 240 and red < 20 and blue < 20, (red, green, blue)
    assert "-> sRGB" in info["icc"]


def test_gray_icc_profile_and_alpha_are_kept():
    linear = icc_profile("GRAY", gamma=1.0)  # linear light: 128 is displayed as sRGB 188
    image = Image.new("LA", (8, 8), (128, 255))
    decoded, _ = open_upload(image_bytes(image, "PNG", icc_profile=linear))
    assert decoded.mode == "RGBA" and abs(int(np.asarray(to_mode(decoded, "L"))[4, 4]) - 188) <= 2


def test_unreadable_or_mismatched_icc_profile_is_ignored():
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    for profile, note in ((b"garbage" * 20, "unreadable"), (icc_profile("GRAY"), "GRAY profile")):
        decoded, info = open_upload(image_bytes(image, "PNG", icc_profile=profile))
        assert note in info["icc"] and tuple(np.asarray(to_mode(decoded, "RGB"))[4, 4]) == (255, 0, 0)


# MNIST framing --------------------------------------------------------------------------------


def ink_geometry(pixels: np.ndarray) -> tuple[int, int, float, float]:
    """(height, width) of the ink's bounding box and its centre of mass (x, y)."""
    rows, cols = np.flatnonzero((pixels > 50).any(1)), np.flatnonzero((pixels > 50).any(0))
    ys, xs = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
    total = pixels.sum()
    return (
        rows[-1] - rows[0] + 1,
        cols[-1] - cols[0] + 1,
        (pixels * xs).sum() / total,
        (pixels * ys).sum() / total,
    )


@pytest.mark.parametrize(
    ("size", "box"),
    [((200, 120), (30, 10, 90, 110)), ((28, 28), (3, 1, 25, 27)), ((50, 50), (40, 40, 46, 49))],
)
def test_framing_scales_the_ink_box_to_20_and_centres_its_mass(size, box):
    """Large, tight-cropped and small off-centre ink: longer side 20, aspect kept, mass at (14, 14)."""
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    framed, info = frame_digit(image)
    pixels = np.asarray(framed, dtype=np.float64)
    height, width, cx, cy = ink_geometry(pixels)
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    assert framed.size == (28, 28) and info["applied"] and info["bbox"] == list(box)
    assert max(height, width) == 20
    assert abs(min(height, width) - 20 * min(box_w, box_h) / max(box_w, box_h)) <= 1
    assert abs(cx - 14) <= 0.5 and abs(cy - 14) <= 0.5
    assert info["scale"] == pytest.approx(20 / max(box_w, box_h), rel=1e-3)


def test_framing_keeps_an_mnist_framed_digit_and_removes_the_background():
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 10:18] = 255  # 20 x 8, mass at (13.5, 13.5): MNIST framing already
    framed, _ = frame_digit(Image.fromarray(digit))
    assert np.abs(np.asarray(framed).astype(int) - np.roll(digit, (0, 0))).sum() <= 255 * 20 * 2
    grey = Image.fromarray(np.clip(digit.astype(int) + 60, 0, 255).astype(np.uint8))  # background 60
    framed_grey, _ = frame_digit(grey)
    assert np.asarray(framed_grey).min() == 0 and np.asarray(framed_grey).max() == 255
    assert np.array_equal(np.asarray(framed_grey), np.asarray(framed))


def test_framing_without_ink_changes_nothing():
    blank = Image.new("L", (40, 40), 30)
    framed, info = frame_digit(blank)
    assert framed is blank and info == {"applied": False, "reason": "no ink found"}


# Datasets take the same path ------------------------------------------------------------------


def test_dataset_images_are_decoded_by_the_same_rules(tmp_path):
    """worker.data decodes ImageFolder files with core.images: a zero-alpha BMP is opaque there
    too, and a format outside the allow-list is refused, never handed to another decoder."""
    from tasks import get_task
    from worker.data import DatasetCorrupt, ImageFolderSource, _decode_chunk

    pixels = digit_seven()
    (tmp_path / "zero.bmp").write_bytes(bmp_v5(pixels, alpha=0))
    (tmp_path / "opaque.bmp").write_bytes(bmp_v5(pixels, alpha=255))
    (tmp_path / "page.eps").write_bytes(eps_bytes())
    source, preset = ImageFolderSource(root=str(tmp_path)), get_task("mnist_lenet5").preset.to_dict()
    zero, opaque = _decode_chunk(source, [str(tmp_path / "zero.bmp"), str(tmp_path / "opaque.bmp")], preset)
    assert np.array_equal(zero, opaque) and zero.max() == 255
    with pytest.raises(DatasetCorrupt, match="accepted format"):
        _decode_chunk(source, [str(tmp_path / "page.eps")], preset)


def test_a_decompression_bomb_is_refused_in_the_services_own_limit():
    """QA: the 413 named Pillow's threshold (twice the limit) beside the service's own."""
    with pytest.raises(ImageRejected) as refused:
        open_image(png_header_only(100_000, 100_000), DecodeLimits(max_pixels=40_000_000))
    assert refused.value.status_code == 413
    assert (
        str(refused.value)
        == "the image has 10000000000 pixels, over the limit of 40000000 (MAX_IMAGE_PIXELS)"
    )
