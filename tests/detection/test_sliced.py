"""Sliced inference: tile grid properties, hand-made merges, and a fake detector end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detseg.detection.sliced import (
    CroppedInstances,
    SliceConfig,
    instance_rles,
    merge_detections,
    slice_grid,
    sliced_predict,
)
from detseg.results import Detections, Instances


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.integers(1, 120),
    st.integers(1, 120),
    st.floats(0.0, 0.9),
)
def test_grid_covers_image_inside_bounds(h: int, w: int, th: int, tw: int, overlap: float) -> None:
    tiles = slice_grid(h, w, (th, tw), overlap)
    x1, y1, x2, y2 = tiles.T
    assert bool((x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all())
    assert bool(((x2 - x1) == min(tw, w)).all() and ((y2 - y1) == min(th, h)).all())
    assert len({tuple(t) for t in tiles.tolist()}) == len(tiles)
    covered = np.zeros((h, w), bool)
    for a, b, c, d in tiles.tolist():
        covered[b:d, a:c] = True
    assert covered.all()
    # neighbours overlap by at least the requested amount
    xs = sorted(set(x1.tolist()))
    assert all(b - a <= tw - int(overlap * tw) for a, b in zip(xs, xs[1:], strict=False))


def test_grid_of_the_benchmark_image() -> None:
    tiles = slice_grid(4000, 6000, (640, 640), 0.2)
    assert len(tiles) == 96
    assert sorted(set(tiles[:, 0].tolist()))[-2:] == [5120, 5360]
    assert sorted(set(tiles[:, 1].tolist()))[-2:] == [3072, 3360]


def _boxes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_nms_iou_class_aware_and_agnostic() -> None:
    boxes = _boxes([0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1])
    b, s, lab, groups = merge_detections(boxes, scores, labels, SliceConfig())
    assert (
        s.tolist() == pytest.approx([0.9, 0.7]) and lab.tolist() == [0, 1] and groups == [[0], [2]]
    )
    _, s, _, _ = merge_detections(boxes, scores, labels, SliceConfig(class_agnostic=True))
    assert s.tolist() == pytest.approx([0.9])


def test_ios_catches_a_box_cut_at_a_tile_border() -> None:
    boxes = _boxes([0, 0, 100, 100], [70, 0, 100, 100])  # IoU 0.3, IoS 1.0
    scores, labels = torch.tensor([0.9, 0.8]), torch.tensor([3, 3])
    assert (
        len(merge_detections(boxes, scores, labels, SliceConfig(merge="nms", match="iou"))[0]) == 2
    )
    b, s, _, groups = merge_detections(boxes, scores, labels, SliceConfig(merge="nms", match="ios"))
    assert b.tolist() == [[0, 0, 100, 100]] and groups == [[0]]


def test_nmm_merges_halves_into_the_union() -> None:
    # Two halves of one object from neighbouring tiles: IoS 0.5, merged into the whole box.
    boxes = _boxes([30, 0, 100, 100], [0, 0, 60, 100], [300, 300, 310, 310])
    scores, labels = torch.tensor([0.8, 0.9, 0.5]), torch.tensor([1, 1, 1])
    cfg = SliceConfig(merge="nmm", match="ios")
    b, s, lab, groups = merge_detections(boxes, scores, labels, cfg)
    assert b.tolist() == [[0, 0, 100, 100], [300, 300, 310, 310]]
    assert s.tolist() == pytest.approx([0.9, 0.5]) and groups == [[1, 0], [2]]


def test_nmm_rechecks_members_against_the_growing_box() -> None:
    # B and C both match A (IoU 0.625, 0.667); once A absorbs B, the union no longer matches C
    # (IoU 0.476), which is dropped, as in SAHI's greedy NMM.
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 16], [-5, 0, 10, 10])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0])
    cfg = SliceConfig(merge="nmm", match="iou")
    b, _, _, groups = merge_detections(boxes, scores, labels, cfg)
    assert groups == [[0, 1]] and b.tolist() == [[0, 0, 10, 16]]


def test_merge_of_nothing() -> None:
    empty = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    for merge in ("nms", "nmm"):
        assert len(merge_detections(*empty, SliceConfig(merge=merge, match="ios"))[0]) == 0


# xyxy; with 48-pixel tiles at overlap 0.25 (origins 0, 36, 72, 108, 112 / 0, 36, 72) the third
# object lies in no tile whole: two halves with IoS 0.5.
OBJECTS = [(5, 5, 30, 25), (50, 10, 75, 40), (60, 85, 100, 115), (120, 50, 150, 70)]


def _scene() -> np.ndarray:
    image = np.zeros((120, 160, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(OBJECTS, start=1):
        image[y1:y2, x1:x2] = k
    return image


class FakeDetector:
    """Finds each painted object (pixel value k) in a tile: its extent, score from its visible
    fraction, label k % 2, and its mask. Records the tiles it is given."""

    def __init__(self, masks: bool = False) -> None:
        self.calls: list[list[np.ndarray]] = []
        self.masks = masks

    def __call__(self, tiles: list[np.ndarray]) -> list[Detections]:
        self.calls.append(tiles)
        return [self._one(t[..., 0]) for t in tiles]

    def _one(self, tile: np.ndarray) -> Detections:
        boxes, scores, labels, masks = [], [], [], []
        for k in np.unique(tile[tile > 0]).tolist():
            ys, xs = np.nonzero(tile == k)
            x1, y1, x2, y2 = OBJECTS[k - 1]
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            scores.append(0.5 + 0.5 * len(xs) / ((x2 - x1) * (y2 - y1)))
            labels.append(k % 2)
            masks.append(tile == k)
        det = (
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(scores),
            torch.tensor(labels, dtype=torch.int64),
        )
        if self.masks:
            return Instances(
                *det, masks=torch.from_numpy(np.array(masks, bool).reshape(-1, *tile.shape))
            )
        return Detections(*det)


def test_sliced_predict_recovers_objects_from_views_in_batches() -> None:
    image = _scene()
    detect = FakeDetector()
    cfg = SliceConfig(size=48, overlap=0.25, merge="nmm", match="ios", batch_size=5)
    out = sliced_predict(image, detect, cfg)
    assert sorted(out.boxes.tolist()) == sorted(list(map(float, b)) for b in OBJECTS)
    assert out.scores.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.85])
    assert out.labels.tolist() == [1, 0, 0, 1]  # ties in score: by x1
    tiles = [t for call in detect.calls for t in call]
    assert len(tiles) == len(slice_grid(120, 160, (48, 48), 0.25))
    assert all(len(call) <= 5 for call in detect.calls)
    assert all(np.shares_memory(t, image) for t in tiles)  # views, not copies


def test_sliced_predict_tensor_image_masks_and_full_pass() -> None:
    image = torch.from_numpy(_scene()).permute(2, 0, 1)  # (C, H, W)

    class TensorDetector(FakeDetector):
        def __call__(self, tiles: list[torch.Tensor]) -> list[Detections]:  # type: ignore[override]
            self.calls.append(tiles)
            return [self._one(t[0].numpy()) for t in tiles]

    detect = TensorDetector(masks=True)
    cfg = SliceConfig(size=(40, 64), overlap=0.2, merge="nmm", match="ios", full_image=True)
    out = sliced_predict(image, detect, cfg)
    assert isinstance(out, CroppedInstances) and out.masks is None and len(out.crops) == 4
    assert detect.calls[-1][0].shape == (3, 120, 160)  # the whole-image pass
    for i, box in enumerate(out.boxes.tolist()):
        x1, y1, x2, y2 = (int(v) for v in box)
        expected = torch.zeros(120, 160, dtype=torch.bool)
        expected[y1:y2, x1:x2] = True
        assert torch.equal(out.mask(i), expected) and [x1, y1, x2, y2] in [list(o) for o in OBJECTS]
        assert out.crops[i].shape == (y2 - y1, x2 - x1) and out.origins[i] == (x1, y1)


class _SizeModel(torch.nn.Module):
    """Returns its input; ``postprocess`` reports each image's box in the original pixels."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x,)

    def postprocess(self, outputs, image_sizes, original_sizes):  # noqa: ANN001, ANN201
        self.batch_shape = tuple(outputs[0].shape)
        self.sizes = list(image_sizes)
        return [
            Detections(
                torch.tensor([[0.0, 0.0, float(w), float(h)]]),
                torch.ones(1),
                torch.zeros(1, dtype=torch.int64),
            )
            for h, w in original_sizes
        ]


