"""FCOS: official parity fixtures, torchvision as an independent reference, checkpoints, losses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from detseg.detection.fcos import (
    FCOS,
    FCOSTargets,
    compute_locations,
    convert_checkpoint,
    fcos_mnv2_fpn,
    iou_loss,
)
from detseg.errors import CheckpointError
from detseg.registry import get_entry
from tests.conftest import need
from tests.parity import fixture_names, parity_dir, run_fixture

FIXTURES = fixture_names("fcos_")


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPUs are shared: one thread is many times faster than an oversubscribed pool here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fixtures_found(shared) -> None:
    assert len(FIXTURES) >= 7, FIXTURES


@pytest.mark.parametrize("name", FIXTURES)
def test_parity(name: str) -> None:
    tol = json.loads((parity_dir() / f"{name}.json").read_text())["tolerance"]
    diffs = run_fixture(name)
    assert diffs and all(d <= tol for d in diffs.values()), diffs


def _fixture_inputs(name: str) -> tuple[dict, list[torch.Tensor], np.lib.npyio.NpzFile]:
    spec = json.loads(need(parity_dir() / f"{name}.json").read_text())
    arrays = np.load(need(parity_dir() / f"{name}.npz"))
    return spec, [torch.from_numpy(arrays[f"in_{n}"]) for n in spec["inputs"]], arrays


def test_model_postprocess_uses_detseg_conventions(shared) -> None:
    """FCOS.postprocess = the official post-processor, with labels 0..K-1 and continuous x2, y2."""
    _, inputs, arrays = _fixture_inputs("fcos_postprocess_plain")
    model = FCOS(num_classes=80, backbone="mobilenet_v2", out_channels=32)
    sizes = [tuple(int(v) for v in s) for s in inputs[-1].tolist()]
    dets = model.postprocess(inputs[:-1], sizes)
    for i, det in enumerate(dets):
        n = int(arrays["out_num_detections"][i])
        want = torch.from_numpy(arrays["out_boxes"][i, :n]).clone()
        want[:, 2:] += 1
        assert len(det) == n
        assert torch.allclose(det.boxes, want, atol=1e-4)
        assert torch.equal(det.labels, torch.from_numpy(arrays["out_labels"][i, :n]).long() - 1)


# ------------------------------------------------------------------ torchvision as a reference
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Spread-out random weights (as the parity fixtures' regen.py), so that many boxes score."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                p.uniform_(0.5, 1.5, generator=g)
            elif leaf == "running_mean" or (p.dim() <= 1 and leaf == "bias"):
                p.normal_(0.0, 0.1, generator=g)
            elif p.dim() <= 1:
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, math.sqrt(2.0 / p[0].numel()), generator=g)


def test_matches_torchvision_fcos_on_a_coco_image(shared) -> None:
    from torchvision.models.detection import fcos_resnet50_fpn

    from detseg.data.images import read_image

    path = need(shared / "data" / "coco128" / "images" / "000000000009.jpg")
    image = torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float() / 255
    tv = fcos_resnet50_fpn(weights=None, weights_backbone=None, min_size=320, max_size=512).eval()
    _randomise(tv, seed=0)
    ours = FCOS.from_torchvision(tv)
    with torch.no_grad():
        want = tv([image])[0]
        batch, _ = tv.transform([image])
        feats = list(tv.backbone(batch.tensors).values())
        ref = tv.head(feats)
        out = ours(batch.tensors)
    # 320x448 input: P7 is 3x4, so torchvision's strides there are 106 and 112, not 128.
    assert batch.tensors.shape[-2:] == (320, 448)
    cls, reg, ctr = ours.split_outputs(out)
    strides = torch.cat(
        [
            torch.full((f.shape[-2] * f.shape[-1], 1), s)
            for f, s in zip(feats, (8, 16, 32, 64, 128), strict=True)
        ]
    )

    def flat(maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)

    assert (flat(cls) - ref["cls_logits"]).abs().max() <= 1e-4
    assert (flat(reg) / strides - ref["bbox_regression"]).abs().max() <= 1e-4
    assert (flat(ctr) - ref["bbox_ctrness"]).abs().max() <= 1e-4
    size = tuple(batch.tensors.shape[-2:])
    det = ours.postprocess(out, batch.image_sizes, [tuple(image.shape[-2:])], size)[0]
    assert len(want["boxes"]) >= 50 and len(det) == len(want["boxes"])
    assert torch.equal(det.labels, want["labels"])
    assert torch.allclose(det.scores, want["scores"], atol=1e-5)
    assert torch.allclose(det.boxes, want["boxes"], atol=1e-2)
    # The official rules (half-cell locations, p > 0.05, +1 boxes) give other detections.
    official = FCOS.from_torchvision(tv, convention="official", score_thresh=0.05)
    other = official.postprocess(out, batch.image_sizes)[0]
    assert len(other) != len(det) or not torch.allclose(other.boxes, det.boxes)


def test_torchvision_convention_requires_imprv() -> None:
    with pytest.raises(ValueError, match="imprv"):
        FCOS(backbone="mobilenet_v2", out_channels=32, convention="torchvision")


# -------------------------------------------------------------------------------- checkpoints
def _official_r50_keys() -> dict[str, tuple[int, ...]]:
    """The official R-50-FPN-RETINANET FCOS key names and shapes, written from spec F10."""
    keys: dict[str, tuple[int, ...]] = {"backbone.body.stem.conv1.weight": (64, 3, 7, 7)}
    bn = ("weight", "bias", "running_mean", "running_var")
    keys.update({f"backbone.body.stem.bn1.{b}": (64,) for b in bn})
    inp = 64
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        width = 64 * 2 ** (layer - 1)
        for j in range(blocks):
            p = f"backbone.body.layer{layer}.{j}."
            shapes = {
                "conv1": (width, inp, 1, 1),
                "conv2": (width, width, 3, 3),
                "conv3": (4 * width, width, 1, 1),
            }
            for k, (conv, shape) in enumerate(shapes.items(), start=1):
                keys[p + f"{conv}.weight"] = shape
                keys.update({p + f"bn{k}.{b}": (shape[0],) for b in bn})
            if j == 0:
                keys[p + "downsample.0.weight"] = (4 * width, inp, 1, 1)
                keys.update({p + f"downsample.1.{b}": (4 * width,) for b in bn})
            inp = 4 * width
    for level, cin in zip((2, 3, 4), (512, 1024, 2048), strict=True):
        keys[f"backbone.fpn.fpn_inner{level}.weight"] = (256, cin, 1, 1)
        keys[f"backbone.fpn.fpn_layer{level}.weight"] = (256, 256, 3, 3)
        keys[f"backbone.fpn.fpn_inner{level}.bias"] = keys[
            f"backbone.fpn.fpn_layer{level}.bias"
        ] = (256,)
    for p in ("p6", "p7"):
        keys[f"backbone.fpn.top_blocks.{p}.weight"], keys[f"backbone.fpn.top_blocks.{p}.bias"] = (
            (256, 256, 3, 3),
            (256,),
        )
    keys.update(_official_head_keys(256, 80))
    return keys


def _official_head_keys(c: int, k: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for tower in ("cls_tower", "bbox_tower"):
        for i in range(4):
            keys[f"rpn.head.{tower}.{3 * i}.weight"] = (c, c, 3, 3)
            for leaf in (f"{3 * i}.bias", f"{3 * i + 1}.weight", f"{3 * i + 1}.bias"):
                keys[f"rpn.head.{tower}.{leaf}"] = (c,)
    for name, out in (("cls_logits", k), ("bbox_pred", 4), ("centerness", 1)):
        keys[f"rpn.head.{name}.weight"], keys[f"rpn.head.{name}.bias"] = (out, c, 3, 3), (out,)
    keys.update({f"rpn.head.scales.{i}.scale": (1,) for i in range(5)})
    return keys


def _random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.rand(s, generator=g) + 0.5 for k, s in shapes.items()}


def test_from_official_r50_pth(tmp_path) -> None:
    state = _random_state(_official_r50_keys())
    path = tmp_path / "FCOS_imprv_R_50_FPN_1x.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "iteration": 90000}, path)
    model = FCOS.from_official(path)
    assert model.variant == "imprv" and model.head.centerness_on_reg
    assert model.head.cls_logits.out_channels == 80
    got = model.state_dict()
    for theirs, ours in (
        ("rpn.head.cls_tower.3.weight", "head.cls_tower.3.weight"),
        ("rpn.head.bbox_tower.10.bias", "head.bbox_tower.10.bias"),
        ("rpn.head.scales.4.scale", "head.scales.4.scale"),
        ("backbone.fpn.fpn_inner2.weight", "backbone.fpn.inner_blocks.0.0.weight"),
        ("backbone.fpn.fpn_layer4.bias", "backbone.fpn.layer_blocks.2.0.bias"),
        ("backbone.fpn.top_blocks.p7.weight", "backbone.fpn.extra_blocks.p7.weight"),
        ("backbone.body.stem.bn1.running_var", "backbone.body.bn1.running_var"),
        (
            "backbone.body.layer3.0.downsample.0.weight",
            "backbone.body.layer3.0.downsample.0.weight",
        ),
    ):
        assert torch.equal(got[ours], state[theirs]), ours
    # MSRA layout: the stride sits in the 1x1 conv; FrozenBN has eps 0.
    assert model.backbone.body.layer2[0].conv1.stride == (2, 2)
    assert model.backbone.body.bn1.eps == 0.0
    assert get_entry("fcos_r50_fpn").official.preprocess({})["channel_order"] == "BGR"


def test_from_official_mnv2_pth(tmp_path) -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    bn = ("weight", "bias", "running_mean", "running_var")

    def conv_bn(prefix: str, conv: str, norm: str, shape: tuple[int, ...]) -> None:
        shapes[f"{prefix}{conv}.weight"] = shape
        shapes.update({f"{prefix}{norm}.{b}": (shape[0],) for b in bn})

    conv_bn("backbone.body.features.0.", "0", "1", (32, 3, 3, 3))
    cin, index = 32, 1
    for t, c, n, _ in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for _ in range(n):
            p, hid = f"backbone.body.features.{index}.conv.", cin * t
            if t == 1:
                conv_bn(p, "0", "1", (hid, 1, 3, 3))
                conv_bn(p, "3", "4", (c, hid, 1, 1))
            else:
                conv_bn(p, "0", "1", (hid, cin, 1, 1))
                conv_bn(p, "3", "4", (hid, 1, 3, 3))
                conv_bn(p, "6", "7", (c, hid, 1, 1))
            cin, index = c, index + 1
    for level, c in zip((2, 3, 4), (32, 96, 320), strict=True):
        shapes[f"backbone.fpn.fpn_inner{level}.weight"] = (128, c, 1, 1)
        shapes[f"backbone.fpn.fpn_layer{level}.weight"] = (128, 128, 3, 3)
        shapes[f"backbone.fpn.fpn_inner{level}.bias"] = shapes[
            f"backbone.fpn.fpn_layer{level}.bias"
        ] = (128,)
    for p in ("p6", "p7"):
        (
            shapes[f"backbone.fpn.top_blocks.{p}.weight"],
            shapes[f"backbone.fpn.top_blocks.{p}.bias"],
        ) = (128, 128, 3, 3), (128,)
    shapes.update(_official_head_keys(128, 80))
    state = _random_state(shapes)
    state["backbone.body.features.3.conv.1.num_batches_tracked"] = torch.tensor(5)
    path = tmp_path / "FCOS_syncbn_bs32_c128_MNV2_FPN_1x.pth"
    torch.save({"model": state}, path)
    model = FCOS.from_official(path)
    assert model.variant == "plain" and model.head.cls_tower[1].num_channels == 128
    got = model.state_dict()
    assert torch.equal(
        got["backbone.body.features.1.conv.1.weight"],
        state["backbone.body.features.1.conv.3.weight"],
    )
    assert torch.equal(
        got["backbone.body.features.17.conv.1.1.bias"],
        state["backbone.body.features.17.conv.4.bias"],
    )
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert [o.shape[-1] for o in out[:5]] == [8, 4, 2, 1, 1]


def test_from_official_mmdet_checkpoint_with_biasless_towers(tmp_path) -> None:
    official = _official_r50_keys()
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shape in official.items():
        key = key.replace("backbone.body.stem.", "backbone.").replace("backbone.body.", "backbone.")
        for i in (2, 3, 4):
            key = key.replace(f"backbone.fpn.fpn_inner{i}.", f"neck.lateral_convs.{i - 2}.conv.")
            key = key.replace(f"backbone.fpn.fpn_layer{i}.", f"neck.fpn_convs.{i - 2}.conv.")
        key = key.replace("backbone.fpn.top_blocks.p6.", "neck.fpn_convs.3.conv.")
        key = key.replace("backbone.fpn.top_blocks.p7.", "neck.fpn_convs.4.conv.")
        for tower, name in (("cls_tower", "cls_convs"), ("bbox_tower", "reg_convs")):
            for k in range(4):
                key = key.replace(f"rpn.head.{tower}.{3 * k}.", f"bbox_head.{name}.{k}.conv.")
                key = key.replace(f"rpn.head.{tower}.{3 * k + 1}.", f"bbox_head.{name}.{k}.gn.")
        for a, b in (
            ("cls_logits", "conv_cls"),
            ("bbox_pred", "conv_reg"),
            ("centerness", "conv_centerness"),
            ("scales", "scales"),
        ):
            key = key.replace(f"rpn.head.{a}.", f"bbox_head.{b}.")
        if not (key.startswith("bbox_head.") and key.endswith(".conv.bias")):
            shapes[key] = shape
    state = _random_state(shapes)
    state["backbone.bn1.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "fcos_r50_caffe_fpn_gn-head_1x_coco.pth"
    torch.save({"state_dict": state, "meta": {}}, path)
    model = FCOS.from_official(path, nms_thresh=0.5)
    got = model.state_dict()
    assert torch.equal(got["head.cls_tower.6.weight"], state["bbox_head.cls_convs.2.conv.weight"])
    assert torch.equal(got["head.bbox_tower.4.bias"], state["bbox_head.reg_convs.1.gn.bias"])
    assert not got["head.cls_tower.0.bias"].any()
    assert torch.equal(
        got["backbone.fpn.extra_blocks.p6.weight"], state["neck.fpn_convs.3.conv.weight"]
    )


def test_convert_rejects_other_checkpoints() -> None:
    with pytest.raises(CheckpointError, match="not an FCOS checkpoint"):
        convert_checkpoint({"encoder.conv1.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------- targets, losses
def test_targets_worked_example_of_the_spec() -> None:
    """Spec F5: GT [0,0,40,40]; P3 (20,20) is positive with centerness 1; (36,36) only without sampling."""
    locs = compute_locations([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], (8, 16, 32, 64, 128))
    boxes, labels = torch.tensor([[0.0, 0.0, 40.0, 40.0]]), torch.tensor([3])
    for radius, positive_at_36 in ((0.0, True), (1.5, False)):
        got, reg = FCOSTargets(center_sampling_radius=radius).assign(locs, boxes, labels)
        at = {(int(x), int(y)): i for i, (x, y) in enumerate(locs[0].tolist())}
        assert got[at[20, 20]] == 3 and reg[at[20, 20]].tolist() == [20.0, 20.0, 20.0, 20.0]
        assert (got[at[36, 36]] == 3) == positive_at_36
    empty, _ = FCOSTargets().assign(locs, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert not empty.any()


def test_iou_loss_hand_worked() -> None:
    pred, target = torch.tensor([[1.0, 1, 1, 1]]), torch.tensor([[2.0, 2, 2, 2]])
    # I = 2*2 = 4, U = 4 + 16 - 4 = 16, smoothed IoU = 5/17; the enclosing box is the target.
    assert iou_loss(pred, target, None, "iou").item() == pytest.approx(-math.log(5 / 17))
    assert iou_loss(pred, target, None, "linear_iou").item() == pytest.approx(12 / 17)
    assert iou_loss(pred, target, None, "giou").item() == pytest.approx(1 - (5 / 17 - 0 / 16))
    assert iou_loss(target, target, torch.tensor([0.5]), "giou").item() == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.mark.parametrize("variant", ["plain", "imprv"])
def test_loss_falls_on_a_tiny_batch(variant: str) -> None:
    from detseg.detection.fcos_training import collate_detection, fcos_loss

    torch.manual_seed(0)
    model = fcos_mnv2_fpn(num_classes=2, out_channels=32, variant=variant).train()
    image = torch.zeros(3, 64, 96)
    image[:, 10:50, 20:70] = 1.0
    items = [
        (
            image,
            {
                "boxes": torch.tensor([[20.0, 10.0, 70.0, 50.0]]),
                "labels": torch.tensor([1]),
                "image_id": 0,
            },
        ),
        (
            torch.zeros(3, 40, 50),
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 1},
        ),
    ]
    batch = collate_detection(items)
    assert batch["images"].shape == (2, 3, 64, 96) and batch["image_sizes"].tolist() == [
        [64, 96],
        [40, 50],
    ]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        loss, parts = fcos_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        assert set(parts) == {"cls", "reg", "ctr"}
    assert all(math.isfinite(v) for v in history)
    assert np.mean(history[-3:]) < 0.7 * np.mean(history[:3]), history


def test_loss_without_any_positive_is_connected_zero() -> None:
    model = fcos_mnv2_fpn(num_classes=1, out_channels=32).train()
    out = model(torch.zeros(2, 3, 64, 64))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model.compute_loss(out, [empty, empty])
    assert losses["reg"].item() == 0 and losses["ctr"].item() == 0 and losses["cls"].item() > 0
    sum(losses.values()).backward()


def test_eval_forward_returns_tensors_only_and_postprocess_detections() -> None:
    from detseg.results import Detections

    model = fcos_mnv2_fpn(num_classes=3, out_channels=32, variant="imprv").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 96, 128))
    assert (
        isinstance(out, tuple) and len(out) == 15 and all(isinstance(o, torch.Tensor) for o in out)
    )
    dets = model.postprocess(out, [(96, 128), (90, 100)], original_sizes=[(192, 256), (90, 100)])
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    assert all(len(d) <= 100 and (d.labels < 3).all() for d in dets)
    if len(dets[1]):
        assert dets[1].boxes[:, 2].max() <= 100 and dets[1].boxes[:, 3].max() <= 90


@pytest.mark.slow
def test_training_loss_falls_on_balloon_images(shared) -> None:
    """~100 steps on four balloon training images (256 px): the total loss falls clearly."""
    from detseg.data.detection import DetectionDataset
    from detseg.detection.fcos_training import collate_detection, fcos_loss

    via = need(shared / "data" / "balloon" / "train" / "via_region_data.json")
    dataset = DetectionDataset(via, max_size=256, class_name="balloon")
    batch = collate_detection([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    model = fcos_mnv2_fpn(num_classes=1, variant="imprv").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(100):
        loss, _ = fcos_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5]), history[::10]
