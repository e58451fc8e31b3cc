"""SwapAlign2Nat: TensorMask's aligned -> natural mask-tensor conversion, in plain PyTorch.

The op (detectron2 ``projects/TensorMask``, a CUDA-only kernel there) is a 4-D multilinear
interpolation: each output element (n, v, u, y, x) reads two taps (floor and ceil, linear weights)
on each of four coordinates,

- spatial ``oy = λ·y + v − Vout/2 + 0.5``, ``ox = λ·x + u − Uout/2 + 0.5`` (input-grid units),
- mask ``ov = (v + 0.5)/λ − 0.5``, ``ou = (u + 0.5)/λ − 0.5`` (input mask-pixel units),

and sums the 16 weighted values ``X[n, v'·Vin + u', y', x']``. A tap with any index out of range
reads ``pad_val`` (nothing is clamped). Since the 16 weights sum to 1 this equals
``pad + Σ w·[in range]·(X − pad)``, which is what is computed here; autograd then gives exactly the
kernel's backward (gradients reach in-range taps only). Coordinates and weights are formed in
float32, like the kernel, and cast to the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_PAD = -6.0


def _taps(coord: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Floor/ceil taps of float32 ``coord``: [(index clamped to [0, size), weight or 0 if out)]."""
    low = torch.floor(coord)
    frac = coord - low
    low = low.long()
    taps = []
    for index, weight in ((low, 1.0 - frac), (low + 1, frac)):
        inside = (index >= 0) & (index < size)
        taps.append((index.clamp(0, max(size - 1, 0)), weight * inside))
    return taps


def _check(x: torch.Tensor, lambda_val: int) -> int:
    """Validate the op's arguments; returns Vin = sqrt(C)."""
    if x.dim() != 4:
        raise ValueError(f"swap_align2nat expects (N, C, H, W), got shape {tuple(x.shape)}")
    vin = math.isqrt(x.shape[1])
    if vin * vin != x.shape[1]:
        raise ValueError(f"swap_align2nat needs a square channel count, got C={x.shape[1]}")
    if not isinstance(lambda_val, int) or lambda_val < 1:
        raise ValueError(f"lambda_val must be an int >= 1, got {lambda_val!r}")
    return vin


