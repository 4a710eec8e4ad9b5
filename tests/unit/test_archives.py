"""The safe archive reader and the layout rules of uploaded datasets, without Redis or a worker."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from safetensors import safe_open

from core.config import Settings
from core.datasets import sniff_archive
from tests.factories_datasets import (
    class_images,
    gzip_bomb_tar,
    overlapping_zip_bomb,
    tar_bytes,
    zip_bytes,
)
from worker.archives import ArchiveRefused, Limits, Member, SafeArchive, safe_name, zip_entry_name
from worker.ingest import IngestFailed, build_dataset, load_uploaded, plan_layout

LIMITS = Limits(max_entries=100, max_total_bytes=10 << 20, max_ratio=100, max_file_bytes=1 << 20)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("../x.png", "'..'"),
        ("a/../../x.png", "'..'"),
        ("a\\..\\x.png", "'..'"),
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share\\x.png", "absolute"),
        ("C:\\x.png", "drive letter"),
        ("c:x.png", "drive letter"),
        ("a/\x00.png", "NUL"),
    ],
)
def test_unsafe_names_are_refused(raw, words):
    with pytest.raises(ArchiveRefused, match=words):
        safe_name(raw)


def test_safe_names_are_normalised():
    assert safe_name("./photos//cats/./a.png") == "photos/cats/a.png"
    assert safe_name("cats\\b.PNG") == "cats/b.PNG"
    assert safe_name("x..y/a..png") == "x..y/a..png"  # dots inside a name are not '..'


def test_formats_are_sniffed_from_content_not_names():
    good = class_images({"a": 1})
    assert sniff_archive(zip_bytes(good)[:512]) == "zip"
    assert sniff_archive(tar_bytes(good)[:512]) == "tar.gz"
    assert sniff_archive(tar_bytes(good, gz=False)[:512]) == "tar"
    assert sniff_archive(b"Rar!\x1a\x07\x00") is None
    assert sniff_archive(b"") is None


def _archive(tmp_path, data: bytes, limits: Limits = LIMITS) -> SafeArchive:
    path = tmp_path / "upload"
    path.write_bytes(data)
    return SafeArchive(path, limits)


def test_overlapping_entries_are_refused_before_anything_is_inflated(tmp_path):
    with pytest.raises(ArchiveRefused, match="overlap"):
        _archive(tmp_path, overlapping_zip_bomb(copies=4, inflated=4 << 20)).members()


def test_entry_count_is_checked_from_the_end_record(tmp_path):
    data = zip_bytes({f"a/{i}.png": b"x" for i in range(101)})
    with pytest.raises(ArchiveRefused, match="101 entries, over the limit of 100"):
        _archive(tmp_path, data).members()


def test_declared_total_over_the_limit_is_refused(tmp_path):
    data = zip_bytes({"a/0.png": bytes(6 << 20), "b/0.png": bytes(6 << 20)})
    with pytest.raises(ArchiveRefused, match="declare"):
        _archive(tmp_path, data).members()


def test_gzip_bomb_is_stopped_while_inflating(tmp_path):
    with pytest.raises(ArchiveRefused, match="gzip bomb"):
        _archive(tmp_path, gzip_bomb_tar(class_images({"a": 1}), inflated=64 << 20)).members()


def test_a_size_that_lies_is_refused(tmp_path):
    """A zip whose central directory declares 100 bytes for data that inflates to 5,000: reading
    stops at the declared size, and the CRC of those bytes does not match: refused."""
    data = bytearray(zip_bytes({"a/0.png": bytes(5000), "b/0.png": b"y"}))
    directory = data.index(b"PK\x01\x02")  # a/0.png's central directory record
    data[directory + 24 : directory + 28] = (100).to_bytes(4, "little")  # uncompressed size
    archive = _archive(tmp_path, bytes(data))
    with pytest.raises(ArchiveRefused, match="Bad CRC"):
        list(archive.read({"a/0.png"}))
    assert archive.bytes_read <= 100


def test_per_entry_ratio_and_size_skip_the_file_not_the_dataset():
    members = [
        Member("cats/a.png", "file", 10_000, 9_000),
        Member("cats/b.png", "file", 50_000_000, 50_000),
        Member("cats/c.png", "file", 3 << 20, 3 << 20),
        Member("dogs/a.png", "file", 10_000, 9_000),
    ]
    plan = plan_layout(members, max_ratio=100, max_file_bytes=1 << 20)
    assert sorted(plan.candidates) == ["cats/a.png", "dogs/a.png"]
    reasons = dict(plan.skipped)
    assert "compression ratio 1000:1" in reasons["cats/b.png"]
    assert "over MAX_UPLOAD_BYTES" in reasons["cats/c.png"]


def test_layouts_enclosing_folder_and_junk():
    def plan(*names: str):
        return plan_layout([Member(n, "file", 10, 10) for n in names], 100, 1 << 20)

    flat = plan("photos/cats/a.jpg", "photos/dogs/b.JPG", "photos/readme.md", "__MACOSX/photos/._a.jpg")
    assert flat.layout == "class_folders" and flat.ignored == 1
    assert {c.cls for c in flat.candidates.values()} == {"cats", "dogs"}
    assert dict(flat.skipped) == {"photos/readme.md": "not inside a class folder"}
    split = plan("train/cats/a.jpg", "val/cats/b.jpg", "train/dogs/c.png", "val/dogs/d.png", "test/x/e.png")
    assert split.layout == "train_val"
    assert {(c.cls, c.split) for c in split.candidates.values()} == {
        ("cats", "train"),
        ("cats", "val"),
        ("dogs", "train"),
        ("dogs", "val"),
    }
    assert "outside train/ and val/" in dict(split.skipped)["test/x/e.png"]
    single = plan("cats/a.jpg", "cats/b.jpg")  # one class folder is not an enclosing folder
    assert {c.cls for c in single.candidates.values()} == {"cats"}
    with pytest.raises(IngestFailed, match="no val/"):
        plan("train/cats/a.jpg", "train/dogs/b.jpg")
    # QA: split folders beside a class folder were read as the classes train, val and dog
    mixed = ("train/cat/a.jpg", "train/dog/b.jpg", "val/cat/c.jpg", "val/dog/d.jpg", "dog/e.jpg")
    with pytest.raises(
        IngestFailed, match=r"mixes split folders \(train/, val/\) with other top folders \(dog/\)"
    ):
        plan(*mixed)
    with pytest.raises(IngestFailed, match="mixes split folders"):
        plan(*(f"photos/{name}" for name in mixed))  # inside an enclosing folder too
    trains = plan("train/a.jpg", "car/b.jpg", "bus/c.jpg")  # a class called train (images in it)
    assert {c.cls for c in trains.candidates.values()} == {"train", "car", "bus"}


def test_the_cache_is_valid_safetensors_in_imagefolder_order(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    images = class_images({"b": 3, "a": 3})
    entries = {f"train/{k}": v for k, v in images.items()} | {"val/a/x.png": images["a/000.png"]}
    entries["val/b/y.png"] = images["b/001.png"]
    (folder / "upload").write_bytes(zip_bytes(dict(reversed(list(entries.items())))))
    fields = build_dataset(folder, Settings(_env_file=None))
    assert fields["classes"] == ["a", "b"] and fields["layout"] == "train_val"
    assert fields["duplicates"]["train_val"] == 2  # both val images are copies of train images
    with safe_open(str(folder / "images.safetensors"), framework="pt") as f:
        assert f.get_slice("images").get_shape() == [8, 3, 224, 224]
    splits = load_uploaded(tmp_path, "ds")
    assert splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits["val"].labels.tolist() == [0, 1] and splits["val"].classes == ["a", "b"]
    assert torch.equal(splits["val"].images[0], splits["train"].images[0])  # val/a/x.png == a/000.png


def test_zip_reading_is_bounded_per_file(tmp_path):
    small = Limits(max_entries=10, max_total_bytes=10 << 20, max_ratio=1e9, max_file_bytes=1000)
    archive = _archive(
        tmp_path, zip_bytes({"a/0.png": bytes(5000), "a/1.png": b"ok"}, zipfile.ZIP_STORED), small
    )
    read = dict(archive.read({"a/0.png", "a/1.png"}))
    assert read["a/1.png"] == b"ok" and not isinstance(read["a/0.png"], bytes)


def info_zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A zip as Info-ZIP's ``zip`` writes it on Linux: UTF-8 names without the UTF-8 flag
    (Python's zipfile sets the flag for any non-ASCII name, so the names are patched in)."""
    placeholders = {name: f"Q{index}Z".ljust(len(name.encode()), "Z") for index, name in enumerate(entries)}
    data = zip_bytes({placeholders[name]: content for name, content in entries.items()})
    for name, placeholder in placeholders.items():
        data = data.replace(placeholder.encode(), name.encode())
    return data


def test_utf8_names_without_the_utf8_flag_are_read_as_utf8(tmp_path):
    """QA: `zip -qr` (Info-ZIP 3.0) gave the class 'ship ⛵' as 'ship Γ¢╡' (read as CP437)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    images = class_images({"a": 3, "b": 3})
    names = {"a": "ship ⛵", "b": "chat_é"}
    entries = {f"{names[key[0]]}/{key[2:]}": value for key, value in images.items()}
    archive = info_zip_bytes(entries)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert not any(info.flag_bits & 0x800 for info in zf.infolist())
        assert "ship Γ¢╡/000.png" in zf.namelist()  # what zipfile alone makes of it
    (folder / "upload").write_bytes(archive)
    assert build_dataset(folder, Settings(_env_file=None))["classes"] == ["chat_é", "ship ⛵"]
    # names that are not UTF-8 stay as CP437 decodes them (e.g. DOS-era 'ä' = 0x84)
    legacy = zip_bytes({"xx/000.png": images["a/000.png"]}).replace(b"xx/", b"\x84x/")
    with zipfile.ZipFile(io.BytesIO(legacy)) as zf:
        assert [zip_entry_name(i) for i in zf.infolist()] == ["äx/000.png"]
