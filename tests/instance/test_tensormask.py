"""TensorMask: head parity (d2_tensormask_head), checkpoint names, sparse masks, inference steps."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from detseg.backbones.d2 import ResNetFPN
from detseg.errors import CheckpointError
from detseg.instance.tensormask import (
    D2_PREPROCESS,
    TensorMask,
    TensorMaskHead,
    convert_detectron2,
    d2_test_size,
    split_head_outputs,
)
from detseg.instance.tensormask_infer import (
    dense_detection_masks,
    paste_masks,
    postprocess,
    select_detections,
    sparse_detection_masks,
)
from detseg.instance.tensormask_targets import (
    assign_windows,
    focal_loss_star,
    mask_loss,
    tensormask_losses,
    window_bitmask_targets,
    window_mask_targets,
)
from detseg.instance.tensormask_windows import (
    decode_boxes,
    encode_boxes,
    grid_windows,
    level_windows,
)
from detseg.ops.swap_align2nat import swap_align2nat
from detseg.registry import get_entry
from tests.parity import fixture_names, parity_dir, run_fixture

FIXTURES = fixture_names("d2_tensormask")


def test_fixtures_found() -> None:
    if parity_dir().is_dir():
        assert FIXTURES == ["d2_tensormask_head"]


@pytest.mark.parametrize("name", FIXTURES)
def test_parity(name: str) -> None:
    diffs = run_fixture(name)
    assert len(diffs) == 24
    assert max(diffs.values()) <= 1e-4, diffs


def test_head_checkpoint_names_and_shapes() -> None:
    with torch.device("meta"):
        state = TensorMaskHead().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert len(shapes) == 34
    assert sum(math.prod(s) for s in shapes.values()) == 4_406_146
    assert shapes["cls_score.weight"] == (160, 256, 3, 3)
    assert shapes["bbox_pred.weight"] == (8, 128, 3, 3)
    assert shapes["bbox_subnet.0.weight"] == (128, 256, 3, 3)
    assert shapes["mask_subnet.6.weight"] == (128, 128, 3, 3)
    assert shapes["mask_pred_11.weight"] == (121, 128, 1, 1)
    assert shapes["mask_pred_15.bias"] == (225,)
    assert shapes["mask_fuse.0.weight"] == (128, 128, 3, 3)
    assert set(TensorMaskHead(bipyramid_on=False).state_dict()) == set(shapes) - {
        "mask_fuse.0.weight",
        "mask_fuse.0.bias",
    }


def test_init_prior() -> None:
    head = TensorMaskHead(in_channels=4, cls_channels=4, bbox_channels=4, mask_channels=4)
    assert torch.allclose(head.cls_score.bias, torch.full((160,), -math.log(99.0)))
    assert float(head.mask_pred_11.bias.detach().abs().max()) == 0.0


def _small_head(**kwargs) -> TensorMaskHead:
    head = TensorMaskHead(
        in_channels=4,
        num_classes=3,
        cls_channels=4,
        bbox_channels=4,
        mask_channels=4,
        num_levels=3,
        mask_sizes=(3, 5),
        **kwargs,
    )
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return head.eval()


def _features() -> list[torch.Tensor]:
    return [torch.randn(2, 4, 8 // 2**k, 12 // 2**k) for k in range(3)]


@pytest.mark.parametrize("max_elements", [1 << 22, 40])
def test_natural_masks_dense_equals_sparse(max_elements: int) -> None:
    head = _small_head()
    feats = _features()
    with torch.no_grad():
        logits, deltas, natural = split_head_outputs(head(*feats), 3)
        towers = head.mask_towers(feats)
        aligned = head.aligned_masks(towers)
    assert [tuple(x.shape) for x in logits] == [(2, 6, 8, 12), (2, 6, 4, 6), (2, 6, 2, 3)]
    assert [tuple(m.shape) for m in natural[2]] == [(2, 144, 2, 3), (2, 400, 2, 3)]
    for k in range(3):
        for a, m in enumerate((3, 5)):
            dense = natural[k][a]
            assert torch.equal(dense, swap_align2nat(aligned[k][a], 2**k, -6.0))
            side = m * 2**k
            rows = torch.arange(dense.shape[2]).repeat_interleave(dense.shape[3])
            cols = torch.arange(dense.shape[3]).repeat(dense.shape[2])
            dets = {
                "scores": torch.ones(len(rows)),
                "level": torch.full_like(rows, k),
                "anchor": torch.full_like(rows, a),
                "row": rows,
                "col": cols,
            }
            with torch.no_grad():
                image = [t[1:2] for t in towers]
                sparse = sparse_detection_masks(head, image, dets, max_elements)
            want = dense[1].permute(1, 2, 0).reshape(-1, side, side).sigmoid()
            assert torch.allclose(torch.stack(sparse), want, atol=1e-6)
            picked = dense_detection_masks(natural, dets, 1)
            assert torch.allclose(torch.stack(picked), want, atol=1e-6)


def test_bipyramid_p2_fuses_with_itself() -> None:
    head = _small_head()
    feats = _features()
    with torch.no_grad():
        towers = head.mask_towers(feats)
        fused = [head.fused_mask_features(towers, k) for k in range(3)]
        f0 = head.mask_subnet(feats[0])
        assert torch.allclose(fused[0], head.mask_fuse(2 * f0))
        assert all(f.shape[-2:] == (8, 12) for f in fused)


def test_non_bipyramid_variants() -> None:
    feats = _features()
    with torch.no_grad():
        _, _, natural = split_head_outputs(_small_head(bipyramid_on=False)(*feats), 3)
        _, _, plain = split_head_outputs(
            _small_head(aligned_on=False, bipyramid_on=False)(*feats), 3
        )
    assert tuple(natural[1][0].shape) == (2, 9, 4, 6)
    assert tuple(plain[2][1].shape) == (2, 25, 2, 3)


def test_grid_windows_hand_worked() -> None:
    boxes = grid_windows(2, 3, 4, (44, 60))
    assert boxes.shape == (12, 4)
    # (h=1, w=2, a=1): centre (8, 4), side 60.
    assert boxes[(1 * 3 + 2) * 2 + 1].tolist() == [-22.0, -26.0, 38.0, 34.0]
    assert boxes[0].tolist() == [-22.0, -22.0, 22.0, 22.0]
    assert [tuple(w.shape) for w in level_windows([(2, 3), (1, 2)])] == [(12, 4), (4, 4)]
    assert level_windows([(1, 1), (1, 1)])[1][1].tolist() == [-60.0, -60.0, 60.0, 60.0]


def test_decode_boxes_hand_worked() -> None:
    window = torch.tensor([[0.0, 0.0, 40.0, 40.0]]).repeat(3, 1)
    deltas = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [1.5, -0.75, 0.0, 0.0], [0.0, 0.0, 0.75 * math.log(2), 100.0]]
    )
    boxes = decode_boxes(deltas, window)
    assert torch.allclose(boxes[0], window[0])
    assert torch.allclose(boxes[1], torch.tensor([40.0, -20.0, 80.0, 20.0]))
    half_h = 20 * 1000 / 16  # dh clamped at log(1000/16)
    assert torch.allclose(boxes[2], torch.tensor([-20.0, 20 - half_h, 60.0, 20 + half_h]))


def test_select_detections_indices_and_nms() -> None:
    num_classes, anchors = 3, 2
    logits = [torch.full((anchors * num_classes, 2, 3), -10.0), torch.full((6, 1, 2), -10.0)]
    deltas = [torch.zeros(8, 2, 3), torch.zeros(8, 1, 2)]
    logits[1][1 * num_classes + 2, 0, 1] = 3.0  # level 1, h 0, w 1, anchor 1, class 2
    logits[0][0 * num_classes + 2, 1, 0] = 2.0  # level 0, h 1, w 0, anchor 0, class 2
    logits[0][1 * num_classes + 2, 1, 0] = 1.0  # same place, bigger window: IoU 0.54 > 0.5
    logits[0][1 * num_classes + 0, 0, 2] = -2.0  # p = 0.119 > 0.05, class 0
    windows = level_windows([(2, 3), (1, 2)])
    dets = select_detections(logits, deltas, windows)
    assert dets["scores"].tolist() == pytest.approx(
        [torch.sigmoid(torch.tensor(v)).item() for v in (3.0, 2.0, -2.0)]
    )
    assert dets["classes"].tolist() == [2, 2, 0]
    assert dets["level"].tolist() == [1, 0, 0]
    assert dets["row"].tolist() == [0, 1, 0]
    assert dets["col"].tolist() == [1, 0, 2]
    assert dets["anchor"].tolist() == [1, 0, 1]
    assert dets["boxes"][0].tolist() == [8 - 60, -60, 8 + 60, 60]
    assert torch.equal(dets["boxes"], dets["windows"])
    assert len(select_detections(logits, deltas, windows, max_detections=1)["scores"]) == 1
    assert len(select_detections(logits, deltas, windows, score_thresh=0.99)["scores"]) == 0


def test_paste_masks_hand_worked() -> None:
    mask = torch.ones(1, 4, 4)
    mask[0, 0, 0] = 0.0
    pasted = paste_masks(mask, torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 8, 9)
    want = torch.zeros(8, 9, dtype=torch.bool)
    want[2:6, 2:6] = True
    want[2, 2] = False
    assert torch.equal(pasted[0], want)
    # Scaled x2: image pixel j samples mask coordinate (j + 0.5)/2 - 0.5. Pixel (1, 1) reads
    # 1 - 0.75² = 0.4375 (off); pixel (0, 2) reads 0.75 (zero pad above) x 0.75 = 0.5625 (on);
    # the far corner (7, 7) reads 0.75 x 0.75 (zero outside, not edge-clamped).
    pasted2 = paste_masks(mask, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 8, 8)[0]
    off = torch.zeros(8, 8, dtype=torch.bool)
    off[0, 0] = off[0, 1] = off[1, 0] = off[1, 1] = True
    assert torch.equal(pasted2, ~off)
    low = paste_masks(mask * 0.7, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 8, 8)[0]
    assert low[3, 3] and not low[7, 7]  # 0.7 inside; 0.7 x 0.5625 < 0.5 at the corner
    assert paste_masks(torch.zeros(0, 4, 4), torch.zeros(0, 4), 3, 3).shape == (0, 3, 3)


def test_paste_over_the_box_equals_sampling_the_whole_image() -> None:
    gen = torch.Generator().manual_seed(0)
    height, width = 30, 41
    boxes = torch.tensor(
        [[3.2, 4.7, 17.9, 19.4], [-20.0, -9.5, 12.25, 22.75], [25.0, 10.0, 90.0, 75.0]]
    )
    masks = [torch.rand(s, s, generator=gen) for s in (5, 9, 13)]
    masks[1][:, 0] = 1.0  # a full-on border: the pixels just outside the box must stay off
    got = paste_masks(masks, boxes, height, width)
    ys = torch.arange(height) + 0.5
    xs = torch.arange(width) + 0.5
    for mask, box, pasted in zip(masks, boxes, got, strict=True):
        gx = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        gy = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=2)[None]
        want = torch.nn.functional.grid_sample(mask[None, None], grid, align_corners=False)
        assert torch.equal(pasted, want[0, 0] >= 0.5)


def test_postprocess_scales_clips_and_pastes_into_window() -> None:
    dets = {
        "boxes": torch.tensor([[-4.0, 2.0, 6.0, 8.0], [30.0, 30.0, 40.0, 40.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "classes": torch.tensor([1, 0]),
        "windows": torch.tensor([[0.0, 0.0, 4.0, 4.0], [20.0, 20.0, 24.0, 24.0]]),
    }
    masks = [torch.ones(2, 2), torch.ones(4, 4)]
    out = postprocess(dets, masks, input_size=(10, 12), output_size=(20, 24))
    assert out.boxes.tolist() == [[0.0, 4.0, 12.0, 16.0]]  # second box clipped to empty
    assert out.labels.tolist() == [1] and out.scores.tolist() == pytest.approx([0.9])
    want = torch.zeros(20, 24, dtype=torch.bool)
    want[:8, :8] = True  # the window (0, 0, 4, 4) scaled x2, not the box
    want[0, 0] = want[0, 7] = want[7, 0] = want[7, 7] = False  # corners read 0.625² < 0.5
    assert torch.equal(out.masks[0], want)


def _assign_brute_force(gt: torch.Tensor, windows: torch.Tensor, unit: torch.Tensor) -> list[int]:
    """The rule written per pair, literally: -1 negative, else the matched GT index."""
    out = []
    for w, s in zip(windows.tolist(), unit.tolist(), strict=True):
        hits = []
        for j, g in enumerate(gt.tolist()):
            contains = w[0] <= g[0] and w[1] <= g[1] and w[2] >= g[2] and w[3] >= g[3]
            scale = (w[2] - w[0]) - s <= max(2 * max(g[2] - g[0], g[3] - g[1]), 40)
            dx = (g[0] + g[2] - w[0] - w[2]) / 2 / s
            dy = (g[1] + g[3] - w[1] - w[3]) / 2 / s
            if contains and scale and dx * dx + dy * dy <= 1:
                hits.append(j)
        out.append(hits[0] if len(hits) == 1 else -1)
    return out


def test_assign_windows_hand_worked() -> None:
    windows = grid_windows(1, 3, 4, (44, 60))  # centres (0, 0), (4, 0), (8, 0)
    unit = torch.full((6,), 4.0)
    gt = torch.tensor([[-10.0, -10.0, 10.0, 10.0]])  # long side 20: S - s <= 40 keeps side 44 only
    matches, positive = assign_windows(gt, windows, unit)
    assert positive.tolist() == [True, False, True, False, False, False]  # (8, 0) is 2 strides off
    # A second GT centred at (4, 0): (0, 0) and (4, 0) now match both (negative); (8, 0) only it.
    gt2 = torch.cat([gt, torch.tensor([[-6.0, -10.0, 14.0, 10.0]])])
    matches, positive = assign_windows(gt2, windows, unit)
    assert positive.tolist() == [False, False, False, False, True, False]
    assert matches[4] == 1
    _, none = assign_windows(torch.zeros(0, 4), windows, unit)
    assert not none.any()


def test_assign_windows_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    windows = torch.cat(level_windows([(6, 8), (3, 4)]))
    unit = torch.cat([torch.full((96,), 4.0), torch.full((24,), 8.0)])
    centre = torch.rand(12, 2, generator=gen) * 28
    half = torch.rand(12, 2, generator=gen) * 30 + 2
    gt = torch.cat([centre - half, centre + half], dim=1)
    matches, positive = assign_windows(gt, windows, unit)
    got = torch.where(positive, matches, -1).tolist()
    assert got == _assign_brute_force(gt, windows, unit)
    assert positive.sum() > 0


def test_encode_inverts_decode() -> None:
    window = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    deltas = encode_boxes(torch.tensor([[40.0, -20.0, 80.0, 20.0]]), window)
    assert torch.allclose(deltas, torch.tensor([[1.5, -0.75, 0.0, 0.0]]))
    gt = torch.tensor([[3.0, 5.0, 30.0, 21.0]])
    assert torch.allclose(decode_boxes(encode_boxes(gt, window), window), gt, atol=1e-5)


def test_focal_loss_star_hand_worked() -> None:
    loss = focal_loss_star(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    want = math.log(2) / 3 * 0.3 + math.log1p(math.exp(6.0)) / 3 * 0.7
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_mask_loss_hand_worked() -> None:
    # All logits 0, all targets 1: per pixel 1.5·log 2; the mean x 2 per window; two windows.
    loss = mask_loss(torch.zeros(2, 3, 3), torch.ones(2, 3, 3))
    assert loss.item() == pytest.approx(2 * 2 * 1.5 * math.log(2), rel=1e-6)
    neg = mask_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    assert neg.item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_window_mask_targets_rasterise_over_the_window() -> None:
    square = [[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]]
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1:3, 1:3] = True
    got = window_mask_targets([square], torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 4)
    assert torch.equal(got[0], want)
    # The same square in a window twice as large, at twice the side: the same 2x2 block.
    got8 = window_mask_targets([square], torch.tensor([[-4.0, -4.0, 12.0, 12.0]]), 8)
    want8 = torch.zeros(8, 8, dtype=torch.bool)
    want8[3:5, 3:5] = True
    assert torch.equal(got8[0], want8)


def test_losses_hand_worked() -> None:
    # A 32x48 input with two levels (P2 8x12, P3 4x6), K = 3, mask sides (3, 5). GT (10, 10, 30, 30):
    # long side 20, so only 44-px P2 windows (44 - 4 <= 40) within one stride of (20, 20) match:
    # centres (20, 20), (16, 20), (24, 20), (20, 16), (20, 24) -> 5 positives.
    num_classes, k2, k3 = 3, (8, 12), (4, 6)
    logits = [torch.zeros(1, 2 * num_classes, *k2), torch.zeros(1, 2 * num_classes, *k3)]
    deltas = [torch.zeros(1, 8, *k2), torch.zeros(1, 8, *k3)]
    aligned = [[torch.zeros(1, 9, *k2), torch.zeros(1, 25, *k2)] for _ in range(2)]
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
            "labels": torch.tensor([2]),
            "polygons": [square],
        }
    ]
    losses = tensormask_losses(logits, deltas, aligned, targets, mask_sizes=(3, 5))
    entries = (96 + 24) * 2 * num_classes
    want_cls = (5 * 0.3 + (entries - 5) * 0.7) * math.log(2) / 3 / 5
    assert losses["loss_cls"].item() == pytest.approx(want_cls, rel=1e-5)
    want_box = (5 * 2 * 0.75 * math.log(44 / 20) + 4 * 1.5 * 4 / 44) / 5
    assert losses["loss_box_reg"].item() == pytest.approx(want_box, rel=1e-5)
    # λ = 1, m = 3: the natural masks of these windows read only in-range zeros (logit 0).
    centres = torch.tensor([[20.0, 20], [16, 20], [24, 20], [20, 16], [20, 24]])
    windows = torch.cat([centres - 22, centres + 22], dim=1)
    gt = window_mask_targets([square] * 5, windows, 3).float()
    per_pixel = (1.5 * gt + (1 - gt)) * math.log(2)
    want_mask = (2 * per_pixel.mean(dim=(1, 2))).sum().item() / 5
    assert losses["loss_mask"].item() == pytest.approx(want_mask, rel=1e-5)
    empty = tensormask_losses(
        logits,
        deltas,
        aligned,
        [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long(), "polygons": []}],
        mask_sizes=(3, 5),
    )
    assert empty["loss_box_reg"].item() == 0.0 and empty["loss_mask"].item() == 0.0
    assert empty["loss_cls"].item() == pytest.approx(entries * 0.7 * math.log(2) / 3, rel=1e-5)


def test_losses_backpropagate_to_the_head() -> None:
    head = _small_head()
    head.train()
    feats = _features()
    out = split_head_outputs(head(*feats), 3)
    aligned = head.aligned_masks(head.mask_towers(feats))
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
        "labels": torch.tensor([1]),
        "polygons": [[[10.0, 10.0, 30.0, 10.0, 30.0, 30.0]]],
    }
    losses = tensormask_losses(out[0], out[1], aligned, [target, target], mask_sizes=(3, 5))
    sum(losses.values()).backward()
    assert head.mask_pred_03.weight.grad.abs().sum() > 0
    assert head.bbox_pred.weight.grad.abs().sum() > 0


def _spec_checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """The 319 model-zoo names and shapes, written out from the spec's section 13."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_norm(name: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.norm.{leaf}"] = (cout,)

    conv_norm("backbone.bottom_up.stem.conv1", 64, 3, 7)
    cin = 64
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3), strict=True):
        width, cout = 64 * 2 ** (stage - 2), 256 * 2 ** (stage - 2)
        for j in range(blocks):
            prefix = f"backbone.bottom_up.res{stage}.{j}"
            conv_norm(f"{prefix}.conv1", width, cin, 1)
            conv_norm(f"{prefix}.conv2", width, width, 3)
            conv_norm(f"{prefix}.conv3", cout, width, 1)
            if j == 0:
                conv_norm(f"{prefix}.shortcut", cout, cin, 1)
            cin = cout

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    for level, c in zip(range(2, 6), (256, 512, 1024, 2048), strict=True):
        conv(f"backbone.fpn_lateral{level}", 256, c, 1)
        conv(f"backbone.fpn_output{level}", 256, 256, 3)
    conv("backbone.top_block.p6", 256, 2048, 3)
    conv("backbone.top_block.p7", 256, 256, 3)
    for i in (0, 2, 4, 6):
        conv(f"head.cls_subnet.{i}", 256, 256, 3)
        conv(f"head.bbox_subnet.{i}", 128, 256 if i == 0 else 128, 3)
        conv(f"head.mask_subnet.{i}", 128, 256 if i == 0 else 128, 3)
    conv("head.cls_score", 160, 256, 3)
    conv("head.bbox_pred", 8, 128, 3)
    conv("head.mask_pred_11", 121, 128, 1)
    conv("head.mask_pred_15", 225, 128, 1)
    conv("head.mask_fuse.0", 128, 128, 3)
    return shapes


