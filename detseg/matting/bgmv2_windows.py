"""BackgroundMattingV2's fast path: windows of resized maps, tiles of refined cells, in-place pastes.

What ``Refiner._refine_fast`` and ``MattingRefine.forward`` use under ``fast_inference``
(``detseg.engine.fast``): every function computes what the reference path computes on full-size
maps (``F.interpolate``, crops of zero-padded maps, concatenations), on the windows around the
selected cells only. See docs/performance.md ("BGMv2's fast path").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from detseg.matting.bgmv2 import Decoder


def bilinear_taps(dst: Tensor, in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear (``align_corners=False``) taps of output positions ``dst`` (int64, in
    [0, out_size)) of a resize from ``in_size``: source indices ``i0 <= i1`` and the weight of ``i1``
    (float32), the arithmetic of ``F.interpolate``."""
    src = ((dst.to(torch.float32) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    return i0, (i0 + 1).clamp(max=in_size - 1), src - i0


def shrink(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear")`` (``align_corners=False``) to a smaller
    ``size``, by gathering the rows and columns it reads.

    The fast path's downsampling of the full-resolution photo and plate: on the CPU,
    ``F.interpolate`` copies a contiguous NCHW input to channels-last first, which costs more
    than the resize itself (3x the time for a 3-channel 1920x1080 frame). Each output pixel is
    PyTorch's ``h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)`` with the same taps
    (``bilinear_taps``), so the result matches within float rounding. x (B, C, h, w) float.
    """
    h, w = x.shape[-2:]
    r0, r1, wr = bilinear_taps(torch.arange(size[0], device=x.device), h, size[0])
    c0, c1, wc = bilinear_taps(torch.arange(size[1], device=x.device), w, size[1])
    wr, wc = wr.to(x.dtype)[:, None], wc.to(x.dtype)

    def across(rows: Tensor) -> Tensor:  # the column lerp of the picked rows
        return pick(rows, 3, c0) * (1.0 - wc) + pick(rows, 3, c1) * wc

    top, bottom = across(pick(x, 2, r0)), across(pick(x, 2, r1))
    return top.mul_(1.0 - wr).add_(bottom.mul_(wr))


def pick(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x.index_select(dim, index)``, as a strided view when ``index`` is evenly spaced (an
    integer scale factor: 1920 -> 480 reads columns 1, 5, 9, ...), so nothing is gathered."""
    if len(index) > 1:
        step = int(index[1] - index[0])
        start = int(index[0])
        if step > 0 and torch.equal(
            index, start + step * torch.arange(len(index), device=index.device)
        ):
            return x.narrow(dim, start, step * (len(index) - 1) + 1)[
                (slice(None),) * dim + (slice(None, None, step),)
            ]
    return x.index_select(dim, index)


def resize_matrix(dst: Tensor, in_size: int, out_size: int) -> tuple[Tensor, Tensor]:
    """Per-window 1-D resize matrices for the windows ``dst`` (P, win) of output positions (outside
    [0, out_size) allowed: their rows are zero): ``(start (P, 1), A (P, win, L) float32)`` such that
    output row ``dst[p, r]`` is ``sum_k A[p, r, k] * input[start[p] + k]``."""
    inside = ((dst >= 0) & (dst < out_size)).to(torch.float32)
    i0, i1, w1 = bilinear_taps(dst.clamp(0, out_size - 1), in_size, out_size)
    start = i0.min(dim=1, keepdim=True).values
    length = int((i1 - start).max()) + 1
    a = torch.zeros((*dst.shape, length), dtype=torch.float32, device=dst.device)
    a.scatter_add_(2, (i0 - start)[..., None], ((1.0 - w1) * inside)[..., None])
    a.scatter_add_(2, (i1 - start)[..., None], (w1 * inside)[..., None])
    return start, a


def resized_crop(
    maps: Tensor | Sequence[Tensor | ConvWindows],
    cells: Tensor,
    size: int,
    pad: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """The windows of ``bgmv2._crop(F.interpolate(x, out_hw), cells, size, pad)`` (bilinear)
    without making the resized map, for ``x`` the concatenation of ``maps`` along channels
    (without making it either).

    maps: (B, C_k, h, w) each -> (P, sum C_k, win, win), ``win = size + 2*pad``, stored
    channels-last (what the fast path's convolutions read, and what ``torch.cat`` of such
    windows keeps): each window gathers the few input rows and columns it needs and applies its
    two bilinear resize matrices (batched matrix products), so the cost follows the windows,
    not the image size. ``out_hw`` equal to the maps' size makes it a plain crop (a gather).
    """
    maps = [maps] if isinstance(maps, Tensor) else list(maps)
    h, w = maps[0].shape[-2:]
    device = maps[0].device
    offsets = torch.arange(-pad, size + pad, device=device)
    rows_out, cols_out = cells[:, 1:2] * size + offsets, cells[:, 2:3] * size + offsets  # (P, win)
    if out_hw == (h, w):  # a plain crop: zeros outside the image
        window = gather_windows(
            maps, cells[:, 0], rows_out.clamp(0, h - 1), cols_out.clamp(0, w - 1)
        )
        return zero_outside(window, rows_out, cols_out, h, w).permute(0, 3, 1, 2)
    row0, rows = resize_matrix(rows_out, h, out_hw[0])
    col0, cols = resize_matrix(cols_out, w, out_hw[1])
    p, win, lr, lc = rows.shape[0], rows.shape[1], rows.shape[-1], cols.shape[-1]
    r = (row0 + torch.arange(lr, device=device)).clamp(max=h - 1)  # (P, lr)
    q = (col0 + torch.arange(lc, device=device)).clamp(max=w - 1)  # (P, lc)
    window = gather_windows(maps, cells[:, 0], r, q)  # (P, lr, lc, C)
    c = window.shape[-1]
    half = torch.matmul(rows.to(window.dtype), window.view(p, lr, lc * c))  # (P, win, lc * C)
    across = cols.to(window.dtype).repeat_interleave(win, dim=0)  # (P * win, win, lc)
    out = torch.bmm(across, half.view(p * win, lc, c)).view(p, win, win, c)
    return out.permute(0, 3, 1, 2)


def zero_outside(window: Tensor, rows: Tensor, cols: Tensor, h: int, w: int) -> Tensor:
    """window (P, R, Q, C) gathered at clamped ``rows`` (P, R) and ``cols`` (P, Q) of an h x w
    map -> the same with zeros where the unclamped position lies outside the map (in place;
    only the windows reaching outside are touched)."""
    rows_in, cols_in = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    edge = torch.nonzero(~(rows_in.all(1) & cols_in.all(1))).squeeze(1)
    if edge.numel():
        inside = rows_in[edge][:, :, None] & cols_in[edge][:, None, :]
        window[edge] = window[edge] * inside[..., None].to(window.dtype)
    return window


def gather_windows(
    maps: list[Tensor | ConvWindows], batch: Tensor, rows: Tensor, cols: Tensor
) -> Tensor:
    """maps (B, C_k, h, w), per window its image (P,), rows (P, R) and columns (P, Q) in range ->
    (P, R, Q, sum C_k) contiguous. A map whose channels are adjacent in memory (channels-last, or
    a channel slice of such a map) is gathered pixel vector by pixel vector, any other element by
    element from its NCHW planes; no map is copied."""
    b, _, h, w = maps[0].shape
    pixel = (batch[:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]  # (P, R, Q)
    parts, plane_index = [], {}  # plane_index: per channel count, shared by the maps having it
    for x in maps:
        if isinstance(x, ConvWindows):
            parts.append(x.windows(batch, rows, cols))
            continue
        c, step = x.shape[1], x.stride(3)  # step: elements from one pixel to the next
        if c > 1 and x.stride(1) == 1 and x.stride(2) == w * step and x.stride(0) == h * w * step:
            pixels = x.as_strided((b * h * w, c), (step, 1))
            parts.append(pixels.index_select(0, pixel.reshape(-1)).view(*pixel.shape, c))
            continue
        if c not in plane_index:
            planes = torch.arange(c, device=x.device) * (h * w)  # offset of channel k in image 0
            index = (pixel + batch[:, None, None] * ((c - 1) * h * w))[..., None] + planes
            plane_index[c] = index.reshape(-1)
        window = x.contiguous().view(-1).index_select(0, plane_index[c])
        parts.append(window.view(*pixel.shape, c))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class ConvWindows:
    """The ReLU'd output ``channels`` of the decoder's last convolution (3 x 3, padding 1) on the
    concatenation of its inputs ``maps`` (B, C_k, h, w), computed only on the windows
    ``gather_windows`` asks for.

    The fast path's hidden decoder channels: they feed nothing but the refiner's windows, a
    fifth of the coarse map at HD, so the decoder's widest convolution runs on those alone.
    """

    def __init__(self, decoder: Decoder, maps: tuple[Tensor, Tensor], channels: slice) -> None:
        self.decoder, self.maps, self.channels = decoder, list(maps), channels
        self.weight = decoder.conv4.weight[channels]
        self.bias = decoder.conv4.bias[channels]
        b, _, h, w = maps[0].shape
        self.shape = torch.Size((b, self.weight.shape[0], h, w))
        self.device = maps[0].device

    def dense_if_cheaper(self, count: int, side: int) -> Tensor | ConvWindows:
        """Itself, or the whole output map (B, C, h, w) when ``count`` windows of ``side`` x
        ``side`` pixels would cover (with their halo) more than half of the map: scattered
        cells then overlap little, and one dense convolution costs less than the windows."""
        if count * (side + 2) ** 2 <= self.shape[-2] * self.shape[-1] // 2:
            return self
        return self.decoder.last_conv(*self.maps, self.channels).relu_()

    def windows(self, batch: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Windows (image (P,), rows (P, R), columns (P, Q), in range, each window's rows within
        R consecutive ones and columns within Q) -> (P, R, Q, C) outputs."""
        h, w = self.shape[-2:]
        top, left = rows.min(1, keepdim=True).values, cols.min(1, keepdim=True).values
        span_r = top + torch.arange(-1, rows.shape[1] + 1, device=rows.device)  # (P, R + 2)
        span_c = left + torch.arange(-1, cols.shape[1] + 1, device=cols.device)
        x = gather_windows(self.maps, batch, span_r.clamp(0, h - 1), span_c.clamp(0, w - 1))
        x = zero_outside(x, span_r, span_c, h, w)  # the convolution's zero padding
        out = F.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias).relu_().permute(0, 2, 3, 1)
        picked = torch.arange(rows.shape[0], device=rows.device)[:, None, None]
        return out[picked, (rows - top)[:, :, None], (cols - left)[:, None, :]]


def paste_cells_(x: Tensor, cells: Tensor, patches: Tensor) -> None:
    """In place: block (b, i, j) of ``cells`` of ``x`` (B, C, H, W) (contiguous) becomes
    ``patches`` (P, C, 4, 4); one scatter into the flat storage, no copy of ``x``."""
    _, c, h, w = x.shape
    d = torch.arange(4, device=x.device)
    pixels = ((cells[:, 1, None] * 4 + d) * w)[:, :, None] + (cells[:, 2, None] * 4 + d)[:, None]
    planes = cells[:, 0, None] * c + torch.arange(c, device=x.device)  # (P, C)
    index = planes[:, :, None] * (h * w) + pixels.reshape(-1, 1, 16)  # (P, C, 16)
    x.view(-1).index_put_((index.reshape(-1),), patches.reshape(-1).to(x.dtype))


def halve(x: Tensor) -> Tensor:
    """(P, C, 2h, 2w) -> (P, C, h, w) means of 2x2 blocks, summed as ``F.interpolate``'s
    bilinear 2x downsample weighs them (columns, then rows)."""
    pairs = x[..., 0::2] + x[..., 1::2]
    return (pairs[..., 0::2, :] + pairs[..., 1::2, :]).mul_(0.25)


def nearest2x_beside(x: Tensor, other: Tensor) -> Tensor:
    """``torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), other], dim=1)`` written
    once, channels-last: x (P, C, h, w), other (P, D, 2h, 2w) -> (P, C + D, 2h, 2w)."""
    n, c, h, w = x.shape
    out = x.new_empty((n, 2 * h, 2 * w, c + other.shape[1]))
    nearest = out[..., :c].unflatten(1, (h, 2)).unflatten(3, (w, 2))  # (P, h, 2, w, 2, C)
    nearest.copy_(x.permute(0, 2, 3, 1)[:, :, None, :, None, :])
    out[..., c:].copy_(other.permute(0, 2, 3, 1))
    return out.permute(0, 3, 1, 2)


def _tile_grid(grid: tuple[int, int], t: int) -> tuple[int, int]:
    """Rows and columns of ``t`` x ``t`` tiles covering a (Hq, Wq) cell grid."""
    return -(-grid[0] // t), -(-grid[1] // t)


def tile_keys(cells: Tensor, grid: tuple[int, int], t: int) -> Tensor:
    """(P,) row-major index of the ``t`` x ``t`` tile of each cell (b, i, j) of a (Hq, Wq) grid."""
    tiles_h, tiles_w = _tile_grid(grid, t)
    return (cells[:, 0] * tiles_h + cells[:, 1] // t) * tiles_w + cells[:, 2] // t


def group_tiles(cells: Tensor, grid: tuple[int, int], t: int) -> tuple[Tensor, Tensor, Tensor]:
    """Square tiles of ``t`` x ``t`` cells covering ``cells`` (P, 3) (b, i, j) of a (Hq, Wq) grid.

    Returns ``(tiles (N, 3), cells (P, 3), first (N + 1,))``, int64: the tiles (b, ti, tj) holding
    a cell, row-major; the cells grouped by tile (tile n holds ``cells[first[n]:first[n + 1]]``).
    """
    key, order = tile_keys(cells, grid, t).sort(stable=True)
    unique, counts = torch.unique_consecutive(key, return_counts=True)
    tiles_h, tiles_w = _tile_grid(grid, t)
    tiles = torch.stack(
        [unique // (tiles_h * tiles_w), unique // tiles_w % tiles_h, unique % tiles_w], dim=1
    )
    first = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return tiles, cells[order], first
