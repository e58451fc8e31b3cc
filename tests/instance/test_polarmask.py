"""PolarMask: official parity fixtures, hand-worked targets, losses, checkpoints, ONNX."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torchvision

from detseg.errors import CheckpointError
from detseg.instance.polarmask import (
    EMPTY_RAY,
    PolarMask,
    PolarMaskTargets,
    convert_official,
    distance2mask,
    largest_contour,
    legacy_iou_loss,
    mass_center,
    polar_centerness,
    polar_iou_loss,
    polar_losses,
    polar_rays,
    polygons_to_masks,
)
from detseg.registry import get_entry
from tests.parity import fixture_names, parity_dir, run_fixture

FIXTURES = fixture_names("polarmask_")


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPUs are shared: one thread is many times faster than an oversubscribed pool here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(num_classes: int = 3) -> PolarMask:
    return PolarMask(
        num_classes, "mobilenet_v2", out_channels=32, feat_channels=64, stacked_convs=1
    )


def test_fixtures_found(shared) -> None:
    assert len(FIXTURES) >= 7, FIXTURES


@pytest.mark.parametrize("name", FIXTURES)
def test_parity(name: str) -> None:
    tol = json.loads((parity_dir() / f"{name}.json").read_text())["tolerance"]
    diffs = run_fixture(name)
    assert diffs and all(d <= tol for d in diffs.values()), diffs


# ------------------------------------------------------------------------------ rays, contours
def _disk(radius: int, size: int = 128) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (size // 2, size // 2), radius, 1, -1)
    return mask


@pytest.mark.parametrize(
    ("radius", "empty", "centerness"), [(6, 8, 0.0), (12, 0, 0.965), (40, 0, 0.990)]
)
def test_official_rays_of_disks_match_the_spec_hand_check(radius, empty, centerness) -> None:
    """Spec bug 5's hand check: a disk of radius 6 has 8 empty rays, 12 and 40 none."""
    contour = torch.from_numpy(largest_contour(_disk(radius))).float()
    rays = polar_rays(torch.tensor([[64.0, 64.0]]), contour)
    assert int((rays == EMPTY_RAY).sum()) == empty
    assert float(polar_centerness(rays)) == pytest.approx(centerness, abs=1e-3)
    if not empty:
        assert rays.max() <= radius + 0.5 and rays.min() >= radius - 1.5


def test_ray_directions_follow_the_current_convention() -> None:
    """Ray 0 points down (+y), ray 9 right (+x): a wide flat box has long rays 9 and 27."""
    mask = np.zeros((64, 128), np.uint8)
    mask[24:41, 4:125] = 1  # 121 x 17 around (64, 32)
    rays = polar_rays(torch.tensor([[64.0, 32.0]]), torch.from_numpy(largest_contour(mask)).float())
    assert rays[0, 9] == pytest.approx(60, abs=0.01) and rays[0, 27] == pytest.approx(60, abs=0.01)
    assert rays[0, 0] == pytest.approx(8, abs=0.01) and rays[0, 18] == pytest.approx(8, abs=0.01)
    poly = distance2mask(torch.tensor([[64.0, 32.0]]), rays)
    assert poly[0, 0, 9] == pytest.approx(124, abs=0.01) and poly[0, 1, 0] == pytest.approx(
        40, abs=0.01
    )


def test_corrected_rays_wrap_around() -> None:
    """Points at 357-359 degrees feed ray 0 only in the corrected mode (spec bug 3)."""
    contour = torch.tensor([[-1.0, 20.0]])  # atan2(-1, 20) = -2.86 deg -> 357
    origin = torch.zeros(1, 2)
    assert polar_rays(origin, contour, official_compat=True)[0, 0] == EMPTY_RAY
    assert polar_rays(origin, contour, official_compat=False)[0, 0] == pytest.approx(
        math.hypot(1, 20)
    )