def _sample(
    x: torch.Tensor,
    lambda_val: int,
    pad_val: float,
    n: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    xo: torch.Tensor,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Evaluate the op at output elements given by broadcastable int64 index tensors.

    Args:
        x: (N, Vin², H, W) aligned input, or a crop of it whose top-left input pixel is
            ``origin`` (y0, x0) of the full map (see :func:`swap_align2nat_windows`).
        n, v, u, y, xo: output batch index, mask row, mask column, output row, output column;
            any shapes that broadcast together.

    Returns:
        The output values, of the broadcast shape, dtype of ``x``.
    """
    vin = _check(x, lambda_val)
    height, width = x.shape[2:]
    vout = lambda_val * vin
    half = vout / 2.0 - 0.5
    f32 = torch.float32
    oy = (lambda_val * y + v - origin[0]).to(f32) - half
    ox = (lambda_val * xo + u - origin[1]).to(f32) - half
    ov = (v.to(f32) + 0.5) / lambda_val - 0.5
    ou = (u.to(f32) + 0.5) / lambda_val - 0.5
    shifted = x - pad_val
    out = None
    for yi, wy in _taps(oy, height):
        for xi, wx in _taps(ox, width):
            for vi, wv in _taps(ov, vin):
                for ui, wu in _taps(ou, vin):
                    weight = (wy * wx * wv * wu).to(x.dtype)
                    term = weight * shifted[n, vi * vin + ui, yi, xi]
                    out = term if out is None else out + term
    return out + pad_val


def swap_align2nat(x: torch.Tensor, lambda_val: int, pad_val: float = DEFAULT_PAD) -> torch.Tensor:
    """Dense SwapAlign2Nat.

    Args:
        x: (N, V², H, W) float, aligned representation (channel v'·V + u').
        lambda_val: λ ≥ 1, the level's unit-length ratio (2^k in the TensorMask bipyramid).
        pad_val: logit read for every out-of-range tap (−6 in TensorMask).

    Returns:
        (N, (λV)², ceil(H/λ), ceil(W/λ)) natural representation, channel v·λV + u, dtype of ``x``.
    """
    vin = _check(x, lambda_val)
    batch, _, height, width = x.shape
    vout = lambda_val * vin
    hout, wout = -(-height // lambda_val), -(-width // lambda_val)
    dev = x.device
    if batch * hout * wout == 0:
        return x.new_empty(batch, vout * vout, hout, wout)

    def axis(size: int, dim: int) -> torch.Tensor:
        shape = [1] * 5
        shape[dim] = size
        return torch.arange(size, device=dev).view(shape)

    n, v, u, y, xo = axis(batch, 0), axis(vout, 1), axis(vout, 2), axis(hout, 3), axis(wout, 4)
    out = _sample(x, lambda_val, pad_val, n, v, u, y, xo)
    out = out.expand(batch, vout, vout, hout, wout)
    return out.reshape(batch, vout * vout, hout, wout)


def input_span(
    lambda_val: int, vin: int, out_index: int, first: int, last: int, size: int
) -> tuple[int, int]:
    """Input rows [lo, hi) (clipped to [0, size)) that natural rows ``first..last-1`` of the
    window at output row ``out_index`` read; the same formula gives columns.

    A crop of the aligned map over this span (and the matching column span) holds every
    in-range tap of those rows, so :func:`swap_align2nat_windows` on the crop with
    ``origin=(lo, ...)`` gives exactly the dense op's values.
    """
    half = lambda_val * vin / 2.0 - 0.5
    lo = math.floor(lambda_val * out_index + first - half)
    hi = math.floor(lambda_val * out_index + last - 1 - half) + 2
    return max(lo, 0), min(hi, size)


def swap_align2nat_windows(
    x: torch.Tensor,
    lambda_val: int,
    batch_index: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    pad_val: float = DEFAULT_PAD,
    *,
    origin: tuple[int, int] = (0, 0),
    v_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SwapAlign2Nat evaluated only at selected output locations (inference, training positives).

    Args:
        x: (N, V², H, W) aligned representation, or a crop of it starting at input pixel
            ``origin`` (y0, x0); a tap outside ``x`` reads ``pad_val``, which is exact when the
            crop covers the :func:`input_span` of every requested window.
        batch_index, rows, cols: (K,) int64, the output locations (n, y, x) with
            y < ceil(H_full/λ), x < ceil(W_full/λ), in full-map output coordinates.
        v_rows: (start, stop) natural mask rows to evaluate (default all λV).

    Returns:
        (K, stop − start, λV) natural masks (row v, column u); equal to
        ``swap_align2nat(x_full, λ, pad)[n, :, y, x].view(λV, λV)[start:stop]`` at each location.
    """
    vout = lambda_val * _check(x, lambda_val)
    start, stop = v_rows or (0, vout)
    if batch_index.numel() == 0:
        return x.new_empty(0, stop - start, vout)
    grid = torch.arange(vout, device=x.device)
    return _sample(
        x,
        lambda_val,
        pad_val,
        batch_index.view(-1, 1, 1),
        grid[start:stop].view(1, -1, 1),
        grid.view(1, 1, -1),
        rows.view(-1, 1, 1),
        cols.view(-1, 1, 1),
        origin,
    ).expand(batch_index.numel(), stop - start, vout)


class SwapAlign2Nat(nn.Module):
    """Module form of :func:`swap_align2nat` (no parameters)."""

    def __init__(self, lambda_val: int, pad_val: float = DEFAULT_PAD) -> None:
        super().__init__()
        self.lambda_val = lambda_val
        self.pad_val = pad_val

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, V², H, W) -> (N, (λV)², ceil(H/λ), ceil(W/λ))."""
        return swap_align2nat(x, self.lambda_val, self.pad_val)

    def extra_repr(self) -> str:
        return f"lambda_val={self.lambda_val}, pad_val={self.pad_val}"
