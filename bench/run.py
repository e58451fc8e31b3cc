"""Every model's fast inference path against its reference path and this machine's GEMM peak.

    PYTHONPATH=$PWD python -m bench.run [--models NAME ...] [--device cpu|cuda] [--quick]
                                        [--threads 1] [--iters 3] [--sliding] [--pipeline]
                                        [--layouts] [--onnx] [--out docs/performance]
                                        [--isolate]

One row per registered network at its natural input size (``NATURAL``; ``--quick`` halves each
side), plus BackgroundMattingV2 at HD and 4K; ``--sliding`` adds sliding-window semantic inference
at 4000x3000, ``--pipeline`` the end-to-end rows (``bench/pipeline.py``). Reference = eager, NCHW,
float32; fast = ``detseg.engine.fast.accelerate`` (f32); bf16 = the fast path under autocast. The
three (and with ``--onnx`` onnxruntime on the model's exported graph, where the graph is the whole
forward) run interleaved in the same loop (warm-up, then ``--iters`` rounds; fewer for slow models),
times are the best round. GFLOP/s counts the reference forward's FLOPs
(``torch.utils.flop_counter``) over the fast path's time, beside the float32 and bfloat16 GEMM
peaks (1024^3 products, best of) measured in every round of the same row, so that both see the
same share of a shared machine; the run also prints the peaks (2048^3) at its start and end. Peak RSS is the process's resident set
during the row. Random weights (every parameter exercised; outputs of random deep ResNets are
large, hence "rel" = max abs diff / max abs reference output). Appends each row to ``OUT.csv`` as
it is measured (so a run may be split over several invocations) and plots the CSV to ``OUT.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import itertools
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detseg.engine.fast import FastPlan, accelerate, example_inputs
from detseg.registry import get_entry, list_models

# (height, width) per name prefix, first match wins: the size each family is usually run at.
NATURAL: dict[str, tuple[int, int]] = {
    "bgmv2_base_": (272, 480),  # the coarse pass of an HD frame
    "espnet": (360, 480),  # CamVid at half resolution, as the authors
    "segnet": (360, 480),
    "unet": (256, 256),
    "fcos": (640, 640),
    "polarmask": (640, 640),
    "tensormask": (640, 640),
    "maskrcnn": (640, 640),
    "pointrend": (640, 640),
    "gfm": (512, 512),
    "": (512, 512),  # the other semantic models: 512 crops
}
BGMV2_SIZES = {"HD": (1080, 1920, 0.25, 80_000), "4K": (2160, 3840, 0.125, 320_000)}
SKIP = {"hog_svm": "not a network (HOG + linear SVM)"}


@dataclass
class Row:
    """One line of the table (times in ms, memory in MB, rates in GFLOP/s)."""

    model: str
    size: str
    ref_ms: float
    fast_ms: float
    ratio: float
    max_diff: float
    rel_diff: float
    bf16_ms: float
    bf16_ratio: float
    bf16_diff: float
    gflop: float
    gflops: float
    pct_f32_peak: float
    bf16_gflops: float
    f32_peak: float
    bf16_peak: float
    peak_rss_mb: float
    rounds: int
    onnx_ms: float = math.nan  # onnxruntime on the exported graph (``--onnx``), f32
    onnx_vs_fast: float = math.nan  # fast_ms / onnx_ms: above 1, onnxruntime is faster
    onnx_diff: float = math.nan  # max abs difference of onnxruntime's outputs to the reference
    onnx_rel: float = math.nan  # onnx_diff / max abs reference output


def gemm_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of a float matrix product in ``dtype`` (the machine's practical limit).

    The larger of ``torch.mm`` of two n x n matrices (MKL / cuBLAS) and, on the CPU, a 4n x n by
    n x n product run as a channels-last 1x1 convolution (oneDNN, the library every convolution here runs on): on an AMD
    EPYC, MKL's float32 GEMM reaches about 220 GFLOP/s on two cores where oneDNN's reaches about
    500, so ``torch.mm`` alone would understate the limit the models are held against.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    products = [(lambda: a @ b, 2 * n**3)]
    if device.type == "cpu":  # 4n pixels x n input channels -> n output channels
        x = (
            torch.randn(1, n, 4 * n // 64, 64)
            .to(dtype)
            .contiguous(memory_format=torch.channels_last)
        )
        w = b.reshape(n, n, 1, 1)
        products.append((lambda: torch.nn.functional.conv2d(x, w), 8 * n**3))
    best = 0.0
    with torch.no_grad():
        for product, flop in products:
            for _ in range(reps + 1):
                _sync(device)
                start = time.perf_counter()
                product()
                _sync(device)
                best = max(best, flop / (time.perf_counter() - start) / 1e9)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakRSS:
    """Samples this process's resident set (``/proc/self/statm``) every 5 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @contextmanager
    def active(self) -> Iterator[PeakRSS]:
        self.peak = self._rss()
        thread = threading.Thread(target=self._poll, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._stop.clear()


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for v in out for t in _tensors(v)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    return []


def max_diff(reference: Any, other: Any) -> tuple[float, float]:
    """(max abs difference, that / max abs reference value) over all floating outputs."""
    diff, scale = 0.0, 0.0
    for a, b in zip(_tensors(reference), _tensors(other), strict=True):
        if a.numel() and a.is_floating_point():
            diff = max(diff, float((a.float() - b.float()).abs().max()))
            scale = max(scale, float(a.float().abs().max()))
    return diff, diff / scale if scale else 0.0


def natural_size(name: str) -> tuple[int, int]:
    return next(size for prefix, size in NATURAL.items() if name.startswith(prefix))


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def compare(
    label: str,
    size: str,
    paths: dict[str, Callable[[], Any]],
    iters: int,
    device: torch.device,
) -> Row:
    """Time ``paths`` ("ref", "fast", "bf16", optionally "onnx": argument-less calls),
    interleaved, best round each.

    The first reference call counts the FLOPs and sets the rounds: ``iters`` when it took under a
    second, 2 under 4 s, else 1 (so a row stays within about 12 reference-call times).
    """
    best = dict.fromkeys(paths, float("inf"))
    outputs: dict[str, Any] = {}
    rss = PeakRSS()
    with rss.active(), torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            first, outputs["ref"] = _timed(paths["ref"], device)
        rounds = iters if first < 1.0 else max(1, min(iters, 2 if first < 4.0 else 1))
        for key in paths.keys() - {"ref"}:  # warm-up
            paths[key]()
        peaks = {torch.float32: 0.0, torch.bfloat16: 0.0}
        for _ in range(rounds):
            for key, fn in paths.items():
                seconds, outputs[key] = _timed(fn, device)
                best[key] = min(best[key], seconds)
            for dtype in peaks:  # the limit, measured in the same minutes as the model
                peaks[dtype] = max(peaks[dtype], gemm_peak(dtype, device, n=1024, reps=3))
    flop = counter.get_total_flops()
    diff, rel = max_diff(outputs["ref"], outputs["fast"])
    diff16, _ = max_diff(outputs["ref"], outputs["bf16"])
    onnx = {}
    if "onnx" in paths:
        onnx_diff, onnx_rel = max_diff(outputs["ref"], outputs["onnx"])
        onnx = dict(
            onnx_ms=best["onnx"] * 1e3,
            onnx_vs_fast=best["fast"] / best["onnx"],
            onnx_diff=onnx_diff,
            onnx_rel=onnx_rel,
        )
    return Row(
        model=label,
        size=size,
        ref_ms=best["ref"] * 1e3,
        fast_ms=best["fast"] * 1e3,
        ratio=best["ref"] / best["fast"],
        max_diff=diff,
        rel_diff=rel,
        bf16_ms=best["bf16"] * 1e3,
        bf16_ratio=best["fast"] / best["bf16"],
        bf16_diff=diff16,
        gflop=flop / 1e9,
        gflops=flop / best["fast"] / 1e9,
        pct_f32_peak=100 * flop / best["fast"] / 1e9 / peaks[torch.float32],
        bf16_gflops=flop / best["bf16"] / 1e9,
        f32_peak=peaks[torch.float32],
        bf16_peak=peaks[torch.bfloat16],
        peak_rss_mb=rss.peak / 2**20,
        rounds=rounds,
        **onnx,
    )


def reduced_precision(device: torch.device) -> str:
    """The fast reduced precision of ``device``: bfloat16 on the CPU, float16 on CUDA."""
    return "bf16" if device.type == "cpu" else "fp16"


def onnx_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...], folder: str) -> Any:
    """onnxruntime on ``model``'s exported graph (traced at the inputs' size), as a callable of
    the forward's signature; None (with the reason printed) where the graph is not the whole
    forward (Mask R-CNN / PointRend export their first stage only) or there is none."""
    from detseg.engine.export import NotExportable, export_model, ort_session
    from detseg.engine.onnx_runtime import OrtForward, read_metadata

    h, w = inputs[0].shape[-2:]
    path = Path(folder) / "model.onnx"
    try:
        # the exporter traces on the CPU: a model elsewhere is exported from a CPU copy
        source = model if inputs[0].device.type == "cpu" else copy.deepcopy(model)
        summary = export_model(source, path, h, w, check=False)
    except NotExportable as exc:
        print(f"  no onnxruntime column: {exc}", flush=True)
        return None
    if not summary["runtime"]:
        print(f"  no onnxruntime column: the graph holds {summary['note']}", flush=True)
        return None
    session = ort_session(path, inputs[0].device)
    return OrtForward(session, read_metadata(session))