def test_model_names_and_shapes_are_the_model_zoo_ones() -> None:
    want = _spec_checkpoint_shapes()
    assert len(want) == 319
    assert sum(math.prod(s) for s in want.values()) == 36_620_610
    with torch.device("meta"):
        model = TensorMask()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want


def test_from_detectron2_synthetic_pickle(tmp_path: Path) -> None:
    shapes = _spec_checkpoint_shapes()
    arrays = {k: np.full(s, i / 1000, np.float32) for i, (k, s) in enumerate(shapes.items())}
    arrays["anchor_generator.cell_anchors.0"] = np.zeros((2, 4), np.float32)
    arrays["pixel_mean"] = np.zeros((3, 1, 1), np.float32)
    path = tmp_path / "model_final.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": arrays, "__author__": "synthetic"}, f)
    model = TensorMask.from_detectron2(path)
    state = model.state_dict()
    names = list(shapes)
    for i in (0, 100, 318):
        assert torch.all(state[names[i]] == i / 1000)
    assert not model.training


def test_model_runs_end_to_end() -> None:
    model = get_entry("tensormask_r50_fpn").build().eval()
    torch.nn.init.zeros_(model.head.cls_score.bias)  # p ~ 0.5 everywhere: many candidates
    images = torch.randn(1, 3, 64, 96) * 50
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 18
    assert tuple(outputs[12].shape) == (1, 128, 16, 24)  # P2 mask tower
    (result,) = model.postprocess(outputs, [(60, 90)], [(120, 180)])
    assert 0 < len(result.scores) <= 100
    assert result.masks.shape == (len(result.scores), 120, 180) and result.masks.dtype == torch.bool
    assert torch.all(result.scores[:-1] >= result.scores[1:])
    assert result.boxes[:, 0::2].max() <= 180 and result.boxes[:, 1::2].max() <= 120
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]),
        "labels": torch.tensor([3]),
        "polygons": [[[10.0, 10.0, 40.0, 10.0, 40.0, 30.0, 10.0, 30.0]]],
    }
    losses = model.compute_loss(outputs, [target])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_retinanet_fpn_average_fusion_and_p6_p7_from_c5() -> None:
    fpn = ResNetFPN(fpn_fuse_type="avg", top_block="LastLevelP6P7").eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        p2, p3, p4, p5, p6, p7 = fpn(image)
        c = fpn.bottom_up(image)
        up = torch.nn.functional.interpolate
        t5 = fpn.fpn_lateral5(c["res5"])
        t4 = (fpn.fpn_lateral4(c["res4"]) + up(t5, scale_factor=2.0)) / 2
        t3 = (fpn.fpn_lateral3(c["res3"]) + up(t4, scale_factor=2.0)) / 2
        assert torch.allclose(p5, fpn.fpn_output5(t5), atol=1e-5)
        assert torch.allclose(p4, fpn.fpn_output4(t4), atol=1e-5)
        assert torch.allclose(p3, fpn.fpn_output3(t3), atol=1e-5)
        want6 = fpn.top_block.p6(c["res5"])
        assert torch.allclose(p6, want6, atol=1e-5)
        assert torch.allclose(p7, fpn.top_block.p7(want6.relu()), atol=1e-5)
    assert [tuple(p.shape[-2:]) for p in (p2, p6, p7)] == [(16, 16), (1, 1), (1, 1)]


