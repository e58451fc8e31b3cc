"""Sliced inference: detseg vs SAHI (``sahi.predict.get_sliced_prediction``) with the same FCOS.

A large image is tiled from COCO128 images (or those of ``--mosaic`` COCO JSON) at their own scale
(so its objects are small relative to the whole), with the shifted boxes as ground truth. Each
variant runs in its own process (clean peak RSS) on the same image and the same weights (seeded
random init unless ``--weights``: an official FCOS ``.pth`` or a detseg checkpoint, whose training
size becomes the model's input size: tiles larger than it and the whole image are shrunk to it):

- ``sahi``: SAHI's serial loop, GREEDYNMM / IOS / 0.5, class-aware, no standard (full) pass;
- ``f32`` / ``bf16``: ``detseg.detection.sliced.sliced_predict`` with the same merge, float32 or
  CPU/GPU autocast bfloat16, ``--batch`` slices per call;
- ``whole``: one whole-image pass at the model's input size (longest side 1333 or the trained
  size), for recall.

With ``--repeats N`` every variant runs N times in rotating order and its fastest run is kept
(the detections of each run are the same). Each variant first runs once, untimed, on a 2x2-slice crop (warm-up of the model and of its
own code). Printed: seconds, images/s, the time inside the model callable and the rest (overhead),
the network's own share of it, peak RSS, detections, agreement with SAHI's merged detections (all,
and those scoring >= 0.3, what ``detseg predict`` lists), recall at IoU 0.5 against the tiled
ground truth (class-aware, class-agnostic, and class-aware on the small objects), and for each
variant not identical to SAHI the scores of the SAHI detections it misses.

Run from the repository root (``pip install sahi`` for the SAHI variant only):
``PYTHONPATH=. python bench/sliced.py [--model fcos_r50_fpn] [--width 6000 --height 4000]``;
with a trained detector: ``--weights runs/x/best.safetensors --mosaic its_train.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from detseg.data.coco import read_coco
from detseg.data.images import read_image
from detseg.data.preprocess import Preprocess
from detseg.detection.sliced import (
    DetectFn,
    SliceConfig,
    batched_detector,
    slice_grid,
    sliced_predict,
)
from detseg.registry import get_entry
from detseg.results import Detections

COCO128 = Path(__file__).resolve().parents[1].parent / "shared/data/coco128"


def make_mosaic(
    width: int, height: int, source: Path = COCO128 / "annotations/instances.json", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shelf-pack the images of COCO JSON ``source`` at native size, in a seeded random order,
    cycling through them until the canvas is full: (H, W, 3) uint8, (G, 4) xyxy GT, (G,) labels."""
    ds = read_coco(source)
    order = np.random.default_rng(seed).permutation(len(ds.images))
    canvas = np.full((height, width, 3), 114, np.uint8)
    boxes, labels = [], []
    x = y = row_h = 0
    repeats = -(-width * height // sum(r.width * r.height for r in ds.images)) + 1
    for i in np.tile(order, repeats):
        im = ds.images[i]
        if x + im.width > width:
            x, y, row_h = 0, y + row_h, 0
        if y + im.height > height:
            break
        canvas[y : y + im.height, x : x + im.width] = read_image(im.path)
        for a in im.annotations:
            boxes.append(a.box + [x, y, x, y])
            labels.append(a.label)
        x, row_h = x + im.width, max(row_h, im.height)
    return canvas, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def _build(args: argparse.Namespace) -> tuple[torch.nn.Module, Preprocess, int]:
    """(model in eval mode, its preprocessing, its input size: the longest side it runs at)."""
    if args.weights:
        from detseg.api import load_model
        from detseg.detection.pipeline import _trained_max_size

        loaded = load_model(
            None if args.weights.endswith(".safetensors") else args.model,
            args.weights,
            "cpu",
            score_thresh=args.score_thresh,
        )
        return loaded.model, loaded.preprocess, _trained_max_size(loaded) or 1333
    entry = get_entry(args.model)
    kwargs = {"num_classes": 80, "score_thresh": args.score_thresh}
    torch.manual_seed(0)
    model = entry.build(**kwargs)
    pre = (
        entry.official.preprocess(kwargs) if entry.official and entry.official.preprocess else None
    )
    return model.eval(), Preprocess.from_dict(pre), 1333


class Timed:
    """Wraps a ``DetectFn`` and adds up the time spent inside it, and inside ``model.forward``
    (the network; the rest of the callable is resizing, normalising, padding and decoding)."""

    def __init__(self, detect: DetectFn, model: torch.nn.Module) -> None:
        self.detect, self.seconds, self.network, self._t = detect, 0.0, 0.0, 0.0
        model.register_forward_pre_hook(lambda *_: setattr(self, "_t", time.perf_counter()))
        model.register_forward_hook(lambda *_: self._add_network())

    def _add_network(self) -> None:
        self.network += time.perf_counter() - self._t

    def __call__(self, images: list[Any]) -> list[Detections]:
        t0 = time.perf_counter()
        out = self.detect(images)
        self.seconds += time.perf_counter() - t0
        return out


def _run_sahi(image: np.ndarray, detect: Timed, cfg: SliceConfig) -> tuple[Detections, dict]:
    from sahi.models.base import DetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.prediction import ObjectPrediction

    class DetsegModel(DetectionModel):
        def set_model(self, model: Any, **kwargs: Any) -> None:
            self.model = model

        def perform_inference(self, image: np.ndarray) -> None:
            self._original_predictions = self.model([image])[0]

        def _create_object_prediction_list_from_original_predictions(
            self, shift_amount_list: Any = None, full_shape_list: Any = None
        ) -> None:
            det, shift = self._original_predictions, (shift_amount_list or [[0, 0]])[0]
            full = None if full_shape_list is None else full_shape_list[0]
            preds = [
                ObjectPrediction(
                    bbox=b, category_id=int(c), score=float(s), shift_amount=shift, full_shape=full
                )
                for b, c, s in zip(
                    det.boxes.tolist(), det.labels.tolist(), det.scores.tolist(), strict=True
                )
            ]
            self._object_prediction_list_per_image = [preds]

    model = DetsegModel(model=detect, confidence_threshold=0.0, category_mapping=None)
    h, w = cfg.tile_hw
    result = get_sliced_prediction(
        image,
        model,
        slice_height=h,
        slice_width=w,
        overlap_height_ratio=cfg.overlap,
        overlap_width_ratio=cfg.overlap,
        perform_standard_pred=False,
        postprocess_type="GREEDYNMM",
        postprocess_match_metric="IOS",
        postprocess_match_threshold=cfg.match_threshold,
        postprocess_class_agnostic=cfg.class_agnostic,
        force_postprocess_type=True,
        verbose=0,
    )
    preds = result.object_prediction_list
    boxes = torch.tensor([p.bbox.to_xyxy() for p in preds], dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor([p.score.value for p in preds], dtype=torch.float32)
    labels = torch.tensor([p.category.id for p in preds], dtype=torch.int64)
    return Detections(boxes, scores, labels), dict(result.durations_in_seconds)


def child(args: argparse.Namespace) -> None:
    """One variant in this process: writes ``<variant>.npz`` and prints a JSON line."""
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    image = np.load(work / "image.npy")
    model, pre, size = _build(args)
    bf16 = torch.bfloat16 if args.child == "bf16" else None
    detect = Timed(
        batched_detector(model, pre, max_size=size, device=args.device, autocast_dtype=bf16),
        model,
    )
    cfg = SliceConfig(
        size=args.slice, overlap=args.overlap, merge="nmm", match="ios", batch_size=args.batch
    )
    run = {
        "sahi": lambda im: _run_sahi(im, detect, cfg),
        "whole": lambda im: (detect([im])[0], {}),
        "f32": lambda im: (sliced_predict(im, detect, cfg), {}),
        "bf16": lambda im: (sliced_predict(im, detect, cfg), {}),
    }[args.child]
    run(np.ascontiguousarray(image[: 2 * args.slice, : 2 * args.slice]))  # warm-up, not timed
    detect.seconds = detect.network = 0.0
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    det, extra = run(image)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.savez(
        work / f"{args.child}.npz",
        boxes=det.boxes.numpy(),
        scores=det.scores.numpy(),
        labels=det.labels.numpy(),
    )
    print(
        json.dumps(
            {
                "variant": args.child,
                "seconds": seconds,
                "model_seconds": detect.seconds,
                "network_seconds": detect.network,
                "input_size": size,
                "base_rss_mb": base_rss,
                "peak_rss_mb": peak,
                "detections": len(det),
                "sahi_durations": extra,
            }
        )
    )


def _load(path: Path) -> Detections:
    d = np.load(path)
    return Detections(*(torch.from_numpy(d[k]) for k in ("boxes", "scores", "labels")))


def matched_fraction(ours: Detections, ref: Detections, iou: float = 0.9) -> float:
    """Fraction of ``ref`` matched one-to-one by a same-label detection of ``ours`` at >= ``iou``."""
    if len(ref) == 0:
        return 1.0 if len(ours) == 0 else 0.0
    ious = box_iou(ref.boxes, ours.boxes) * (ref.labels[:, None] == ours.labels[None, :])
    used = torch.zeros(len(ours), dtype=torch.bool)
    hits = 0
    for i in torch.argsort(ref.scores, descending=True).tolist():
        cand = ious[i].masked_fill(used, -1.0)
        j = int(cand.argmax()) if len(ours) else -1
        if j >= 0 and float(cand[j]) >= iou:
            used[j], hits = True, hits + 1
    return hits / len(ref)


def identical(a: Detections, b: Detections) -> str:
    if len(a) != len(b):
        return f"no ({len(a)} vs {len(b)})"
    key = lambda d: np.lexsort((*d.boxes.numpy().T[::-1], d.labels.numpy(), -d.scores.numpy()))  # noqa: E731
    ia, ib = key(a), key(b)
    db = float((a.boxes[ia] - b.boxes[ib]).abs().max()) if len(a) else 0.0
    same = bool((a.labels[ia] == b.labels[ib]).all()) and db <= 1e-3
    return f"{'yes' if same else 'no'} (max box diff {db:.2e})"


def recall(
    det: Detections, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, small: bool, aware: bool
) -> float:
    """Fraction of the GT boxes (those under 32x32 pixels when ``small``) that some detection (of
    the same class when ``aware``) overlaps with IoU >= 0.5."""
    area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    keep = area < 32**2 if small else torch.ones(len(gt_boxes), dtype=torch.bool)
    g, lab = gt_boxes[keep], gt_labels[keep]
    if len(g) == 0 or len(det) == 0:
        return 0.0
    ious = box_iou(g, det.boxes)
    if aware:
        ious = ious * (lab[:, None] == det.labels[None, :])
    return float((ious.max(dim=1).values >= 0.5).float().mean())


def _above(det: Detections, threshold: float) -> Detections:
    keep = det.scores >= threshold
    return Detections(det.boxes[keep], det.scores[keep], det.labels[keep])


def misses(ours: Detections, ref: Detections, iou: float = 0.9) -> str:
    """Where the SAHI detections that ``ours`` does not match at ``iou`` lie: their scores, and
    whether ``ours`` has a same-class box at IoU >= 0.5 instead (moved) or none (dropped)."""
    matched = [matched_fraction(ours, _above(ref, t), iou) for t in (0.1, 0.3, 0.5)]
    ious = box_iou(ref.boxes, ours.boxes) * (ref.labels[:, None] == ours.labels[None, :])
    best = ious.max(dim=1).values if len(ours) else torch.zeros(len(ref))
    lost = best < iou
    moved = int((lost & (best >= 0.5)).sum())
    lost_scores = ref.scores[lost].sort().values
    median = float(lost_scores[len(lost_scores) // 2]) if len(lost_scores) else 0.0
    return (
        f"{int(lost.sum())} of {len(ref)} SAHI detections have no same-class box at IoU >= {iou} "
        f"({moved} moved: one at IoU >= 0.5; {int(lost.sum()) - moved} dropped), median score "
        f"{median:.3f} (SAHI's max {float(ref.scores.max()) if len(ref) else 0:.3f}); matched "
        f"among SAHI's scoring >= 0.1 / 0.3 / 0.5: "
        + " / ".join(f"{m:.4f}" for m in matched)
        + f" ({int((ref.scores >= 0.1).sum())} / {int((ref.scores >= 0.3).sum())} / "
        f"{int((ref.scores >= 0.5).sum())} detections)"
    )


def parent(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image, gt_boxes, gt_labels = make_mosaic(args.width, args.height, Path(args.mosaic))
        np.save(work / "image.npy", image)
        tiles = len(slice_grid(args.height, args.width, (args.slice, args.slice), args.overlap))
        print(
            f"image {args.width}x{args.height}, {len(gt_boxes)} GT boxes "
            f"({int(((gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(1) < 1024).sum())} small), "
            f"{tiles} slices of {args.slice} at overlap {args.overlap}; model {args.model} "
            f"({'weights ' + args.weights if args.weights else 'seeded random weights'}), "
            f"score_thresh {args.score_thresh}, {args.threads} threads, batch {args.batch}, "
            f"device {args.device}, best of {args.repeats}; mosaic of {args.mosaic}"
        )
        rows: dict[str, dict] = {}
        variants = args.variants.split(",")
        for rep in range(args.repeats):  # rotate the order: load changes hit every variant
            for variant in variants[rep % len(variants) :] + variants[: rep % len(variants)]:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--workdir",
                    tmp,
                    *sys.argv[1:],
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    print(f"{variant}: failed\n{out.stderr[-2000:]}")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                if variant not in rows or row["seconds"] < rows[variant]["seconds"]:
                    rows[variant] = row
                    Path(tmp, f"{variant}.npz").replace(Path(tmp, f"{variant}.best.npz"))
        rows = {v: rows[v] for v in variants if v in rows}
        dets = {v: _load(work / f"{v}.best.npz") for v in rows}
    sizes = {r["input_size"] for r in rows.values()}
    print(f"model input size (longest side): {', '.join(map(str, sorted(sizes)))}")
    if "sahi" in rows:
        print("SAHI's own split (s):", json.dumps(rows["sahi"]["sahi_durations"]))
    gt_b, gt_l = torch.from_numpy(gt_boxes), torch.from_numpy(gt_labels)
    ref = rows.get("sahi")
    print(
        "| variant | s | images/s | in model s (network s) | overhead | vs SAHI | "
        "peak RSS MB (+ run) | detections | same as SAHI | matched SAHI @0.9 (score >= 0.3) | "
        "recall | recall agnostic | recall small |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for v, r in rows.items():
        over = r["seconds"] - r["model_seconds"]
        ratio = f"{ref['seconds'] / r['seconds']:.2f}x" if ref else "-"
        same = identical(dets[v], dets["sahi"]) if ref and v != "sahi" else "-"
        frac = "-"
        if ref:
            frac = (
                f"{matched_fraction(dets[v], dets['sahi']):.4f} "
                f"({matched_fraction(dets[v], _above(dets['sahi'], 0.3)):.4f})"
            )
        rec = [recall(dets[v], gt_b, gt_l, small, aware) for small, aware in RECALLS]
        print(
            f"| {v} | {r['seconds']:.2f} | {1 / r['seconds']:.4f} | {r['model_seconds']:.2f} "
            f"({r['network_seconds']:.2f}) | "
            f"{over:.3f} s ({100 * over / max(r['model_seconds'], 1e-9):.2f}%) | {ratio} | "
            f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['base_rss_mb']:.0f}) | "
            f"{r['detections']} | {same} | {frac} | " + " | ".join(f"{x:.3f}" for x in rec) + " |"
        )
    for v in rows:
        if (
            ref
            and v not in ("sahi", "whole")
            and not identical(dets[v], dets["sahi"]).startswith("yes")
        ):
            print(f"{v}: {misses(dets[v], dets['sahi'])}")


RECALLS = ((False, True), (False, False), (True, True))  # (small only, class-aware) per column


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fcos_r50_fpn")
    p.add_argument(
        "--weights", default="", help="official FCOS .pth or detseg checkpoint (default: random)"
    )
    p.add_argument(
        "--mosaic",
        default=str(COCO128 / "annotations/instances.json"),
        help="COCO JSON whose images tile the large image",
    )
    p.add_argument("--score-thresh", type=float, default=0.05)
    p.add_argument("--width", type=int, default=6000)
    p.add_argument("--height", type=int, default=4000)
    p.add_argument("--slice", type=int, default=640)
    p.add_argument("--overlap", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="sahi,f32,bf16,whole")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant; the fastest is kept")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