def measure(
    label: str,
    size: str,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    iters: int,
    device: torch.device,
    plan: FastPlan | None = None,
    name: str | None = None,
    onnx: bool = False,
) -> Row:
    """Reference, fast (f32) and fast (bf16 / fp16) of ``model`` on ``inputs``; with ``onnx``,
    onnxruntime on its exported graph too."""
    model = model.eval().to(device)
    nets = {
        "ref": model,
        "fast": accelerate(model, name, "f32", plan),
        "bf16": accelerate(model, name, reduced_precision(device), plan),
    }
    with tempfile.TemporaryDirectory() as folder:
        runtime = onnx_forward(model, inputs, folder) if onnx else None
    if runtime is not None:
        nets["onnx"] = runtime
    paths = {key: functools.partial(net, *inputs) for key, net in nets.items()}
    return compare(label, size, paths, iters, device)


def bgmv2_model(name: str, label: str) -> tuple[nn.Module, tuple[int, int]]:
    """BackgroundMattingV2 ``name`` (seed 0) at the ``BGMV2_SIZES[label]`` setting, and the frame
    size (h, w). The oversampling guard is off, as in the authors' inference_speed_test.py: random
    weights clamp the error map to exactly 0 nearly everywhere, and the guard would then refine a
    handful of cells instead of the setting's pixels // 16."""
    h, w, scale, pixels = BGMV2_SIZES[label]
    torch.manual_seed(0)
    model = get_entry(name).build(
        backbone_scale=scale, refine_sample_pixels=pixels, refine_prevent_oversampling=False
    )
    return model, (h, w)


