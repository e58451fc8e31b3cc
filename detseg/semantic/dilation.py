"""Per-conv dilation schedules for the dilated ResNet stages (PSPNet "all" style, DUC's HDC)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def set_rates(stage: nn.Module, rates: Sequence[int]) -> None:
    """Give the 3x3 convs of ``stage``, in order, the dilations ``rates`` cycled (padding = rate).

    Strides are untouched: call this on a stage that ``build_backbone`` already dilated. For
    Bottleneck stages that is one rate per block; BasicBlock stages take two per block.
    """
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    for i, conv in enumerate(convs):
        r = rates[i % len(rates)]
        conv.dilation, conv.padding = (r, r), (r, r)
