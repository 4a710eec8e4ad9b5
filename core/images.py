"""Image decoding: the one path every image takes, from a ``/predict`` upload or a dataset file.

Rules, in order (``open_image`` checks the header, ``load_image`` decodes; ``decode_image`` does both):

* Formats: an allow-list (``ALLOWED_FORMATS``: PNG, JPEG (and MPO, the multi-picture JPEG of
  cameras), GIF, TIFF, WebP, BMP), passed to ``Image.open(..., formats=...)``: no other Pillow
  plugin ever sees the bytes, so nothing reaches an external program (Pillow hands EPS/PostScript
  to Ghostscript). Anything else, or a format whose decoder this build lacks, is 415.
* Size: every frame or page the container declares (TIFF pages, MPO pictures, GIF frames, which
  may extend the canvas) must fit ``max_pixels``, read from headers before any pixel is decoded;
  Pillow's own ``Image.MAX_IMAGE_PIXELS`` is set to the same limit (plugins that decode inside
  ``Image.open`` check it), and its ``DecompressionBomb*`` warnings and errors become 413.
* Cost: decoding time is bounded before decoding starts. A progressive JPEG walks every block
  once per scan, so a 134 KB file of 883 scans costs a minute (libjpeg-turbo's report
  LJT-01-003). The scans (SOS markers) are counted from the bytes: more than ``max_jpeg_scans``
  (default 500, NVIDIA DALI's default cap) is 413, and so is a ``cost`` (pixels x scans; pixels for
  other formats, whose decoders are linear) over ``max_decode_cost``.
* Frames: the first frame of a multi-frame file is used; EXIF orientation is applied first.
* Alpha: in a BMP, an alpha channel that is zero everywhere carries no transparency and is
  dropped (many writers leave it 0; Windows, browsers and editors show such files opaque); other
  transparency is composited onto white (never dropped to black).
* Colour: an embedded ICC profile is converted to sRGB (``PIL.ImageCms``) before anything else
  looks at the colours; an unreadable or mismatched profile is ignored.
* Modes: 1, L, LA, La, P, RGB, RGBA, RGBa, CMYK, YCbCr, LAB, HSV, I;16*, I and F (see ``to_mode``).
* MNIST digits are white on black: ``should_invert`` (polarity) and ``frame_digit`` (MNIST's
  framing: ink box scaled into 20 x 20, centre of mass at the centre of 28 x 28).

This module is used by the API (``app``) and the worker (``worker.data``); it imports neither.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

InvertChoice = Literal["auto", "true", "false"]
NormalizeChoice = Literal["auto", "none"]
BACKGROUND = 255  # transparent pixels become white

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP")  # JPEG opens MPO files too
ALLOWED_NAMES = "PNG, JPEG, GIF, TIFF, WebP, BMP"
MAX_FRAMES = 1000  # frames / pages a container may declare


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost to decode.

    Attributes:
        max_pixels: largest width x height of any frame (``MAX_IMAGE_PIXELS``).
        max_jpeg_scans: most scans (SOS markers) in a JPEG (``MAX_JPEG_SCANS``).
        max_decode_cost: largest pixels x scans (pixels for non-JPEG formats) (``MAX_DECODE_COST``).
    """

    max_pixels: int = 40_000_000
    max_jpeg_scans: int = 500
    max_decode_cost: int = 500_000_000

    @classmethod
    def from_settings(cls, settings: object) -> DecodeLimits:
        """The limits of a ``core.config.Settings`` (fields of the same names)."""
        return cls(
            max_pixels=settings.max_image_pixels,
            max_jpeg_scans=settings.max_jpeg_scans,
            max_decode_cost=settings.max_decode_cost,
        )


