"""FCN, U-Net and DeepLabV3+: shapes at odd sizes, independent references, registry entries."""

from __future__ import annotations

import pytest
import torch
import torchvision

from detseg.registry import get_entry
from detseg.semantic.deeplab import DeepLabV3Plus
from detseg.semantic.fcn import FCN
from detseg.semantic.losses import SegmentationLoss, dice_loss, semantic_loss
from detseg.semantic.unet import UNet


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "name", ["fcn_resnet18", "unet", "deeplabv3plus_mobilenetv2", "deeplabv3plus_resnet50"]
)
def test_logits_at_input_resolution_for_odd_sizes(name):
    model = get_entry(name).build(num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 45, 61))
    assert out.shape == (1, 5, 45, 61)


def test_fcn_equals_torchvision_fcn_resnet50():
    """torchvision's fcn_resnet50 is an independent implementation of the same network."""
    ref = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=False
    ).eval()
    ours = FCN(num_classes=21, backbone="resnet50").eval()
    head = {"0": "0.0", "1": "0.1", "4": "2"}
    mapped = {}
    for key, value in ref.state_dict().items():
        if key.startswith("classifier."):
            idx, rest = key.split(".", 2)[1:]
            key = f"head.{head[idx]}.{rest}"
        mapped[key] = value
    ours.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x)["out"], atol=1e-5)
    assert _params(ours) == 32_957_013  # spec table 0: torchvision fcn_resnet50 without aux


def test_unet_parameter_count_matches_spec():
    assert _params(UNet(num_classes=21)) == 31_038_933  # spec table 0: U-Net "same" + BN


def test_deeplab_output_stride_8_and_mobilenet():
    m = DeepLabV3Plus(num_classes=3, backbone="resnet18", output_stride=8).eval()
    feats = m.backbone(torch.zeros(1, 3, 64, 64))
    assert feats["layer4"].shape[-1] == 8 and feats["layer1"].shape[-1] == 16
    assert m.aspp.convs[1][0].dilation == (12, 12)


def test_loss_ignores_void_and_dice_is_zero_for_perfect_prediction():
    target = torch.tensor([[[0, 1], [2, 255]]])
    perfect = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target, 255) < 1e-6
    loss = SegmentationLoss(ignore_index=255, dice_weight=1.0)
    assert loss(perfect, target) < 1e-6
    noisy = perfect.clone()
    noisy[0, :, 1, 1] = torch.tensor([100.0, -100.0, -100.0])  # a void pixel: must not matter
    assert torch.allclose(loss(noisy, target), loss(perfect, target))
    assert loss(perfect, torch.full_like(target, 255)) == 0


def test_auxiliary_heads_add_weighted_losses():
    criterion = SegmentationLoss(ignore_index=255)
    target = torch.randint(0, 3, (2, 8, 8))
    out, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    total, parts = semantic_loss({"out": out, "aux": aux}, target, criterion, {"aux": 0.4})
    aux_up = torch.nn.functional.interpolate(aux, size=(8, 8), mode="bilinear", align_corners=False)
    expected = criterion(out, target) + 0.4 * criterion(aux_up, target)
    assert torch.allclose(total, expected)
    assert set(parts) == {"loss_out", "loss_aux"}
    plain, none = semantic_loss(out, target, criterion)
    assert torch.allclose(plain, criterion(out, target)) and none == {}