def test_batched_detector_resizes_pads_and_maps_back() -> None:
    from detseg.data.preprocess import Preprocess
    from detseg.detection.sliced import batched_detector

    model = _SizeModel()
    detect = batched_detector(model, Preprocess(), max_size=100, size_divisor=32)
    big = np.zeros((150, 300, 3), np.uint8)
    small = torch.zeros(3, 40, 50, dtype=torch.uint8)
    out = detect([big, small])
    assert model.sizes == [(50, 100), (40, 50)] and model.batch_shape == (2, 3, 64, 128)
    assert out[0].boxes.tolist() == [[0, 0, 300, 150]] and out[1].boxes.tolist() == [[0, 0, 50, 40]]


def _reference_merge(boxes: list, scores: list, labels: list, kind: str, thr: float, nmm: bool):  # noqa: ANN202
    """Plain-Python greedy NMS/NMM (SAHI's rules), an independent reference."""

    def metric(a: list, b: list) -> float:
        iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
        inter = max(iw, 0) * max(ih, 0)
        area = [(q[2] - q[0]) * (q[3] - q[1]) for q in (a, b)]
        den = min(area) if kind == "ios" else sum(area) - inter
        return inter / den if den > 0 else 0.0

    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], *boxes[i]))
    done, out = set(), []
    for i in order:
        if i in done:
            continue
        done.add(i)
        group = [
            j
            for j in order
            if j not in done and labels[j] == labels[i] and metric(boxes[i], boxes[j]) >= thr
        ]
        done.update(group)
        box = list(boxes[i])
        for j in group if nmm else []:
            if metric(box, boxes[j]) >= thr:
                box = [
                    min(box[0], boxes[j][0]),
                    min(box[1], boxes[j][1]),
                    max(box[2], boxes[j][2]),
                    max(box[3], boxes[j][3]),
                ]
        out.append((box, scores[i], labels[i]))
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 40),
            st.integers(0, 40),
            st.integers(1, 25),
            st.integers(1, 25),
            st.integers(1, 9),
            st.integers(0, 1),
        ),
        max_size=40,
    ),
    st.sampled_from([("nms", "ios"), ("nmm", "iou"), ("nmm", "ios")]),  # nms+iou: torchvision
)
def test_merge_matches_plain_reference(rows: list, method: tuple[str, str]) -> None:
    import detseg.detection.sliced as sliced

    sliced._BLOCK_ROWS, saved = 7, sliced._BLOCK_ROWS  # several blocks, unaligned
    try:
        boxes = [[float(x), float(y), float(x + w), float(y + h)] for x, y, w, h, _, _ in rows]
        scores = [s / 10 for *_, s, _ in rows]
        labels = [c for *_, c in rows]
        merge, match = method
        cfg = SliceConfig(merge=merge, match=match, match_threshold=0.5)
        b, s, lab, _ = merge_detections(
            torch.tensor(boxes).reshape(-1, 4),
            torch.tensor(scores),
            torch.tensor(labels, dtype=torch.int64),
            cfg,
        )
        ref = _reference_merge(boxes, scores, labels, match, 0.5, merge == "nmm")
        ours = list(zip(b.tolist(), s.tolist(), lab.tolist(), strict=True))
        assert len(ours) == len(ref)
        for (bo, so, lo), (br, sr, lr) in zip(ours, ref, strict=True):
            assert bo == br and so == pytest.approx(sr) and lo == lr
    finally:
        sliced._BLOCK_ROWS = saved


