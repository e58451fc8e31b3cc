"""BGMv2 alpha under bfloat16 vs float32 on the real HD pair (bgm_pairs 0001), and where they differ.

    PYTHONPATH=$PWD python -m bench.bf16_accuracy [--weights OFFICIAL.pth]

Runs ``matte_pair`` with the float32 reference path and the bf16 fast path of
``bgmv2_mobilenetv2`` (HD, sampling 80,000 px); prints the max and mean absolute alpha difference
in 1/255 units, the share of pixels more than 2/255 apart, and how many refined cells the two
selected differently. The oversampling guard is off (as in the speed benchmarks) so that the refiner
always recomputes 5,000 cells. Without ``--weights`` the weights are random (seeded): a check of the
arithmetic, not of a trained model's mattes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from detseg.api import fast_model, load_model
from detseg.data.images import read_image
from detseg.matting.bgmv2_infer import matte_pair

PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bgm_pairs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    src, bgr = read_image(PAIRS / "0001_img.png"), read_image(PAIRS / "0001_back.png")
    loaded = load_model(  # without the guard every image refines its 5,000 cells
        "bgmv2_mobilenetv2", args.weights, "cpu", refine_prevent_oversampling=False
    )
    ref = matte_pair(loaded.model, src, bgr)
    bf16 = matte_pair(fast_model(loaded, precision="bf16").model, src, bgr)
    diff = np.abs(ref["pha"] - bf16["pha"]) * 255
    cells = int((ref["ref"] != bf16["ref"]).sum() // 16)
    print(
        f"alpha |bf16 - f32|: max {diff.max():.2f}/255, mean {diff.mean():.4f}/255, "
        f"{100 * (diff > 2).mean():.4f}% of pixels > 2/255; refined cells selected differently: "
        f"{cells} of {int(ref['ref'].sum() // 16)}"
    )


if __name__ == "__main__":
    main()
