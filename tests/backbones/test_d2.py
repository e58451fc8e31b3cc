"""detectron2-named ResNet-50 FPN against the d2_r50fpn_backbone parity fixture."""

from __future__ import annotations

import torch

from detseg.backbones.d2 import ResNetFPN
from tests.parity import run_fixture


def test_backbone_parity(shared) -> None:
    diffs = run_fixture("d2_r50fpn_backbone")
    assert set(diffs) == {"p2", "p3", "p4", "p5", "p6"}
    assert max(diffs.values()) <= 1e-4, diffs


def test_shapes_and_key_names() -> None:
    model = ResNetFPN().eval()
    keys = model.state_dict().keys()
    assert "bottom_up.stem.conv1.norm.running_var" in keys
    assert "bottom_up.res5.2.conv3.weight" in keys and "fpn_lateral2.weight" in keys
    with torch.no_grad():
        outs = model(torch.zeros(1, 3, 64, 96))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
