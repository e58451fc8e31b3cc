"""TensorMask inference at 800x1333: sparse masks of the kept windows vs the dense natural tensors.

    PYTHONPATH=. python bench/tensormask_memory.py [--threads 1] [--device cpu|cuda] [--modes ...]

Each mode runs in a fresh subprocess (random-init R50-FPN with the class prior bias set to 0 so
every window is a candidate and the 100 NMS survivors spread over all levels; the weights do not
change the cost): ``forward`` (the network only), ``sparse`` (forward + ``postprocess``, the
default) and ``dense`` (forward + ``postprocess(dense=True)``: the full natural mask tensor of
every level and window size, as the head's SwapAlign2Nat path builds it). Memory: peak resident
set (``ru_maxrss``) of the subprocess on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. The
sparse and dense detections are then compared (boxes, scores, classes, pasted mask pixels).
Times are wall and process-CPU seconds (the CPU seconds are what a shared machine can compare).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detseg.instance.tensormask import TensorMask

HEIGHT, WIDTH = 800, 1333


def worker(mode: str, out: Path, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TensorMask().eval().to(device)
    torch.nn.init.zeros_(model.head.cls_score.bias)
    image = torch.zeros(1, 3, 800, 1344, device=device)
    image[..., :WIDTH] = (
        torch.randn(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1)).to(device) * 50
    )
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    with torch.no_grad():
        start, cpu = time.perf_counter(), time.process_time()
        outputs = model(image)
        sync()
        record = {
            "mode": mode,
            "forward_s": time.perf_counter() - start,
            "forward_cpu_s": time.process_time() - cpu,
        }
        if mode != "forward":
            start, cpu = time.perf_counter(), time.process_time()
            (inst,) = model.postprocess(outputs, [(HEIGHT, WIDTH)], dense=mode == "dense")
            sync()
            record["postprocess_s"] = time.perf_counter() - start
            record["postprocess_cpu_s"] = time.process_time() - cpu
            record["detections"] = len(inst.scores)
            np.savez_compressed(
                out,
                boxes=inst.boxes.cpu().numpy(),
                scores=inst.scores.cpu().numpy(),
                labels=inst.labels.cpu().numpy(),
                masks=np.packbits(inst.masks.cpu().numpy(), axis=-1),
            )
    if device == "cuda":
        record["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        record["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(record))


def dense_natural_mib(model: TensorMask) -> float:
    """MiB of all dense natural mask tensors (float32) at the benchmark size, analytically."""
    total = 0
    for k in range(model.head.num_levels):
        cells = -(-800 // (4 * 2**k)) * -(-1344 // (4 * 2**k))
        total += sum((m * 2**k) ** 2 * cells for m in model.head.mask_sizes)
    return total * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=("forward", "sparse", "dense"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--modes", nargs="+", default=["sparse", "dense", "forward"])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.device, args.threads)
        return
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", mode, "--out", f"{tmp}/{mode}.npz"]
            cmd += ["--device", args.device, "--threads", str(args.threads)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            records[mode] = json.loads(line.strip().splitlines()[-1])
            print(json.dumps(records[mode]), flush=True)
        compared = None
        if {"sparse", "dense"} <= set(records):
            sparse, dense = (np.load(f"{tmp}/{m}.npz") for m in ("sparse", "dense"))
            keys = ("boxes", "scores", "labels")
            same = {k: bool(np.array_equal(sparse[k], dense[k])) for k in keys}
            differing = int(np.unpackbits(sparse["masks"] ^ dense["masks"]).sum())
            on = int(np.unpackbits(dense["masks"]).sum())
            compared = f"same detections: {same}; mask pixels differing: {differing} of {on} on"
    with torch.device("meta"):
        natural = dense_natural_mib(TensorMask())
    print(
        f"800x1333, {args.device}, {args.threads} thread(s); dense natural masks: {natural:.0f} MiB"
    )
    print("| mode | forward s (CPU s) | postprocess s (CPU s) | detections | peak MiB |")
    print("|---|---|---|---|---|")
    for r in records.values():
        post = f"{r.get('postprocess_s', 0):.2f} ({r.get('postprocess_cpu_s', 0):.2f})"
        print(
            f"| {r['mode']} | {r['forward_s']:.2f} ({r['forward_cpu_s']:.2f}) | {post} "
            f"| {r.get('detections', '-')} | {r['peak_mib']:.0f} |"
        )
    print(compared or "(run both sparse and dense to compare their detections)")


if __name__ == "__main__":
    main()
