"""Detection task glue: train, evaluate and predict, as the CLI and API expose them.

``data`` is a COCO instances JSON, a VIA folder or JSON (balloon), a YOLO folder, or a root holding
splits: ``<data>/<split>/`` (VIA or YOLO), ``<data>/annotations/instances_<split>*.json`` (COCO,
images in ``<data>/<split>*/`` or ``<data>/images/<split>*/``) or ``<data>/images/<split>/`` (YOLO).
A dataset without splits (a single JSON, coco128) serves every split whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
import torch
from torch import nn

from detseg.checkpoint import CheckpointMeta, save_checkpoint
from detseg.data.coco import DetectionSet, read_coco
from detseg.data.convert import read_dataset
from detseg.data.detection import DetectionDataset
from detseg.data.images import list_images, read_image, write_image
from detseg.data.preprocess import Preprocess
from detseg.detection.coco_eval import (
    IouType,
    detections_to_coco,
    evaluate_detections,
    run_coco_eval,
    write_coco_results,
)
from detseg.detection.fcos_training import collate_detection, fcos_evaluate_fn, fcos_loss
from detseg.detection.sliced import (
    DetectFn,
    SliceConfig,
    batched_detector,
    detection_records,
    sliced_predict,
)
from detseg.engine.distributed import is_main_process, rank_world
from detseg.engine.prefetch import BackgroundWriter, prefetch
from detseg.engine.progress import count_progress
from detseg.engine.trainer import TrainConfig, Trainer
from detseg.errors import DetsegError, InputFileError
from detseg.fileio import write_text_atomic
from detseg.results import Detections

if TYPE_CHECKING:
    from detseg.api import LoadedModel

DEFAULT_MAX_SIZE = 1333  # longest input side at inference when the checkpoint does not say


# ------------------------------------------------------------------------------------- data
def _coco_image_root(root: Path, split: str) -> Path | None:
    for parent in (root, root / "images"):
        found = sorted(p for p in parent.glob(f"{split}*") if p.is_dir())
        if found:
            return found[0]
    return None


def _yolo_split(root: Path, split: str) -> DetectionSet:
    full = read_dataset(root)
    folder = (root / "images" / split).resolve()
    images = [r for r in full.images if r.path.resolve().is_relative_to(folder)]
    return replace(full, images=images, source=root / "images" / split)


def load_split(data: str | Path, split: str | None, class_name: str = "object") -> DetectionSet:
    """The annotated images of one split of ``data`` (see the module docstring for the layouts).

    Raises:
        InputFileError: ``data`` missing or in no known layout, or its annotations are malformed.
    """
    root = Path(data)
    if not root.exists():
        raise InputFileError(
            f"{root}: no such file or folder; pass a COCO JSON, a VIA folder or a YOLO folder."
        )
    if root.is_dir() and split:
        coco = sorted((root / "annotations").glob(f"instances_{split}*.json"))
        if coco:
            return read_coco(coco[0], image_root=_coco_image_root(root, split))
        if (root / split).is_dir():
            return read_dataset(root / split, class_name)
        if (root / "images" / split).is_dir():
            return _yolo_split(root, split)
    return read_dataset(root, class_name)


# -------------------------------------------------------------------------------- detectors
def _trained_max_size(loaded: LoadedModel) -> int | None:
    """The ``max_size`` our training recorded in the checkpoint (``extra``), if any."""
    if not loaded.weights or not str(loaded.weights).endswith(".safetensors"):
        return None
    from safetensors import safe_open

    from detseg.checkpoint import META_KEY

    with safe_open(str(loaded.weights), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    size = json.loads(raw).get("extra", {}).get("max_size") if raw else None
    return int(size) if size else None


def detector_fn(loaded: LoadedModel, max_size: int | None = None) -> DetectFn:
    """``detect(images) -> list[Detections]`` for a loaded FCOS or HOG+SVM model.

    ``images`` are (H, W, 3) uint8 RGB arrays; boxes come back in their pixels. FCOS shrinks each
    image to ``max_size`` on its longest side (default: the size it was trained at, else 1333).
    """
    model = loaded.model
    if hasattr(model, "detect"):  # HOG + SVM: its own pyramid, one image at a time
        return lambda images: [model.detect(image) for image in images]
    if not hasattr(model, "postprocess"):
        raise DetsegError(f"model {loaded.name!r} is not a detector (no postprocess).")
    size = max_size or _trained_max_size(loaded) or DEFAULT_MAX_SIZE
    return batched_detector(model, loaded.preprocess, max_size=size, device=loaded.device)


def detect_image(
    detect: DetectFn, image: np.ndarray, slice_cfg: SliceConfig | None = None
) -> Detections:
    """One image's detections, on the whole image or on tiles (``slice_cfg``) merged."""
    if slice_cfg is None:
        return detect([image])[0]
    return sliced_predict(image, detect, slice_cfg)


