"""The chapter's zoo (FCN-VGG/ResNet/DenseNet, SegNet, PSPNet, GCN, DUC-HDC, U-Net valid).

Shapes and parameter counts run on the ``meta`` device (no arithmetic), so every registered model
is checked at the full odd size 361 x 479 in a fraction of a second; numerics (the ONNX export
against PyTorch, one net per family) run for real on small odd inputs.

Every count of the spec's table 0 is matched exactly (``SPEC_PARAMS``); none differ.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detseg.engine.export import export_model
from detseg.errors import CheckpointError, DetsegError
from detseg.registry import get_entry, list_models
from detseg.semantic.duc_hdc import DUC, DUCHead
from detseg.semantic.fcn import FCNVGG
from detseg.semantic.gcn import GCN
from detseg.semantic.losses import SegmentationLoss, semantic_loss
from detseg.semantic.pipeline import load_imagenet_encoder
from detseg.semantic.pspnet import PSPNet
from detseg.semantic.segnet import SegNet, max_unpool
from detseg.semantic.unet import UNet
from detseg.semantic.upsample import BilinearUpsample, bilinear_kernel

SEMANTIC = [e.name for e in list_models("semantic")]

# spec table 0 (C = 21): learnable parameters, aux heads excluded
SPEC_PARAMS = {
    "fcn32s_vgg16": 134_346_581,
    "fcn16s_vgg16": 134_357_354,
    "fcn8s_vgg16": 134_362_751,
    "fcn8s_resnet18": 11_195_391,
    "fcn8s_resnet50": 23_583_359,
    "fcn8s_resnet101": 42_575_487,
    "fcn8s_densenet121": 7_010_751,
    "fcn_resnet50": 32_957_013,
    "unet": 31_038_933,
    "segnet": 29_455_125,
    "pspnet_resnet50": 46_592_597,
    "pspnet_resnet101": 65_584_725,
    "gcn_resnet18": 11_906_388,
    "gcn_resnet50": 26_052_308,
    "gcn_resnet101": 45_044_436,
    "gcn_resnet152": 60_688_084,
    "duc_resnet101": 67_274_112,
    "duc_hdc_resnet101": 67_274_112,
}


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _meta(name: str, **kwargs: object) -> torch.nn.Module:
    with torch.device("meta"):
        return get_entry(name).build(**kwargs)


@pytest.mark.parametrize("name", SEMANTIC)
def test_every_model_returns_logits_at_odd_input_size(name):
    model = _meta(name, num_classes=21).eval()
    assert model.num_classes == 21
    out = model(torch.empty(1, 3, 361, 479, device="meta"))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 21, 361, 479)


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_parameter_counts_match_spec_table(name):
    model = _meta(name, num_classes=21)
    aux = getattr(model, "aux", None)
    assert _params(model) - (_params(aux) if aux is not None else 0) == SPEC_PARAMS[name]


def test_other_spec_counts_aux_heads_and_unet_valid():
    psp = _meta("pspnet_resnet50", num_classes=21)
    assert _params(psp.aux) == 2_365_205
    assert _params(_meta("unet", num_classes=21, variant="valid")) == 31_033_045
    assert _params(_meta("unet", num_classes=2, variant="valid")) == 31_031_810
    with torch.device("meta"):
        official = DUCHead(2048, 21, head="official")
        official_r4 = DUCHead(2048, 21, head="official", cell_width=2)
        fcn_learned = FCNVGG(21, stride=32, learn_upsample=True)
    assert _params(official) == 99_095_808  # spec D2: ~99.1 M
    assert _params(official_r4) == _params(_meta("duc_resnet101", num_classes=21).head)
    assert _params(fcn_learned) == 134_346_581 + 21 * 64 * 64  # depthwise, not C x C


@pytest.mark.parametrize("variant", [32, 16, 8])
def test_fcn_vgg_crops_fit_every_size(variant):
    """Ceil-mode pools + the 100-px pad: the constant crops fit at every size (spec F1)."""
    with torch.device("meta"):
        model = FCNVGG(3, stride=variant).eval()
    for h in [1, 2, 7, 31, 32, 33, 100, 499, 500, 501]:
        assert model(torch.empty(1, 3, h, 64, device="meta")).shape[-2:] == (h, 64)


def test_aux_head_only_in_train_mode_and_weighted_by_trainer_loss():
    model = PSPNet(4, backbone="resnet18")
    x, target = torch.randn(2, 3, 40, 48), torch.randint(0, 4, (2, 40, 48))
    out = model.train()(x)
    assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 4, 40, 48)
    assert model.aux_weights == {"aux": 0.4}
    criterion = SegmentationLoss()
    total, parts = semantic_loss(out, target, criterion, model.aux_weights)
    expected = criterion(out["out"], target) + 0.4 * criterion(out["aux"], target)
    assert torch.allclose(total, expected) and set(parts) == {"loss_out", "loss_aux"}
    with torch.no_grad():
        assert isinstance(model.eval()(x), torch.Tensor)
    assert PSPNet(4, backbone="resnet18", aux=False).aux is None


def test_pspnet_switches_change_outputs_not_params():
    torch.manual_seed(0)
    base = PSPNet(3, backbone="resnet18").eval()
    x = torch.randn(1, 3, 49, 49)  # 8k + 1: align_corners=True is exact here
    for kwargs in ({"dilation_style": "all"}, {"align_corners": True}):
        other = PSPNet(3, backbone="resnet18", **kwargs).eval()
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert not torch.allclose(other(x), base(x), atol=1e-4)
    allb = _meta("pspnet_resnet50", dilation_style="all")
    assert [b.conv2.dilation[0] for b in allb.backbone.layer3] == [2] * 6
    assert [b.conv2.dilation[0] for b in allb.backbone.layer4] == [4] * 3


def test_hdc_schedule_matches_the_official_r101():
    model = _meta("duc_hdc_resnet101", num_classes=19)
    layer3 = [b.conv2.dilation[0] for b in model.backbone.layer3]
    assert layer3 == [2, 2, 5, 9] + [1, 2, 5, 9] * 4 + [1, 2, 5]  # spec D3, 23 blocks
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [5, 9, 17]
    assert all(b.conv2.padding == b.conv2.dilation for b in model.backbone.layer3)
    plain = _meta("duc_resnet101", num_classes=19)
    assert [b.conv2.dilation[0] for b in plain.backbone.layer4] == [2, 4, 4]


def test_duc_pixel_shuffle_is_class_major():
    """out[l, y*r + i, x*r + j] = in[l*r*r + i*r + j, y, x] (the official label layout)."""
    head = DUCHead(4, 2, output_stride=2)
    feat = torch.randn(1, 4, 3, 5)
    with torch.no_grad():
        dense = head.convs[0](feat)
        out = head(feat)
    assert out.shape == (1, 2, 6, 10)
    for c, i, j, y, x in [(0, 0, 0, 0, 0), (1, 1, 0, 2, 3), (1, 0, 1, 1, 4), (0, 1, 1, 2, 2)]:
        assert out[0, c, y * 2 + i, x * 2 + j] == dense[0, c * 4 + i * 2 + j, y, x]


def test_bilinear_upsampler_equals_interpolate_in_the_interior():
    x = torch.randn(1, 3, 9, 11)
    for s in (2, 8):
        up = BilinearUpsample(3, s, padding=s // 2)(x)
        ref = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        assert up.shape == ref.shape
        assert torch.allclose(up[..., s:-s, s:-s], ref[..., s:-s, s:-s], atol=1e-5)
    assert torch.equal(bilinear_kernel(4)[0], torch.tensor([0.0625, 0.1875, 0.1875, 0.0625]))
    assert bilinear_kernel(3)[1, 1] == 1.0


def test_bilinear_upsampler_runs_in_float32_under_bf16_autocast():
    # oneDNN's bfloat16 depthwise transposed convolution is the slow one: autocast must not reach it
    x = torch.randn(1, 4, 5, 7).contiguous(memory_format=torch.channels_last)
    up = BilinearUpsample(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = up(x.bfloat16())
    assert out.dtype == torch.float32
    assert torch.equal(out, up(x.bfloat16().float()))


def test_fcn_vgg_imagenet_fc_layers_become_exact_convolutions(tmp_path):
    with torch.device("meta"):
        ref = torchvision.models.vgg16(weights=None).eval()
    ref.to_empty(device="cpu")
    for p in ref.parameters():
        torch.nn.init.uniform_(p, -0.05, 0.05)
    path = tmp_path / "vgg16.pth"
    torch.save(ref.state_dict(), path)
    model = FCNVGG(21, stride=32).eval()
    model.load_imagenet(path)
    pool5 = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        conv = model.fc7(F.relu(model.fc6(pool5))).flatten(1)
        linear = ref.classifier[3](F.relu(ref.classifier[0](pool5.flatten(1))))
    assert torch.allclose(conv, linear, atol=1e-4)
    assert model.score_fr.weight.abs().sum() == 0  # score layers start at zero (spec F3)
    assert torch.equal(model.features[0].weight, ref.features[0].weight)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointError, match="not a torchvision vgg16"):
        model.load_imagenet(wrong)


def test_segnet_encoder_loads_torchvision_vgg16_bn_strictly(tmp_path):
    ref = torchvision.models.vgg16_bn(weights=None)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(ref.state_dict(), path)
    model = SegNet(11)
    model.encoder.load_imagenet(path)
    assert torch.equal(model.encoder.features[40].weight, ref.features[40].weight)


def test_segnet_unpools_to_the_exact_pre_pool_sizes():
    x = torch.randn(2, 3, 45, 61)
    pooled, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    assert torch.equal(
        max_unpool(pooled, idx, (45, 61)), F.max_unpool2d(pooled, idx, 2, 2, output_size=(45, 61))
    )
    with torch.device("meta"):
        model = SegNet(11).eval()
    assert model(torch.empty(1, 3, 360, 480, device="meta")).shape == (1, 11, 360, 480)
    convs = [[m for m in s if isinstance(m, torch.nn.Conv2d)] for s in model.decoder]
    assert [c[0].in_channels for c in convs] == [512, 512, 256, 128, 64]  # channels at the unpools
    assert [c[-1].out_channels for c in convs] == [512, 256, 128, 64, 11]


def test_unet_valid_is_the_paper_network():
    with torch.device("meta"):
        model = UNet(2, variant="valid").eval()
    assert model(torch.empty(1, 1 + 2, 572, 572, device="meta")).shape[-2:] == (388, 388)
    assert [n for n in range(100, 520) if model.valid_size(n)] == list(range(188, 509, 16))
    with pytest.raises(DetsegError, match="16k \\+ 124"):
        model(torch.empty(1, 3, 361, 479, device="meta"))
    small = UNet(3, base_channels=4, variant="valid").eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in small.modules())
    with torch.no_grad():
        assert small.predict_tiled(torch.randn(1, 3, 37, 29)).shape == (1, 3, 37, 29)
        assert small.predict_tiled(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)
    assert UNet(2).variant == "same"


def test_gcn_kernel_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        GCN(3, backbone="resnet18", k=14)
    with torch.device("meta"):
        gcn = GCN(3, backbone="resnet18", k=7)
    assert gcn.gcm[0].left[0].kernel_size == (7, 1) and gcn.gcm[0].left[0].padding == (3, 0)


def _scored_fcn_vgg() -> FCNVGG:
    """FCN-8s VGG with random score layers (they start at zero, which would hide any mismatch)."""
    model = FCNVGG(3, stride=8)
    for conv in (model.score_fr, model.score_pool4, model.score_pool3):
        torch.nn.init.normal_(conv.weight, std=0.05)
    return model


# name -> (builder, traced input size, two other sizes): one net per family, small odd inputs;
# the graph is exported with dynamic H and W, and run at the other sizes
ONNX_CASES = {
    "fcn8s_vgg16": (_scored_fcn_vgg, (37, 45), [(45, 29), (50, 64)]),
    "fcn8s_resnet18": (
        lambda: get_entry("fcn8s_resnet18").build(num_classes=3),
        (37, 45),
        [(45, 29), (50, 64)],
    ),
    "fcn8s_densenet121": (
        lambda: get_entry("fcn8s_densenet121").build(num_classes=3),
        (37, 45),
        [(45, 29), (50, 64)],
    ),
    "segnet": (lambda: SegNet(3), (37, 45), [(45, 29), (50, 64)]),
    # OS-8 sides 5 x 6, then 6 x 4 and 7 x 8: bins 2, 3 and 6 do not divide them
    "pspnet": (lambda: PSPNet(3, backbone="resnet18"), (37, 45), [(45, 29), (50, 64)]),
    "gcn": (lambda: GCN(3, backbone="resnet18"), (37, 45), [(45, 29), (50, 64)]),
    "duc_hdc": (lambda: DUC(3, backbone="resnet18"), (37, 45), [(45, 29), (50, 64)]),
    "unet": (lambda: UNet(3, base_channels=4), (37, 45), [(45, 29), (48, 64)]),
    "unet_valid": (
        lambda: UNet(3, base_channels=4, variant="valid"),
        (188, 204),
        [(204, 188), (236, 220)],
    ),
}


@pytest.mark.parametrize("name", sorted(ONNX_CASES))
def test_onnx_export_at_dynamic_size_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    build, size, others = ONNX_CASES[name]
    model = build().eval()
    path = tmp_path / f"{name}.onnx"
    export_model(model, path, *size, check=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in [size, *others]:
        x = torch.randn(1, 3, h, w)
        (got,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref = model(x).numpy()
        valid = model.variant == "valid" if isinstance(model, UNet) else False
        assert got.shape == ref.shape == (1, 3, h - 184 * valid, w - 184 * valid)
        assert abs(ref).max() > 1e-3  # a non-trivial output
        assert abs(got - ref).max() <= 1e-4 * max(1.0, float(abs(ref).max()))


def test_imagenet_file_loads_into_each_kind_of_encoder(tmp_path):
    """The trunk (``backbone``), FCN-VGG itself and SegNet's ``encoder``; U-Net has none."""
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    fcn = get_entry("fcn8s_resnet18").build(num_classes=3)
    load_imagenet_encoder(fcn, tmp_path / "r18.pth")
    assert torch.equal(fcn.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match="not a torchvision ImageNet file"):
        load_imagenet_encoder(get_entry("gcn_resnet50").build(num_classes=3), tmp_path / "r18.pth")
    with pytest.raises(DetsegError, match="omit --imagenet"):
        load_imagenet_encoder(UNet(3, base_channels=4), tmp_path / "r18.pth")
