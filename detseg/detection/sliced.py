"""Sliced inference: find small objects in large images by running a detector on overlapping tiles.

Works with any detector given as ``detect(tiles) -> list[Detections]`` (FCOS now; PolarMask and
Mask R-CNN through the same callable, returning ``Instances``). The image is read once; tiles are
views into it (no copy per tile) and go to ``detect`` ``batch_size`` at a time, so peak memory
is bounded by one batch, not by the number of tiles. Tile detections are shifted to image
coordinates and merged by NMS or greedy non-maximum merging (NMM), with IoU or IoS (intersection
over the smaller box) as the match metric, per class or across classes.

Instance masks (``Instances`` from ``detect``) are cut to their extent as soon as a tile is done
and stay that way: the result is a ``CroppedInstances`` whose masks are crops placed in the image
(memory: the masks' extents, never one full-image mask per detection); ``instance_rles`` and
``instance_masks`` read them the same way as ordinary ``Instances``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou

from detseg.data.preprocess import Preprocess
from detseg.ops.ios import box_ios
from detseg.ops.masks import (
    RLE,
    mask_to_rle,
    rle_area,
    rle_to_uncompressed,
    segmentation_to_rle,
)
from detseg.results import Detections, Instances

Image = np.ndarray | torch.Tensor  # (H, W, C) array or (C, H, W) tensor
DetectFn = Callable[[list[Image]], list[Detections]]


@dataclass(frozen=True)
class SliceConfig:
    """Sliced-inference settings.

    Attributes:
        size: tile (height, width) in pixels, or one int for square tiles.
        overlap: fraction of the tile shared with its neighbour, in [0, 1).
        full_image: also run ``detect`` on the whole image (the detector resizes it) and merge
            those detections with the tiles' (finds the objects larger than a tile).
        merge: "nms" keeps the best of each group; "nmm" merges each group into the union box.
        match: "iou" or "ios" (intersection over the smaller area).
        match_threshold: boxes match when the metric is >= this.
        class_agnostic: match across classes (otherwise only within a class).
        batch_size: tiles per ``detect`` call.
    """

    size: int | tuple[int, int] = 640
    overlap: float = 0.2
    full_image: bool = False
    merge: Literal["nms", "nmm"] = "nms"
    match: Literal["iou", "ios"] = "iou"
    match_threshold: float = 0.5
    class_agnostic: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), not {self.overlap}")
        if self.merge not in ("nms", "nmm") or self.match not in ("iou", "ios"):
            raise ValueError(
                f"merge must be nms|nmm and match iou|ios, not {self.merge}/{self.match}"
            )
        if min(self.tile_hw) < 1 or self.batch_size < 1:
            raise ValueError("tile size and batch size must be positive")

    @property
    def tile_hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis: a fixed stride, the last tile shifted back inside."""
    if length <= tile:
        return [0]
    step = max(1, tile - int(overlap * tile))
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def slice_grid(height: int, width: int, tile_hw: tuple[int, int], overlap: float) -> torch.Tensor:
    """(T, 4) int64 xyxy tiles covering a ``height`` x ``width`` image, row by row.

    Every tile lies inside the image and has the tile size (or the image's, when smaller); the
    stride is ``tile - int(overlap * tile)``, as SAHI's, so the grids are the same.
    """
    ys = _starts(height, tile_hw[0], overlap)
    xs = _starts(width, tile_hw[1], overlap)
    th, tw = min(tile_hw[0], height), min(tile_hw[1], width)
    return torch.tensor([[x, y, x + tw, y + th] for y in ys for x in xs], dtype=torch.int64)


def _crop(image: Image, tile: Sequence[int]) -> Image:
    x1, y1, x2, y2 = tile
    if isinstance(image, torch.Tensor):
        return image[..., y1:y2, x1:x2]  # (C, h, w) view
    return image[y1:y2, x1:x2]  # (h, w, C) view


def _image_hw(image: Image) -> tuple[int, int]:
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else tuple(image.shape[:2])


Crop = tuple[torch.Tensor, int, int]  # (h, w) bool mask and its top-left (x0, y0) in the image