def test_mass_center_is_the_polygon_centroid_and_falls_back_to_the_mean() -> None:
    square = np.array([[0, 0], [10, 0], [10, 20], [0, 20]], np.int32)
    assert mass_center(square) == (5, 10)
    line = np.array([[2, 3], [4, 3], [9, 3]], np.int32)  # zero area: the officially caught NaN
    assert mass_center(line) == (5, 3)


def test_largest_contour_ignores_other_parts_and_empty_masks() -> None:
    mask = np.zeros((40, 60), np.uint8)
    mask[5:10, 5:10] = 1
    mask[10:35, 30:55] = 1
    contour = largest_contour(mask)
    assert contour[:, 0].min() == 30 and contour[:, 1].max() == 34
    assert largest_contour(np.zeros((8, 8), np.uint8)) is None


# -------------------------------------------------------------------------------------- targets
def _targets(boxes, masks, labels, **kw):
    t = PolarMaskTargets(**kw)
    return t(
        torch.tensor(boxes, dtype=torch.float32),
        torch.from_numpy(np.stack(masks)),
        torch.tensor(labels),
    )


def test_targets_sample_around_the_mass_center_of_an_l_shape() -> None:
    """An L whose centroid is off the box centre and off the diagonal (spec bug 4)."""
    mask = np.zeros((128, 128), np.uint8)
    mask[8:120, 8:40] = 1
    mask[88:120, 8:120] = 1
    cx, cy = mass_center(largest_contour(mask))
    labels, _, rays, centers = _targets([[8, 8, 119, 119]], [mask], [1])
    assert tuple(centers[0].tolist()) == (cx, cy) and cx < cy  # lower-left of the box centre
    pos = labels > 0
    assert 0 < int(pos.sum()) <= 16
    locs = torch.cat([_locations(128, 128, s) for s in (8, 16, 32, 64, 128)])[pos]
    r = 1.5 * 16  # 112 px box -> level p4 (64..128)
    assert bool(((locs[:, 0] - cx).abs() < r).all() and ((locs[:, 1] - cy).abs() < r).all())
    assert bool((rays[pos] > 0).all()) and bool((rays[~pos] == 0).all())


