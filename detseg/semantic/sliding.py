"""Semantic segmentation inference: the whole image at once, or sliding windows for images of any size.

Sliding windows of ``crop`` pixels move by ``stride``; the last window of each row and column is
shifted back inside the image, so no window is padded unless the image is smaller than the crop
(then the window is the image itself, padded like a whole image to a multiple of ``size_divisor``).
Overlapping windows' logits are averaged. Memory is bounded by the crop batch and one band of
``crop`` image rows: rows that no later window touches are decided (softmax, argmax) and dropped
from the accumulator, so no ``(C, H, W)`` float tensor of the whole image is ever held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detseg.data.preprocess import Preprocess
from detseg.errors import DetsegError
from detseg.results import SemanticResult

Progress = Callable[[int, int], None]  # (windows done, windows in all)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as (height, width); a single int stands for both."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise DetsegError(
            f"sliding-window {name} {value!r} is invalid; give one or two positive sizes in pixels."
        )
    return int(pair[0]), int(pair[1])


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis of length ``size`` for windows of length ``min(crop, size)``.

    Windows start every ``stride`` pixels; the last one is moved back to end on the border.
    """
    if size <= crop:
        return [0]
    count = -(-(size - crop) // stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def _coverage(size: int, starts: list[int], length: int, device: torch.device) -> torch.Tensor:
    """(size,) float32: how many windows of ``length`` starting at ``starts`` cover each pixel."""
    count = torch.zeros(size, dtype=torch.float32, device=device)
    for start in starts:
        count[start : start + length] += 1
    return count


def _placement(
    model: nn.Module, device: torch.device | str | None
) -> tuple[torch.device, torch.dtype]:
    """Where the network input goes and its dtype: ``device`` or the model's, the model's float dtype."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    return torch.device(device), param.dtype if param is not None else torch.float32


def _logits(model: nn.Module, x: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """(N, 3, h, w) network input -> (N, C, h, w) float32 logits.

    The input is zero-padded on the bottom and right to a multiple of ``size_divisor`` (zero in
    network units: the mean colour), the logits resized to the padded size when the model predicts
    at a lower resolution (bilinear, ``align_corners=False``), then cropped back to (h, w).
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % size_divisor, -w % size_divisor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    out = model(x)
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out[..., :h, :w].float()


def _decide(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, h, w) logits -> (h, w) int64 labels and (h, w) float32 softmax probability of each label."""
    scores, labels = logits.softmax(dim=0).max(dim=0)
    return labels, scores


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(
            f"expected a non-empty (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}"
        )


def _check_classes(logits: torch.Tensor, num_classes: int) -> None:
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"the model predicts {logits.shape[1]} classes, expected num_classes={num_classes}"
        )


def whole_image_predict(
    model: nn.Module,
    image: np.ndarray,
    preprocess: Preprocess,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    size_divisor: int = 1,
    class_names: tuple[str, ...] = (),
) -> SemanticResult:
    """Segment ``image`` ((H, W, 3) uint8 RGB) in one forward pass of ``model`` (in eval mode).

    The image is padded to a multiple of ``size_divisor`` and the logits cropped back to (H, W).
    ``device`` defaults to the model's. Returns labels and scores on the CPU.
    """
    return whole_batch_predict(
        model,
        [image],
        preprocess,
        num_classes,
        device=device,
        size_divisor=size_divisor,
        class_names=class_names,
    )[0]


def whole_batch_predict(
    model: nn.Module,
    images: Sequence[np.ndarray],
    preprocess: Preprocess,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    size_divisor: int = 1,
    class_names: tuple[str, ...] = (),
) -> list[SemanticResult]:
    """``whole_image_predict`` of several (H, W, 3) uint8 RGB images of one size in one forward
    pass (video frames); one result per image."""
    for image in images:
        _check_image(image)
    if len({im.shape for im in images}) > 1:
        raise ValueError("whole_batch_predict needs images of one size")
    device, dtype = _placement(model, device)
    with torch.inference_mode():
        batch = torch.stack([preprocess(im) for im in images]).to(device, dtype)
        logits = _logits(model, batch, size_divisor)
        _check_classes(logits, num_classes)
        decided = [_decide(one) for one in logits]
    return [
        SemanticResult(labels=labels.cpu(), scores=scores.cpu(), class_names=class_names)
        for labels, scores in decided
    ]


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def sliding_window_predict(
    model: nn.Module,
    image: np.ndarray,
    preprocess: Preprocess,
    num_classes: int,
    *,
    crop: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    size_divisor: int = 1,
    progress: Progress | None = None,
    class_names: tuple[str, ...] = (),
) -> SemanticResult:
    """Segment ``image`` ((H, W, 3) uint8 RGB) window by window with ``model`` (in eval mode).

    Args:
        crop, stride: window size and step in pixels, one int or (height, width); ``stride <= crop``.
        batch_size: windows per forward pass (windows of one row at a time).
        device: where the model runs and logits accumulate; defaults to the model's.
        size_divisor: each window is zero-padded to a multiple of it (in network units).
        progress: called as ``progress(windows_done, windows_total)`` after every batch.

    Returns:
        labels (H, W) int64 and scores (H, W) float32 (softmax of the averaged logits) on the CPU.
    """
    _check_image(image)
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise DetsegError(
            f"sliding-window stride {stride!r} is larger than the crop {crop!r}, which would leave "
            "pixels unpredicted; use a stride between 1 and the crop size."
        )
    if batch_size < 1:
        raise DetsegError(f"batch size {batch_size} is invalid; use 1 or more windows per batch.")
    height, width = image.shape[:2]
    win_h, win_w = min(crop_h, height), min(crop_w, width)
    ys, xs = window_starts(height, crop_h, stride_h), window_starts(width, crop_w, stride_w)
    device, dtype = _placement(model, device)
    row_count = _coverage(height, ys, win_h, device)
    col_count = _coverage(width, xs, win_w, device)
    labels = torch.empty((height, width), dtype=torch.int64)
    scores = torch.empty((height, width), dtype=torch.float32)
    band = torch.zeros(
        (num_classes, win_h, width), dtype=torch.float32, device=device
    )  # rows y..y+win_h
    done, total = 0, len(ys) * len(xs)
    with torch.inference_mode():
        for i, y in enumerate(ys):
            for chunk in _chunks(xs, batch_size):
                crops = [preprocess(image[y : y + win_h, x : x + win_w]) for x in chunk]
                logits = _logits(model, torch.stack(crops).to(device, dtype), size_divisor)
                _check_classes(logits, num_classes)
                for x, window in zip(chunk, logits, strict=True):
                    band[:, :, x : x + win_w] += window
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            stop = ys[i + 1] if i + 1 < len(ys) else height  # rows above stop are final
            _decide_rows(band, row_count[y:stop], col_count, labels[y:stop], scores[y:stop])
            if i + 1 < len(ys):  # after the last row the band is done with
                _shift_up(band, stop - y)
    return SemanticResult(labels=labels, scores=scores, class_names=class_names)


def _decide_rows(
    band: torch.Tensor,
    row_count: torch.Tensor,
    col_count: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    """``_decide`` of the first ``len(row_count)`` rows of ``band`` (C, h, W) divided by the
    windows covering each pixel, into ``labels`` / ``scores`` (rows, W), a few rows at a time:
    the same values as on the whole slice, without its (C, rows, W) temporaries (a 4000-wide
    band's 341 final rows are 109 MB per temporary; in 4 MB pieces they stay in cache)."""
    c, _, width = band.shape
    step = max(1, (4 << 20) // (4 * c * width))
    for r0 in range(0, len(row_count), step):
        r1 = min(r0 + step, len(row_count))
        count = row_count[r0:r1, None] * col_count[None, :]
        piece_labels, piece_scores = _decide(band[:, r0:r1] / count)
        labels[r0:r1], scores[r0:r1] = piece_labels.cpu(), piece_scores.cpu()


def _shift_up(band: torch.Tensor, rows: int) -> None:
    """In place: drop the first ``rows`` rows of ``band`` (C, h, W), move the rest up and zero
    the freed rows at the bottom (no new band: a 4000-wide one is 164 MB)."""
    keep = band.shape[1] - rows
    tail = band[:, rows:]
    band[:, :keep] = tail if rows >= keep else tail.clone()  # clone where they overlap
    band[:, keep:].zero_()


def predict_semantic(
    model: nn.Module,
    image: np.ndarray,
    preprocess: Preprocess,
    num_classes: int,
    *,
    mode: str = "whole",
    crop: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    size_divisor: int = 1,
    progress: Progress | None = None,
    class_names: tuple[str, ...] = (),
) -> SemanticResult:
    """Segment one image with ``mode="whole"`` (one pass) or ``"sliding"`` (windows).

    ``crop``, ``stride``, ``batch_size`` and ``progress`` apply to sliding windows only; see
    ``sliding_window_predict`` and ``whole_image_predict`` for the rest.
    """
    if mode == "whole":
        return whole_image_predict(
            model,
            image,
            preprocess,
            num_classes,
            device=device,
            size_divisor=size_divisor,
            class_names=class_names,
        )
    if mode == "sliding":
        return sliding_window_predict(
            model,
            image,
            preprocess,
            num_classes,
            crop=crop,
            stride=stride,
            batch_size=batch_size,
            device=device,
            size_divisor=size_divisor,
            progress=progress,
            class_names=class_names,
        )
    raise ValueError(f"unknown inference mode {mode!r}; expected 'whole' or 'sliding'")
