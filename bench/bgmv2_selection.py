"""BackgroundMattingV2 at HD, reference vs fast path, for refined-cell selections of different shapes.

    PYTHONPATH=$PWD python -m bench.bgmv2_selection [--threads 2] [--iters 7]

MobileNetV2, backbone scale 1/4, sampling 80,000 pixels (5,000 of the 270x480 4x4 cells), random
weights and frames, the whole model (base network and refiner). Which cells are refined decides
how much the fast path's tiles share (``Refiner._tile_size``), and with random weights the error
map is exactly 0 on all but a handful of cells, so the benchmark table's selection is ``topk``'s
choice among ties ("model": blocks). Here ``Refiner.select`` is replaced on both paths by fixed
selections of 5,000 cells: "outline", a band along an ellipse's border (the shape a trained
model's error takes: the matte's edge), and "scattered", cells drawn uniformly (isolated cells,
the worst case for tiles). Columns: the tile side chosen, tiles, reference and fast ms (best of
``--iters``, interleaved), their ratio and the max abs difference over the six outputs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from detseg.engine.fast import accelerate, example_inputs
from detseg.matting.bgmv2 import MattingRefine
from detseg.matting.bgmv2_windows import tile_keys
from detseg.registry import get_entry

GRID = (270, 480)  # the HD frame's 4x4 cells
CELLS = 80_000 // 16


def _top_cells(score: torch.Tensor) -> torch.Tensor:
    """(Hq, Wq) score -> (1, 1, Hq, Wq) 0/1 map of its ``CELLS`` highest cells."""
    flat = torch.zeros(score.numel())
    flat[score.flatten().topk(CELLS).indices] = 1.0
    return flat.view(1, 1, *score.shape)


def selections() -> dict[str, torch.Tensor | None]:
    """name -> fixed (1, 1, 270, 480) selection, or None for the model's own."""
    y = torch.linspace(-1, 1, GRID[0])[:, None]
    x = torch.linspace(-1, 1, GRID[1])[None, :]
    radius = ((y / 0.8) ** 2 + (x / 0.45) ** 2).sqrt()
    noise = torch.rand(GRID, generator=torch.Generator().manual_seed(0))
    return {
        "model": None,
        "outline": _top_cells(-(radius - 1).abs()),
        "scattered": _top_cells(noise),
    }


def _fixed(
    selection: torch.Tensor | None, own: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``Refiner.select`` returning ``selection`` whatever the error (``own`` when None)."""
    return own if selection is None else (lambda err: selection.to(err.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model: MattingRefine = get_entry("bgmv2_mobilenetv2").build(
        backbone_scale=0.25, refine_sample_pixels=80_000, refine_prevent_oversampling=False
    )
    model.eval()
    paths = {"ref": model, "fast": accelerate(model, "bgmv2_mobilenetv2")}
    own = {key: net.refiner.select for key, net in paths.items()}
    src, bgr = example_inputs(model, 1, 1080, 1920)
    print(f"CPU, {args.threads} threads, torch {torch.__version__}, best of {args.iters}")
    print("| selection | tile side | tiles | reference ms | fast ms | ratio | max diff |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, selection in selections().items():
            for key, net in paths.items():
                net.refiner.select = _fixed(selection, own[key])
            best = dict.fromkeys(paths, float("inf"))
            outputs = {}
            for _ in range(args.iters + 1):  # the first round warms up
                for key, net in paths.items():
                    start = time.perf_counter()
                    outputs[key] = net(src, bgr)
                    best[key] = min(best[key], time.perf_counter() - start)
            cells = torch.nonzero(outputs["ref"][-1].squeeze(1))
            side = paths["fast"].refiner._tile_size(cells, GRID)
            tiles = torch.unique(tile_keys(cells, GRID, side)).numel()
            diff = max(float((a - b).abs().max()) for a, b in zip(*outputs.values(), strict=True))
            print(
                f"| {name} | {side} | {tiles} | {best['ref'] * 1e3:.0f} | "
                f"{best['fast'] * 1e3:.0f} | {best['ref'] / best['fast']:.2f} | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