@dataclass
class CroppedInstances(Instances):
    """``Instances`` whose masks are stored inside their extent (``masks`` is None).

    Attributes:
        crops: per detection, a (h_i, w_i) bool CPU tensor: the mask's pixels within its extent.
        origins: per detection, (x0, y0) image pixels of the crop's top-left pixel.
        image_hw: (H, W) of the image the masks belong to.
    """

    crops: list[torch.Tensor] = field(default_factory=list)
    origins: list[tuple[int, int]] = field(default_factory=list)
    image_hw: tuple[int, int] = (0, 0)

    def mask(self, i: int) -> torch.Tensor:
        """(H, W) bool full-image mask of detection ``i`` (one at a time: H x W bytes)."""
        out = torch.zeros(self.image_hw, dtype=torch.bool)
        crop, (x0, y0) = self.crops[i], self.origins[i]
        out[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        return out

    def select(self, keep: torch.Tensor) -> CroppedInstances:
        """The detections where ``keep`` (N,) bool is True, in order, crops included."""
        out = super().select(keep)
        idx = torch.nonzero(keep).flatten().tolist()
        out.crops, out.origins = [self.crops[i] for i in idx], [self.origins[i] for i in idx]
        return out


def _extent(mask: torch.Tensor, x0: int, y0: int) -> Crop:
    """A (h, w) mask placed at (x0, y0) -> its nonzero extent as a CPU copy, placed; an empty mask
    becomes a (0, 0) crop."""
    m = mask.to("cpu", torch.bool)
    rows = torch.nonzero(m.any(dim=1)).flatten()
    cols = torch.nonzero(m.any(dim=0)).flatten()
    if len(rows) == 0:
        return m.new_zeros(0, 0), x0, y0
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return m[r0:r1, c0:c1].clone(), x0 + c0, y0 + r0  # a copy: the tile's mask is freed


def _union(crops: Sequence[Crop]) -> Crop:
    """The pixel union of placed crops, as one placed crop over their joint extent."""
    parts = [c for c in crops if c[0].numel()]
    if not parts:
        return crops[0]
    x0 = min(x for _, x, _ in parts)
    y0 = min(y for _, _, y in parts)
    x1 = max(x + m.shape[1] for m, x, _ in parts)
    y1 = max(y + m.shape[0] for m, _, y in parts)
    out = torch.zeros((y1 - y0, x1 - x0), dtype=torch.bool)
    for m, x, y in parts:
        out[y - y0 : y - y0 + m.shape[0], x - x0 : x - x0 + m.shape[1]] |= m
    return out, x0, y0


def _crop_rle(crop: torch.Tensor, x0: int, y0: int, hw: tuple[int, int]) -> RLE:
    """COCO compressed RLE of a placed crop in an ``hw`` image, built from the (H, w) column strip
    under the crop (COCO runs are column-major, so the columns left and right are plain zeros)."""
    h, w = hw
    strip = np.zeros((h, crop.shape[1]), np.uint8)
    strip[y0 : y0 + crop.shape[0]] = crop.numpy()
    runs = rle_to_uncompressed(mask_to_rle(strip))["counts"]
    runs[0] += x0 * h
    after = (w - x0 - crop.shape[1]) * h
    if len(runs) % 2:  # the strip ends inside a run of zeros
        runs[-1] += after
    elif after:
        runs.append(after)
    return segmentation_to_rle({"size": [h, w], "counts": runs}, h, w)


def instance_rles(det: Detections) -> list[RLE] | None:
    """COCO compressed RLE of each detection's mask (``Instances`` or ``CroppedInstances``), in
    image pixels; None when ``det`` has no masks."""
    if isinstance(det, CroppedInstances):
        return [
            _crop_rle(c, x, y, det.image_hw)
            for c, (x, y) in zip(det.crops, det.origins, strict=True)
        ]
    if isinstance(det, Instances) and det.masks is not None:
        return [mask_to_rle(m) for m in det.masks.to("cpu").numpy()]
    return None


def detection_records(det: Detections, names: Sequence[str]) -> list[dict[str, Any]]:
    """JSON-ready ``[{"label", "class", "score", "box": xyxy pixels}]`` of ``det``; instances add
    ``"mask"`` (COCO compressed RLE in image pixels) and ``"area"`` (its pixels)."""
    rles = instance_rles(det)
    records = []
    for i, (box, score, label) in enumerate(
        zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True)
    ):
        record = {
            "label": label,
            "class": names[label] if label < len(names) else str(label),
            "score": round(score, 5),
            "box": [round(v, 2) for v in box],
        }
        if rles is not None:
            record["mask"], record["area"] = rles[i], rle_area(rles[i])
        records.append(record)
    return records


def instance_masks(
    det: Detections, indices: Sequence[int]
) -> Iterator[tuple[np.ndarray, int, int]]:
    """For each of ``indices``: its mask as a (h, w) bool array and the (x0, y0) image pixel of its
    top-left corner (the crop of ``CroppedInstances``, the full mask of ``Instances`` at (0, 0));
    nothing when ``det`` has no masks."""
    if isinstance(det, CroppedInstances):
        for i in indices:
            yield det.crops[i].numpy(), *det.origins[i]
    elif isinstance(det, Instances) and det.masks is not None:
        for i in indices:
            yield det.masks[i].to("cpu").numpy(), 0, 0


