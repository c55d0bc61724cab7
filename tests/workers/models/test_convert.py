"""Checkpoint import, safe loading and TorchScript model directories."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from radq.errors import ModelError
from workers.models.arch import ARCHITECTURES, SmallCNN
from workers.models.convert import import_checkpoint, normalize_state_dict
from workers.models.loader import load_model, sha256_of

CPU = torch.device("cpu")
PROVENANCE = {
    "training_data": "None: random weights made by the test suite.",
    "intended_use": "Testing radq's import path only; not a diagnostic device.",
    "limitations": "Random weights; outputs mean nothing.",
    "license": "Apache-2.0",
}


def randomized(architecture: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A module whose every tensor (BN statistics included) is random, so a mix-up shows."""
    torch.manual_seed(0)
    module = ARCHITECTURES[architecture](in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                positive = "running_var" in key
                value.copy_(torch.rand_like(value) + 0.5 if positive else torch.randn_like(value) * 0.05)
    return module.eval()


def import_(src: Path, root: Path, architecture: str, labels: list[str], channels: int = 3) -> Path:
    return import_checkpoint(
        src, root, name="imported", version="1.0", architecture=architecture, labels=labels,
        input_size=224, channels=channels, preprocessing=None, training_data=PROVENANCE["training_data"],
        intended_use=PROVENANCE["intended_use"], limitations=PROVENANCE["limitations"],
        license=PROVENANCE["license"],
    )


def chexnet_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """arnoweng/CheXNet's model.pth.tar: DataParallel + wrapper, old dense-layer names, Sequential head.

    Like the original (saved before PyTorch 0.4), it has no ``num_batches_tracked``.
    """
    old: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
        key = key.replace("classifier.", "classifier.0.")
        old[f"module.densenet121.{key}"] = value
    return {"epoch": 7, "arch": "densenet121", "state_dict": old, "best_loss": torch.tensor(0.15)}


@pytest.mark.parametrize("layout", ["torchvision", "chexnet"])
def test_densenet_import_gives_identical_outputs(tmp_path: Path, layout: str) -> None:
    labels = [f"finding_{i}" for i in range(14)]
    original = randomized("densenet121", len(labels))
    state = original.state_dict()
    src = tmp_path / ("model.pth.tar" if layout == "chexnet" else "densenet.pth")
    torch.save(chexnet_layout(state) if layout == "chexnet" else state, src)
    if layout == "chexnet":
        old_key = "module.densenet121.features.denseblock1.denselayer1.norm.1.weight"
        assert old_key in torch.load(src)["state_dict"]

    model_dir = import_(src, tmp_path / "models", "densenet121", labels)
    loaded = load_model(model_dir, CPU)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), original(x))
    card = json.loads((model_dir / "model.json").read_text())
    assert card["sha256"] == sha256_of(model_dir / "model.safetensors")
    assert card["training_data"] == PROVENANCE["training_data"] and card["weights_format"] == "state_dict"


def test_resnet_lightning_safetensors_import(tmp_path: Path) -> None:
    original = randomized("resnet18", 2, in_channels=1)
    src = tmp_path / "lightning.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in original.state_dict().items()}, str(src))
    loaded = load_model(import_(src, tmp_path, "resnet18", ["a", "b"], channels=1), CPU)
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), original(x))


def test_normalize_maps_known_layouts() -> None:
    t = torch.zeros(1)
    state = {
        "model_state_dict": {
            "module.features.denseblock2.denselayer3.conv.2.weight": t,
            "module.features.denseblock2.denselayer3.norm.1.running_mean": t,
            "module.features.denseblock2.denselayer3.norm.2.num_batches_tracked": t,
            "module.features.transition1.norm.weight": t,
            "module.classifier.0.weight": t,
            "module.classifier.0.bias": t,
        },
        "epoch": 3,
    }
    assert sorted(normalize_state_dict(state, "densenet121")) == [
        "classifier.bias", "classifier.weight",
        "features.denseblock2.denselayer3.conv2.weight",
        "features.denseblock2.denselayer3.norm1.running_mean",
        "features.denseblock2.denselayer3.norm2.num_batches_tracked",
        "features.transition1.norm.weight",
    ]
    # A prefix only some keys carry is part of a name, not a wrapper.
    assert set(normalize_state_dict({"model.x": t, "y": t}, "resnet18")) == {"model.x", "y"}


