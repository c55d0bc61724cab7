"""The registered architectures reproduce torchvision's state-dict layout exactly.

Where the expected values come from: the state dicts of ``torchvision.models.densenet121``,
``resnet18`` and ``resnet50`` (torchvision 0.26.0, torch 2.11) were dumped as ordered
``key:shape`` lines and hashed; our modules gave the same lines in the same order and,
with those torchvision state dicts loaded, bit-identical outputs. The counts also follow
from torchvision's source: a BatchNorm2d holds 5 entries (weight, bias, running_mean,
running_var, num_batches_tracked), a bias-free Conv2d 1, a Linear 2.

- densenet121: stem conv0+norm0 (6) + 58 dense layers x (2 BN + 2 conv = 12) = 696
  + 3 transitions x 6 = 18 + norm5 (5) + classifier (2) = 727 (606 without num_batches_tracked).
- resnet18: conv1+bn1 (6) + 8 BasicBlocks x 12 + 3 downsamples x 6 + fc (2) = 122.
- resnet50: conv1+bn1 (6) + 16 Bottlenecks x 18 + 4 downsamples x 6 + fc (2) = 320.

Parameter counts are torchvision's published ones.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from workers.models.arch import ARCHITECTURES

TORCHVISION = {
    # name: (state-dict entries, sha256 of the ordered "key:shape" lines, parameters)
    "densenet121": (727, "57f5603c9d45b54bd33e533ec767ba46ea21f9dcb53034b751f32513ef3c466d", 7_978_856),
    "resnet18": (122, "57440be3f02613ebbe12e65d6702b9fcc7c39f9851592b06db0bd3df2ada1626", 11_689_512),
    "resnet50": (320, "b2933f3f8f5836c8d3176a74a87213e36a72179677abbad33ecdf41b7505d5d7", 25_557_032),
}

SAMPLES = {
    "densenet121": {
        "features.conv0.weight": (64, 3, 7, 7),
        "features.norm0.running_var": (64,),
        "features.denseblock1.denselayer1.norm1.weight": (64,),
        "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
        "features.denseblock1.denselayer1.norm2.num_batches_tracked": (),
        "features.denseblock1.denselayer1.conv2.weight": (32, 128, 3, 3),
        "features.transition1.norm.weight": (256,),
        "features.transition1.conv.weight": (128, 256, 1, 1),
        "features.transition3.conv.weight": (512, 1024, 1, 1),
        "features.denseblock4.denselayer16.conv1.weight": (128, 992, 1, 1),
        "features.norm5.bias": (1024,),
        "classifier.weight": (1000, 1024),
        "classifier.bias": (1000,),
    },
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.num_batches_tracked": (),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer4.2.bn3.weight": (2048,),
        "fc.weight": (1000, 2048),
    },
}
ABSENT = {"resnet18": "layer1.0.downsample.0.weight", "resnet50": "layer1.1.downsample.0.weight"}


def build(name: str, in_channels: int = 3, num_classes: int = 1000) -> nn.Module:
    return ARCHITECTURES[name](in_channels=in_channels, num_classes=num_classes)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_state_dict_matches_torchvision(name: str) -> None:
    entries, digest, params = TORCHVISION[name]
    state = build(name).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for key, shape in SAMPLES[name].items():
        assert shapes.get(key) == shape, key
    assert ABSENT.get(name, "no such key") not in shapes
    assert len(state) == entries
    lines = "\n".join(f"{k}:{'x'.join(map(str, s))}" for k, s in shapes.items())
    assert hashlib.sha256(lines.encode()).hexdigest() == digest
    assert sum(p.numel() for p in build(name).parameters()) == params


@pytest.mark.parametrize("name", sorted(TORCHVISION))
@pytest.mark.parametrize("in_channels", [3, 1])
def test_forward_shapes(name: str, in_channels: int) -> None:
    model = build(name, in_channels=in_channels, num_classes=14).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 224, 224))
    assert out.shape == (2, 14)
    assert torch.isfinite(out).all()
    assert model.state_dict()[next(iter(model.state_dict()))].shape[1] == in_channels


def test_one_channel_stem_differs_only_in_the_first_conv() -> None:
    three, one = build("densenet121").state_dict(), build("densenet121", in_channels=1).state_dict()
    differing = [k for k in three if three[k].shape != one[k].shape]
    assert differing == ["features.conv0.weight"]


def test_chexnet_head_is_fourteen_logits() -> None:
    model = build("densenet121", num_classes=14)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.weight.shape == (14, 1024)


def test_small_cnn_still_registered() -> None:
    assert "radq-smallcnn" in ARCHITECTURES
    assert build("radq-smallcnn", in_channels=1, num_classes=4)(torch.randn(2, 1, 64, 64)).shape == (2, 4)
