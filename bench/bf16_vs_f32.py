"""Where the bf16 fast path loses time against the float32 one, operator by operator.

    PYTHONPATH=$PWD python -m bench.bf16_vs_f32 [--models NAME ...] [--top 4] [--min-ms 1.0]

For each model (default: every registered one the table runs) at its natural size (BGMv2 at HD,
sampling 80,000 px, guard off, as in ``bench.run``): one profiled call of the fast path in
float32 and one in bf16 after a warm-up each, self CPU time per (operator, input shapes), and the
``--top`` entries where bf16 spent the most time beyond float32 (at least ``--min-ms``). This is
how docs/performance.md's "Where bfloat16 ran slower than float32" was found: a depthwise
transposed convolution 220 ms in bf16 against 4 in float32 shows up on the first line. Shapes
that differ between the two runs (pieces of RoIs sized by the element size) do not pair up.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import profile

from bench.run import SKIP, bgmv2_model, natural_size
from detseg.engine.fast import accelerate, example_inputs
from detseg.registry import get_entry, list_models


def _build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    if name.startswith("bgmv2_") and not name.startswith("bgmv2_base_"):
        model, (h, w) = bgmv2_model(name, "HD")
    else:
        torch.manual_seed(0)
        model, (h, w) = get_entry(name).build(), natural_size(name)
    model = model.eval()
    return model, example_inputs(model, 1, h, w)


def self_times(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[tuple, float]:
    """Self CPU ms per (operator, input shapes) of one call of ``model`` after a warm-up."""
    with torch.inference_mode():
        model(*inputs)
        with profile(record_shapes=True) as prof:
            model(*inputs)
    times: dict[tuple, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        times[(event.key, str(event.input_shapes))] += event.self_cpu_time_total / 1e3
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--min-ms", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or [e.name for e in list_models() if e.name not in SKIP]
    for name in names:
        model, inputs = _build(name)
        f32 = self_times(accelerate(model, name, "f32"), inputs)
        bf16 = self_times(accelerate(model, name, "bf16"), inputs)
        print(f"## {name}: f32 {sum(f32.values()):.0f} ms, bf16 {sum(bf16.values()):.0f} ms")
        extra = sorted(((bf16.get(k, 0.0) - f32.get(k, 0.0), k) for k in bf16), reverse=True)
        for ms, (op, shapes) in extra[: args.top]:
            if ms >= args.min_ms:
                print(f"   +{ms:.1f} ms  {op} {shapes[:100]}  (f32 {f32.get((op, shapes), 0):.1f})")


if __name__ == "__main__":
    main()
