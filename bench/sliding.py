"""Sliding-window against whole-image semantic inference: peak memory and time, as a markdown table.

    PYTHONPATH=. python bench/sliding.py [--model espnet] [--threads 2] [--device cpu]

Each measurement runs in a fresh subprocess, so its peak resident set size (``ru_maxrss``) is its
own: first a large image by sliding windows (acceptance: peak RSS below 2 GB), then a size where
the whole image fits, both ways. The model has random weights: only speed and memory are measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GB = 1e9  # the acceptance bound is 2 GB


def _size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args: argparse.Namespace) -> dict[str, float | int | str]:
    """Build the model and a synthetic image, run one prediction, return time and memory."""
    import numpy as np
    import torch

    from detseg.data.preprocess import Preprocess
    from detseg.registry import get_entry
    from detseg.semantic.sliding import predict_semantic, window_starts

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = get_entry(args.model).build(num_classes=args.classes).eval().to(device)
    width, height = args.size
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    options = dict(
        mode=args.mode, crop=args.crop, stride=args.stride, batch_size=args.batch, device=device
    )
    preprocess = Preprocess()
    predict_semantic(model, image[:64, :64], preprocess, args.classes, **options)  # warm-up
    rss_before = _peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = predict_semantic(model, image, preprocess, args.classes, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert result.labels.shape == (height, width)
    windows = 1
    if args.mode == "sliding":
        windows = len(window_starts(height, args.crop, args.stride)) * len(
            window_starts(width, args.crop, args.stride)
        )
    return {
        "mode": args.mode,
        "size": f"{width}x{height}",
        "windows": windows,
        "seconds": seconds,
        "rss_before": rss_before,
        "rss_peak": _peak_rss(),
        "gpu_peak": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
    }


def _run_child(args: argparse.Namespace, mode: str, size: tuple[int, int]) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--mode",
        mode,
        "--size",
        "x".join(map(str, size)),
    ]
    for name in ("model", "classes", "crop", "stride", "batch", "threads", "device"):
        command += [f"--{name}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"measurement {mode} {size} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], whole: dict) -> str:
    """Markdown table; ``time / whole`` compares rows of the whole-image row's size with it."""
    lines = [
        "| mode | image | windows | time (s) | s / Mpx | time / whole | RSS before (GB) "
        "| peak RSS (GB) | GPU peak (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        width, height = _size(r["size"])
        ratio = f"{r['seconds'] / whole['seconds']:.2f}" if r["size"] == whole["size"] else "-"
        lines.append(
            f"| {r['mode']} | {r['size']} | {r['windows']} | {r['seconds']:.2f} | "
            f"{r['seconds'] / (width * height / 1e6):.2f} | {ratio} | {r['rss_before'] / GB:.2f} | "
            f"{r['rss_peak'] / GB:.2f} | {r['gpu_peak'] / GB:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="espnet", help="a registered semantic model")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument(
        "--large", type=_size, default=(4000, 3000), help="WIDTHxHEIGHT, sliding only"
    )
    parser.add_argument(
        "--compare", type=_size, default=(1024, 768), help="WIDTHxHEIGHT, both ways"
    )
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sliding", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=_size, default=(4000, 3000), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    large = _run_child(args, "sliding", args.large)
    whole = _run_child(args, "whole", args.compare)
    sliding = _run_child(args, "sliding", args.compare)
    print(
        f"model {args.model} ({args.classes} classes, random weights), crop {args.crop}, "
        f"stride {args.stride}, batch {args.batch}, device {args.device}, {args.threads} threads\n"
    )
    print(_table([whole, sliding, large], whole))
    verdict = "below" if large["rss_peak"] < 2 * GB else "ABOVE"
    print(f"\nsliding {large['size']}: peak RSS {large['rss_peak'] / GB:.2f} GB, {verdict} 2 GB")


if __name__ == "__main__":
    main()
