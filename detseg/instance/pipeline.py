"""Instance task glue for the CLI: predict (whole images or sliced) with PolarMask, TensorMask,
Mask R-CNN and PointRend; draw and list masks; COCO segm result files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from detseg.data.images import list_images
from detseg.detection.pipeline import predict_files, slice_config
from detseg.detection.sliced import DetectFn
from detseg.errors import DetsegError
from detseg.instance.polarmask import PolarMask
from detseg.instance.polarmask_infer import OFFICIAL_INPUT_SIZE, draw_instances, predict_image
from detseg.instance.tensormask import TensorMask, d2_test_size
from detseg.results import Instances

if TYPE_CHECKING:
    from detseg.api import LoadedModel


def _official_size(model: LoadedModel, image: np.ndarray) -> tuple[int, int] | None:
    """The (h, w) input size released weights were tested at, or None (longest side max_size)."""
    if not model.official:
        return None
    if isinstance(model.model, PolarMask):  # the official fixed test-time stretch
        return OFFICIAL_INPUT_SIZE
    if isinstance(model.model, TensorMask):  # detectron2: short side 800, long side <= 1333
        return d2_test_size(*image.shape[:2])
    return None


def _segment(model: LoadedModel, image: np.ndarray, max_size: int) -> Instances:
    """Instances of one (H, W, 3) uint8 RGB image at its own size, for any instance model."""
    net = model.model
    if hasattr(net, "postprocess"):  # dense single-shot models (PolarMask, TensorMask)
        return predict_image(
            net, image, model.preprocess, input_size=_official_size(model, image), max_size=max_size
        )
    # two-stage detectron2-style models resize internally and return Instances themselves
    with torch.inference_mode():
        return net.predict(model.preprocess(image).to(model.device), image.shape[:2])


def instance_detector(model: LoadedModel, max_size: int = 768) -> DetectFn:
    """``detect(images) -> list[Instances]`` for ``detseg.detection.sliced``: each (h, w, 3) uint8
    image (a tile view) segmented on its own, as ``_segment`` does a whole image."""
    return lambda images: [_segment(model, np.ascontiguousarray(im), max_size) for im in images]


def predict_instance_files(
    model: LoadedModel,
    source: str | Path,
    out_dir: str | Path | None,
    *,
    score_threshold: float = 0.3,
    max_size: int = 768,
    progress: bool = True,
    slice: int | None = None,
    overlap: float = 0.2,
    merge: Literal["nms", "nmm"] = "nms",
    match: Literal["iou", "ios"] = "iou",
    full_image: bool = False,
    batch_size: int = 8,
    save_coco: str | Path | None = None,
    coco_gt: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Segment instances in every image of ``source``; draw ``<out_dir>/<stem>_inst.jpg``.

    Each record lists the instances above ``score_threshold`` like detection records, each with
    its mask as COCO RLE (``"mask"``) and its area in pixels. ``slice`` runs tiled inference
    (``detseg.detection.sliced``: each tile segmented as a whole image is, its masks kept cropped
    to their extent and merged with the boxes). ``save_coco`` writes every instance (no
    threshold) as a COCO segm results file, ids as ``detseg predict`` gives them for detection.
    """
    return predict_files(
        model,
        list_images(source),
        instance_detector(model, max_size),
        slice_config(slice, overlap, merge, match, full_image, batch_size),
        out_dir,
        draw=lambda image, inst: draw_instances(image, inst, score_threshold),
        suffix="inst",
        score_threshold=score_threshold,
        iou_type="segm",
        save_coco=save_coco,
        coco_gt=coco_gt,
        progress=progress,
    )


def evaluate_instance(
    *,
    data: str | Path,
    split: str | None = "val",
    model: LoadedModel,
    limit: int | None = None,
    class_name: str = "object",
    max_size: int = 768,
    batch_size: int = 2,
    results_json: str | Path | None = None,
    **_: Any,
) -> dict[str, Any]:
    """COCO mask AP (``AP``, ``AP50``, ``AP75``) and box AP of an instance model on a split.

    PolarMask, TensorMask, Mask R-CNN and PointRend models; the R-CNNs also report ``AP90`` (mask
    AP at IoU 0.9) and run at the size their checkpoint was trained at when it records one.
    """
    from detseg.detection.pipeline import _subset, _trained_max_size, load_split
    from detseg.instance.maskrcnn import MaskRCNN
    from detseg.instance.polarmask_training import polarmask_dataset, polarmask_evaluate_fn
    from detseg.instance.rcnn_training import rcnn_evaluate_fn

    if results_json is not None:
        raise DetsegError(
            "to score a results file use `detseg coco-eval GT RESULTS --iou-type segm`."
        )
    if isinstance(model.model, MaskRCNN):
        make_evaluate, max_size = rcnn_evaluate_fn, _trained_max_size(model) or max_size
    elif isinstance(model.model, PolarMask | TensorMask):
        make_evaluate = polarmask_evaluate_fn
    else:
        raise DetsegError(
            "`detseg eval --task instance` scores PolarMask, TensorMask, Mask R-CNN and PointRend"
            f" models, not {model.name!r}."
        )
    dataset = _subset(load_split(data, split, class_name), limit)
    items = polarmask_dataset(dataset, train=False, max_size=max_size, preprocess=model.preprocess)
    model.model.eval()
    with torch.no_grad():
        metrics = make_evaluate(items, batch_size)(model.model)
    return {**metrics, "split": split, "images": len(dataset.images)}
