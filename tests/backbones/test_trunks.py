"""Backbones: strides/channels, torchvision key compatibility, dilation, frozen BN."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from detseg.backbones import build_backbone
from detseg.errors import CheckpointError


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_imagenet_file_loads_strictly(tmp_path, name):
    reference = getattr(torchvision.models, name)(weights=None)
    torch.save(reference.state_dict(), tmp_path / "imagenet.pth")
    backbone = build_backbone(name)
    backbone.load_imagenet(tmp_path / "imagenet.pth")
    ref_params = {
        k: v for k, v in reference.state_dict().items() if not k.startswith(("fc.", "classifier."))
    }
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, ref_params[key])
    with pytest.raises(CheckpointError, match="not a torchvision ImageNet file"):
        build_backbone("resnet34").load_imagenet(tmp_path / "imagenet.pth")


def test_output_strides_and_frozen_bn():
    x = torch.zeros(1, 6, 64, 96)
    b = build_backbone("resnet18", in_channels=6, output_stride=8, frozen_bn=True).eval()
    feats = b(x)
    for info in b.feature_info:
        f = feats[info.name]
        assert f.shape[1] == info.channels and f.shape[-1] == 96 // info.stride
    assert feats["layer4"].shape[-2:] == (8, 12)
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in b.modules())


def test_dilated_bottleneck_matches_torchvision_dilation():
    ours = build_backbone("resnet50", output_stride=8).eval()
    ref = torchvision.models.resnet50(
        weights=None, replace_stride_with_dilation=[False, True, True]
    ).eval()
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(ref_state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    body = torch.nn.Sequential(*list(ref.children())[:-2])
    assert torch.allclose(ours(x)["layer4"], body(x), atol=1e-5)
