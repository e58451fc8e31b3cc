"""The export table: every registered model exported to ONNX and checked against PyTorch.

    PYTHONPATH=. python bench/export_table.py run [--models a,b] [--size 256]   # accumulate
    PYTHONPATH=. python bench/export_table.py table                              # docs/export.md

``run``: each model in its real default configuration (the registry's defaults, random weights
after ``torch.manual_seed(0)``) goes through ``detseg.api.export`` at ``--size`` (rounded as the
model's export spec says): trace, write, then onnxruntime on fresh inputs of batch 2 at another
size (the same size for fixed-size graphs), compared with eager PyTorch output by output. One
torch thread; results accumulate in ``runs/export_table/results.json`` (one entry per model), so
an interrupted run resumes. ``table`` writes ``docs/export.md`` from them.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

RUNS = Path("runs/export_table")
MISSING = "not measured before the deadline (the first run was OOM-killed on the shared machine)"
DOC = Path("docs/export.md")

HEADER = """# ONNX export

`detseg export --model NAME [--weights W] --format onnx -o model.onnx` writes what the model's
export spec (`onnx_spec()`, `detseg.engine.export.OnnxSpec`) names: the whole eval `forward`
where it is made of tensor operations, or the raw head outputs where post-processing is
data-dependent; that post-processing is the model's own code, run beside the graph by
`detseg.engine.onnx_runtime`. The file carries the model name, constructor arguments, input
normalisation and class names as metadata, so

    detseg predict street.png --runtime onnx --onnx model.onnx

runs it through the same pipeline as the PyTorch model (`Predictor`, sliding windows, video).
Batch is always dynamic; height and width are dynamic for every graph below.

## What is exported, and what is not

| family | graph | beside it (torch / numpy) | `--runtime onnx` |
|---|---|---|---|
| semantic (FCN, U-Net, SegNet, ESPNet, DeepLabV3+, PSPNet, GCN, DUC-HDC) | whole network, logits | argmax, sliding windows | yes |
| DeepLabV3+ PointRend | whole network incl. the two subdivision steps | - | yes, for inputs of >= 4 x `subdivision_num_points` pixels (the traced top-k keeps its k) |
| FCOS | backbone + FPN + head: per level class logits, box regression, centerness | locations, thresholds, top-k, NMS (`FCOS.postprocess`) | yes |
| PolarMask | backbone + FPN + head raw outputs | polar decoding, NMS, polygon rasterisation | yes |
| TensorMask | backbone + head with the aligned mask logits | window selection, NMS, SwapAlign2Nat of the kept windows, pasting | yes |
| Mask R-CNN, PointRend (instance) | backbone + FPN (p2..p6) + RPN head logits and deltas | proposals (top-k, NMS), the RoI heads, mask pasting: **not exported** | no: the file holds only the first stage |
| BackgroundMattingV2 | whole network, every refine mode (refine mode, backbone scale, threshold fixed) | - | yes (sampling mode: inputs of >= `refine_sample_pixels`) |
| GFM | whole network (glance, focus, collaborative matting; RIM) | test-time resizing and the hybrid merge | yes |
| HOG + SVM | **not a network**: HOG features (OpenCV/numpy) over a pyramid, a linear SVM | - | no |

Two changes made the dynamic sizes possible: pyramid pooling to bins of 2, 3, 5, 6 (PSPNet, GFM)
exports as two averaging matrices built from the traced size (`detseg.ops.adaptive_pool`; the
exporter otherwise refuses dynamic sizes), and the PointRend point coordinates are computed from
the traced grid size (they froze to the trace size before).

## The table

Every registered model in its real default configuration (random weights, `torch.manual_seed(0)`),
exported at {size} and checked by onnxruntime 1.x CPU on batch 2 at {check} against eager PyTorch
(fp32): the max abs difference over all outputs, and the largest |output| for scale. Time: export
+ check, one torch thread on a shared 2-core machine. Command: `PYTHONPATH=. python
bench/export_table.py run --size {side} && python bench/export_table.py table`.

| model | task | exported | outputs | max abs diff | max abs output | time s | note |
|---|---|---|---:|---:|---:|---:|---|
"""


def _one(name: str, size: int, folder: Path) -> dict[str, Any]:
    from detseg import api
    from detseg.engine.export import NotExportable
    from detseg.registry import get_entry

    entry = get_entry(name)
    torch.manual_seed(0)
    start = time.perf_counter()
    path = folder / f"{name}.onnx"
    row: dict[str, Any] = {"model": name, "task": entry.task}
    try:
        result = api.export(name, path, height=size, width=size)
    except NotExportable as exc:
        return {**row, "exported": "no", "note": str(exc)}
    except Exception as exc:  # the table records any failure, with its reason
        traceback.print_exc()
        return {**row, "exported": "failed", "note": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        path.unlink(missing_ok=True)
    diffs = result["max_abs_diff"]
    return {
        **row,
        "exported": "yes" if result["runtime"] else "partial",
        "outputs": len(result["outputs"]),
        "size": result["size"],
        "max_abs_diff": max(diffs.values()),
        "max_abs_output": result.get("max_abs_output"),
        "seconds": round(time.perf_counter() - start, 1),
        "note": result["note"],
    }


def run(models: list[str] | None, size: int) -> None:
    from detseg.registry import list_models

    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    store = RUNS / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for entry in list_models():
        if (models and entry.name not in models) or (not models and entry.name in results):
            continue
        print(f"== {entry.name}", flush=True)
        results[entry.name] = {**_one(entry.name, size, RUNS), "side": size}
        print(json.dumps(results[entry.name]), flush=True)
        store.write_text(json.dumps(results, indent=1))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table() -> None:
    from detseg.fileio import write_text_atomic
    from detseg.registry import list_models

    results = json.loads((RUNS / "results.json").read_text())
    side = next(iter(results.values()))["side"]
    text = HEADER.format(size=f"{side}x{side}", check=f"{side + 32}x{side + 64}", side=side)
    for entry in list_models():
        r = results.get(entry.name)
        if r is None:
            text += f"| {entry.name} | {entry.task} | not measured | | | | | {MISSING} |\n"
            continue
        note = r.get("note", "").replace("|", "/").replace("\n", " ")
        text += (
            f"| {r['model']} | {r['task']} | {r['exported']} | {r.get('outputs', '-')} | "
            f"{_fmt(r.get('max_abs_diff'), '.2e')} | {_fmt(r.get('max_abs_output'), '.3g')} | "
            f"{_fmt(r.get('seconds'), '.1f')} | {note} |\n"
        )
    write_text_atomic(DOC, text)
    print(f"wrote {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("run", "table"))
    parser.add_argument("--models", default=None, help="comma list (default: all not yet run)")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    if args.part == "run":
        run(args.models.split(",") if args.models else None, args.size)
    else:
        table()


if __name__ == "__main__":
    main()