def _locations(h: int, w: int, s: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(h // s) * s + s // 2, torch.arange(w // s) * s + s // 2, indexing="ij"
    )
    return torch.stack((xs.reshape(-1), ys.reshape(-1)), 1).float()


def test_targets_survive_empty_tiny_edge_and_missing_objects() -> None:
    h = w = 128
    empty = np.zeros((h, w), np.uint8)
    dot = empty.copy()
    dot[50, 50] = 1  # one pixel: zero-area contour
    edge = empty.copy()
    edge[30:90, 0:40] = 1  # touches the left edge: the official code silenced the image
    labels, boxes, rays, centers = _targets(
        [[0, 0, 20, 20], [50, 50, 50, 50], [0, 30, 39, 89]], [empty, dot, edge], [1, 2, 3]
    )
    assert set(labels.unique().tolist()) <= {0, 2, 3} and int((labels == 3).sum()) > 0
    assert tuple(centers[1].tolist()) == (50, 50)
    assert torch.isfinite(rays).all() and torch.isfinite(boxes).all()
    none = PolarMaskTargets()(
        torch.zeros(0, 4), torch.zeros(0, h, w, dtype=torch.uint8), torch.zeros(0)
    )
    assert none[0].shape == (341,) and int(none[0].sum()) == 0 and none[2].shape == (341, 36)


def test_target_generation_is_fast_enough(shared) -> None:
    """Vectorised: the fixture images' targets take milliseconds, not seconds."""
    import time

    spec = json.loads((parity_dir() / "polarmask_targets_img144.json").read_text())
    arrays = np.load(parity_dir() / "polarmask_targets_img144.npz")
    module = PolarMaskTargets(**spec["kwargs"])
    inputs = [torch.from_numpy(arrays[f"in_{n}"]) for n in spec["inputs"]]
    start = time.perf_counter()
    for _ in range(5):
        module(*inputs)
    assert (time.perf_counter() - start) / 5 < 0.25


# --------------------------------------------------------------------------------------- losses
def test_polar_iou_loss_hand_values() -> None:
    target = torch.full((2, 36), 10.0)
    pred = torch.stack((torch.full((36,), 20.0), torch.full((36,), 10.0)))
    loss = polar_iou_loss(pred, target, torch.tensor([1.0, 1.0]))
    assert float(loss) == pytest.approx(math.log(2))


def test_legacy_iou_loss_uses_plus_one_widths() -> None:
    t = torch.tensor([[4.0, 4.0, 5.0, 5.0]])  # (4 + 5 + 1) x (4 + 5 + 1) = 100
    p = torch.tensor([[4.0, 4.0, 5.0, 0.0]])  # 10 x 5, inside t
    assert float(legacy_iou_loss(t, t, torch.ones(1))) == pytest.approx(0.0, abs=1e-7)
    assert float(legacy_iou_loss(p, t, torch.ones(1))) == pytest.approx(
        -math.log(50 / 100), rel=1e-5
    )


def test_losses_ignore_all_empty_positives_and_handle_no_positives() -> None:
    k, n = 3, 4
    cls, box, ctr, ray = torch.zeros(n, k), torch.ones(n, 4), torch.zeros(n), torch.ones(n, 36)
    box_t, ray_t = torch.ones(n, 4) * 3, torch.full((n, 36), EMPTY_RAY)
    ray_t[0] = 5.0
    labels = torch.tensor([1, 2, 0, 0])
    full = polar_losses(cls, box, ctr, ray, labels, box_t, ray_t, 1)
    only = polar_losses(cls[:1], box[:1], ctr[:1], ray[:1], labels[:1], box_t[:1], ray_t[:1], 1)
    assert float(full["mask"]) == pytest.approx(float(only["mask"])) and float(full["mask"]) > 0
    none = polar_losses(cls, box, ctr, ray, torch.zeros(n, dtype=torch.long), box_t, ray_t, 2)
    assert all(torch.isfinite(v) for v in none.values()) and float(none["mask"]) == 0


def test_model_loss_backward_and_postprocess() -> None:
    model = _tiny()
    images = torch.randn(1, 3, 128, 160)
    masks = torch.zeros(1, 128, 160, dtype=torch.uint8)
    masks[0, 20:80, 30:100] = 1
    target = {
        "boxes": torch.tensor([[30.0, 20, 100, 80]]),
        "labels": torch.tensor([1]),
        "masks": masks,
    }
    losses = model.compute_loss(model(images), [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.head.polar_mask.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model.head.polar_cls.bias.fill_(2.0)  # every location fires: NMS, masks and caps run
        (inst,) = model.postprocess(model(images), [(128, 160)], [(256, 320)])
    assert (
        0 < len(inst) <= 100
        and inst.masks.shape[1:] == (256, 320)
        and inst.masks.dtype == torch.bool
    )


# ---------------------------------------------------------------------------------- checkpoints
def _official_state(old_names: bool) -> dict[str, torch.Tensor]:
    """An mmdet v1 PolarMask state dict built from the spec's key list (P6), random values."""
    state = {
        f"backbone.{k}": torch.randn(v.shape) if v.is_floating_point() else v
        for k, v in torchvision.models.resnet50().state_dict().items()
        if not k.startswith("fc.")
    }
    for i, c in enumerate((512, 1024, 2048)):
        state[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(256, c, 1, 1)
        state[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(256)
    for i in range(5):
        state[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3)
        state[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(256)
    for tower in ("cls", "reg", "mask"):
        for k in range(4):
            state[f"bbox_head.{tower}_convs.{k}.conv.weight"] = torch.randn(256, 256, 3, 3)
            state[f"bbox_head.{tower}_convs.{k}.gn.weight"] = torch.randn(256)
            state[f"bbox_head.{tower}_convs.{k}.gn.bias"] = torch.randn(256)
    prefix = "fcos" if old_names else "polar"
    for name, out in (("cls", 80), ("reg", 4), ("mask", 36), ("centerness", 1)):
        state[f"bbox_head.{prefix}_{name}.weight"] = torch.randn(out, 256, 3, 3)
        state[f"bbox_head.{prefix}_{name}.bias"] = torch.arange(out, dtype=torch.float32)
    for kind in ("bbox", "mask"):
        for i in range(5):
            state[f"bbox_head.scales_{kind}.{i}.scale"] = torch.tensor([1.0 + i])
    return state


@pytest.mark.parametrize("old_names", [False, True])
def test_from_official_maps_every_key(tmp_path, old_names: bool) -> None:
    state = _official_state(old_names)
    path = tmp_path / "polar_768_1x_r50.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 12}}, path)
    model = PolarMask.from_official(path)
    own = model.state_dict()
    assert torch.equal(
        own["backbone.body.layer3.2.conv2.weight"], state["backbone.layer3.2.conv2.weight"]
    )
    assert torch.equal(
        own["backbone.fpn.extra_blocks.p7.weight"], state["neck.fpn_convs.4.conv.weight"]
    )
    assert torch.equal(own["head.mask_convs.3.gn.bias"], state["bbox_head.mask_convs.3.gn.bias"])
    assert (
        own["head.scales_mask.4.scale"].shape == ()
        and float(own["head.scales_mask.4.scale"]) == 5.0
    )
    bias = own["head.polar_mask.bias"]
    assert bias[0] == (9.0 if old_names else 0.0)  # old convention: ray_new[j] = ray_old[j + 9]
    rolled = convert_official(state, ray_roll=0)[1]["head.polar_mask.bias"]
    assert rolled[0] == 0.0


def test_official_format_is_registered_and_rejects_other_files() -> None:
    entry = get_entry("polarmask_r50")
    assert entry.task == "instance" and entry.official is not None
    with pytest.raises(CheckpointError):
        entry.official.convert({"rpn.head.cls_logits.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------- ONNX
def test_onnx_export_matches_pytorch(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _tiny().eval()
    images = torch.randn(1, 3, 128, 160)
    path = tmp_path / "polarmask.onnx"
    torch.onnx.export(model, (images,), str(path), dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        want = model(images)
    assert len(got) == len(want) == 20
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))
    assert diff <= 1e-4, diff


def test_polygons_to_masks_fills_boundary_pixels() -> None:
    square = torch.tensor([[[2.5, 6.9, 6.9, 2.5], [1.2, 1.2, 5.7, 5.7]]])  # -> 2..6 x 1..5
    mask = polygons_to_masks(square, 8, 10)[0]
    assert mask.sum() == 25 and mask[1, 2] == 1 and mask[5, 6] == 1


def test_predict_image_and_draw_instances() -> None:
    from detseg.instance.polarmask_infer import draw_instances, predict_image

    model = _tiny()
    with torch.no_grad():
        model.head.polar_cls.bias.fill_(2.0)
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    inst = predict_image(model, image, max_size=128)
    assert len(inst) > 0 and inst.masks.shape[1:] == (90, 120)
    assert inst.boxes[:, 2].max() <= 120 and inst.boxes[:, 3].max() <= 90
    drawn = draw_instances(image, inst, score_thresh=0.0)
    assert (
        drawn.shape == image.shape and drawn.dtype == np.uint8 and not np.array_equal(drawn, image)
    )


@pytest.mark.slow
def test_training_loss_falls_on_balloon_images(shared) -> None:
    """~60 steps on four balloon training images (192 px): the total loss falls clearly."""
    from detseg.detection.fcos_training import collate_detection
    from detseg.instance.polarmask_training import polarmask_dataset, polarmask_loss
    from tests.conftest import need

    via = need(shared / "data" / "balloon" / "train" / "via_region_data.json")
    dataset = polarmask_dataset(via, train=False, max_size=192)
    batch = collate_detection([dataset[i] for i in range(4)])
    model = PolarMask(1, "mobilenet_v2", 64, 64, 2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(60):
        loss, _ = polarmask_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5]), history[::10]
