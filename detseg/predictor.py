"""One in-memory predictor for every task: an image array in, a ``Prediction`` out.

The file-based commands (``detseg predict``, ``detseg matte``) read and write files; the server,
video, Ray and benchmark paths need the same inference on arrays already in memory. ``Predictor``
wraps a ``LoadedModel`` and dispatches to the task's own inference function (the ones the file
commands use, so both give the same results)::

    loaded = detseg.api.load_model("fcos_mobilenetv2", "best.safetensors")
    predictor = Predictor(loaded, score_threshold=0.3)
    prediction = predictor(image)            # (H, W, 3) uint8 RGB
    prediction.to_json(); prediction.render(image)

A ``Prediction`` holds the task's result in numpy/torch form, its JSON summary (the records
``detseg predict --json`` prints) and draws itself: the label overlay (semantic), boxes
(detection), translucent masks (instance) or the RGBA cut-out (matting).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from detseg.detection.sliced import detection_records
from detseg.errors import DetsegError, InputFileError
from detseg.results import Detections, Instances

if TYPE_CHECKING:
    from detseg.api import LoadedModel

TASKS_WITH_PLATE = ("bgmv2",)  # registry-name prefixes of models that need a background plate


@dataclass
class Prediction:
    """The result of one image.

    Attributes:
        task: "semantic", "detection", "instance" or "matting".
        labels: semantic only, (H, W) int64 class ids.
        detections: detection/instance only (``Instances`` carry (N, H, W) bool masks).
        alpha: matting only, (H, W) float32 in [0, 1]; ``foreground`` (H, W, 3) float32 or None.
        class_names: names indexed by class id.
    """

    task: str
    width: int
    height: int
    class_names: tuple[str, ...] = ()
    labels: np.ndarray | None = None
    detections: Detections | None = None
    alpha: np.ndarray | None = None
    foreground: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _name(self, label: int) -> str:
        return self.class_names[label] if label < len(self.class_names) else str(label)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary: class fractions (semantic), detections with RLE masks (detection /
        instance) or alpha coverage (matting)."""
        out: dict[str, Any] = {"task": self.task, "width": self.width, "height": self.height}
        if self.labels is not None:
            ids, counts = np.unique(self.labels, return_counts=True)
            out["classes"] = {
                self._name(i): round(c / self.labels.size, 5)
                for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
            }
        if self.detections is not None:
            out["detections"] = detection_records(self.detections, self.class_names)
        if self.alpha is not None:
            out["foreground_fraction"] = round(float(self.alpha.mean()), 5)
        return out

    def render(self, image: np.ndarray) -> np.ndarray:
        """The picture of the result over (H, W, 3) uint8 RGB ``image``: (H, W, 3) uint8, or for
        matting the (H, W, 4) uint8 RGBA cut-out."""
        if self.labels is not None:
            from detseg.semantic.visualize import overlay, palette_for

            colours = palette_for(self.class_names)
            return overlay(image, self.labels, colours)
        if isinstance(self.detections, Instances):
            from detseg.instance.polarmask_infer import draw_instances

            return draw_instances(image, self.detections, score_thresh=0.0)
        if self.detections is not None:
            from detseg.detection.pipeline import draw_detections

            return draw_detections(image, self.detections, self.class_names)
        if self.alpha is not None:
            from detseg.matting.bgmv2_infer import composite

            foreground = (
                self.foreground if self.foreground is not None else image.astype(np.float32) / 255.0
            )
            return composite(self.alpha, foreground)
        raise DetsegError("this prediction holds no result to draw.")