def _onnx_max_diff(model: TensorMask, path: Path) -> float:
    pytest.importorskip("onnxruntime")
    from detseg.engine.export import export_model

    result = export_model(model, path, 64, 96)
    assert len(result["outputs"]) == 18
    return max(result["max_abs_diff"].values())


def test_onnx_export_of_the_light_model_matches_raw_head_outputs(tmp_path: Path) -> None:
    from detseg.instance.tensormask_training import LIGHT_KWARGS

    torch.manual_seed(0)
    assert _onnx_max_diff(TensorMask(num_classes=2, **LIGHT_KWARGS), tmp_path / "tm.onnx") <= 1e-4


@pytest.mark.slow
def test_onnx_export_matches_raw_head_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    assert _onnx_max_diff(TensorMask(), tmp_path / "tensormask.onnx") <= 1e-4


def test_window_bitmask_targets_hand_worked() -> None:
    masks = torch.zeros(2, 8, 10, dtype=torch.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[1, :, :] = 1
    windows = torch.tensor([[0.0, 0.0, 8.0, 8.0], [-8.0, -8.0, 8.0, 8.0]])
    got = window_bitmask_targets(masks, windows, 4)
    want0 = torch.zeros(4, 4, dtype=torch.bool)
    want0[1:3, 1:3] = True  # each 2x2-pixel bin averages exactly its four pixels
    assert torch.equal(got[0], want0)
    want1 = torch.zeros(4, 4, dtype=torch.bool)
    want1[2:, 2:] = True  # the window's top-left quarter lies outside the image: 0
    assert torch.equal(got[1], want1)


def test_losses_accept_bitmasks() -> None:
    logits = [torch.zeros(1, 6, 8, 12), torch.zeros(1, 6, 4, 6)]
    deltas = [torch.zeros(1, 8, 8, 12), torch.zeros(1, 8, 4, 6)]
    aligned = [[torch.zeros(1, 9, 8, 12), torch.zeros(1, 25, 8, 12)] for _ in range(2)]
    masks = torch.zeros(1, 32, 48, dtype=torch.uint8)
    masks[0, 10:30, 10:30] = 1
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    polygon = [[[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]]
    common = {"boxes": box, "labels": torch.tensor([0])}
    by_mask = tensormask_losses(logits, deltas, aligned, [{**common, "masks": masks}], (3, 5))
    by_poly = tensormask_losses(logits, deltas, aligned, [{**common, "polygons": polygon}], (3, 5))
    assert by_mask["loss_cls"] == by_poly["loss_cls"]
    # An axis-aligned square gives the same window targets either way.
    assert by_mask["loss_mask"].item() == pytest.approx(by_poly["loss_mask"].item(), rel=1e-6)


def test_d2_test_size_and_official_format() -> None:
    assert d2_test_size(480, 640) == (800, 1067)
    assert d2_test_size(500, 2000) == (333, 1333)
    entry = get_entry("tensormask_r50_fpn")
    assert entry.official is not None
    assert entry.official.preprocess({})["channel_order"] == "BGR"
    with pytest.raises(CheckpointError, match="not a TensorMask checkpoint"):
        convert_detectron2({"backbone.fpn_lateral2.weight": torch.zeros(1)})
    kwargs, _ = convert_detectron2(
        {
            "head.cls_score.weight": torch.zeros(6, 1, 3, 3),
            "head.mask_pred_11.weight": torch.zeros(1),
        }
    )
    assert kwargs == {"num_classes": 3}


def test_predict_image_glue_runs_tensormask() -> None:
    from detseg.data.preprocess import Preprocess
    from detseg.instance.polarmask_infer import predict_image

    model = TensorMask(num_classes=2).eval()
    torch.nn.init.zeros_(model.head.cls_score.bias)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    result = predict_image(model, image, Preprocess.from_dict(D2_PREPROCESS), input_size=(40, 56))
    assert result.masks.shape[1:] == (50, 70) and len(result.scores) > 0
    assert int(result.labels.max()) <= 1
