"""BackgroundMattingV2 inference speed: torch eager vs onnxruntime, HD and 4K, on the CPU.

    PYTHONPATH=. python bench/bgmv2.py [--backbones mobilenetv2 resnet50] [--sizes hd 4k]
                                       [--iters 3] [--threads 1]

Settings are the official recommendations (``doc/model_usage.md``): HD backbone_scale 0.25 with
80,000 refined pixels, 4K 0.125 with 320,000, sampling mode without the oversampling guard (a
fixed cost, as ``inference_speed_test.py``), batch 1, random weights and inputs (the tensor
throughput the paper quotes; no decoding or encoding). The reference path of every row group is
plain torch eager on the same model and input in the same run; "ratio" = frames/s / reference.
One thread by default: on a CPU shared with other work, more threads mostly wait at OpenMP
barriers (measured 1.0 s vs 7 s per HD frame with 1 vs 2 threads on a loaded 2-core machine).
"fast path" is ``detseg.engine.fast.accelerate`` (what ``detseg matte`` runs: BN folded, the
refiner on windows); onnxruntime applies the same folding among its default graph optimisations.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from detseg.engine.fast import accelerate
from detseg.matting.bgmv2 import MattingRefine
from detseg.matting.bgmv2_export import export_onnx

SIZES = {  # name: (height, width, backbone_scale, refine_sample_pixels)
    "hd": (1080, 1920, 0.25, 80_000),
    "4k": (2160, 3840, 0.125, 320_000),
}


def seconds_per_call(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of ``iters`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onnx_runner(model: MattingRefine, h: int, w: int, threads: int, folder: Path):
    """An onnxruntime CPU session of ``model``, exported (traced at quarter size) into ``folder``."""
    import onnxruntime as ort

    path = folder / "model.onnx"
    export_onnx(model, path, height=h // 4, width=w // 4, check=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session


def bench(backbone: str, size: str, iters: int, threads: int) -> list[tuple[str, float]]:
    h, w, scale, pixels = SIZES[size]
    torch.manual_seed(0)  # the refined cells follow the random weights
    model = MattingRefine(
        backbone,
        backbone_scale=scale,
        refine_mode="sampling",
        refine_sample_pixels=pixels,
        refine_prevent_oversampling=False,
    ).eval()
    src, bgr = torch.rand(1, 3, h, w), torch.rand(1, 3, h, w)

    def eager(net: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return net(src, bgr)

        return run

    rows = [
        ("torch eager (reference)", seconds_per_call(eager(model), iters)),
        ("torch fast path", seconds_per_call(eager(accelerate(model)), iters)),
    ]
    with tempfile.TemporaryDirectory() as folder:
        session = onnx_runner(model, h, w, threads, Path(folder))
        feed = {"src": src.numpy(), "bgr": bgr.numpy()}
        rows.append(("onnxruntime", seconds_per_call(lambda: session.run(None, feed), iters)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilenetv2", "resnet50"])
    parser.add_argument("--sizes", nargs="+", default=["hd", "4k"], choices=list(SIZES))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, torch {torch.__version__}, median of {args.iters} runs")
    print("| backbone | size | backend | ms/frame | frames/s | ratio |")
    print("|---|---|---|---|---|---|")
    for backbone in args.backbones:
        for size in args.sizes:
            rows = bench(backbone, size, args.iters, args.threads)
            reference = rows[0][1]
            for name, sec in rows:
                print(
                    f"| {backbone} | {size.upper()} | {name} | {sec * 1e3:.0f} | "
                    f"{1 / sec:.2f} | {reference / sec:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
