"""Dataset discovery in every supported layout, decoding through the preset, and the cache."""

from __future__ import annotations

import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import hymenoptera_resnet18
from tests.factories import CIFAR_CLASSES, make_cifar_batches, make_hymenoptera, make_image_folder, make_mnist
from worker import data as data_module
from worker.data import DatasetCorrupt, DatasetNotFound, clear_memory_cache, load_split
from worker.training import TrainingContext


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    clear_memory_cache()
    yield
    clear_memory_cache()


def test_mnist_idx_files(tmp_path):
    raw = make_mnist(tmp_path, train=50, test=20)
    train = load_split("mnist_lenet5", "train", tmp_path, tmp_path / "cache")
    assert train.images.shape == (50, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.classes == [str(d) for d in range(10)]
    raw_bytes = (raw / "train-images-idx3-ubyte").read_bytes()[16:]
    assert train.images.numpy().tobytes() == raw_bytes
    test = load_split("mnist_lenet5", "test", tmp_path, tmp_path / "cache")
    assert len(test) == 20


def test_mnist_gz_files(tmp_path):
    import gzip

    raw = make_mnist(tmp_path, train=30, test=10)
    for path in list(raw.iterdir()):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    assert len(load_split("mnist_lenet5", "train", tmp_path, tmp_path / "cache")) == 30


def test_cifar_python_batches(tmp_path):
    make_cifar_batches(tmp_path, per_batch=20, test=10)
    train = load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache")
    assert train.images.shape == (100, 3, 32, 32)
    assert train.classes == CIFAR_CLASSES
    batch = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert np.array_equal(train.images[:20].numpy().reshape(20, -1), batch["data"])
    assert train.labels[:20].tolist() == batch["labels"]


def test_cifar_batches_refuse_code_in_pickles(tmp_path):
    folder = make_cifar_batches(tmp_path, per_batch=5, test=5)

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(DatasetCorrupt, match="not allowed"):
        load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache")
    assert (tmp_path / "victim").exists()


@pytest.mark.parametrize("as_zip", [False, True])
def test_cifar_image_folder_and_zip(tmp_path, as_zip):
    make_image_folder(tmp_path, "cifar10-jpg", {"train": 30, "test": 10}, CIFAR_CLASSES, as_zip=as_zip)
    train = load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache")
    assert train.images.shape == (30, 3, 32, 32)
    assert train.classes == CIFAR_CLASSES
    assert sorted(train.labels.tolist()) == sorted(i % 10 for i in range(30))


def test_hymenoptera_folder_goes_through_resize_and_crop(tmp_path):
    make_hymenoptera(tmp_path, train=6, val=4)
    (tmp_path / "hymenoptera_data" / "train" / "ants" / "notes.txt").write_text("not an image")
    train = load_split("hymenoptera_resnet18", "train", tmp_path, tmp_path / "cache")
    assert train.images.shape == (6, 3, 224, 224)
    assert train.classes == ["ants", "bees"]
    first = sorted((tmp_path / "hymenoptera_data" / "train" / "ants").glob("*.jpg"))[0]
    from tasks import get_task

    with Image.open(first) as image:
        expected = get_task("hymenoptera_resnet18").preset.to_uint8(image)
    assert torch.equal(train.images[0], expected)


def test_hymenoptera_zip(tmp_path):
    make_hymenoptera(tmp_path, train=4, val=4, as_zip=True)
    val = load_split("hymenoptera_resnet18", "val", tmp_path, tmp_path / "cache")
    assert val.images.shape == (4, 3, 224, 224)


def test_missing_dataset_names_every_place_looked(tmp_path):
    with pytest.raises(DatasetNotFound) as info:
        load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache")
    message = str(info.value)
    for expected in ("cifar-10-batches-py", "cifar10-jpg.zip", "cifar10-jpg", "ALLOW_DOWNLOAD"):
        assert expected in message
    with pytest.raises(DatasetNotFound, match="train-images-idx3-ubyte"):
        load_split("mnist_lenet5", "train", tmp_path, tmp_path / "cache")
    with pytest.raises(DatasetNotFound, match=r"hymenoptera_data\.zip"):
        load_split("hymenoptera_resnet18", "val", tmp_path, tmp_path / "cache")


def test_corrupt_image_is_named(tmp_path):
    make_image_folder(tmp_path, "cifar10-jpg", {"train": 10, "test": 10}, CIFAR_CLASSES)
    bad = sorted((tmp_path / "cifar10-jpg" / "train" / "cat").glob("*.jpg"))[0]
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetCorrupt, match=re.escape(bad.name)):
        load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache")


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    make_image_folder(tmp_path, "cifar10-jpg", {"train": 20, "test": 10}, CIFAR_CLASSES, as_zip=True)
    first = load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache")
    files = list((tmp_path / "cache" / "datasets" / "cifar10_dense").glob("train-*.safetensors"))
    assert len(files) == 1
    clear_memory_cache()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is there")

    monkeypatch.setattr(data_module, "_decode_folder", no_decoding)
    second = load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache")
    assert torch.equal(first.images, second.images) and first.classes == second.classes


