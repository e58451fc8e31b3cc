"""Semantic-segmentation folders: CamVid (``train/`` + ``trainannot/``) and VOC layouts.

Images and labels are paired by file stem (CamVid's train images may be JPEGs, labels PNGs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from detseg.data.images import IMAGE_SUFFIXES, image_size, read_image, read_label
from detseg.data.preprocess import Preprocess
from detseg.errors import InputFileError

CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@dataclass(frozen=True)
class LayoutInfo:
    """Where a split's images and labels live, and the dataset's defaults."""

    image_dir: Path
    label_dir: Path
    stems: list[str] | None
    class_names: tuple[str, ...]
    ignore_index: int


def find_layout(root: str | Path, split: str) -> LayoutInfo:
    """Recognise ``root``: CamVid (``split/`` + ``{split}annot/``) or VOC (``JPEGImages/`` ...)."""
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(f"{root}: no such dataset folder.")
    if (root / split).is_dir() and (root / f"{split}annot").is_dir():
        names = CAMVID_CLASSES if "camvid" in root.name.lower() else ()
        return LayoutInfo(root / split, root / f"{split}annot", None, names, 11 if names else 255)
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise InputFileError(f"{listing}: split list not found (VOC layout).")
        stems = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
        return LayoutInfo(root / "JPEGImages", root / "SegmentationClass", stems, VOC_CLASSES, 255)
    raise InputFileError(
        f"{root}: unknown layout for split {split!r}; expected {split}/ and {split}annot/ "
        "(CamVid) or JPEGImages/ + SegmentationClass/ + ImageSets/Segmentation/ (VOC)."
    )


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def pair_files(layout: LayoutInfo) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a split; a label without image or the reverse is an error."""
    images, labels = _by_stem(layout.image_dir), _by_stem(layout.label_dir)
    stems = layout.stems if layout.stems is not None else sorted(images)
    if not stems:
        raise InputFileError(f"{layout.image_dir}: no images found.")
    pairs = []
    for stem in stems:
        if stem not in images:
            raise InputFileError(f"{layout.image_dir}: image {stem!r} is missing.")
        if stem not in labels:
            raise InputFileError(f"{layout.label_dir}: no label for image {images[stem].name}.")
        pairs.append((images[stem], labels[stem]))
    return pairs


def check_label(label: np.ndarray, path: Path, num_classes: int, ignore_index: int) -> None:
    """Raise ``InputFileError`` naming ``path`` if a value is neither a class nor ``ignore_index``."""
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))[:5]
        raise InputFileError(
            f"{path}: label values {values} are out of range (classes 0..{num_classes - 1}, "
            f"ignore {ignore_index}); check --num-classes / --ignore-index."
        )


class SegmentationFolder(Dataset):
    """A split of a CamVid- or VOC-layout folder.

    Items are ``(image (3, H, W) float32 preprocessed, label (H, W) int64)``.

    Args:
        root: dataset folder; split: "train", "val", "test" ...
        num_classes: number of real classes; label values must be < num_classes or ignore_index.
        ignore_index: the void label (CamVid: 11, VOC: 255), excluded from loss and metrics.
        transform: albumentations-style ``transform(image=, mask=) -> dict`` (train augmentation).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        preprocess: Preprocess | None = None,
        transform: Callable[..., dict] | None = None,
    ) -> None:
        layout = find_layout(root, split)
        self.pairs = pair_files(layout)
        self.class_names = layout.class_names
        self.num_classes = num_classes or len(layout.class_names)
        if not self.num_classes:
            raise InputFileError(
                f"{root}: pass --num-classes; the dataset does not name its classes."
            )
        self.ignore_index = layout.ignore_index if ignore_index is None else ignore_index
        self.preprocess = preprocess or Preprocess()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (H, W, 3) uint8 RGB image and (H, W) uint8 label, validated."""
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise InputFileError(
                f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but image "
                f"{image_path.name} is {image.shape[1]}x{image.shape[0]}."
            )
        check_label(label, label_path, self.num_classes, self.ignore_index)
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.read_pair(index)
        if self.transform is not None:
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        return self.preprocess(image), torch.from_numpy(label.astype(np.int64))

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every image, from headers only."""
        return [image_size(p) for p, _ in self.pairs]
