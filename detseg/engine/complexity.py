"""Model size and cost without running it: parameters and FLOPs counted on the ``meta`` device."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (learnable or frozen) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _image_inputs(model: nn.Module) -> int:
    """How many required positional inputs ``forward`` takes (matting: photo + background)."""
    params = inspect.signature(model.forward).parameters.values()
    required = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return max(len(required), 1)


def count_flops(
    model: nn.Module, height: int = 512, width: int = 512, device: str | torch.device = "meta"
) -> int:
    """FLOPs (2 x multiply-accumulates) of one eval-mode forward pass on (1, 3, H, W) images.

    ``model`` lives on ``device``; on ``meta`` (the default) nothing is computed, only counted.
    Every required positional input of ``forward`` gets its own (1, 3, H, W) image. Counts the
    operations ``torch.utils.flop_counter`` knows (convolutions, matrix products, attention).
    """
    images = [torch.empty(1, 3, height, width, device=device) for _ in range(_image_inputs(model))]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(*images)
    return counter.get_total_flops()
