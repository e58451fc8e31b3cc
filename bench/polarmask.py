"""PolarMask measurements: the 36-ray representation's mask IoU ceiling and target-generation time.

    PYTHONPATH=. python bench/polarmask.py rays [--shared ../shared]
    PYTHONPATH=. python bench/polarmask.py timing [--shared ../shared]

``rays``: every non-crowd mask of coco128 and balloon train, encoded as 36 rays from its mass
centre (official and corrected search), decoded to the polygon, rasterised at the image size and
compared with the mask: mean / worst / 5th-percentile IoU. ``timing``: target generation per
image (coco128 at 768 px, all its objects) against one forward/backward step of polarmask_r50 and
of the small MobileNetV2 model at the same size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from detseg.data.convert import read_dataset
from detseg.data.detection import DetectionDataset
from detseg.detection.fcos import compute_locations
from detseg.instance.polarmask import (
    PolarMask,
    distance2mask,
    largest_contour,
    mass_center,
    polar_rays,
    polygons_to_masks,
)
from detseg.ops.masks import segmentation_to_mask


def _masks(path: Path, class_name: str = "object"):
    data = read_dataset(path, class_name)
    for im in data.images:
        for a in im.annotations:
            if a.segmentation is not None and not a.iscrowd:
                yield segmentation_to_mask(a.segmentation, im.height, im.width)


def ray_iou(mask: np.ndarray, official_compat: bool) -> float | None:
    """IoU of ``mask`` with its 36-ray polygon from the mass centre (None for an empty mask)."""
    contour = largest_contour(mask)
    if contour is None:
        return None
    origin = torch.tensor([mass_center(contour)], dtype=torch.float32)
    rays = polar_rays(origin, torch.from_numpy(contour).float(), official_compat)
    h, w = mask.shape
    decoded = polygons_to_masks(distance2mask(origin, rays, (h, w)), h, w)[0].numpy().astype(bool)
    m = mask.astype(bool)
    return float((decoded & m).sum() / max((decoded | m).sum(), 1))


def rays(shared: Path) -> None:
    sets = {
        "coco128": shared / "data/coco128/annotations/instances.json",
        "balloon train": shared / "data/balloon/train/via_region_data.json",
    }
    print("| data | masks | search | mean IoU | worst | 5th pct |\n|---|---|---|---|---|---|")
    for name, path in sets.items():
        masks = list(_masks(path, "balloon"))
        for compat in (True, False):
            ious = np.array([v for m in masks if (v := ray_iou(m, compat)) is not None])
            mode = "official" if compat else "corrected"
            print(
                f"| {name} | {len(ious)} | {mode} | {ious.mean():.4f} | {ious.min():.4f} | "
                f"{np.percentile(ious, 5):.4f} |"
            )


def timing(shared: Path, size: int = 768, images: int = 20) -> None:
    torch.set_num_threads(1)
    data = DetectionDataset(
        shared / "data/coco128/annotations/instances.json", max_size=size, masks=True
    )
    model = PolarMask(80)
    items = [data[i] for i in range(images)]
    start = time.perf_counter()
    objects = 0
    strides = model.head.strides
    for image, t in items:
        h, w = image.shape[-2:]
        sizes = [(-(-h // s), -(-w // s)) for s in strides]
        boxes = torch.cat((t["boxes"][:, :2], t["boxes"][:, 2:] - 1), 1)
        model.targets.assign(compute_locations(sizes, strides), boxes, t["masks"], t["labels"] + 1)
        objects += len(t["labels"])
    per_image = (time.perf_counter() - start) / images
    print(
        f"targets: {per_image * 1e3:.1f} ms/image ({objects / images:.1f} objects/image, {size} px)"
    )
    image = items[0][0][None, :, : size // 32 * 32, : size // 32 * 32]
    for name, net in (
        ("polarmask_r50", model),
        ("mobilenet_v2 64ch", PolarMask(1, "mobilenet_v2", 64, 64, 2)),
    ):
        out = net(image)
        start = time.perf_counter()
        out = net(image)
        sum(o.sum() for o in out).backward()
        print(
            f"{name} forward+backward, 1 image {tuple(image.shape[-2:])}: {time.perf_counter() - start:.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("rays", "timing"))
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
    )
    args = parser.parse_args()
    (rays if args.what == "rays" else timing)(args.shared)


if __name__ == "__main__":
    main()
