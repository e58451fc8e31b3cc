"""Where the time goes when a model is not GEMM-bound: profile summaries for docs/performance.md.

    PYTHONPATH=$PWD python -m bench.profile_models [--cases bgmv2 espnet deeplab_mnv2 gfm polarmask]

torch.profiler on one call of each fast path after a warm-up (BGMv2 MobileNetV2 HD, ESPNet
480x360, DeepLabV3+ MobileNetV2 512x512): self CPU time per operator class (GEMM-like convolution
and matrix products, depthwise convolution, resampling, memory movement, element-wise, other).
GFM's hybrid test strategy and PolarMask's target generation run mostly outside torch kernels
(NumPy / scikit-image / OpenCV, Python), so they get cProfile's top functions. One thread.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from torch.profiler import profile

from detseg.engine.fast import accelerate, example_inputs
from detseg.registry import get_entry

RESAMPLE = ("upsample", "interpolate", "grid_sampler", "max_pool", "avg_pool", "adaptive")
MEMORY = ("copy_", "cat", "index", "gather", "scatter", "clone", "contiguous", "pad", "nonzero")
ELEMENTWISE = ("add", "mul", "relu", "clamp", "sigmoid", "div", "sub", "hardtanh", "prelu", "exp")


def _category(name: str, shapes: list) -> str:
    if "conv" in name:
        weight = shapes[1] if len(shapes) > 1 else []
        if len(weight) == 4 and weight[1] == 1 and shapes[0] and shapes[0][1] > 1:
            return "depthwise conv"
        return "GEMM-like (conv, mm)"
    if any(k in name for k in RESAMPLE):
        return "resampling / pooling"
    if any(k in name for k in ("mm", "matmul", "linear", "addmm")):
        return "GEMM-like (conv, mm)"
    if any(k in name for k in MEMORY):
        return "memory (copy, cat, gather)"
    if any(k in name for k in ELEMENTWISE):
        return "element-wise"
    return "other"


def torch_summary(label: str, fn: Callable[[], object], top: int = 6) -> None:
    with torch.inference_mode():
        fn()
        with profile(record_shapes=True) as prof:
            fn()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    by_class: dict[str, float] = defaultdict(float)
    for e in events:
        by_class[_category(e.key, e.input_shapes)] += e.self_cpu_time_total
    print(f"\n#### {label}: {total / 1e3:.0f} ms of operator self time\n")
    print("| operator class | share |\n|---|---|")
    for name, t in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * t / total:.0f}% |")
    print("\n| top operators (input shapes) | ms |\n|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        shapes = ", ".join(str(s) for s in e.input_shapes[:2])
        print(f"| {e.key} {shapes} | {e.self_cpu_time_total / 1e3:.1f} |")


def cprofile_summary(label: str, fn: Callable[[], object], top: int = 8) -> None:
    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"\n#### {label}: {total * 1e3:.0f} ms\n")
    print("| function (self time) | ms | share |\n|---|---|---|")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    for (path, line, func), (_, _, tottime, _, _) in rows:
        where = f"{path.split('site-packages/')[-1].split('wt_perf/')[-1]}:{line}"
        print(f"| `{func}` ({where}) | {tottime * 1e3:.0f} | {100 * tottime / total:.0f}% |")


def _model_case(name: str, h: int, w: int, **kwargs: object) -> Callable[[], object]:
    torch.manual_seed(0)
    model = accelerate(get_entry(name).build(**kwargs).eval(), name)
    inputs = example_inputs(model, 1, h, w)
    return lambda: model(*inputs)


def gfm_case() -> Callable[[], object]:
    from detseg.matting.gfm_infer import infer_gfm

    torch.manual_seed(0)
    model = accelerate(get_entry("gfm_r34").build().eval(), "gfm_r34")
    image = np.random.default_rng(0).integers(0, 256, (720, 1080, 3), dtype=np.uint8)
    return lambda: torch.inference_mode()(infer_gfm)(model, image, "hybrid")


def polarmask_case() -> Callable[[], object]:
    from detseg.instance.polarmask import PolarMaskTargets

    h, w, g = 768, 1024, 8
    masks = torch.zeros(g, h, w)
    boxes = torch.zeros(g, 4)
    for i in range(g):
        y, x = 60 + 80 * i, 50 + 110 * i
        masks[i, y : y + 120, x : x + 90] = 1
        boxes[i] = torch.tensor([x, y, x + 89, y + 119])
    targets = PolarMaskTargets()
    labels = torch.arange(1, g + 1)
    return lambda: targets(boxes, masks, labels)


CASES: dict[str, tuple[str, Callable[[], Callable[[], object]], bool]] = {
    "bgmv2": (
        "BGMv2 MobileNetV2, HD, sampling 80,000 px (fast path)",
        # the guard off, as bench/run.py: random weights leave the error 0 on all but ~8 cells
        lambda: _model_case("bgmv2_mobilenetv2", 1080, 1920, refine_prevent_oversampling=False),
        True,
    ),
    "espnet": ("ESPNet 480x360 (fast path)", lambda: _model_case("espnet", 360, 480), True),
    "deeplab_mnv2": (
        "DeepLabV3+ MobileNetV2 512x512 (fast path)",
        lambda: _model_case("deeplabv3plus_mobilenetv2", 512, 512),
        True,
    ),
    "gfm": ("GFM R34 hybrid test strategy, 1080x720 photo", gfm_case, False),
    "polarmask": ("PolarMask targets, 1024x768, 8 objects", polarmask_case, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for key in args.cases:
        label, make, with_torch = CASES[key]
        (torch_summary if with_torch else cprofile_summary)(label, make())


if __name__ == "__main__":
    main()