def model_rows(
    names: list[str], quick: bool, iters: int, device: torch.device, onnx: bool = False
) -> Iterator[Row]:
    for name in names:
        if name in SKIP:
            print(f"skip {name}: {SKIP[name]}", flush=True)
            continue
        entry = get_entry(name)
        if name.startswith("bgmv2_") and not name.startswith("bgmv2_base_"):
            sizes = list(BGMV2_SIZES)[:1] if quick else list(BGMV2_SIZES)
            for label in sizes:
                model, (h, w) = bgmv2_model(name, label)
                inputs = example_inputs(model.to(device), 1, h, w)
                yield measure(name, label, model, inputs, iters, device, name=name, onnx=onnx)
            continue
        h, w = natural_size(name)
        if quick:
            h, w = h // 2, w // 2
        torch.manual_seed(0)
        model = entry.build().to(device)
        inputs = example_inputs(model, 1, h, w)
        yield measure(name, f"{w}x{h}", model, inputs, iters, device, name=name, onnx=onnx)


def layout_rows(names: list[str], quick: bool, iters: int, device: torch.device) -> Iterator[Row]:
    """For choosing ``PLANS``: each model's fast path with NCHW (as ``ref``) vs channels-last."""
    for name in names:
        h, w = natural_size(name)
        if quick:
            h, w = h // 2, w // 2
        torch.manual_seed(0)
        model = get_entry(name).build().to(device).eval()
        inputs = example_inputs(model, 1, h, w)
        nets = {
            "ref": accelerate(model, name, "f32", FastPlan(channels_last=False)),
            "fast": accelerate(model, name, "f32", FastPlan(channels_last=True)),
            "bf16": accelerate(model, name, reduced_precision(device), FastPlan(True)),
        }
        paths = {key: functools.partial(net, *inputs) for key, net in nets.items()}
        yield compare(f"{name} NCHW->NHWC", f"{w}x{h}", paths, iters, device)