def slice_config(
    slice: int | None,
    overlap: float = 0.2,
    merge: Literal["nms", "nmm"] = "nms",
    match: Literal["iou", "ios"] = "iou",
    full_image: bool = False,
    batch_size: int = 8,
) -> SliceConfig | None:
    """The ``SliceConfig`` of the CLI's ``--slice/--overlap/--merge/--match`` (None: no slicing)."""
    if slice is None:
        return None
    try:
        return SliceConfig(slice, overlap, full_image, merge, match, batch_size=batch_size)
    except ValueError as exc:
        raise DetsegError(f"bad slicing options: {exc}.") from exc


# -------------------------------------------------------------------------------- evaluation
def _subset(dataset: DetectionSet, limit: int | None) -> DetectionSet:
    return dataset if limit is None else replace(dataset, images=dataset.images[:limit])


def predict_dataset(
    detect: DetectFn,
    dataset: DetectionSet,
    slice_cfg: SliceConfig | None = None,
    progress: bool = False,
) -> list[Detections]:
    """Detections for every image of ``dataset``, in order, in the files' pixels."""
    out = []
    with count_progress(len(dataset.images), "eval", enabled=progress) as advance:
        for record in dataset.images:
            out.append(detect_image(detect, read_image(record.path), slice_cfg))
            advance(1)
    return out


def _summary(evaluation: Any, split: str | None, images: int) -> dict[str, Any]:
    out = evaluation.to_dict()
    out.update({"AP": out["stats"][0], "AP50": out["stats"][1], "AP75": out["stats"][2]})
    out.update({"split": split, "images": images})
    return out


def evaluate_detection(
    *,
    data: str | Path,
    split: str | None = "val",
    model: LoadedModel | None = None,
    results_json: str | Path | None = None,
    iou_type: IouType = "bbox",
    limit: int | None = None,
    class_name: str = "object",
    max_size: int | None = None,
    slice: int | None = None,
    overlap: float = 0.2,
    merge: Literal["nms", "nmm"] = "nms",
    match: Literal["iou", "ios"] = "iou",
    progress: bool = True,
) -> dict[str, Any]:
    """COCO AP of a model run on a split, or of a saved COCO results file, against its labels.

    Returns ``{"stats": [12 pycocotools numbers], "stat_names", "per_class": {name: {AP, AP50,
    AP75, num_gt, category_id}}, "AP", "AP50", "AP75", "split", "images"}`` (fractions in 0..1).
    """
    if (model is None) == (results_json is None):
        raise DetsegError("pass either --model (to run it) or --results (a COCO results file).")
    dataset = _subset(load_split(data, split, class_name), limit)
    if results_json is not None:
        return _summary(run_coco_eval(dataset, results_json, iou_type), split, len(dataset.images))
    if iou_type != "bbox":
        raise DetsegError(f"model {model.name!r} predicts boxes only; use --iou-type bbox.")
    detect = detector_fn(model, max_size)
    slice_cfg = slice_config(slice, overlap, merge, match)
    predictions = predict_dataset(detect, dataset, slice_cfg, progress)
    predictions = _dataset_labels(predictions, model.class_names, dataset.class_names)
    return _summary(evaluate_detections(dataset, predictions), split, len(dataset.images))


def _dataset_labels(
    predictions: list[Detections], model_names: Sequence[str], data_names: Sequence[str]
) -> list[Detections]:
    """Model labels -> dataset labels by class name when the model's classes are some of the
    dataset's in another order (e.g. a one-class HOG model of a many-class dataset); otherwise
    the labels are kept."""
    if list(model_names) == list(data_names) or not set(model_names) <= set(data_names):
        return predictions
    mapping = torch.tensor([list(data_names).index(n) for n in model_names], dtype=torch.int64)
    return [replace(d, labels=mapping[d.labels]) for d in predictions]