@dataclass
class _Pieces:
    """Detections of all tiles in image pixels; masks cut to their extent, placed in the image."""

    boxes: list[torch.Tensor]
    scores: list[torch.Tensor]
    labels: list[torch.Tensor]
    masks: list[Crop]
    class_names: tuple[str, ...] = ()

    def add(self, det: Detections, x0: int, y0: int) -> None:
        shift = torch.tensor([x0, y0, x0, y0], dtype=det.boxes.dtype, device=det.boxes.device)
        self.boxes.append(det.boxes + shift)
        self.scores.append(det.scores)
        self.labels.append(det.labels)
        self.class_names = self.class_names or det.class_names
        if isinstance(det, Instances) and det.masks is not None:
            self.masks.extend(_extent(m, x0, y0) for m in det.masks)


_BLOCK_ROWS = 256  # rows of the match matrix computed at once: memory O(256 * N), not O(N^2)


def _metric(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return box_ios(a, b) if kind == "ios" else box_iou(a, b).nan_to_num(0.0)


def _rank(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices by score, best first; ties broken by x1, y1, x2, y2 (SAHI's order)."""
    return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -scores))


def _later_matches(boxes: torch.Tensor, kind: str, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """For boxes in rank order, the lower-ranked boxes each one matches, as CSR arrays
    ``(indptr (n + 1,), indices)``: ``indices[indptr[i]:indptr[i + 1]]`` ascending, all > i."""
    n = len(boxes)
    rows, cols = [], []
    for s in range(0, n, _BLOCK_ROWS):
        e = min(s + _BLOCK_ROWS, n)
        hit = _metric(kind, boxes[s:e], boxes[s:]) >= thr  # (e - s, n - s)
        hit &= torch.arange(s, n)[None, :] > torch.arange(s, e)[:, None]
        r, c = torch.nonzero(hit, as_tuple=True)
        rows.append(r.numpy() + s)
        cols.append(c.numpy() + s)
    r, c = np.concatenate(rows), np.concatenate(cols)
    return np.concatenate(([0], np.cumsum(np.bincount(r, minlength=n)))), c


def _greedy_groups(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cfg: SliceConfig
) -> list[list[int]]:
    """Greedy matching: each remaining box, best first, takes the lower-ranked remaining boxes it
    matches (metric >= threshold). Returns the groups by their keeper's rank, each keeper first
    and the rest by rank."""
    b64 = boxes.to(torch.float64)
    order = _rank(b64.numpy(), scores.to(torch.float64).numpy())
    lab = labels.numpy()[order]
    groups = []
    for cls in [None] if cfg.class_agnostic else np.unique(lab).tolist():
        idx = order if cls is None else order[lab == cls]
        indptr, later = _later_matches(b64[torch.from_numpy(idx)], cfg.match, cfg.match_threshold)
        free = np.ones(len(idx), dtype=bool)
        for i in range(len(idx)):
            if free[i]:
                taken = later[indptr[i] : indptr[i + 1]]
                taken = taken[free[taken]]
                free[taken] = False
                groups.append([int(idx[i]), *idx[taken].tolist()])
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    return sorted(groups, key=lambda g: position[g[0]])


def _pair_metric(kind: str, a: list[float], b: list[float]) -> float:
    """IoU or IoS of two xyxy boxes (plain floats: called once per merge candidate)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    denom = min(area_a, area_b) if kind == "ios" else area_a + area_b - inter
    return inter / denom if denom > 0 else 0.0


def _merge_group(
    boxes: list[list[float]], members: list[int], kind: str, thr: float
) -> tuple[list[float], list[int]]:
    """Fold the members into the keeper's box one by one (union box), each only if it still
    matches the merged box, as SAHI's greedy NMM does. Returns the box and the merged members."""
    box, merged = list(boxes[members[0]]), [members[0]]
    for j in members[1:]:
        other = boxes[j]
        if _pair_metric(kind, box, other) >= thr:
            box = [
                min(box[0], other[0]),
                min(box[1], other[1]),
                max(box[2], other[2]),
                max(box[3], other[3]),
            ]
            merged.append(j)
    return box, merged


def merge_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cfg: SliceConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Merge overlapping detections (on CPU).

    Args:
        boxes: (N, 4) float xyxy image pixels; scores: (N,); labels: (N,) int64.

    Returns:
        boxes (M, 4) float32, scores (M,), labels (M,) sorted by score, and for each the indices
        of the input detections it stands for (the keeper first). A merged detection keeps the
        keeper's score and label.
    """
    if cfg.merge == "nms" and cfg.match == "iou":
        group_ids = torch.zeros_like(labels) if cfg.class_agnostic else labels
        keep = batched_nms(boxes.float(), scores.float(), group_ids, cfg.match_threshold)
        return boxes[keep].float(), scores[keep], labels[keep], [[int(k)] for k in keep]
    if len(boxes) == 0:
        return boxes.float(), scores, labels, []
    groups = _greedy_groups(boxes, scores, labels, cfg)
    keepers = torch.tensor([g[0] for g in groups], dtype=torch.int64)
    if cfg.merge == "nms":
        return boxes[keepers].float(), scores[keepers], labels[keepers], [[g[0]] for g in groups]
    as_lists = boxes.to(torch.float64).tolist()
    merged = [_merge_group(as_lists, g, cfg.match, cfg.match_threshold) for g in groups]
    out = torch.tensor([m[0] for m in merged], dtype=torch.float64).reshape(-1, 4).float()
    return out, scores[keepers], labels[keepers], [m[1] for m in merged]


def sliced_predict(image: Image, detect: DetectFn, cfg: SliceConfig | None = None) -> Detections:
    """Detect on overlapping tiles of ``image`` (and optionally the whole image), then merge.

    Args:
        image: (H, W, C) uint8 array or (C, H, W) tensor, read once; tiles are views of it.
        detect: the detector on a list of tiles (same type as ``image``), boxes in tile pixels.
        cfg: slicing and merging settings.

    Returns:
        ``Detections`` (``CroppedInstances`` when ``detect`` returns masks) in image pixels; when
        the image fits in one tile, ``detect``'s own result on the whole image, unmerged.
    """
    cfg = cfg or SliceConfig()
    h, w = _image_hw(image)
    tiles = slice_grid(h, w, cfg.tile_hw, cfg.overlap).tolist()
    if len(tiles) == 1:  # the image fits in a tile: nothing to slice or merge
        return detect([image])[0]
    pieces = _Pieces([], [], [], [])
    for start in range(0, len(tiles), cfg.batch_size):
        batch = tiles[start : start + cfg.batch_size]
        for tile, det in zip(batch, detect([_crop(image, t) for t in batch]), strict=True):
            pieces.add(det, tile[0], tile[1])
    if cfg.full_image:
        pieces.add(detect([image])[0], 0, 0)
    boxes = torch.cat(pieces.boxes).float().cpu()
    scores, labels = torch.cat(pieces.scores).float().cpu(), torch.cat(pieces.labels).cpu()
    if pieces.masks and len(pieces.masks) != len(boxes):
        raise ValueError("detect returned masks for some tiles only")
    boxes, scores, labels, groups = merge_detections(boxes, scores, labels, cfg)
    if pieces.masks:
        merged = [_union([pieces.masks[j] for j in g]) for g in groups]
        return CroppedInstances(
            boxes,
            scores,
            labels,
            pieces.class_names,
            crops=[m for m, _, _ in merged],
            origins=[(x, y) for _, x, y in merged],
            image_hw=(h, w),
        )
    return Detections(boxes, scores, labels, pieces.class_names)


def _as_hwc(image: Image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).cpu().numpy()
    return image


def _fit(image: np.ndarray, max_size: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return image
    s = max_size / max(h, w)
    return cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)


def batched_detector(
    model: nn.Module,
    preprocess: Preprocess,
    max_size: int | None = 1333,
    size_divisor: int = 32,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> DetectFn:
    """A ``DetectFn`` for a detseg detector with FCOS's interface: ``model(x) -> outputs`` and
    ``model.postprocess(outputs, image_sizes, original_sizes) -> list[Detections]``.

    Each image (uint8 (H, W, 3) array or (3, H, W) tensor) is shrunk to ``max_size`` on its longest
    side if larger (tiles usually are not; a full-image pass is), preprocessed, and the batch is
    zero-padded to a multiple of ``size_divisor``. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs
    the network under autocast on ``device``; decoding is float32. Boxes come back in the pixels of
    the images given.
    """
    model = model.eval().to(device)
    dev = torch.device(device)

    def detect(images: list[Image]) -> list[Detections]:
        arrays = [_as_hwc(im) for im in images]
        inputs = [preprocess(_fit(a, max_size)) for a in arrays]
        sizes = [tuple(x.shape[1:]) for x in inputs]
        ph = -(-max(h for h, _ in sizes) // size_divisor) * size_divisor
        pw = -(-max(w for _, w in sizes) // size_divisor) * size_divisor
        batch = torch.stack([F.pad(x, (0, pw - x.shape[2], 0, ph - x.shape[1])) for x in inputs])
        autocast = (
            torch.autocast(dev.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            outputs = model(batch.to(dev))
        outputs = tuple(o.float() for o in outputs)
        return model.postprocess(outputs, sizes, [a.shape[:2] for a in arrays])

    return detect