class ImageRejected(Exception):
    """The image cannot be used; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[Image.Image, dict]:
    """``open_image`` then ``load_image``: the decoded first frame and what was found.

    Raises:
        ImageRejected: see ``open_image`` and ``load_image``.
    """
    image, info = open_image(data, limits)
    return load_image(image, info, limits), info


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[Image.Image, dict]:
    """Identify an image and check its declared sizes and decoding cost; no pixel is decoded.

    Args:
        data: the file's bytes.
        limits: pixel, scan and cost limits.

    Returns:
        (lazily opened image, info): info has ``width``, ``height`` (as stored), ``mode``,
        ``format``, ``frames``, ``scans`` (JPEG only) and ``cost`` (pixels x scans).

    Raises:
        ImageRejected: 400 empty; 415 not an accepted format, or no decoder for it in this build;
            413 a frame over ``max_pixels``, more than ``MAX_FRAMES`` frames, more than
            ``max_jpeg_scans`` scans, cost over ``max_decode_cost``; 422 corrupt header.
    """
    if not data:
        raise ImageRejected(400, "the uploaded file is empty")
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # plugins that decode inside open() check it
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        if "support not installed" in str(exc):  # e.g. WebP without libwebp
            raise ImageRejected(415, f"this server cannot decode the image: {exc}") from None
        raise ImageRejected(
            415, f"the uploaded file is not an image in an accepted format ({ALLOWED_NAMES})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(413, _too_many_pixels(exc, limits.max_pixels)) from None
    except Exception as exc:
        raise ImageRejected(422, f"the uploaded image is corrupt: {exc}") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageRejected(422, "the image has no pixels")
    info = {"width": width, "height": height, "mode": image.mode, "format": image.format}
    frames = _declared_sizes(image, data)
    info["frames"] = len(frames)
    for index, (w, h) in enumerate(frames):
        if w * h > limits.max_pixels:
            where = f"frame {index + 1} of {len(frames)} is" if index else "the image is"
            raise ImageRejected(
                413, f"{where} {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}"
            )
    cost = width * height
    if image.format in ("JPEG", "MPO"):
        scans = count_jpeg_scans(data)
        info["scans"] = scans
        if scans > limits.max_jpeg_scans:
            raise ImageRejected(
                413,
                f"the JPEG has {scans} scans, over the limit of {limits.max_jpeg_scans} (MAX_JPEG_SCANS): "
                "each progressive scan makes the decoder walk the whole image again",
            )
        cost *= max(scans, 1)
    info["cost"] = cost
    if cost > limits.max_decode_cost:
        raise ImageRejected(
            413,
            f"decoding the image would cost {cost} pixel-scans, over the limit of "
            f"{limits.max_decode_cost} (MAX_DECODE_COST)",
        )
    if image.format == "TIFF":
        _check_tiff_codec(image)
    return image, info


def load_image(image: Image.Image, info: dict, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode the first frame of an ``open_image`` result: EXIF orientation, zero alpha, sRGB.

    Args:
        image: from ``open_image``.
        info: its info; updated with ``width``/``height`` as displayed (after EXIF orientation),
            and ``exif``, ``alpha``, ``icc`` notes when they apply.
        limits: the limits ``open_image`` checked (a decoder finding more pixels is refused).

    Returns:
        The decoded image, mode as stored (or RGB after an ICC conversion, no alpha if zero).

    Raises:
        ImageRejected: 415 when this build has no decoder for it; 413 when a decoder finds more
            pixels than declared; 422 corrupt or truncated.
    """
    try:
        image.seek(0)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(413, _too_many_pixels(exc, limits.max_pixels)) from None
    except OSError as exc:
        if re.search(r"decoder \S+ not available", str(exc)):
            raise ImageRejected(415, f"this server cannot decode this {image.format} image: {exc}") from None
        raise ImageRejected(422, f"the uploaded image is corrupt or truncated: {exc}") from None
    except Exception as exc:  # bad codec stream
        raise ImageRejected(422, f"the uploaded image is corrupt or truncated: {exc}") from None
    if image.width * image.height > limits.max_pixels:
        raise ImageRejected(
            413,
            f"the decoded image is {image.width}x{image.height}, over the limit of {limits.max_pixels}",
        )
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: the pixels are fine, use them as stored
        info["exif"] = "unreadable, orientation ignored"
    image = _drop_zero_alpha(image, info)
    image = _to_srgb(image, info)
    info["width"], info["height"] = image.size  # as displayed, after the EXIF orientation
    return image


_STANDALONE = {0x01, 0xD8, 0xD9, *range(0xD0, 0xD8)}  # TEM, SOI, EOI, RSTn: no length field