def print_row(row: Row, onnx: bool = False) -> None:
    """``row`` as a line of the table (with the onnxruntime cells when ``onnx``)."""
    print(
        f"| {row.model} | {row.size} | {row.ref_ms:.0f} | {row.fast_ms:.0f} | {row.ratio:.2f} | "
        f"{row.max_diff:.1e} ({row.rel_diff:.0e}) | {row.bf16_ms:.0f} | {row.bf16_ratio:.2f} | "
        f"{row.bf16_diff:.1e} | {row.gflop:.1f} | {row.gflops:.0f} | {row.pct_f32_peak:.0f}% | "
        f"{row.bf16_gflops:.0f} | {row.f32_peak:.0f} / {row.bf16_peak:.0f} | "
        f"{row.peak_rss_mb:.0f} |" + (_onnx_cells(row) if onnx else ""),
        flush=True,
    )


def _onnx_cells(row: Row) -> str:
    """The onnxruntime columns of ``row`` ("-" where it has none), as table cells."""
    if math.isnan(row.onnx_ms):
        return " - | - | - |"
    return (
        f" {row.onnx_ms:.0f} | {row.onnx_vs_fast:.2f} | {row.onnx_diff:.1e} ({row.onnx_rel:.0e}) |"
    )


HEADER = (
    "| model | input | ref ms | fast ms | ratio | max diff (rel) | bf16 ms | bf16/f32 | bf16 diff "
    "| GFLOP | GFLOP/s | % f32 peak | bf16 GFLOP/s | GEMM peak f32 / bf16 | peak RSS MB |"
)
RULE = "|---" * 15 + "|"
ONNX_HEADER = " onnx ms | fast / onnx | onnx diff (rel) |"


def header(onnx: bool) -> str:
    """The table's header (with the onnxruntime columns when ``onnx``) and its rule line."""
    if onnx:
        return HEADER + ONNX_HEADER + "\n" + RULE + "---|" * 3
    return HEADER + "\n" + RULE


def append_csv(row: Row, path: Path) -> None:
    """Add ``row`` to the CSV at ``path`` (header when new): a long run keeps what it measured.

    Raises SystemExit when the file has other columns (written by an older version)."""
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            columns = next(csv.reader(f), [])
        if columns != list(asdict(row)):
            raise SystemExit(
                f"{path} has other columns (an older run of the benchmark); move it away or "
                "pick another --out."
            )
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(row)))
        if new:
            writer.writeheader()
        writer.writerow(asdict(row))


