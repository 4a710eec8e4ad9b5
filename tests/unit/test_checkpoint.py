"""The checkpoint store: atomic writes, verification, refusal of tampered files, id validation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from models_store.checkpoint import (
    CheckpointInvalid,
    CheckpointStore,
    InvalidModelId,
    ModelNotFound,
    validate_model_id,
)


def make_checkpoint(
    store: CheckpointStore, model_id: str = "mnist_lenet5-1", task: str = "mnist_lenet5", **meta
):
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(3)}
    metadata = {"task": task, "created_at": meta.pop("created_at", "2026-11-29T00:00:00+00:00"), **meta}
    return store.save(model_id, tensors, metadata)


def test_save_then_load_round_trip(tmp_path):
    store = CheckpointStore(tmp_path / "models")
    info = make_checkpoint(store, classes=["a", "b"])
    assert info.valid and info.size_bytes > 0
    tensors, meta = store.load("mnist_lenet5-1")
    assert torch.equal(tensors["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert meta["classes"] == ["a", "b"] and len(meta["weights"]["sha256"]) == 64
    assert sorted(os.listdir(tmp_path / "models" / "mnist_lenet5-1")) == [
        "metadata.json",
        "model.safetensors",
    ]


def test_list_newest_first_and_newest_valid_of_task(tmp_path):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store, "a-old", created_at="2026-01-01T00:00:00+00:00")
    make_checkpoint(store, "b-new", created_at="2026-06-01T00:00:00+00:00")
    make_checkpoint(store, "c-other", task="cifar10_dense", created_at="2026-12-01T00:00:00+00:00")
    assert [i.model_id for i in store.list()] == ["c-other", "b-new", "a-old"]
    assert store.newest("mnist_lenet5").model_id == "b-new"
    (tmp_path / "b-new" / "model.safetensors").write_bytes(b"x" * 10)
    assert store.newest("mnist_lenet5").model_id == "a-old"
    assert store.newest("hymenoptera_resnet18") is None


def test_tampered_weights_are_listed_invalid_and_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store)
    weights = tmp_path / "mnist_lenet5-1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (info,) = store.list()
    assert not info.valid and "sha256" in info.error
    with pytest.raises(CheckpointInvalid, match="sha256"):
        store.load("mnist_lenet5-1")


def test_weights_rewritten_in_place_with_their_old_mtime_are_verified_again(tmp_path):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store)
    assert store.get("mnist_lenet5-1").valid  # verified once, and remembered
    weights = tmp_path / "mnist_lenet5-1" / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    with open(weights, "r+b") as file:  # same inode, same size
        file.write(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -r` would
    info = store.get("mnist_lenet5-1")
    assert not info.valid and "sha256" in info.error


def test_truncated_weights_are_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store)
    weights = tmp_path / "mnist_lenet5-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    assert "truncated" in store.get("mnist_lenet5-1").error
    with pytest.raises(CheckpointInvalid):
        store.load("mnist_lenet5-1")


def test_edited_metadata_hash_does_not_validate_other_weights(tmp_path):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store)
    meta_path = tmp_path / "mnist_lenet5-1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["weights"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert not store.get("mnist_lenet5-1").valid


def test_unreadable_metadata_is_listed_invalid(tmp_path):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store)
    (tmp_path / "mnist_lenet5-1" / "metadata.json").write_text("{not json")
    (info,) = store.list()
    assert not info.valid and "unreadable" in info.error


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    import models_store.checkpoint as module

    real = module._write_file

    def fail_on_metadata(path, data):
        if path.name == "metadata.json":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(module, "_write_file", fail_on_metadata)
    with pytest.raises(OSError, match="No space"):
        make_checkpoint(store)
    assert os.listdir(tmp_path) == []
    assert store.list() == []


def test_temporary_directories_are_invisible_and_cleaned(tmp_path):
    store = CheckpointStore(tmp_path)
    (tmp_path / ".tmp-mnist_lenet5-1-abcd").mkdir()
    (tmp_path / ".tmp-mnist_lenet5-1-abcd" / "model.safetensors").write_bytes(b"half")
    assert store.list() == []
    assert store.remove_stale_temp(older_than_s=-1) == 1
    assert not (tmp_path / ".tmp-mnist_lenet5-1-abcd").exists()


def test_existing_id_is_not_overwritten(tmp_path):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store)
    with pytest.raises(FileExistsError):
        make_checkpoint(store)


@pytest.mark.parametrize(
    "bad",
    ["", "../etc", "a/b", ".hidden", "UPPER", "a" * 129, "a.b", "a\x00b", "-x", "abc\n", "a" * 127 + "\n"],
)
def test_invalid_ids_never_reach_the_filesystem(tmp_path, bad):
    with pytest.raises(InvalidModelId):
        validate_model_id(bad)
    with pytest.raises(InvalidModelId):
        CheckpointStore(tmp_path).get(bad)


def test_unknown_id(tmp_path):
    with pytest.raises(ModelNotFound):
        CheckpointStore(tmp_path).get("nope")


def test_symbolic_links_in_the_store_are_not_followed(tmp_path):
    elsewhere = CheckpointStore(tmp_path / "elsewhere")
    make_checkpoint(elsewhere, "outside")
    store = CheckpointStore(tmp_path / "models")
    make_checkpoint(store, "inside")
    (tmp_path / "models" / "linked").symlink_to(tmp_path / "elsewhere" / "outside")
    assert [i.model_id for i in store.list()] == ["inside"]
    with pytest.raises(ModelNotFound):
        store.get("linked")


@pytest.mark.parametrize(
    "metadata",
    [
        {"task": "mnist_lenet5", "created_at": 12},
        {"task": ["x"], "created_at": "2026-11-29T00:00:00+00:00"},
        {"task": "mnist_lenet5", "created_at": None},
    ],
)
def test_metadata_of_the_wrong_shape_is_listed_invalid_not_fatal(tmp_path, metadata):
    store = CheckpointStore(tmp_path)
    make_checkpoint(store, "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metadata.json").write_text(json.dumps(metadata))
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    listed = {i.model_id: i for i in store.list()}
    assert listed["good"].valid and not listed["broken"].valid
    assert "invalid metadata.json" in listed["broken"].error and not listed["broken"].metadata
    assert store.newest("mnist_lenet5").model_id == "good"
    with pytest.raises(CheckpointInvalid, match=r"invalid metadata\.json"):
        store.load("broken")