def test_cache_invalidated_when_source_changes(tmp_path):
    make_mnist(tmp_path, train=20, test=10)
    load_split("mnist_lenet5", "train", tmp_path, tmp_path / "cache")
    clear_memory_cache()
    make_mnist(tmp_path, train=40, test=10, seed=1)
    assert len(load_split("mnist_lenet5", "train", tmp_path, tmp_path / "cache")) == 40


def test_damaged_cache_is_rebuilt(tmp_path):
    make_mnist(tmp_path, train=20, test=10)
    load_split("mnist_lenet5", "train", tmp_path, tmp_path / "cache")
    clear_memory_cache()
    (cache_file,) = (tmp_path / "cache" / "datasets" / "mnist_lenet5").glob("train-*.safetensors")
    cache_file.write_bytes(b"garbage")
    assert len(load_split("mnist_lenet5", "train", tmp_path, tmp_path / "cache")) == 20


def test_decoding_stops_between_chunks_when_asked(tmp_path):
    """A cancel during data loading: decoding stops after the chunk in hand, remaining chunks are
    dropped, and nothing is cached."""
    make_image_folder(tmp_path, "cifar10-jpg", {"train": 640, "test": 10}, CIFAR_CLASSES, as_zip=True)
    calls = []

    class Cancelled(Exception):
        pass

    def check_stop():
        calls.append(1)
        raise Cancelled

    with pytest.raises(Cancelled):
        load_split("cifar10_dense", "train", tmp_path, tmp_path / "cache", check_stop=check_stop)
    assert len(calls) == 1
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    calls_done = []
    train = load_split(
        "cifar10_dense", "train", tmp_path, tmp_path / "cache", check_stop=lambda: calls_done.append(1)
    )
    assert len(train) == 640 and len(calls_done) >= 2  # checked after each chunk


def test_empty_class_folder_is_refused_not_made_a_class(tmp_path):
    make_hymenoptera(tmp_path, train=8, val=4)
    (tmp_path / "hymenoptera_data" / "train" / "wasps").mkdir()
    with pytest.raises(DatasetCorrupt, match=r"wasps .* hold no images"):
        load_split("hymenoptera_resnet18", "train", tmp_path, tmp_path / "cache")


def test_splits_with_different_classes_fail_the_job(tmp_path):
    make_hymenoptera(tmp_path, train=8, val=4)
    shutil.rmtree(tmp_path / "hymenoptera_data" / "val" / "ants")
    ctx = TrainingContext(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    ctx.load("hymenoptera_resnet18", "train")
    with pytest.raises(DatasetCorrupt, match=r"different classes: train \['ants', 'bees'\], val \['bees'\]"):
        ctx.load("hymenoptera_resnet18", "val")


def test_failed_download_says_what_from_where(tmp_path, monkeypatch):
    """ALLOW_DOWNLOAD with the archive unreachable (here: a closed local port, so no internet is
    needed): the job's error names the dataset, the URL and DATA_DIR."""
    url = "http://127.0.0.1:9/hymenoptera_data.zip"
    monkeypatch.setattr(hymenoptera_resnet18, "HYMENOPTERA_URL", url)
    with pytest.raises(
        DatasetNotFound, match=r"hymenoptera is not in DATA_DIR=.* downloading it from http://127"
    ):
        load_split("hymenoptera_resnet18", "train", tmp_path, tmp_path / "cache", allow_download=True)


def test_empty_class_folder_added_after_caching_is_still_refused(tmp_path):
    make_hymenoptera(tmp_path, train=8, val=4)
    load_split("hymenoptera_resnet18", "train", tmp_path, tmp_path / "cache")
    clear_memory_cache()
    (tmp_path / "hymenoptera_data" / "train" / "wasps").mkdir()
    with pytest.raises(DatasetCorrupt, match="wasps"):
        load_split("hymenoptera_resnet18", "train", tmp_path, tmp_path / "cache")