# -------------------------------------------------------------------------------- prediction
def _colour(label: int) -> tuple[int, int, int]:
    hue = (label * 47) % 180  # spread neighbouring ids around the hue circle
    rgb = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0]
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def draw_detections(
    image: np.ndarray, det: Detections, class_names: Sequence[str] = ()
) -> np.ndarray:
    """A copy of (H, W, 3) uint8 RGB ``image`` with each box and ``"<class> <score>"`` drawn."""
    out = np.ascontiguousarray(image.copy())
    thick = max(1, round(max(image.shape[:2]) / 500))
    for box, score, label in zip(
        det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
    ):
        x1, y1, x2, y2 = (round(v) for v in box)
        colour = _colour(label)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        name = class_names[label] if label < len(class_names) else str(label)
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, thick)
        top, left = max(y1 - th - base, 0), max(min(x1, out.shape[1] - tw), 0)
        cv2.rectangle(out, (left, top), (left + tw, top + th + base), colour, -1)
        cv2.putText(
            out, text, (left, top + th), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 0), thick
        )
    return out


def _coco_ids(
    gt: str | Path | None, paths: list[Path], names: Sequence[str], num_classes: int
) -> tuple[list[int], list[int]]:
    """(image id per path, category id per label): from ``gt`` by file name and class name, else
    1, 2, ... in order and ``label + 1``."""
    if gt is None:
        return list(range(1, len(paths) + 1)), list(range(1, num_classes + 1))
    dataset = read_coco(gt)
    by_name = {Path(r.file_name).name: r.id for r in dataset.images}
    missing = [p.name for p in paths if p.name not in by_name]
    if missing:
        raise InputFileError(f"{gt}: no image named {missing[0]}; pass the matching ground truth.")
    cat_of = {c.name: c.id for c in dataset.categories}
    unknown = [n for n in names if n not in cat_of]
    if unknown:
        raise InputFileError(f"{gt}: no category named {unknown[0]!r} (the model's classes).")
    return [by_name[p.name] for p in paths], [cat_of[n] for n in names]


def _record(path: Path, image: np.ndarray, det: Detections, names: Sequence[str]) -> dict:
    return {
        "file": str(path),
        "width": image.shape[1],
        "height": image.shape[0],
        "detections": detection_records(det, names),
    }


Draw = Callable[[np.ndarray, Detections], np.ndarray]


def _draw_to(target: Path, draw: Draw, image: np.ndarray, det: Detections) -> None:
    write_image(target, draw(image, det))