def check_image(image: Any, what: str = "image") -> np.ndarray:
    """``image`` as a contiguous (H, W, 3) uint8 array; ``InputFileError`` for anything else."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise InputFileError(
            f"{what} must be an (H, W, 3) uint8 RGB array, got {arr.dtype} {tuple(arr.shape)}."
        )
    return np.ascontiguousarray(arr)


class Predictor:
    """In-memory inference for one loaded model of any task.

    Args:
        loaded: a ``detseg.api.LoadedModel``.
        exact: run the float32 reference path; by default the fast inference path
            (``detseg.engine.fast``: folded BatchNorm, measured memory layout) runs, whose outputs
            stay within 1e-4 of it.
        precision: fast-path precision, ``"f32"``, ``"bf16"`` or ``"fp16"`` (CUDA).
        score_threshold: detection/instance: keep detections at or above it.
        sliding, crop, stride, batch_size: semantic sliding-window inference (``batch_size`` is
            also the slice batch of sliced detection).
        slice, overlap, merge, match, full_image: detection sliced inference (see
            ``detseg.detection.sliced``); ``slice=None`` runs the whole image.
        max_size: detection/instance input size (longest side); default the model's own.
        strategy: GFM test-time strategy ("hybrid" or "resize").
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        exact: bool = False,
        precision: str = "f32",
        **options: Any,
    ) -> None:
        from detseg.engine.fast import for_inference

        self.exact, self.precision = exact, precision
        self.loaded = for_inference(loaded, exact, precision)
        self.task = loaded.task
        self._configure(**options)

    def _configure(
        self,
        score_threshold: float = 0.3,
        sliding: bool = False,
        crop: int = 512,
        stride: int | None = None,
        batch_size: int = 4,
        slice: int | None = None,
        overlap: float = 0.2,
        merge: str = "nms",
        match: str = "iou",
        full_image: bool = False,
        max_size: int | None = None,
        strategy: str = "hybrid",
    ) -> None:
        self.options: dict[str, Any] = dict(
            score_threshold=score_threshold,
            sliding=sliding,
            crop=crop,
            stride=stride,
            batch_size=batch_size,
            slice=slice,
            overlap=overlap,
            merge=merge,
            match=match,
            full_image=full_image,
            max_size=max_size,
            strategy=strategy,
        )
        self.score_threshold = score_threshold
        self.semantic_options = dict(
            sliding=sliding, crop=crop, stride=stride, batch_size=batch_size
        )
        self.max_size = max_size
        self.strategy = strategy
        self._detect = None
        if self.task == "detection":
            from detseg.detection.pipeline import detector_fn, slice_config

            self._detect = detector_fn(self.loaded, max_size)
            self._slice_cfg = slice_config(slice, overlap, merge, match, full_image, batch_size)  # type: ignore[arg-type]
        elif slice is not None:
            raise DetsegError(f"slicing is not available for {self.task} models here.")

    def with_options(self, **options: Any) -> Predictor:
        """A predictor of the same (already prepared) model with ``options`` replacing some of
        this one's."""
        clone = copy.copy(self)
        clone._configure(**{**self.options, **options})
        return clone

    @property
    def needs_plate(self) -> bool:
        """True for models that take a background plate (BGMv2)."""
        return self.loaded.name.startswith(TASKS_WITH_PLATE)

    def __call__(self, image: np.ndarray, bgr: np.ndarray | None = None) -> Prediction:
        """Predict one (H, W, 3) uint8 RGB image (``bgr``: the background plate for BGMv2)."""
        image = check_image(image)
        base = self._base(image)
        if self.task == "semantic":
            return Prediction(**base, labels=self._segment(image))
        if self.task == "detection":
            from detseg.detection.pipeline import detect_image

            det = detect_image(self._detect, image, self._slice_cfg)
            return Prediction(**base, detections=det.above(self.score_threshold))
        if self.task == "instance":
            from detseg.instance.pipeline import _segment

            inst = _segment(self.loaded, image, self.max_size or 768)
            return Prediction(**base, detections=inst.above(self.score_threshold))
        if self.task == "matting":
            return self._matte(image, bgr, base)
        raise DetsegError(f"no in-memory predictor for task {self.task!r}.")

    def predict_batch(
        self, images: Sequence[np.ndarray], bgr: np.ndarray | None = None
    ) -> list[Prediction]:
        """Predict several (H, W, 3) uint8 RGB images (video frames), one ``Prediction`` each,
        equal to calling the predictor on each image.

        Same-size images go through the network in one forward pass where the task's inference
        allows it (whole-image semantic, unsliced detection); other cases run image by image.
        """
        images = [check_image(image) for image in images]
        if not images:
            return []
        same_size = len({image.shape for image in images}) == 1
        if self.task == "semantic" and same_size and not self.semantic_options["sliding"]:
            from detseg.semantic.pipeline import segment_batch

            loaded = self.loaded
            labels = segment_batch(loaded.model, images, loaded.preprocess, loaded.device)
            return [
                Prediction(**self._base(image), labels=lab)
                for image, lab in zip(images, labels, strict=True)
            ]
        if self.task == "detection" and self._slice_cfg is None:
            dets = self._detect(images)
            return [
                Prediction(**self._base(image), detections=det.above(self.score_threshold))
                for image, det in zip(images, dets, strict=True)
            ]
        return [self(image, bgr) for image in images]

    def _base(self, image: np.ndarray) -> dict[str, Any]:
        h, w = image.shape[:2]
        return dict(task=self.task, width=w, height=h, class_names=tuple(self.loaded.class_names))

    def _segment(self, image: np.ndarray) -> np.ndarray:
        from detseg.semantic.pipeline import segment

        loaded = self.loaded
        return segment(
            loaded.model, image, loaded.preprocess, device=loaded.device, **self.semantic_options
        )

    def _matte(self, image: np.ndarray, bgr: np.ndarray | None, base: dict) -> Prediction:
        if self.needs_plate:
            from detseg.matting.bgmv2_infer import matte_pair

            if bgr is None:
                raise InputFileError(
                    f"{self.loaded.name} needs the background plate (bgr) of the photo."
                )
            maps = matte_pair(
                self.loaded.model, image, check_image(bgr, "plate"), self.loaded.device
            )
            return Prediction(**base, alpha=maps["pha"], foreground=maps["fgr"])
        from detseg.matting.gfm_infer import infer_gfm

        maps = infer_gfm(self.loaded.model, image, self.strategy)
        return Prediction(**base, alpha=maps["alpha"].astype(np.float32))
