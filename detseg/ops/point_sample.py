"""PointRend's point operations (detectron2 ``point_features.py`` semantics), plain torch.

Point coordinates are (x, y) in [0, 1]^2 relative to the full extent of the map they index:
0 and 1 are the outer edges, pixel i spans [i/W, (i+1)/W] and its centre is (i + 0.5)/W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from detseg.ops.parallel import parallel_map


def point_sample(input: Tensor, coords: Tensor, threads: int = 1, **kwargs: object) -> Tensor:
    """Bilinear samples of ``input`` (N, C, H, W) at ``coords`` (N, P, 2) or (N, Hg, Wg, 2).

    Returns (N, C, P) or (N, C, Hg, Wg): ``grid_sample(input, 2 * coords - 1)`` with zero padding
    and ``align_corners=False`` unless ``kwargs`` say otherwise. ``threads`` > N (flat coords):
    the points are sampled in ``threads`` pieces in parallel (``detseg.ops.parallel``): the CPU
    ``grid_sample`` spreads only the N maps over threads (one map: one thread). Same values.
    """
    flat = coords.dim() == 3
    grid = coords.unsqueeze(2) if flat else coords
    kwargs.setdefault("align_corners", False)

    def sample(points: Tensor) -> Tensor:
        return F.grid_sample(input, 2.0 * points - 1.0, **kwargs)

    if flat and threads > len(input) and input.device.type == "cpu":
        out = torch.cat(parallel_map(sample, grid.chunk(threads, dim=1), threads), dim=2)
    else:
        out = sample(grid)
    return out.squeeze(3) if flat else out


def regular_grid(num: int, side: int, device: torch.device | None = None) -> Tensor:
    """The side^2 cell centres ``((j + 0.5)/side, (i + 0.5)/side)``, x fastest: (num, side^2, 2).

    Computed through ``affine_grid`` as detectron2 does, so the float32 values are the same bits.
    """
    theta = torch.tensor([[[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]], device=device)
    grid = F.affine_grid(theta, [1, 1, side, side], align_corners=False)
    return grid.view(1, -1, 2).expand(num, -1, -1)


def uncertain_points_on_grid(uncertainty: Tensor, num_points: int) -> tuple[Tensor, Tensor]:
    """The ``min(H*W, num_points)`` most uncertain cells of ``uncertainty`` (R, 1, H, W).

    Returns flat cell indices (R, P) int64 and their centres (R, P, 2) in [0, 1]^2.
    """
    r, _, h, w = uncertainty.shape
    k = min(h * w, num_points)
    idx = torch.topk(uncertainty.view(r, h * w), k=k, dim=1)[1]
    if torch.onnx.is_in_onnx_export():  # keep H, W symbolic: float(w) would freeze the trace size
        x = ((idx % w).to(torch.float) + 0.5) / w
        y = (torch.div(idx, w, rounding_mode="floor").to(torch.float) + 0.5) / h
        return idx, torch.stack((x, y), dim=2)
    w_step, h_step = 1.0 / float(w), 1.0 / float(h)
    coords = torch.zeros(r, k, 2, dtype=torch.float, device=uncertainty.device)
    coords[:, :, 0] = w_step / 2.0 + (idx % w).to(torch.float) * w_step
    coords[:, :, 1] = h_step / 2.0 + (idx // w).to(torch.float) * h_step
    return idx, coords


def uncertain_points_with_randomness(
    coarse_logits: Tensor,
    uncertainty_fn: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training point selection: (R, num_points, 2) box-normalised coordinates.

    Draws ``oversample_ratio * num_points`` uniform points, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain (``uncertainty_fn`` of the
    logits sampled there: (R, C, P) -> (R, 1, P)) and fills the rest with fresh uniform points.
    """
    r = coarse_logits.shape[0]
    kw = {"device": coarse_logits.device, "dtype": coarse_logits.dtype, "generator": generator}
    sampled = int(num_points * oversample_ratio)
    coords = torch.rand(r, sampled, 2, **kw)
    uncertainty = uncertainty_fn(point_sample(coarse_logits, coords))
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rest = num_points - num_uncertain
    if rest > 0:
        picked = torch.cat([picked, torch.rand(r, rest, 2, **kw)], dim=1)
    return picked


def box_points_to_image(boxes: Tensor, coords: Tensor) -> Tensor:
    """Box-normalised ``coords`` (R, P, 2) inside ``boxes`` (R, 4) xyxy -> image pixels (R, P, 2)."""
    x = coords[:, :, 0] * (boxes[:, None, 2] - boxes[:, None, 0]) + boxes[:, None, 0]
    y = coords[:, :, 1] * (boxes[:, None, 3] - boxes[:, None, 1]) + boxes[:, None, 1]
    return torch.stack((x, y), dim=2)
