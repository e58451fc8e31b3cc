"""Semantic task glue: train, evaluate and predict on folders, as the CLI and API expose them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from detseg.checkpoint import CheckpointMeta
from detseg.data.folders import SegmentationFolder, check_label, find_layout, pair_files
from detseg.data.images import list_images, read_image, read_label, write_image
from detseg.data.preprocess import Preprocess
from detseg.data.transforms import semantic_train_transform
from detseg.engine.distributed import is_main_process
from detseg.engine.prefetch import BackgroundWriter, prefetch
from detseg.engine.progress import count_progress
from detseg.engine.trainer import TrainConfig, Trainer
from detseg.errors import DetsegError, InputFileError
from detseg.fileio import write_text_atomic
from detseg.semantic.losses import SegmentationLoss, enet_class_weights, semantic_loss
from detseg.semantic.metrics import ConfusionMatrix
from detseg.semantic.sliding import predict_semantic, whole_batch_predict
from detseg.semantic.visualize import overlay, palette_for

if TYPE_CHECKING:
    from detseg.api import LoadedModel


def _num_outputs(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n is None:
        raise DetsegError(f"{type(model).__name__} does not say its number of classes.")
    return int(n)


def segment(
    model: nn.Module,
    image: np.ndarray,
    preprocess: Preprocess,
    *,
    sliding: bool = False,
    crop: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 labels, whole-image or sliding-window."""
    result = predict_semantic(
        model,
        image,
        preprocess,
        _num_outputs(model),
        mode="sliding" if sliding else "whole",
        crop=crop,
        stride=stride or max(crop * 2 // 3, 1),
        batch_size=batch_size,
        device=device,
        size_divisor=int(getattr(model, "size_divisor", 1)),
    )
    return result.labels.numpy()


def segment_batch(
    model: nn.Module,
    images: Sequence[np.ndarray],
    preprocess: Preprocess,
    device: torch.device | None = None,
) -> list[np.ndarray]:
    """Whole-image labels ((H, W) int64 each) of same-size (H, W, 3) uint8 RGB images, in one
    forward pass (video frames)."""
    results = whole_batch_predict(
        model,
        images,
        preprocess,
        _num_outputs(model),
        device=device,
        size_divisor=int(getattr(model, "size_divisor", 1)),
    )
    return [r.labels.numpy() for r in results]


def _score(cm: ConfusionMatrix, class_names: Sequence[str], convention: str) -> dict[str, Any]:
    metrics = cm.compute(convention)
    names = list(class_names) or [str(i) for i in range(cm.num_classes)]
    metrics["per_class_IoU"] = dict(zip(names, metrics["per_class_IoU"], strict=False))
    metrics["per_class_acc"] = dict(zip(names, metrics["per_class_acc"], strict=False))
    return metrics


def evaluate_model_on(
    model: nn.Module,
    dataset: SegmentationFolder,
    preprocess: Preprocess,
    limit: int | None = None,
    progress: bool = False,
    **segment_options: Any,
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over (the first ``limit`` images of) ``dataset``."""
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    device = next(model.parameters()).device
    with count_progress(count, "eval", enabled=progress) as advance:
        for i in range(count):
            image, label = dataset.read_pair(i)
            cm.update(segment(model, image, preprocess, device=device, **segment_options), label)
            advance(1)
    return cm


def _score_saved(
    pred_dir: Path, dataset: SegmentationFolder, num_pred_classes: int
) -> ConfusionMatrix:
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    preds = {p.stem.removesuffix("_label"): p for p in list_images(pred_dir)}
    for image_path, label_path in dataset.pairs:
        pred_path = preds.get(image_path.stem)
        if pred_path is None:
            raise InputFileError(
                f"{pred_dir}: no prediction for {image_path.name} (matched by name)."
            )
        pred, label = read_label(pred_path), read_label(label_path)
        if pred.shape != label.shape:
            raise InputFileError(
                f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} but label "
                f"{label_path.name} is {label.shape[1]}x{label.shape[0]}."
            )
        check_label(pred, pred_path, num_pred_classes, dataset.ignore_index)
        cm.update(pred, label)
    return cm


def evaluate_semantic(
    *,
    data: str | Path,
    split: str = "val",
    model: LoadedModel | None = None,
    pred_dir: str | Path | None = None,
    convention: str = "standard",
    num_classes: int | None = None,
    ignore_index: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    **segment_options: Any,
) -> dict[str, Any]:
    """Dataset-level metrics of a model (run on the split) or of saved label PNGs in ``pred_dir``.

    Returns ``mIoU``, ``per_class_IoU`` {name: %}, ``pixel_acc``, ``mean_class_acc`` ... in percent.
    """
    if (model is None) == (pred_dir is None):
        raise DetsegError(
            "pass either --model (to run it) or --pred (saved predictions), not both."
        )
    if model is not None:
        dataset = SegmentationFolder(data, split, num_classes, ignore_index, model.preprocess)
        cm = evaluate_model_on(
            model.model, dataset, model.preprocess, limit, progress, **segment_options
        )
        names = model.class_names or dataset.class_names
    else:
        dataset = SegmentationFolder(data, split, num_classes, ignore_index)
        cm = _score_saved(Path(pred_dir), dataset, dataset.num_classes)
        names = dataset.class_names
    metrics = _score(cm, names[: dataset.num_classes], convention)
    metrics.update(
        {"split": split, "images": len(dataset) if limit is None else min(limit, len(dataset))}
    )
    return metrics


def _write_label_pictures(
    targets: list[Path], image: np.ndarray, labels: np.ndarray, colours: np.ndarray
) -> None:
    """``targets`` = [label PNG (palette), overlay PNG] of one image's (H, W) labels."""
    write_image(targets[0], labels.astype(np.uint8), colours)
    write_image(targets[1], overlay(image, labels, colours))


def predict_files(
    model: LoadedModel,
    source: str | Path,
    out_dir: str | Path | None,
    *,
    sliding: bool = False,
    crop: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Segment every image of ``source``; write ``<stem>_label.png`` and ``<stem>_overlay.png``."""
    paths = list_images(source)
    colours = palette_for(model.class_names)
    records = []
    with (
        count_progress(len(paths), "predict", enabled=progress) as advance,
        BackgroundWriter() as writer,  # reading, inference and writing overlap
    ):
        for path, image in prefetch((p, read_image(p)) for p in paths):
            labels = segment(
                model.model,
                image,
                model.preprocess,
                sliding=sliding,
                crop=crop,
                stride=stride,
                batch_size=batch_size,
                device=model.device,
            )
            ids, counts = np.unique(labels, return_counts=True)
            names = model.class_names
            record: dict[str, Any] = {
                "file": str(path),
                "width": image.shape[1],
                "height": image.shape[0],
                "classes": {
                    (names[i] if i < len(names) else str(i)): round(c / labels.size, 5)
                    for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
                },
            }
            if out_dir is not None:
                targets = [
                    Path(out_dir) / f"{path.stem}_{kind}.png" for kind in ("label", "overlay")
                ]
                writer.submit(_write_label_pictures, targets, image, labels, colours)
                record["outputs"] = [str(t) for t in targets]
            records.append(record)
            advance(1)
    return records


def _label_counts(dataset: SegmentationFolder) -> torch.Tensor:
    counts = torch.zeros(dataset.num_classes, dtype=torch.float64)
    for _, label_path in dataset.pairs:
        label = torch.from_numpy(read_label(label_path).astype(np.int64)).reshape(-1)
        label = label[label < dataset.num_classes]
        counts += torch.bincount(label, minlength=dataset.num_classes).double()
    return counts


def load_imagenet_encoder(model: nn.Module, path: str | Path) -> None:
    """Load a torchvision ImageNet file into ``model``'s encoder, strictly (classifier dropped).

    The encoder is the model itself (FCN-VGG: its fc6/fc7 convolutions take the classifier), its
    ``backbone`` (the torchvision trunks) or its ``encoder`` (SegNet's VGG16-BN).
    """
    for part in (model, getattr(model, "backbone", None), getattr(model, "encoder", None)):
        if part is not None and hasattr(part, "load_imagenet"):
            part.load_imagenet(path)
            return
    raise DetsegError(
        f"{type(model).__name__} has no torchvision encoder for ImageNet weights (the paper "
        "trains it from scratch): omit --imagenet."
    )


def train_semantic(
    *,
    model: str,
    data: str | Path,
    out_dir: str | Path = "runs/semantic",
    split: str = "train",
    val_split: str | None = "val",
    steps: int = 1000,
    batch_size: int = 4,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    crop: tuple[int, int] = (256, 256),
    eval_every: int = 200,
    val_limit: int | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    class_weights: str | None = None,
    dice_weight: float = 0.0,
    weights: str | None = None,
    imagenet: str | Path | None = None,
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
    """Train a semantic model on a CamVid/VOC folder; returns the run summary.

    ``class_weights="enet"`` weights CE by ``1/ln(1.02 + p_c)`` from the training labels;
    ``imagenet``: a torchvision ImageNet file for the encoder (``load_imagenet_encoder``).
    """
    from detseg.api import load_model

    torch.manual_seed(seed)
    layout = find_layout(data, split)
    n_classes = num_classes or len(layout.class_names)
    if not n_classes:
        raise DetsegError(f"{data}: pass --num-classes; the dataset does not name its classes.")
    ignore = layout.ignore_index if ignore_index is None else ignore_index
    pair_files(layout)
    kwargs = {"num_classes": n_classes, **(model_kwargs or {})}
    loaded = load_model(model, weights=weights, device=device, **kwargs)
    if imagenet is not None and not resume:
        load_imagenet_encoder(loaded.model, imagenet)
    train_set = SegmentationFolder(
        data, split, n_classes, ignore, loaded.preprocess, semantic_train_transform(crop, ignore)
    )
    weights_list = enet_class_weights(_label_counts(train_set)) if class_weights == "enet" else None
    criterion = SegmentationLoss(ignore, weights_list, dice_weight)
    val_set = (
        SegmentationFolder(data, val_split, n_classes, ignore, loaded.preprocess)
        if val_split
        else None
    )
    names = loaded.class_names or train_set.class_names

    def loss_fn(net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        aux_weights = getattr(getattr(net, "module", net), "aux_weights", None)
        return semantic_loss(net(images), labels, criterion.to(images.device), aux_weights)

    def evaluate_fn(net: nn.Module) -> dict[str, float]:
        if val_set is None:
            return {}
        cm = evaluate_model_on(net, val_set, loaded.preprocess, val_limit)
        m = cm.compute("standard")
        return {"mIoU": m["mIoU"] or 0.0, "pixel_acc": m["pixel_acc"] or 0.0}

    meta = CheckpointMeta(
        model=loaded.name,
        kwargs=loaded.kwargs,
        preprocess=loaded.preprocess.to_dict(),
        class_names=list(names),
    )
    cfg = TrainConfig(
        out_dir=str(out_dir),
        max_steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        eval_every=eval_every,
        seed=seed,
        device=device,
        num_workers=num_workers,
        log_every=log_every,
        grad_accum=grad_accum,
        sync_bn=sync_bn,
    )
    trainer = Trainer(loaded.model, train_set, cfg, loss_fn, evaluate_fn, meta=meta)
    if not resume:
        trainer.evaluate()  # the starting point of the mIoU curve
    history = trainer.fit(resume=resume, progress=progress)
    summary = {
        "out_dir": str(out_dir),
        "steps": trainer.step,
        "first_eval": history.evals[0] if history.evals else None,
        "last_eval": history.evals[-1] if history.evals else None,
        "best_step": history.best_step,
        "best_mIoU": history.best_value,
        "checkpoints": [str(Path(out_dir) / n) for n in ("best.safetensors", "last.safetensors")],
        "curves": str(Path(out_dir) / "curves.png"),
    }
    if is_main_process():
        write_text_atomic(Path(out_dir) / "summary.json", json.dumps(summary, indent=1))
    return summary