def test_one_tile_is_the_whole_image_pass() -> None:
    image = _scene()
    detect = FakeDetector(masks=True)
    out = sliced_predict(image, detect, SliceConfig(size=200, merge="nmm", match="ios"))
    whole = detect([image])[0]
    assert len(detect.calls) == 2 and detect.calls[0][0] is image
    assert torch.equal(out.boxes, whole.boxes) and torch.equal(out.masks, whole.masks)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39), st.integers(1, 25)), max_size=4),
    st.integers(0, 2**31 - 1),
)
def test_cropped_masks_equal_full_masks(h: int, w: int, rects: list, seed: int) -> None:
    """Cut to their extent and placed back, masks give the same RLE, drawing and COCO results as
    the full-image masks (random masks, some empty, some touching the borders)."""
    from detseg.detection.coco_eval import detections_to_coco
    from detseg.detection.sliced import _extent
    from detseg.instance.polarmask_infer import draw_instances

    rng = np.random.default_rng(seed)
    full = torch.zeros(len(rects), h, w, dtype=torch.bool)
    for k, (x, y, size) in enumerate(rects):
        full[k, y : y + size, x : x + size] = torch.from_numpy(rng.random((h, w)) < 0.6)[
            y : y + size, x : x + size
        ]
    n = len(rects)
    det = (torch.rand(n, 4).sort(dim=1).values * 10, torch.rand(n), torch.arange(n) % 2)
    placed = [_extent(m, 0, 0) for m in full]
    cropped = CroppedInstances(
        *det,
        crops=[c for c, _, _ in placed],
        origins=[(x, y) for _, x, y in placed],
        image_hw=(h, w),
    )
    whole = Instances(*det, masks=full)
    assert instance_rles(cropped) == instance_rles(whole)
    assert all(torch.equal(cropped.mask(i), full[i]) for i in range(n))
    assert detections_to_coco(1, cropped, [3, 5], "segm") == detections_to_coco(
        1, whole, [3, 5], "segm"
    )
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(draw_instances(image, cropped, 0.0), draw_instances(image, whole, 0.0))
    keep = torch.rand(n) < 0.5
    kept = cropped.select(keep)
    assert instance_rles(kept) == instance_rles(
        Instances(*(t[keep] for t in det), masks=full[keep])
    )
