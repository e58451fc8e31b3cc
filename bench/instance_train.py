"""The balloon protocol for any trainable instance model: train from scratch, print the AP curves.

    PYTHONPATH=. python bench/instance_train.py --model maskrcnn_r50 \
        --model-arg backbone=mobilenet_v2 [--steps 480] [--out runs/maskrcnn_balloon]

``/work/notes/instance_protocol.md``: the 61 balloon training images (scale jitter + flip, the
``DetectionDataset`` training transform), 256 px max size, batch 4, AdamW lr 2e-3, cosine, seed 0,
one thread; COCO mask AP / AP50 / AP90 (IoU 0.9, the boundary-sensitive threshold) and box AP50
on balloon train (no augmentation) and val, before training and every ``--eval-every`` steps.
The loss and evaluation come from the training recipe the CLI uses (``detection.pipeline``), so
every model that ``detseg train --task instance`` trains runs here. Writes ``history.json`` and the
checkpoints under ``--out``; prints one JSON line per evaluation and the wall / CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from detseg.api import load_model
from detseg.checkpoint import CheckpointMeta
from detseg.cli import _parse_model_args
from detseg.data.convert import read_dataset
from detseg.data.detection import DetectionDataset
from detseg.detection.fcos_training import collate_detection
from detseg.detection.pipeline import _recipe
from detseg.engine.trainer import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="maskrcnn_r50")
    parser.add_argument("--model-arg", action="append", default=[], help="KEY=VALUE")
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
    )
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--eval-every", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--out", default="runs/instance_balloon")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.shared / "data/balloon"
    train, val = (
        read_dataset(root / s / "via_region_data.json", "balloon") for s in ("train", "val")
    )
    kwargs = {"num_classes": 1, **_parse_model_args(args.model_arg)}
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu", **kwargs)
    loss_fn, make_evaluate, masks = _recipe(loaded)
    pre = loaded.preprocess

    def items(data, augment: bool) -> DetectionDataset:  # noqa: ANN001
        return DetectionDataset(data, augment, args.size, masks=masks, preprocess=pre)

    on_train, on_val = make_evaluate(items(train, False), 4), make_evaluate(items(val, False), 4)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        out = {f"train_{k}": v for k, v in on_train(model).items()}
        return {**out, **{f"val_{k}": v for k, v in on_val(model).items()}}

    cfg = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        schedule="cosine",
        warmup_steps=args.warmup,
        eval_every=args.eval_every,
        log_every=20,
        grad_clip=35.0,
        device="cpu",
    )
    meta = CheckpointMeta(model=loaded.name, kwargs=loaded.kwargs, preprocess=pre.to_dict())
    trainer = Trainer(
        loaded.model,
        items(train, True),
        cfg,
        loss_fn,
        evaluate,
        collate_fn=collate_detection,
        primary_metric="val_AP50",
        meta=meta,
        on_log=[lambda r: print(json.dumps({k: round(v, 4) for k, v in r.items()}), flush=True)],
    )
    wall, cpu = time.perf_counter(), time.process_time()
    if not args.resume:
        trainer.evaluate()  # the starting point of the curve
    history = trainer.fit(resume=args.resume, progress=False)
    losses = history.train
    print("train loss:", [round(r["loss"], 3) for r in losses[:: max(1, len(losses) // 10)]])
    print(
        f"steps {trainer.step}, wall {time.perf_counter() - wall:.0f} s, "
        f"cpu {time.process_time() - cpu:.0f} s"
    )


if __name__ == "__main__":
    main()