def predict_files(
    model: LoadedModel,
    paths: Sequence[Path],
    detect: DetectFn,
    slice_cfg: SliceConfig | None,
    out_dir: str | Path | None,
    *,
    draw: Draw,
    suffix: str,
    score_threshold: float,
    iou_type: IouType = "bbox",
    save_coco: str | Path | None = None,
    coco_gt: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The folder loop of ``detseg predict`` for boxes and instances: images read ahead in a
    thread, ``detect`` (whole image or sliced), pictures ``<out_dir>/<stem>_<suffix>.jpg`` drawn
    and written in a writer thread, so reading, inference and writing overlap.

    Returns one record per image (``_record``: detections above ``score_threshold``); ``save_coco``
    writes every detection (no threshold) as COCO ``iou_type`` results, ids from ``coco_gt`` (by
    file and class name) when given, else 1, 2, ... and ``label + 1``.
    """
    names = list(model.class_names)
    num_classes = int(getattr(model.model, "num_classes", len(names)))
    image_ids, category_ids = (
        _coco_ids(coco_gt, paths, names, num_classes) if save_coco else ([], [])
    )
    records, results = [], []
    with (
        count_progress(len(paths), "predict", enabled=progress) as advance,
        BackgroundWriter() as writer,
    ):
        for i, (path, image) in enumerate(prefetch((p, read_image(p)) for p in paths)):
            det = detect_image(detect, image, slice_cfg)
            if save_coco:
                results += detections_to_coco(image_ids[i], det, category_ids, iou_type)
            det = det.above(score_threshold)
            record = _record(path, image, det, names)
            if out_dir is not None:
                target = Path(out_dir) / f"{path.stem}_{suffix}.jpg"
                writer.submit(_draw_to, target, draw, image, det)
                record["outputs"] = [str(target)]
            records.append(record)
            advance(1)
    if save_coco:
        write_coco_results(save_coco, results)
    return records


def predict_detection_files(
    model: LoadedModel,
    source: str | Path,
    out_dir: str | Path | None,
    *,
    score_threshold: float = 0.3,
    max_size: int | None = None,
    slice: int | None = None,
    overlap: float = 0.2,
    merge: Literal["nms", "nmm"] = "nms",
    match: Literal["iou", "ios"] = "iou",
    full_image: bool = False,
    batch_size: int = 8,
    save_coco: str | Path | None = None,
    coco_gt: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Detect in every image of ``source``; draw ``<out_dir>/<stem>_det.jpg``; return summaries.

    Each record: ``{"file", "width", "height", "detections": [{"label", "class", "score",
    "box": xyxy pixels}], "outputs"}`` (detections with score >= ``score_threshold``).
    ``slice`` runs tiled inference (see ``detseg.detection.sliced``); FCOS shrinks tiles larger
    than its ``max_size``, so pick ``slice <= max_size`` to gain resolution. ``save_coco``: see
    ``predict_files``.
    """
    names = list(model.class_names)
    return predict_files(
        model,
        list_images(source),
        detector_fn(model, max_size),
        slice_config(slice, overlap, merge, match, full_image, batch_size),
        out_dir,
        draw=lambda image, det: draw_detections(image, det, names),
        suffix="det",
        score_threshold=score_threshold,
        save_coco=save_coco,
        coco_gt=coco_gt,
        progress=progress,
    )


# ---------------------------------------------------------------------------------- training
def _train_hog_svm(
    train: DetectionSet,
    val: DetectionSet | None,
    out_dir: Path,
    seed: int,
    model_kwargs: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    from detseg.detection.hog_svm import train_hog_svm

    model, rounds = train_hog_svm(train, seed=seed, progress=progress, **model_kwargs)
    meta = CheckpointMeta(
        model="hog_svm", kwargs=model.config(), class_names=[model.class_name], extra={}
    )
    path = out_dir / "best.safetensors"
    save_checkpoint(path, model, meta)
    evaluation = None
    if val is not None:
        detect = lambda images: [model.detect(im) for im in images]  # noqa: E731
        preds = predict_dataset(detect, val, progress=progress)
        preds = _dataset_labels(preds, model.class_names, val.class_names)
        evaluation = _summary(evaluate_detections(val, preds), None, len(val.images))
    return {
        "out_dir": str(out_dir),
        "rounds": rounds,
        "last_eval": evaluation and {k: evaluation[k] for k in ("AP", "AP50", "AP75")},
        "best_AP50": evaluation and evaluation["AP50"],
        "checkpoints": [str(path)],
    }


def train_detection(
    *,
    model: str,
    data: str | Path,
    out_dir: str | Path = "runs/detection",
    split: str = "train",
    val_split: str | None = "val",
    steps: int = 1000,
    batch_size: int = 4,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    grad_clip: float | None = None,
    eval_every: int = 200,
    val_limit: int | None = None,
    max_size: int = 512,
    class_name: str = "object",
    weights: str | None = None,
    resume: bool = False,
    device: str = "auto",
    seed: int = 0,
    num_workers: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 10,
    grad_accum: int = 1,
    sync_bn: bool = False,
) -> dict[str, Any]:
    """Train a detector on ``data`` (COCO / VIA / YOLO, see the module docstring); run summary.

    FCOS models go through ``detseg.engine.trainer.Trainer`` (best checkpoint by box AP50 on
    ``val_split``; train images scale-jittered to ``max_size * [0.75, 1]``, evaluated at
    ``max_size``). ``model="hog_svm"`` trains the sliding-window baseline its own way (hard-negative
    rounds; ``model_kwargs`` go to ``train_hog_svm``) on the first class of the dataset.
    """
    out = Path(out_dir)
    torch.manual_seed(seed)
    train_set = load_split(data, split, class_name)
    val_set = _subset(load_split(data, val_split, class_name), val_limit) if val_split else None
    if model == "hog_svm":
        if rank_world()[1] > 1:
            raise DetsegError("hog_svm trains in one process; run it without torchrun.")
        summary = _train_hog_svm(train_set, val_set, out, seed, dict(model_kwargs or {}), progress)
    else:
        summary = _train_fcos(
            model,
            train_set,
            val_set,
            TrainConfig(
                out_dir=str(out),
                max_steps=steps,
                batch_size=batch_size,
                lr=lr,
                optimizer=optimizer,
                weight_decay=weight_decay,
                schedule=schedule,
                warmup_steps=warmup_steps,
                eval_every=eval_every,
                log_every=log_every,
                seed=seed,
                device=device,
                num_workers=num_workers,
                grad_clip=grad_clip,
                grad_accum=grad_accum,
                sync_bn=sync_bn,
            ),
            max_size=max_size,
            weights=weights,
            resume=resume,
            model_kwargs=model_kwargs,
            progress=progress,
        )
    summary.update({"train_data": str(train_set.source), "train_images": len(train_set.images)})
    if val_set is not None:
        summary.update({"val_data": str(val_set.source), "val_images": len(val_set.images)})
    if is_main_process():
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _recipe(loaded: LoadedModel) -> tuple[Any, Any, bool]:
    """(loss_fn, evaluate_fn factory, needs masks) of a trainable dense detector."""
    from detseg.instance.maskrcnn import MaskRCNN
    from detseg.instance.polarmask import PolarMask
    from detseg.instance.tensormask import TensorMask

    if isinstance(loaded.model, MaskRCNN):
        from detseg.instance.rcnn_training import rcnn_evaluate_fn, rcnn_loss

        return rcnn_loss, rcnn_evaluate_fn, True
    if isinstance(loaded.model, PolarMask | TensorMask):
        from detseg.instance.polarmask_training import polarmask_evaluate_fn, polarmask_loss
        from detseg.instance.tensormask_training import tensormask_loss

        loss = polarmask_loss if isinstance(loaded.model, PolarMask) else tensormask_loss
        return loss, polarmask_evaluate_fn, True
    if loaded.task != "detection" or not hasattr(loaded.model, "compute_loss"):
        raise DetsegError(
            f"model {loaded.name!r} cannot be trained here yet; train FCOS, PolarMask, "
            "TensorMask, Mask R-CNN or PointRend models."
        )
    return fcos_loss, fcos_evaluate_fn, False


def _train_fcos(
    name: str,
    train: DetectionSet,
    val: DetectionSet | None,
    cfg: TrainConfig,
    *,
    max_size: int,
    weights: str | None,
    resume: bool,
    model_kwargs: dict[str, Any] | None,
    progress: bool,
) -> dict[str, Any]:
    from detseg.api import load_model

    names = train.class_names
    kwargs = {"num_classes": len(names), **(model_kwargs or {})}
    loaded = load_model(name, weights=weights, device=cfg.device, **kwargs)
    net: nn.Module = loaded.model
    loss_fn, make_evaluate_fn, masks = _recipe(loaded)
    preprocess: Preprocess = loaded.preprocess
    train_items = DetectionDataset(
        train, train=True, max_size=max_size, preprocess=preprocess, masks=masks
    )
    evaluate_fn = None
    if val is not None:
        val_items = DetectionDataset(val, max_size=max_size, preprocess=preprocess, masks=masks)
        evaluate_fn = make_evaluate_fn(val_items, cfg.batch_size, cfg.num_workers)
    meta = CheckpointMeta(
        model=loaded.name,
        kwargs=loaded.kwargs,
        preprocess=preprocess.to_dict(),
        class_names=list(names),
        extra={"max_size": max_size},
    )
    trainer = Trainer(
        net,
        train_items,
        cfg,
        loss_fn,
        evaluate_fn,
        collate_fn=collate_detection,
        primary_metric="AP50",
        meta=meta,
    )
    if not resume:
        trainer.evaluate()  # the starting point of the AP50 curve
    history = trainer.fit(resume=resume, progress=progress)
    return {
        "out_dir": cfg.out_dir,
        "steps": trainer.step,
        "first_eval": history.evals[0] if history.evals else None,
        "last_eval": history.evals[-1] if history.evals else None,
        "best_step": history.best_step,
        "best_AP50": history.best_value,
        "checkpoints": [
            str(Path(cfg.out_dir) / n) for n in ("best.safetensors", "last.safetensors")
        ],
        "curves": str(Path(cfg.out_dir) / "curves.png"),
    }
