"""Every semantic model of detseg in one table: size, cost, speed, and CamVid-subset mIoU.

    PYTHONPATH=. python bench/semantic_zoo.py static            # params, GFLOPs, CPU ms: all models
    PYTHONPATH=. python bench/semantic_zoo.py train [--models a,b] [--steps 30 --crop 128 ...]
    PYTHONPATH=. python bench/semantic_zoo.py table             # markdown table + docs/ picture grid

``static``: learnable parameters (aux heads apart), GFLOPs of one 480x360 image in eval mode
(``FlopCounterMode`` on the meta device: FLOPs, i.e. 2 x MACs) and also GMACs at 512x512 (the
spec's table 0 unit), and CPU milliseconds of one 480x360 forward pass (random weights, after a
small warm-up). ``train``: the same bounded budget for every model, from the same initialisation
(random weights drawn after ``torch.manual_seed(0)``; no ImageNet weights: none are available
offline), via ``detseg.semantic.pipeline.train_semantic`` on /work/shared/data/camvid (60 train
images, AdamW lr 1e-3 poly, random crops); mIoU on the first ``val_limit`` val images before and
after. The published mIoU of each paper stands beside it for reference only: other datasets, full
schedules and ImageNet initialisation, so the numbers are not comparable.
Results accumulate in ``runs/semantic_zoo/results.json`` (one entry per model and part).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA = Path("/work/shared/data/camvid")
RUNS = Path("runs/semantic_zoo")
GRID = Path("docs/semantic_zoo.png")
GRID_IMAGES = 3  # the first val images, the same for every model

# default training set: the models light enough for the 2-core CPU budget (heavier families run
# with a ResNet-18 trunk, stated in the table)
TRAIN = {
    "espnet": {},
    "fcn_resnet18": {},
    "fcn8s_resnet18": {},
    "deeplabv3plus_mobilenetv2": {},
    "gcn_resnet18": {},
    "pspnet_resnet50": {"backbone": "resnet18"},
    "duc_hdc_resnet101": {"backbone": "resnet18"},
}

PUBLISHED = {
    "fcn32s_vgg16": "63.6 VOC11 seg11valid",
    "fcn16s_vgg16": "65.0 VOC11 seg11valid",
    "fcn8s_vgg16": "65.5 seg11valid; 62.2 VOC12 test",
    "fcn_resnet50": "60.5 COCO-val (VOC classes, torchvision)",
    "unet": "none (biomedical only)",
    "segnet": "60.1 CamVid test (unverified)",
    "pspnet_resnet50": "77.05 VOC val (semseg)",
    "pspnet_resnet101": "85.4 VOC12 test (COCO pre-train)",
    "gcn_resnet152": "82.2 VOC12 test",
    "duc_resnet101": "83.1 VOC12 test (R152-DUC)",
    "duc_hdc_resnet101": "80.1 Cityscapes test",
    "deeplabv3plus_resnet50": "none here (R101/Xception: 89.0 VOC12 test)",
    "espnet": "55.6 CamVid test (ESPNet paper, unverified)",
}


def _results() -> dict[str, dict[str, Any]]:
    path = RUNS / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(name: str, part: dict[str, Any]) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    # two bench processes may train side by side: read-modify-write under an exclusive lock
    with open(RUNS / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = _results()
        results.setdefault(name, {}).update(part)
        tmp = RUNS / f"results.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(RUNS / "results.json")


def _params(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _flops(name: str, num_classes: int, size: tuple[int, int]) -> int:
    from detseg.engine.complexity import count_flops
    from detseg.registry import get_entry

    with torch.device("meta"):
        model = get_entry(name).build(num_classes=num_classes)
    return count_flops(model, *size)


def static(names: list[str], repeats: int) -> None:
    """Params, GFLOPs @480x360, GMACs @512^2 and CPU ms @480x360 of each model (11 classes)."""
    from detseg.registry import get_entry

    for name in names:
        torch.manual_seed(0)
        model = get_entry(name).build(num_classes=11).eval()
        aux = getattr(model, "aux", None)
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
            x = torch.randn(1, 3, 360, 480)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(1000 * (time.perf_counter() - start))
        part = {
            "params": _params(model) - _params(aux),
            "aux_params": _params(aux),
            "params_c21": _params(_meta(name)) - _params(getattr(_meta(name), "aux", None)),
            "gflops_480x360": _flops(name, 11, (360, 480)) / 1e9,
            "gmacs_512_c21": _flops(name, 21, (512, 512)) / 2e9,
            "cpu_ms_480x360": float(np.median(times)),
        }
        _save(name, part)
        print(name, json.dumps(part), flush=True)


def _meta(name: str) -> torch.nn.Module:
    from detseg.registry import get_entry

    with torch.device("meta"):
        return get_entry(name).build(num_classes=21)


def train(names: list[str], steps: int, crop: int, batch: int, val_limit: int) -> None:
    """Train each model with the same budget; save mIoU and its labels on the grid images."""
    from detseg.api import load_model
    from detseg.data.folders import SegmentationFolder
    from detseg.semantic.pipeline import segment, train_semantic

    for name in names:
        kwargs = TRAIN.get(name, {})
        start = time.perf_counter()
        summary = train_semantic(
            model=name,
            data=DATA,
            out_dir=RUNS / name,
            steps=steps,
            batch_size=batch,
            crop=(crop, crop),
            eval_every=0,
            val_limit=val_limit,
            device="cpu",
            seed=0,
            model_kwargs=kwargs,
            progress=False,
        )
        seconds = time.perf_counter() - start
        loaded = load_model(weights=RUNS / name / "last.safetensors", device="cpu")
        loaded.model.eval()
        val = SegmentationFolder(DATA, "val", 11, 11, loaded.preprocess)
        labels = [
            segment(loaded.model, val.read_pair(i)[0], loaded.preprocess)
            for i in range(GRID_IMAGES)
        ]
        np.save(RUNS / name / "grid_labels.npy", np.stack(labels).astype(np.uint8))
        part = {
            "train_kwargs": kwargs,
            "budget": f"{steps} steps x {batch} crops {crop}x{crop}, val {val_limit} images",
            "mIoU_init": summary["first_eval"]["mIoU"],
            "mIoU": summary["last_eval"]["mIoU"],
            "train_s": seconds,
        }
        _save(name, part)
        print(name, json.dumps(part), flush=True)


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table() -> str:
    """Markdown table of everything measured so far; also writes the picture grid."""
    from detseg.registry import list_models

    results = _results()
    lines = [
        "| model | params (C=11) | params C=21 | GMACs 512² C=21 | GFLOPs 480x360 | CPU ms 480x360"
        " | trained as | mIoU init → after | published mIoU (not comparable) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for entry in list_models("semantic"):
        r = results.get(entry.name, {})
        aux = f" + {r['aux_params']:,} aux" if r.get("aux_params") else ""
        trained = r.get("train_kwargs")
        as_text = (
            "–"
            if trained is None
            else (", ".join(f"{k}={v}" for k, v in trained.items()) or "as registered")
        )
        miou = "–" if "mIoU" not in r else f"{r['mIoU_init']:.1f} → {r['mIoU']:.1f}"
        lines.append(
            f"| {entry.name} | {_fmt(r.get('params'), ',')}{aux} | {_fmt(r.get('params_c21'), ',')}"
            f" | {_fmt(r.get('gmacs_512_c21'), '.1f')} | {_fmt(r.get('gflops_480x360'), '.1f')}"
            f" | {_fmt(r.get('cpu_ms_480x360'), '.0f')} | {as_text} | {miou}"
            f" | {PUBLISHED.get(entry.name, 'none')} |"
        )
    budgets = {r["budget"] for r in results.values() if "budget" in r}
    lines.append("")
    lines.append(
        f"Training budget: {', '.join(sorted(budgets)) or 'none run'}; AdamW lr 1e-3, poly, "
        "random init after torch.manual_seed(0), CPU."
    )
    _grid(results)
    return "\n".join(lines)


def _grid(results: dict[str, dict[str, Any]]) -> None:
    """Rows: val image, ground truth, then each trained model's labels, on the same images."""
    from PIL import Image, ImageDraw

    from detseg.data.folders import SegmentationFolder
    from detseg.data.images import write_image
    from detseg.semantic.visualize import palette

    trained = [n for n in results if (RUNS / n / "grid_labels.npy").exists()]
    if not trained:
        return
    colours = palette(256, camvid=True)
    val = SegmentationFolder(DATA, "val", 11, 11)
    pairs = [val.read_pair(i) for i in range(GRID_IMAGES)]
    scale = 4  # 480x360 -> 120x90 tiles
    rows = [("image", [p[0] for p in pairs]), ("ground truth", [colours[p[1]] for p in pairs])]
    for name in trained:
        labels = np.load(RUNS / name / "grid_labels.npy")
        rows.append((name, [colours[lab] for lab in labels]))
    th, tw = 360 // scale, 480 // scale
    label_w = 190
    canvas = Image.new("RGB", (label_w + GRID_IMAGES * tw, len(rows) * th), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, tiles) in enumerate(rows):
        draw.text((4, r * th + th // 2 - 6), title, fill="black")
        for c, tile in enumerate(tiles):
            small = Image.fromarray(np.ascontiguousarray(tile)).resize((tw, th), Image.NEAREST)
            canvas.paste(small, (label_w + c * tw, r * th))
    write_image(GRID, np.asarray(canvas))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["static", "train", "table"])
    parser.add_argument("--models", default="", help="comma-separated names (default: all / TRAIN)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--val-limit", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from detseg.registry import list_models

    names = [n for n in args.models.split(",") if n]
    if args.part == "static":
        static(names or [e.name for e in list_models("semantic")], args.repeats)
    elif args.part == "train":
        train(names or list(TRAIN), args.steps, args.crop, args.batch, args.val_limit)
    else:
        print(table())


if __name__ == "__main__":
    main()
