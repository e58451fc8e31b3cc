"""Mask R-CNN / PointRend training: targets and losses on hand-made cases, a learning step."""

from __future__ import annotations

import math

import pytest
import torch

from detseg.instance.maskrcnn import MaskRCNN
from detseg.instance.pointrend import PointRendRCNN, point_labels
from detseg.instance.roi_heads import RoIHeads, crop_masks, fast_rcnn_losses, mask_rcnn_loss
from detseg.instance.rpn import RPN, apply_deltas, get_deltas


def test_get_deltas_inverts_apply_deltas() -> None:
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 7.0, 9.0]])
    targets = torch.tensor([[12.0, 18.0, 60.0, 44.0], [1.0, 2.0, 5.0, 12.0]])
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = get_deltas(boxes, targets, weights)
    assert torch.allclose(apply_deltas(deltas, boxes, weights), targets, atol=1e-4)
    # dx = wx * (centre shift) / width, by hand for the first box
    assert deltas[0, 0].item() == pytest.approx(10 * (36 - 30) / 40)


def test_anchor_labels_thresholds_and_low_quality_ties() -> None:
    rpn = RPN()
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 12.0],  # IoU 10/12 = 0.83 with GT 0: positive
            [0.0, 0.0, 10.0, 20.0],  # 0.5: ignored
            [0.0, 0.0, 10.0, 40.0],  # 0.25: negative
            [100.0, 100.0, 110.0, 130.0],  # 1/3 with GT 1, its best: positive (low quality)
            [100.0, 80.0, 110.0, 110.0],  # the same 1/3: a tie, also positive
            [200.0, 200.0, 210.0, 210.0],  # 0: negative
        ]
    )
    labels, matched = rpn.label_anchors(anchors, gt)
    assert labels.tolist() == [1, -1, 0, 1, 1, 0]
    assert torch.equal(matched[[0, 3, 4]], gt[[0, 1, 1]])
    labels, _ = rpn.label_anchors(anchors, torch.zeros(0, 4))
    assert labels.tolist() == [0] * 6


def test_rpn_losses_by_hand() -> None:
    """Zero weights: every logit and delta is 0, so both losses follow from the labels alone."""
    rpn = RPN(in_channels=4)
    for p in rpn.parameters():
        torch.nn.init.zeros_(p)
    feats = [torch.zeros(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    _, losses = rpn.losses(feats, [(64, 64)], [gt])
    anchors = torch.cat(rpn.anchor_generator(*feats))
    labels, matched = rpn.label_anchors(anchors, gt)
    pos = labels == 1
    assert 0 < int(pos.sum()) < 128  # all positives are sampled, 256 anchors in all
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), rel=1e-5)
    target = get_deltas(anchors[pos], matched[pos], (1, 1, 1, 1)).abs().sum() / 256
    assert losses["loss_rpn_loc"].item() == pytest.approx(target.item(), rel=1e-5)


def test_roi_sampling_appends_gt_and_caps_foreground() -> None:
    heads = RoIHeads(num_classes=3, in_channels=8, box_fc_dim=16, mask_conv_dim=8)
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 50.0]])
    boxes, classes, matched, index = heads.label_and_sample(
        torch.zeros(0, 4), gt, torch.tensor([2, 0])
    )
    assert torch.equal(boxes, gt) and classes.tolist() == [2, 0] and index.tolist() == [0, 1]
    assert torch.equal(matched, gt)
    # 600 near-copies of GT 0 and 600 far boxes: 512 kept, 128 foreground at most
    near = gt[:1].repeat(600, 1) + torch.rand(600, 1)
    far = torch.tensor([[100.0, 100.0, 120.0, 120.0]]).repeat(600, 1)
    _, classes, _, _ = heads.label_and_sample(torch.cat([near, far]), gt, torch.tensor([2, 0]))
    assert len(classes) == 512 and int((classes < 3).sum()) == 128


def test_fast_rcnn_losses_by_hand() -> None:
    scores = torch.zeros(4, 3)  # K = 2, background 2
    classes = torch.tensor([0, 1, 2, 2])
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    gt = torch.tensor([[1.0, 0.0, 11.0, 10.0]] * 4)
    deltas = torch.zeros(4, 8)
    losses = fast_rcnn_losses(scores, deltas, proposals, classes, gt)
    assert losses["loss_cls"].item() == pytest.approx(math.log(3))
    # two foreground RoIs, each |dx| = 10 * 1 / 10 = 1, divided by the 4 sampled RoIs
    assert losses["loss_box_reg"].item() == pytest.approx(2 * 1.0 / 4)


def test_crop_masks_and_mask_loss() -> None:
    masks = torch.zeros(1, 40, 40, dtype=torch.uint8)
    masks[0, 10:30, 10:20] = 1  # left half of the box below
    crop = crop_masks(masks, torch.tensor([0]), torch.tensor([[10.0, 10.0, 30.0, 30.0]]), 4)
    assert crop[0].tolist() == [[1, 1, 0, 0]] * 4
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1] = 100 * (2 * crop[0] - 1)  # class 1 predicts the crop exactly
    assert mask_rcnn_loss(logits, torch.tensor([1]), crop).item() < 1e-6
    assert mask_rcnn_loss(logits, torch.tensor([0]), crop).item() == pytest.approx(math.log(2))


def test_point_labels_are_soft_at_the_edge() -> None:
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, :, :4] = 1
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    coords = torch.tensor([[[0.25, 0.5], [0.5, 0.5], [0.75, 0.5]]])  # x = 2, 4, 6 pixels
    labels = point_labels([masks], [torch.tensor([0])], boxes, coords)
    assert labels[0].tolist() == pytest.approx([1.0, 0.5, 0.0])


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 96, 128, generator=g) * 255
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 20:70, 30:90] = 1
    images[0, :, 20:70, 30:90] = 250.0
    targets = [
        {
            "boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0]]),
            "labels": torch.tensor([0]),
            "masks": masks[:1],
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 64, 96, dtype=torch.uint8),
        },
    ]
    return images, torch.tensor([[96, 128], [64, 96]]), targets


@pytest.mark.parametrize("cls", [MaskRCNN, PointRendRCNN])
def test_gradient_steps_reduce_the_loss(cls: type[MaskRCNN]) -> None:
    torch.manual_seed(0)
    model = cls(
        num_classes=1,
        backbone="mobilenet_v2",
        fpn_channels=16,
        box_fc_dim=32,
        mask_conv_dim=16,
        roi_batch_size_per_image=64,
    ).train()
    images, sizes, targets = _batch()
    names = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    if cls is PointRendRCNN:
        names.add("loss_mask_point")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(8):
        torch.manual_seed(1)  # the same anchors/RoIs/points every step
        losses = model.compute_loss(images, sizes, targets)
        assert set(losses) == names
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total))
    assert totals[-1] < 0.8 * totals[0], totals


def test_light_backbone_keeps_detectron2_names() -> None:
    model = MaskRCNN(num_classes=1, backbone="mobilenet_v2")
    keys = model.state_dict().keys()
    assert "backbone.fpn_lateral2.weight" in keys and "backbone.fpn_output5.bias" in keys
    assert "backbone.bottom_up.features.0.0.weight" in keys  # torchvision MobileNetV2 names
    assert "roi_heads.mask_head.mask_fcn4.weight" in keys
    feats = model.backbone(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 16, 24),
        (1, 64, 8, 12),
        (1, 64, 4, 6),
        (1, 64, 2, 3),
        (1, 64, 1, 2),
    ]
    assert model.roi_heads.box_head.fc1.out_features == 256
