"""COCO box and mask AP with faster-coco-eval, bit-identical to pycocotools' 12 summary numbers.

faster-coco-eval runs pycocotools' per-image matching and accumulation in C++. Its precision differs
from pycocotools' in one place only: pycocotools divides by ``tp + fp + eps`` (``eps`` = 2**-52), which
changes the quotient only when ``tp + fp == 1``, turning a one-detection prefix's precision 1.0 into
``1 / (1 + eps)``. After interpolation that value survives where the first counted detection is a
true positive and the second is not; ``_match_pycocotools`` finds those cases with a second, cheap
accumulation at one recall probe per (class, area range) and writes the pycocotools value there.
The summary means then agree bit for bit.

``iou_type="boundary"`` is Boundary AP (Cheng et al., "Boundary IoU", CVPR 2021): mask results,
each IoU replaced by min(mask IoU, boundary IoU) over the pixels within 2 % of the image diagonal
of each contour; faster-coco-eval computes it (pycocotools has no such mode). It rewards sharp
boundaries that mask AP, dominated by the interior pixels of large objects, barely sees.

Boxes are xyxy pixels in detseg; COCO's xywh exists only in the result dicts made here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval import faster_eval_api_cpp as _cpp

from detseg.data.coco import DetectionSet, load_json
from detseg.detection.sliced import instance_rles
from detseg.errors import InputFileError
from detseg.fileio import atomic_output
from detseg.results import Detections

IouType = Literal["bbox", "segm", "boundary"]
IOU_TYPES = get_args(IouType)

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


@dataclass
class CocoEvaluation:
    """The outcome of one COCO evaluation.

    Attributes:
        iou_type: "bbox", "segm" or "boundary".
        stats: the 12 pycocotools summary numbers (``STAT_NAMES``), -1 where undefined.
        precision: (T, R, K, A, M) float64 interpolated precision (IoU thresholds .50:.05:.95,
            101 recall thresholds, categories, area ranges all/small/medium/large, maxDets 1/10/100);
            -1 where a category has no ground truth.
        recall_thresholds: (R,) float64.
        category_ids, class_names: per K.
        num_gt: (K,) non-crowd ground-truth objects per category.
    """

    iou_type: str
    stats: list[float]
    precision: np.ndarray
    recall_thresholds: np.ndarray
    category_ids: list[int]
    class_names: list[str]
    num_gt: list[int]

    def per_class(self) -> dict[str, dict[str, Any]]:
        """Per category: AP (.50:.95), AP50, AP75 (area all, 100 detections), None without GT."""
        p = self.precision[..., 0, -1]  # (T, R, K)
        out = {}
        for k, (cat, name) in enumerate(zip(self.category_ids, self.class_names, strict=True)):
            row = {"category_id": cat, "num_gt": self.num_gt[k]}
            for key, t in (("AP", slice(None)), ("AP50", 0), ("AP75", 5)):
                v = p[t, :, k]
                row[key] = float(v[v > -1].mean()) if (v > -1).any() else None
            out[name] = row
        return out

    def to_dict(self) -> dict[str, Any]:
        """``{"stats": [12], "stat_names": [...], "per_class": {...}}`` (JSON-ready)."""
        return {
            "iou_type": self.iou_type,
            "stats": [float(s) for s in self.stats],
            "stat_names": list(STAT_NAMES),
            "per_class": self.per_class(),
        }

    def table(self) -> str:
        """A plain-text per-class AP table (classes with ground truth), then the summary."""
        rows = [f"{'class':<20} {'gt':>6} {'AP':>7} {'AP50':>7} {'AP75':>7}"]
        for name, r in self.per_class().items():
            if r["AP"] is not None:
                rows.append(
                    f"{name[:20]:<20} {r['num_gt']:>6} {r['AP']:>7.4f} {r['AP50']:>7.4f} "
                    f"{r['AP75']:>7.4f}"
                )
        rows.append("")
        rows += [f"{n:<10} {s:.4f}" for n, s in zip(STAT_NAMES, self.stats, strict=True)]
        return "\n".join(rows)

    def plot_pr(self, path: str | Path, iou: float = 0.5, top: int = 10) -> None:
        """Precision-recall curves (area all, 100 detections) at IoU ``iou`` for the ``top`` most
        frequent classes and the class mean, written atomically as an image (format by suffix)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = int(np.argmin(np.abs(np.linspace(0.5, 0.95, 10) - iou)))
        p = self.precision[t, :, :, 0, -1]  # (R, K)
        valid = (p > -1).all(axis=0)
        fig, ax = plt.subplots(figsize=(6, 5))
        for k in sorted(np.flatnonzero(valid), key=lambda k: -self.num_gt[k])[:top]:
            ax.plot(self.recall_thresholds, p[:, k], lw=1, label=self.class_names[k])
        if valid.any():
            mean = p[:, valid].mean(axis=1)
            label = f"class mean: AP{round(iou * 100)} {mean.mean():.3f}"
            ax.plot(self.recall_thresholds, mean, "k", lw=2.5, label=label)
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.set_title(f"{self.iou_type} precision-recall, IoU {iou:.2f}")
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
        plt.close(fig)


