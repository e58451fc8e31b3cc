"""Boundary quality of trained Mask R-CNN and PointRend models, and PointRend's point head ablated.

    PYTHONPATH=. python bench/pointrend_boundary.py \
        --maskrcnn runs/maskrcnn_balloon/last.safetensors \
        --pointrend runs/pointrend_balloon/last.safetensors [--data ../shared/data/balloon]

Scores each checkpoint on balloon train and val (no augmentation, the size it was trained at) with
the training recipe's evaluator: mask AP / AP50, AP90 (mask AP at IoU 0.9), Boundary AP and box
AP50. The PointRend checkpoint is scored twice: as trained (subdivision to 224x224) and with its
masks taken from the coarse 7x7 head alone, so the two rows share every detection and differ only
in the point head's refinement. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import torch

from detseg.api import load_model
from detseg.detection.pipeline import _trained_max_size, load_split
from detseg.instance.pointrend import PointRendRoIHeads, class_channel
from detseg.instance.polarmask_training import polarmask_dataset
from detseg.instance.rcnn_training import rcnn_evaluate_fn

COLUMNS = ("AP", "AP50", "AP90", "boundary_AP", "boundary_AP50", "box_AP50")


def _coarse_mask_probs(
    self: PointRendRoIHeads, features: list[torch.Tensor], boxes: list[torch.Tensor], classes
) -> torch.Tensor:
    """Predicted-class probabilities (R, 7, 7) of the coarse head, no subdivision."""
    _, coarse = self.mask_head.predict(features[0], boxes, classes)
    return class_channel(coarse, classes)[:, 0].sigmoid()


def _scores(weights: Path, data: Path, coarse_only: bool = False) -> dict[str, dict[str, float]]:
    loaded = load_model(weights=weights, device="cpu")
    loaded.model.eval()
    if coarse_only:
        heads = loaded.model.roi_heads
        heads.mask_probs = types.MethodType(_coarse_mask_probs, heads)
    max_size = _trained_max_size(loaded) or 256
    out = {}
    for split in ("train", "val"):
        dataset = load_split(data, split, "balloon")
        items = polarmask_dataset(
            dataset, train=False, max_size=max_size, preprocess=loaded.preprocess
        )
        with torch.no_grad():
            out[split] = rcnn_evaluate_fn(items)(loaded.model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maskrcnn", type=Path, required=True)
    parser.add_argument("--pointrend", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/balloon"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {
        "Mask R-CNN (28x28 masks)": _scores(args.maskrcnn, args.data),
        "PointRend, coarse 7x7 head only": _scores(args.pointrend, args.data, coarse_only=True),
        "PointRend (subdivision to 224x224)": _scores(args.pointrend, args.data),
    }
    header = " | ".join(f"{split} {c}" for split in ("train", "val") for c in COLUMNS)
    print(f"| model | {header} |")
    print("|---|" + "---:|" * (2 * len(COLUMNS)))
    for name, scores in rows.items():
        cells = " | ".join(f"{scores[split][c]:.4f}" for split in ("train", "val") for c in COLUMNS)
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
