"""Initial ResNet18 weights: torchvision's IMAGENET1K_V1 via the torch hub cache, a local file, none.

ImageNet weights cannot be downloaded here, so a random ResNet18 state dict is written where torch
hub keeps IMAGENET1K_V1; torchvision's own loading path then reads it.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from worker.pretrained import PretrainedWeightsUnavailable, hub_cache_file, resolve_weights
from worker.training import TrainingContext, run_training


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def imagenet_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return resnet18(weights=None).state_dict()


def test_imagenet_weights_come_from_the_hub_cache(torch_home):
    state = imagenet_like_state()
    cached = hub_cache_file()
    assert cached == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    weights = resolve_weights("IMAGENET1K_V1", "none", None, allow_download=False)
    assert weights.name == "IMAGENET1K_V1" and weights.file == str(cached) and len(weights.sha256) == 64
    assert torch.equal(weights.state_dict["conv1.weight"], state["conv1.weight"])
    assert resolve_weights("default", "IMAGENET1K_V1", None, False).name == "IMAGENET1K_V1"


def test_missing_imagenet_weights_without_download_say_where(torch_home):
    with pytest.raises(PretrainedWeightsUnavailable, match=r"resnet18-f37072fd\.pth"):
        resolve_weights("IMAGENET1K_V1", "none", None, allow_download=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file(tmp_path, suffix):
    state = imagenet_like_state(1)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    weights = resolve_weights("local", "none", path, allow_download=False)
    assert weights.name == "local" and torch.equal(weights.state_dict["fc.weight"], state["fc.weight"])
    assert resolve_weights("default", "local", path, False).name == "local"


def test_local_file_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot read"):
        resolve_weights("local", "none", path, False)


def test_none_is_random_init():
    weights = resolve_weights("none", "IMAGENET1K_V1", None, False)
    assert weights.state_dict is None and weights.describe() == "none"


def test_training_starts_from_the_imagenet_file_and_records_it(tmp_path, torch_home, synthetic_data_dir):
    state = imagenet_like_state(2)
    hub_cache_file().parent.mkdir(parents=True)
    torch.save(state, hub_cache_file())
    infos = []
    ctx = TrainingContext(
        data_dir=synthetic_data_dir,
        cache_dir=tmp_path / "cache",
        resnet18_weights="IMAGENET1K_V1",
        show_progress_bar=False,
        on_info=infos.append,
    )
    result = run_training(
        "hymenoptera_resnet18", {"epochs": 1, "batch_size": 8, "mode": "feature_extraction"}, ctx
    )
    assert result.extra_metadata["pretrained"]["name"] == "IMAGENET1K_V1"
    assert infos and infos[0]["weights"].startswith("IMAGENET1K_V1")
    assert torch.equal(result.tensors["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_wrong_architecture_file_is_refused(tmp_path, synthetic_data_dir):
    path = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    ctx = TrainingContext(
        data_dir=synthetic_data_dir,
        cache_dir=tmp_path / "cache",
        resnet18_weights="local",
        resnet18_weights_file=path,
        show_progress_bar=False,
    )
    with pytest.raises(PretrainedWeightsUnavailable):
        run_training("hymenoptera_resnet18", {"epochs": 1, "batch_size": 8}, ctx)