def _num_gt(gt: COCO, params: Any) -> np.ndarray:
    """(K, A) pycocotools' count of non-ignored ground truth: not crowd, area inside the range."""
    img_ids = set(params.imgIds)
    cat_index = {c: k for k, c in enumerate(params.catIds)}
    counts = np.zeros((len(params.catIds), len(params.areaRng)), np.int64)
    lo, hi = np.asarray(params.areaRng, np.float64).T
    for ann in gt.dataset["annotations"]:
        k = cat_index.get(ann["category_id"])
        if k is None or ann["image_id"] not in img_ids or ann.get("iscrowd", 0):
            continue
        counts[k] += (ann["area"] >= lo) & (ann["area"] <= hi)
    return counts


def _match_pycocotools(ev: COCOeval_faster, num_gt: np.ndarray) -> None:
    """Write pycocotools' ``1 / (1 + eps)`` where its interpolated precision has that value.

    That is where the C++ precision is 1.0 and the second counted detection is not a true positive,
    which is where the precision interpolated at a recall in (1/n, 2/n] is below 1 (n = num_gt).
    """
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    probe = np.where(num_gt >= 2, 1.5 / np.maximum(num_gt, 1), 2.0)  # (K, A)
    thresholds = np.unique(probe[probe <= 1.0])
    second_tp = np.zeros((precision.shape[0], *num_gt.shape, precision.shape[4]), bool)
    if thresholds.size:
        params = copy.deepcopy(ev._paramsEval)
        params.recThrs = thresholds
        probed = _cpp.COCOevalAccumulate(params, ev._evalImgs_cpp)["precision"]  # (T, R', K, A, M)
        k, a = np.nonzero(probe <= 1.0)
        r = np.searchsorted(thresholds, probe[k, a])
        second_tp[:, k, a, :] = probed[:, r, k, a, :] == 1.0
    one_det = 1.0 / (1.0 + np.spacing(1.0))
    lone = (precision == 1.0) & ~second_tp[:, None]
    precision[lone] = one_det


def _coco(gt: str | Path | dict | DetectionSet) -> COCO:
    if isinstance(gt, DetectionSet):
        gt = gt.to_coco()
    data = gt if isinstance(gt, dict) else load_json(gt)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        name = "the ground truth" if isinstance(gt, dict) else str(gt)
        raise InputFileError(
            f"{name}: not a COCO ground-truth file (needs images and annotations)."
        )
    # COCOeval adds keys to the annotation dicts: give it its own (shallow) copies.
    return COCO({**data, "annotations": [dict(a) for a in data["annotations"]]})


def _check_results(results: Any, gt: COCO, iou_type: str, source: str) -> list[dict]:
    if not isinstance(results, list):
        raise InputFileError(f"{source}: a COCO results file holds a JSON list of detections.")
    need = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    for i, r in enumerate(results):
        if not isinstance(r, dict) or any(k not in r for k in need):
            raise InputFileError(f"{source}: result [{i}] needs {', '.join(need)}.")
        if r["image_id"] not in gt.imgs:
            raise InputFileError(
                f"{source}: result [{i}] has image_id {r['image_id']}, not in the ground truth."
            )
        if r["category_id"] not in gt.cats:
            raise InputFileError(
                f"{source}: result [{i}] has category_id {r['category_id']}, not in the ground truth."
            )
    return [dict(r) for r in results]  # loadRes adds keys to each result