def write_plot(csv_path: Path) -> None:
    """``<csv_path>.png``: speed-up and share of the f32 peak of every row of the CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detseg.fileio import atomic_output

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [f"{r['model']} {r['size']}" for r in rows]
    ratio = [float(r["ratio"]) for r in rows]
    bf16 = [float(r["ref_ms"]) / float(r["bf16_ms"]) for r in rows]
    bars = {"fast f32": ratio, "fast bf16": bf16}
    if any(not math.isnan(float(r.get("onnx_ms", "nan"))) for r in rows):
        bars["onnxruntime f32"] = [float(r["ref_ms"]) / float(r["onnx_ms"]) for r in rows]
    pct = [float(r["pct_f32_peak"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.28 * len(rows) + 1.5), sharey=True)
    y = list(range(len(rows)))
    height = 0.8 / len(bars)
    for k, (label, values) in enumerate(bars.items()):
        offset = (k - (len(bars) - 1) / 2) * height
        ax1.barh([i + offset for i in y], values, height, label=label)
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set(xlabel="speed-up over the reference path", yticks=y, yticklabels=labels)
    ax1.legend()
    ax2.barh(y, pct, 0.6)
    ax2.axvline(100, color="k", lw=0.8)
    ax2.set(xlabel="fast f32 GFLOP/s, % of the f32 GEMM peak measured with the row")
    ax1.invert_yaxis()
    fig.tight_layout()
    with atomic_output(csv_path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def run_isolated(names: list[str], args: argparse.Namespace) -> None:
    """``--isolate``: this command once per model, then once for ``--sliding`` and once for
    ``--pipeline``, each in a fresh process. In one long process the rows after the large models
    run slower (FCN-8s R18 52 ms fresh, 58-97 ms after GFM R101, PointRend and PSPNet, measured
    here), whatever the order: each row is then measured as a user's single run would be."""
    common = ["--device", args.device, "--threads", str(args.threads), "--iters", str(args.iters)]
    common += ["--quick"] * args.quick + ["--layouts"] * args.layouts + ["--onnx"] * args.onnx
    if args.out is not None:
        common += ["--out", str(args.out)]
    runs = [["--models", name] for name in names]
    runs += [["--models", "--sliding"]] * args.sliding + [
        ["--models", "--pipeline"]
    ] * args.pipeline
    for extra in runs:
        subprocess.run([sys.executable, "-m", "bench.run", *extra, *common], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", help="registry names (default: all; none: only --sliding/--pipeline)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="half-size inputs, one round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sliding", action="store_true", help="add the 4000x3000 sliding rows")
    parser.add_argument("--pipeline", action="store_true", help="add the end-to-end rows")
    parser.add_argument("--layouts", action="store_true", help="NCHW vs channels-last instead")
    parser.add_argument(
        "--onnx", action="store_true", help="add onnxruntime on each model's exported graph"
    )
    parser.add_argument("--out", type=Path, default=None, help="append to OUT.csv, plot OUT.png")
    parser.add_argument(
        "--isolate", action="store_true", help="every row (and the extra rows) in its own process"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    iters = 1 if args.quick else args.iters
    names = [e.name for e in list_models()] if args.models is None else args.models
    if args.isolate:
        run_isolated(names, args)
        return
    start = time.perf_counter()
    peaks = {
        "f32_peak": gemm_peak(torch.float32, device),
        "bf16_peak": gemm_peak(torch.bfloat16, device),
    }
    load = os.getloadavg()
    print(
        f"{device.type}, {args.threads} thread(s), torch {torch.__version__}, load average "
        f"{load[0]:.1f}; GEMM peak f32 {peaks['f32_peak']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16_peak']:.0f} GFLOP/s"
    )
    onnx = args.onnx and not args.layouts  # the layout rows compare two torch paths only
    print(header(onnx))
    if args.layouts:
        rows = layout_rows(names, args.quick, iters, device)
    else:
        rows = model_rows(names, args.quick, iters, device, onnx)
    if args.sliding:
        from bench.sliding_rows import sliding_rows

        rows = itertools.chain(rows, sliding_rows(device, args.quick))
    for row in rows:
        print_row(row, onnx)
        if args.out is not None:
            append_csv(row, args.out.with_suffix(".csv"))
    end_peaks = (gemm_peak(torch.float32, device), gemm_peak(torch.bfloat16, device))
    print(
        f"GEMM peak at the end: f32 {end_peaks[0]:.0f}, bf16 {end_peaks[1]:.0f} GFLOP/s; load "
        f"average {os.getloadavg()[0]:.1f}; {time.perf_counter() - start:.0f} s in all"
    )
    if args.pipeline:
        from bench.pipeline import main as pipeline_main

        pipeline_main(device, args.quick)
    if args.out is not None and args.out.with_suffix(".csv").exists():
        write_plot(args.out.with_suffix(".csv"))


if __name__ == "__main__":
    main()