def test_misfits_are_explained(tmp_path: Path) -> None:
    src = tmp_path / "r18.pt"
    torch.save(randomized("resnet18", 3).state_dict(), src)
    with pytest.raises(ModelError, match=r"does not fit densenet121; missing keys: .*unexpected keys: "):
        import_(src, tmp_path, "densenet121", ["a", "b", "c"])
    shapes = r"2 labels: shape mismatch for fc.weight \(3, 512\) \(model: \(2, 512\)\)"
    with pytest.raises(ModelError, match=shapes):
        import_(src, tmp_path, "resnet18", ["a", "b"])
    with pytest.raises(ModelError, match="limitations is empty"):
        import_checkpoint(
            src, tmp_path, name="m", version="1", architecture="resnet18", labels=["a", "b", "c"],
            input_size=224, channels=3, training_data="x", intended_use="y", limitations=" ", license="MIT",
        )
    torch.save({"epoch": 3, "losses": [0.1]}, src)
    with pytest.raises(ModelError, match="no flat state dict of tensors"):
        import_(src, tmp_path, "resnet18", ["a", "b", "c"])
    assert not (tmp_path / "imported").exists()


def small_model_dir(tmp_path: Path) -> Path:
    src = tmp_path / "small.pt"
    torch.save(SmallCNN(1, 2).state_dict(), src)
    return import_(src, tmp_path / "models", "radq-smallcnn", ["a", "b"], channels=1)


def test_wrong_sha256_is_refused_naming_both(tmp_path: Path) -> None:
    model_dir = small_model_dir(tmp_path)
    card = json.loads((model_dir / "model.json").read_text())
    actual, claimed = card["sha256"], "f" * 64
    (model_dir / "model.json").write_text(json.dumps({**card, "sha256": claimed}))
    with pytest.raises(ModelError) as refused:
        load_model(model_dir, CPU)
    assert actual in str(refused.value) and claimed in str(refused.value)


class Tripwire:
    """A custom class whose unpickling would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __setstate__(self, state: dict[str, str]) -> None:
        Path(state["path"]).touch()


class ShellPayload:
    """Pickles as a call to ``os.system``; harmless if it ever ran (it creates a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [Tripwire, ShellPayload])
def test_pickles_with_code_are_refused(tmp_path: Path, payload: type) -> None:
    sentinel = tmp_path / "ran"
    model_dir = small_model_dir(tmp_path)
    evil = model_dir / "model.pt"
    torch.save({**SmallCNN(1, 2).state_dict(), "extra": payload(sentinel)}, evil)
    card = json.loads((model_dir / "model.json").read_text())
    card.update(weights="model.pt", sha256=sha256_of(evil))
    (model_dir / "model.json").write_text(json.dumps(card))

    expected = r"refusing to unpickle .*model\.pt: not a plain state dict \(weights_only load failed: "
    with pytest.raises(ModelError, match=expected):
        load_model(model_dir, CPU)
    with pytest.raises(ModelError, match=expected):
        import_(evil, tmp_path / "other", "radq-smallcnn", ["a", "b"], channels=1)
    assert not sentinel.exists()


def torchscript_dir(tmp_path: Path, scripted: torch.jit.ScriptModule, architecture: str) -> Path:
    model_dir = tmp_path / "ts"
    model_dir.mkdir()
    torch.jit.save(scripted, str(model_dir / "model.pt"))
    card = {
        "name": "ts-model", "version": "1", "task": "test", "architecture": architecture,
        "labels": ["a", "b", "c"], "input": {"height": 64, "width": 64, "channels": 1},
        "weights": "model.pt", "weights_format": "torchscript", "sha256": sha256_of(model_dir / "model.pt"),
        **PROVENANCE,
    }
    (model_dir / "model.json").write_text(json.dumps(card))
    return model_dir


def test_torchscript_model_dir_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    scripted = torch.jit.script(SmallCNN(1, 3).eval())
    # An architecture radq does not know is fine: a TorchScript archive carries its own code.
    loaded = load_model(torchscript_dir(tmp_path, scripted, "vendor-net-v2"), CPU)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), scripted(x))


def test_torchscript_under_a_state_dict_card_is_refused(tmp_path: Path) -> None:
    model_dir = torchscript_dir(tmp_path, torch.jit.script(SmallCNN(1, 3).eval()), "radq-smallcnn")
    card = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**card, "weights_format": "state_dict"}))
    with pytest.raises(ModelError, match="refusing to unpickle .*TorchScript archive"):
        load_model(model_dir, CPU)