def run_coco_eval(
    gt: str | Path | dict | DetectionSet,
    results: str | Path | list[dict],
    iou_type: IouType = "bbox",
) -> CocoEvaluation:
    """Evaluate COCO results against ground truth (default pycocotools ``Params``).

    Args:
        gt: a COCO instances JSON path, its dict, or a ``DetectionSet``.
        results: a COCO results JSON path or list: ``{"image_id", "category_id", "score", "bbox":
            [x, y, w, h]}`` or ``"segmentation": RLE``.
        iou_type: "bbox", "segm" or "boundary" (mask results scored by Boundary AP).
    """
    if iou_type not in IOU_TYPES:
        raise InputFileError(f"unknown IoU type {iou_type!r}; use bbox, segm or boundary.")
    coco_gt = _coco(gt)
    source = str(results) if isinstance(results, (str, Path)) else "results"
    raw = load_json(results) if isinstance(results, (str, Path)) else results
    coco_dt = coco_gt.loadRes(_check_results(raw, coco_gt, iou_type, source))
    # one process: the evaluator also runs inside training loops (no forking there)
    ev = COCOeval_faster(coco_gt, coco_dt, iou_type, separate_eval=True, boundary_cpu_count=1)
    ev.evaluate()
    ev.accumulate()
    num_gt = _num_gt(coco_gt, ev._paramsEval)
    _match_pycocotools(ev, num_gt)
    ev.summarize()
    cats = coco_gt.loadCats(ev.params.catIds)
    return CocoEvaluation(
        iou_type=iou_type,
        stats=[float(s) for s in ev.stats[:12]],
        precision=np.asarray(ev.eval["precision"]),
        recall_thresholds=np.asarray(ev.params.recThrs, np.float64),
        category_ids=[int(c["id"]) for c in cats],
        class_names=[str(c["name"]) for c in cats],
        num_gt=[int(n) for n in num_gt[:, 0]],
    )


def evaluate_coco(
    gt_json: str | Path | dict, results_json: str | Path | list[dict], iou_type: IouType = "bbox"
) -> dict[str, Any]:
    """``detseg coco-eval GT RESULTS --iou-type``: ``{"stats": [12], "per_class": {...}, ...}``."""
    return run_coco_eval(gt_json, results_json, iou_type).to_dict()


def detections_to_coco(
    image_id: int, det: Detections, category_ids: Sequence[int], iou_type: IouType = "bbox"
) -> list[dict[str, Any]]:
    """One image's detections as COCO result dicts.

    Contiguous labels become ``category_ids[label]``; xyxy boxes become xywh. For "segm" and
    "boundary" the masks of ``Instances`` (or the crops of sliced ``CroppedInstances``) become
    compressed RLE and no ``bbox`` is written (so that COCO's ``loadRes`` takes area and box from
    the mask, as detectron2 does).
    """
    boxes = det.boxes.detach().to("cpu", torch.float64)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = det.scores.detach().to("cpu", torch.float64).tolist()
    cats = [int(category_ids[int(k)]) for k in det.labels.tolist()]
    if iou_type != "bbox":  # segm and boundary score masks
        rles = instance_rles(det)
        if rles is None:
            raise InputFileError("mask (segm) evaluation needs a model that predicts masks.")
        return [
            {"image_id": image_id, "category_id": c, "segmentation": rle, "score": s}
            for c, rle, s in zip(cats, rles, scores, strict=True)
        ]
    return [
        {"image_id": image_id, "category_id": c, "bbox": [round(v, 3) for v in b], "score": s}
        for c, b, s in zip(cats, xywh, scores, strict=True)
    ]


def evaluate_detections(
    dataset: DetectionSet, predictions: Sequence[Detections], iou_type: IouType = "bbox"
) -> CocoEvaluation:
    """``detseg eval --task detection``: COCO AP of ``predictions[i]`` (in original image pixels,
    contiguous labels) for ``dataset.images[i]``."""
    if len(predictions) != len(dataset.images):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset.images)} images")
    results = [
        r
        for im, det in zip(dataset.images, predictions, strict=True)
        for r in detections_to_coco(im.id, det, dataset.category_ids, iou_type)
    ]
    return run_coco_eval(dataset, results, iou_type)


def write_coco_results(path: str | Path, results: list[dict[str, Any]]) -> None:
    """Write a COCO results list (``detseg predict --save-coco``) atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(results), encoding="utf-8")
