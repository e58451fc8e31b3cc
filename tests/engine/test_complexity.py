"""Parameters and FLOPs counted on the meta device, against hand-worked counts and spec table 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detseg.api import _complexity
from detseg.engine.complexity import count_flops, count_parameters
from detseg.registry import ModelEntry, get_entry


class _TwoInputs(nn.Module):
    """A matting-like forward(photo, background): one 1x1 conv (3 -> 4, no bias) on each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)

    def forward(self, photo: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        return self.conv(photo) + self.conv(background)


class _DataDependent(nn.Module):
    """Output size depends on the values (nonzero): no meta-device count exists."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(self.conv(x))


def test_flops_are_twice_the_multiply_accumulates():
    with torch.device("meta"):
        conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        two = _TwoInputs()
    assert count_flops(conv, 64, 32) == 2 * (8 * 3 * 9) * 64 * 32
    assert count_flops(two, 10, 20) == 2 * 2 * (4 * 3) * 10 * 20  # both inputs counted
    assert count_parameters(conv) == 8 * 3 * 9 + 8


def test_models_table_row_matches_spec_table_zero():
    """fcn8s_resnet18 at C = 21: 11,195,391 params and 9.5 GMACs at 512^2 (spec table 0)."""
    params, gflops = _complexity(get_entry("fcn8s_resnet18"))
    assert params == 11_195_391
    assert gflops / 2 == pytest.approx(9.5, abs=0.05)


def test_data_dependent_forward_has_no_flops_but_keeps_params():
    entry = ModelEntry("nonzero_net", "semantic", _DataDependent, "test")
    assert _complexity(entry) == (4, None)
