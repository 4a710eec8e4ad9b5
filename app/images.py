"""Uploaded images: decode anything Pillow opens, safely, into what a preset expects.

* Size limits: the pixel count is read from the header (``Image.open`` is lazy) and refused
  before any pixel is decoded (decompression bombs).
* EXIF orientation is applied first (``ImageOps.exif_transpose``); multi-frame files (GIF, TIFF,
  WebP) use their first frame.
* Modes: 1, L, LA, La, P (with or without transparency), RGB, RGBA, RGBa, CMYK, YCbCr, LAB, HSV,
  I;16*, I and F. Transparency is composited onto white, never dropped to black. Integer images:
  values up to 255 are kept, up to 65535 are divided by 257 (16-bit full scale), larger ones are
  stretched from their minimum to their maximum. Float (F) images in [0, 1] are scaled by 255,
  others clipped to [0, 255]; NaN becomes 0.
* MNIST digits are white on black; photos and drawings are usually dark on light. For presets
  in mode L, ``invert="auto"`` inverts when the image's border is lighter than mid-grey.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

InvertChoice = Literal["auto", "true", "false"]
BACKGROUND = 255  # transparent pixels become white


class ImageRejected(Exception):
    """The upload cannot be used; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def open_upload(data: bytes, max_pixels: int) -> tuple[Image.Image, dict]:
    """Decode the first frame of an upload with its EXIF orientation applied.

    Args:
        data: the file's bytes.
        max_pixels: largest accepted width * height.

    Returns:
        (decoded image, {"width", "height", "mode", "format"} of the upload: size after the EXIF
        orientation, mode and format as stored).

    Raises:
        ImageRejected: 400 empty, 415 not an image, 413 too many pixels, 422 corrupt/truncated.
    """
    if not data:
        raise ImageRejected(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(415, "the uploaded file is not an image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, f"the image has more than {max_pixels} pixels") from None
    except Exception as exc:
        raise ImageRejected(422, f"the uploaded image is corrupt: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            413, f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise ImageRejected(422, "the image has no pixels")
    info = {"width": width, "height": height, "mode": image.mode, "format": image.format}
    try:
        image.seek(0)
        image.load()
    except Exception as exc:  # truncated data, bad codec stream
        raise ImageRejected(422, f"the uploaded image is corrupt or truncated: {exc}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: the pixels are fine, use them as stored
        info["exif"] = "unreadable, orientation ignored"
    info["width"], info["height"] = image.size  # as displayed, after the EXIF orientation
    return image, info


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
    pixels = np.asarray(image, dtype=np.float32)
    h, w = pixels.shape
    band_h, band_w = max(1, h // 10), max(1, w // 10)
    border = np.concatenate(
        [
            pixels[:band_h].ravel(),
            pixels[-band_h:].ravel(),
            pixels[:, :band_w].ravel(),
            pixels[:, -band_w:].ravel(),
        ]
    )
    return float(border.mean()) > 127.5


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