def _too_many_pixels(exc: Exception, max_pixels: int) -> str:
    """The 413 message for Pillow's decompression-bomb check, in this service's limit (Pillow's
    own text names its error threshold, twice MAX_IMAGE_PIXELS)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{found.group(1)} pixels" if found else "more pixels than that"
    return f"the image has {size}, over the limit of {max_pixels} (MAX_IMAGE_PIXELS)"


def count_jpeg_scans(data: bytes) -> int:
    """Number of scans (SOS markers) in a JPEG file, all pictures of an MPO together.

    Marker segments are skipped by their length (an EXIF thumbnail's scans are not counted);
    entropy-coded data is searched for the next marker (0xFF then a byte other than 0x00, the
    stuffing, or 0xFF, a fill byte), ``bytes.find`` jumping from one 0xFF to the next. Linear in
    ``len(data)``, no decoding: about 0.1 ms for a 130 kB photo.
    """
    scans = 0
    pos = 0
    end = len(data)
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < end:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte: the marker comes after
            pos += 1
            continue
        pos += 2
        if marker == 0x00 or marker in _STANDALONE:  # stuffed 0xFF in entropy data, or no length
            continue
        if pos + 2 > end:
            break
        if marker == 0xDA:
            scans += 1
        pos += int.from_bytes(data[pos : pos + 2], "big")
    return scans


def _declared_sizes(image: Image.Image, data: bytes) -> list[tuple[int, int]]:
    """(width, height) of every frame the container declares, from headers only."""
    if image.format == "GIF":
        return _gif_sizes(data, image.size)
    count = getattr(image, "n_frames", 1)
    if count > MAX_FRAMES:
        raise ImageRejected(413, f"the image declares {count} frames, over the limit of {MAX_FRAMES}")
    if image.format not in ("TIFF", "MPO"):
        return [image.size] * count  # one picture, or frames bounded by the canvas (APNG, WebP)
    sizes = []
    try:
        for index in range(count):
            image.seek(index)
            sizes.append(image.size)
        image.seek(0)
    except Image.DecompressionBombError:  # Pillow's own check on seek (MPO), size already read
        w, h = image.size
        raise ImageRejected(
            413, f"frame {len(sizes) + 1} of {count} is {w}x{h} = {w * h} pixels, over the pixel limit"
        ) from None
    except Exception as exc:
        raise ImageRejected(422, f"the uploaded image is corrupt: {exc}") from None
    return sizes


def _gif_sizes(data: bytes, first: tuple[int, int]) -> list[tuple[int, int]]:
    """Canvas size each GIF frame needs: a frame may extend the logical screen (Pillow grows it)."""
    width, height = struct.unpack("<HH", data[6:10])
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    sizes = []
    try:
        while pos < len(data) and len(sizes) <= MAX_FRAMES:
            block = data[pos]
            pos += 1
            if block == 0x21:  # extension: label, then sub-blocks
                pos = _skip_sub_blocks(data, pos + 1)
            elif block == 0x2C:  # image descriptor
                x0, y0, w, h, local = struct.unpack("<HHHHB", data[pos : pos + 9])
                pos += 9 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
                pos = _skip_sub_blocks(data, pos)
                sizes.append((max(width, x0 + w), max(height, y0 + h)))
            else:  # trailer or garbage
                break
    except (struct.error, IndexError):
        pass  # truncated: the frames read so far
    if len(sizes) > MAX_FRAMES:
        raise ImageRejected(413, f"the GIF has more than {MAX_FRAMES} frames")
    return sizes or [first]


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while (size := data[pos]) != 0:
        pos += size + 1
    return pos + 1


@lru_cache(maxsize=1)
def tiff_compressions() -> frozenset[str]:
    """TIFF compressions this build of Pillow/libtiff can decode (each tried once on a 2 x 2 image)."""
    from PIL import TiffImagePlugin

    working = set()
    for name in set(TiffImagePlugin.COMPRESSION_INFO.values()):
        sample = Image.new("1" if name in ("group3", "group4", "tiff_ccitt") else "RGB", (2, 2))
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sample.save(buffer, "TIFF", compression=name)
                Image.open(io.BytesIO(buffer.getvalue())).load()
            working.add(name)
        except Exception:
            continue
    return frozenset(working)


def _check_tiff_codec(image: Image.Image) -> None:
    from PIL import TiffImagePlugin

    compression = TiffImagePlugin.COMPRESSION_INFO.get(image.tag_v2.get(259, 1), "raw")
    if compression not in tiff_compressions() | {"raw"}:
        raise ImageRejected(
            415, f"this server cannot decode TIFF compression {compression!r} (not in its libtiff)"
        )


# Formats whose writers commonly leave an unused alpha channel at 0, and whose viewers (Windows,
# browsers, editors) then show the picture opaque. Elsewhere (PNG, WebP, GIF, TIFF) alpha is
# honoured even when it is 0 everywhere: viewers show an empty picture.
ZERO_ALPHA_MEANS_OPAQUE = frozenset({"BMP"})


def _drop_zero_alpha(image: Image.Image, info: dict) -> Image.Image:
    """In ``ZERO_ALPHA_MEANS_OPAQUE`` formats, an alpha channel that is 0 everywhere carries no
    transparency: drop it, so the picture is the one a viewer shows."""
    if info.get("format") not in ZERO_ALPHA_MEANS_OPAQUE:
        return image
    bands = image.getbands()
    if len(bands) < 2 or bands[-1] not in ("A", "a"):
        return image
    if image.getchannel(len(bands) - 1).getextrema() != (0, 0):
        return image
    info["alpha"] = "zero everywhere, ignored"
    if image.mode == "PA":
        return image.convert("RGBA").convert("RGB")
    return image.convert("L" if bands[0] == "L" else "RGB")


@lru_cache(maxsize=1)
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


MAX_CACHED_ICC_BYTES = 64 * 1024  # the cache holds profile bytes: 64 of them, at most 4 MiB


@lru_cache(maxsize=64)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """The lcms transform from an embedded profile (its bytes) to sRGB for ``mode`` images,
    built once per profile: building it costs about 3 ms, applying it to a 500 x 375 photo 1 ms,
    and a few profiles (cameras', Adobe RGB) cover most uploads. Built as ``profileToProfile``
    does (perceptual intent), with lcms's one-pixel cache off so that threads can share it."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(
        profile,
        _srgb(),
        mode,
        "RGB",
        renderingIntent=ImageCms.Intent.PERCEPTUAL,
        flags=ImageCms.Flags.NOCACHE,
    )


_ICC_MODES = {"RGB ": ("RGB", "RGBA"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}


def _to_srgb(image: Image.Image, info: dict) -> Image.Image:
    """Convert an image with an embedded ICC profile to sRGB (RGB, alpha kept); else unchanged."""
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space
    except Exception:
        info["icc"] = "unreadable, ignored"
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode not in _ICC_MODES.get(space, ()):
        info["icc"] = f"{space.strip()} profile on a {image.mode} image, ignored"
        return image
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    base = image.convert(image.mode[:-1]) if alpha is not None else image
    try:
        build = _srgb_transform if len(icc) <= MAX_CACHED_ICC_BYTES else _srgb_transform.__wrapped__
        converted = build(icc, base.mode).apply(base)
    except Exception as exc:  # a profile lcms cannot use
        info["icc"] = f"not convertible ({exc}), ignored"
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    info["icc"] = f"{ImageCms.getProfileDescription(profile).strip()} -> sRGB"
    return converted


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to ``mode`` (``RGB`` or ``L``), compositing transparency onto white.

    Raises:
        ImageRejected: 415 for a mode Pillow cannot convert to RGB.
    """
    image = _to_8bit(image)
    if image.mode in ("RGBa", "La"):
        image = image.convert(image.mode[:-1] + "A")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "RGBA", "PA") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = _composite(image)
    if image.mode != mode:
        image = _convert(image, mode)
    return image


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """``image.convert(mode)``, through RGB where Pillow has no direct conversion (LAB to L)."""
    try:
        return image.convert(mode)
    except ValueError:
        pass
    try:
        return image.convert("RGB").convert(mode)
    except ValueError:
        raise ImageRejected(415, f"images of mode {image.mode} cannot be converted to {mode}") from None


def should_invert(image: Image.Image, choice: InvertChoice) -> bool:
    """For an L-mode image: invert if asked, or on ``auto`` when the border (outer 10 %) is light."""
    if choice != "auto":
        return choice == "true"
    # the 8-bit border summed exactly, without a float copy of the image (a float32 mean, as
    # before, rounds once the border passes about 65,000 pixels)
    border = _border(np.asarray(image))
    return float(border.sum(dtype=np.float64)) / border.size > 127.5


def _border(pixels: np.ndarray) -> np.ndarray:
    """The outer 10 % band of a 2-D array (at least one pixel wide), flattened."""
    h, w = pixels.shape
    band_h, band_w = max(1, h // 10), max(1, w // 10)
    return np.concatenate(
        [
            pixels[:band_h].ravel(),
            pixels[-band_h:].ravel(),
            pixels[:, :band_w].ravel(),
            pixels[:, -band_w:].ravel(),
        ]
    )


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float array without NaNs, by one ``np.partition`` (np.median's own
    checks cost more than the partition on a digit's border)."""
    half = values.size // 2
    if values.size % 2:
        return float(np.partition(values, half)[half])
    low, high = np.partition(values, (half - 1, half))[half - 1 : half + 1]
    return float((low + high) / 2)


def _composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale I;16*, I and F images to L by their value range; other modes unchanged."""
    if image.mode == "F":
        values = np.array(image, dtype=np.float32)  # one working copy, then in place
        np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0 and values.max() <= 1.0:
            values *= 255.0
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        return Image.fromarray(values.astype(np.uint8))
    if image.mode.startswith("I"):
        values = np.array(image, dtype=np.int64) if image.mode == "I" else np.array(image, dtype=np.int32)
        top = int(values.max()) if values.size else 0
        if top > 65535:
            low = int(values.min())
            values -= low
            values *= 255
            values //= max(top - low, 1)
        elif top > 255:
            values //= 257
        np.clip(values, 0, 255, out=values)
        return Image.fromarray(values.astype(np.uint8))
    return image


def frame_digit(image: Image.Image, size: int = 28, box: int = 20) -> tuple[Image.Image, dict]:
    """Frame a white-on-black digit the way MNIST's were framed (LeCun et al. 1998).

    The background level (median of the outer 10 % border) is subtracted and the ink's peak
    stretched to 255; the bounding box of the ink (pixels above 20 % of the peak) is scaled,
    anti-aliased and keeping its aspect ratio, so that its longer side is ``box``; it is then
    placed in a black ``size`` x ``size`` image with its intensity-weighted centre of mass at pixel
    (size / 2, size / 2) (index coordinates, where MNIST's training digits have theirs). An MNIST
    digit comes out unchanged up to a one-pixel shift.

    Args:
        image: mode ``L``, any size, ink brighter than the background (after ``should_invert``).
        size: side of the output (28 for MNIST).
        box: side of the box the ink is scaled into (20 for MNIST).

    Returns:
        (``size`` x ``size`` L image, description): ``applied`` (False with a ``reason`` when no
        ink stands out of the background: the image is returned unchanged), ``bbox`` [left, top,
        right, bottom) of the ink in the input's pixels, ``scale`` (output pixels per input pixel),
        ``offset`` [left, top] of the scaled box in the output, ``center_of_mass`` [x, y] there.
    """
    if image.mode != "L":
        raise ValueError(f"frame_digit needs an L image, got {image.mode}")
    width, height = image.size
    work = image
    if max(width, height) > 16 * size:  # over 448 px: shrink first (anti-aliased), same geometry
        work = image.copy()
        work.thumbnail((16 * size, 16 * size), Image.Resampling.BOX)
    shrink = width / work.width
    pixels = np.asarray(work, dtype=np.float32)
    pixels = np.clip(pixels - _median(_border(pixels)), 0, None)
    peak = float(pixels.max())
    if peak < 32:  # no ink stands out of the background by an eighth of the range
        return image, {"applied": False, "reason": "no ink found"}
    pixels *= 255.0 / peak
    ink = pixels > 0.2 * 255.0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = pixels[top:bottom, left:right]
    scale = box / max(crop.shape)
    new_w = max(1, min(box, round(crop.shape[1] * scale)))
    new_h = max(1, min(box, round(crop.shape[0] * scale)))
    if (new_w, new_h) != (crop.shape[1], crop.shape[0]):
        crop = np.asarray(Image.fromarray(crop, "F").resize((new_w, new_h), Image.Resampling.LANCZOS))
    crop = np.clip(crop, 0, 255)
    total = float(crop.sum())
    ys, xs = np.arange(new_h)[:, None], np.arange(new_w)[None, :]  # np.mgrid's products, broadcast
    com_y, com_x = float((crop * ys).sum()) / total, float((crop * xs).sum()) / total
    off_x = min(max(round(size / 2 - com_x), 0), size - new_w)
    off_y = min(max(round(size / 2 - com_y), 0), size - new_h)
    out = np.zeros((size, size), dtype=np.float32)
    out[off_y : off_y + new_h, off_x : off_x + new_w] = crop
    framed = Image.fromarray(np.rint(out).astype(np.uint8), "L")
    return framed, {
        "applied": True,
        "bbox": [round(v * shrink) for v in (left, top, right, bottom)],
        "scale": round(scale / shrink, 4),
        "offset": [off_x, off_y],
        "center_of_mass": [round(com_x + off_x, 2), round(com_y + off_y, 2)],
    }
