"""Dataset archives for the upload tests: real photos re-packed, synthetic class folders, and
hostile archives (zip slip, bombs, links, devices, truncation), all built in memory or streamed."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.factories import colour_image, image_bytes


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``entries`` (name -> bytes), names kept exactly as given (``..`` and ``/`` too)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(_info(name, compression), data)
    return out.getvalue()


def _info(name: str, compression: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = compression
    return info


def tar_bytes(entries: dict[str, bytes], gz: bool = True, special: list[tarfile.TarInfo] = ()) -> bytes:
    """A tar (gzip-compressed when ``gz``) of regular files plus ``special`` entries (links, devices)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special:
            tf.addfile(info)
    return out.getvalue()


def class_images(
    classes: dict[str, int], seed: int = 0, size: int = 40, fmt: str = "PNG"
) -> dict[str, bytes]:
    """``<class>/<i>.png`` entries with learnable colour images: {class: count}."""
    rng = np.random.default_rng(seed)
    entries = {}
    for label, (cls, count) in enumerate(sorted(classes.items())):
        for i in range(count):
            pixels = colour_image(label, rng, size=size, classes=len(classes))
            entries[f"{cls}/{i:03d}.{fmt.lower()}"] = image_bytes(Image.fromarray(pixels), fmt)
    return entries


def cifar_mixed_modes(source: Path, classes: tuple[str, ...], per_class: int) -> bytes:
    """Three CIFAR-10 classes from cifar10-jpg.zip re-packed as ``<class>/*.png`` of mixed sizes
    and modes: some grayscale (L), some RGBA with transparency, some upscaled, and some files
    with an upper-case ``.PNG`` extension."""
    entries = {}
    with zipfile.ZipFile(source) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))
        for cls in classes:
            picked = [n for n in names if f"/train/{cls}/" in n][:per_class]
            for i, name in enumerate(picked):
                with Image.open(io.BytesIO(zf.read(name))) as img:
                    image = img.convert("RGB")
                if i % 4 == 1:
                    image = image.convert("L")
                elif i % 4 == 2:
                    image = image.convert("RGBA")
                    image.putalpha(200)
                elif i % 4 == 3:
                    image = image.resize((64, 48))
                ext = "PNG" if i % 3 == 0 else "png"
                entries[f"{cls}/{i:04d}.{ext}"] = image_bytes(image, "PNG")
    return zip_bytes(entries)


# Hostile archives ------------------------------------------------------------------------------


def zip_with_huge_entry(valid: dict[str, bytes], name: str, inflated: int = 1 << 30) -> bytes:
    """A zip of ``valid`` plus one entry of ``inflated`` zero bytes (1 GiB -> about 1 MB)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry, data in valid.items():
            zf.writestr(entry, data)
        block = bytes(1 << 20)
        with zf.open(_info(name), "w", force_zip64=True) as f:
            for _ in range(inflated // len(block)):
                f.write(block)
    return out.getvalue()


def overlapping_zip_bomb(copies: int = 64, inflated: int = 64 << 20) -> bytes:
    """One deflated stream of ``inflated`` zeros referenced by ``copies`` central-directory
    entries (different names, same local header): a small file that declares a huge total."""
    one = io.BytesIO()
    with zipfile.ZipFile(one, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(_info("a/0000.png"), "w") as f:
        block = bytes(1 << 20)
        for _ in range(inflated // len(block)):
            f.write(block)
    data = one.getvalue()
    eocd = data.rindex(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", data[eocd + 12 : eocd + 20])
    record = data[cd_offset : cd_offset + cd_size]
    records = b"".join(record.replace(b"a/0000.png", f"a/{i:04d}.png".encode()) for i in range(copies))
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, copies, copies, len(records), cd_offset, 0)
    return data[:cd_offset] + records + end


def many_entries_zip(count: int = 100_000) -> bytes:
    """``count`` one-byte entries, stored."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(f"c{i % 2}/{i}.png", b"x")
    return out.getvalue()


def gzip_bomb_tar(valid: dict[str, bytes], inflated: int = 256 << 20) -> bytes:
    """A .tar.gz of ``valid`` plus one member of ``inflated`` zeros, compressed as a stream."""
    header = tarfile.TarInfo("cats/zeros.png")
    header.size = inflated
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    parts = [compressor.compress(_tar_members(valid)), compressor.compress(header.tobuf())]
    block = bytes(1 << 20)
    for _ in range(inflated // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(bytes(1024)))
    parts.append(compressor.flush())
    return b"".join(parts)


def _tar_members(entries: dict[str, bytes]) -> bytes:
    """The member blocks of an uncompressed tar, without its two end-of-archive blocks."""
    data = tar_bytes(entries, gz=False)
    end = len(data)
    while end >= 512 and data[end - 512 : end] == bytes(512):
        end -= 512
    return data[:end]


def device_entry(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3  # /dev/null
    return info


def link_entry(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def zip_symlink(valid: dict[str, bytes], name: str, target: str) -> bytes:
    """A zip with a Unix symlink entry (mode S_IFLNK in the external attributes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for entry, data in valid.items():
            zf.writestr(entry, data)
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16) | 0
        info.create_system = 3
        zf.writestr(info, target)
    return out.getvalue()
