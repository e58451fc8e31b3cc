"""The balloon protocol for TensorMask: a short from-scratch CPU run, mask/box AP curve.

    PYTHONPATH=. python bench/tensormask_train.py [--steps 480] [--size 256] [--out runs/tm_balloon]

The light TensorMask (``LIGHT_KWARGS``: random-init MobileNetV2, FPN 64 channels, 2-conv towers
of 64) trained with ``detseg.engine.trainer.Trainer`` on the 61 balloon training images (scale
jitter, flip), AdamW 2e-3 cosine, batch 4, seed 0, one thread; evaluated without augmentation
on balloon train and val (mask AP/AP50, box AP50) before training and every ``--eval-every``
steps. Prints one JSON line per evaluation, the wall and CPU seconds.

    PYTHONPATH=. python bench/tensormask_train.py --plot runs/tm_balloon/history.json docs/x.png

draws the curve of a run (loss; mask AP50 / AP and box AP50 on train and val against step).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from detseg.checkpoint import CheckpointMeta
from detseg.data.convert import read_dataset
from detseg.detection.fcos_training import collate_detection
from detseg.engine.trainer import TrainConfig, Trainer
from detseg.instance.polarmask_training import polarmask_evaluate_fn
from detseg.instance.tensormask import TensorMask
from detseg.instance.tensormask_training import LIGHT_KWARGS, tensormask_dataset, tensormask_loss


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plot_curve(history: Path, out: Path) -> None:
    """Loss (left) and mask AP50 / AP, box AP50 on train and val (right) of a run's history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detseg.fileio import atomic_output

    record = json.loads(history.read_text())
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = record["train"]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="step", ylabel="training loss", title="TensorMask, balloon train")
    steps = [r["step"] for r in record["evals"]]
    for key, style in (("AP50", "o-"), ("AP", "s-"), ("box_AP50", "^-")):
        for split, prefix, dash in (("train", "", ""), ("val", "val_", "-")):
            values = [r[prefix + key] for r in record["evals"]]
            label = f"{'mask ' if 'box' not in key else ''}{key} {split}"
            ax_ap.plot(steps, values, style + dash, label=label, markersize=4)
    ax_ap.set(xlabel="step", ylabel="COCO AP", title="mask / box AP (no augmentation)")
    ax_ap.legend(fontsize=7, ncol=2)
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
    )
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--eval-every", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--images", type=int, default=None, help="first N training images only")
    parser.add_argument("--out", default="runs/tm_balloon")
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("HISTORY", "PNG"))
    args = parser.parse_args()
    if args.plot:
        plot_curve(*args.plot)
        return
    torch.set_num_threads(1)
    balloon = args.shared / "data/balloon"
    train = read_dataset(balloon / "train/via_region_data.json", "balloon")
    train = replace(train, images=train.images[: args.images])
    val = read_dataset(balloon / "val/via_region_data.json", "balloon")
    train_set = tensormask_dataset(train, train=True, max_size=args.size)
    eval_train = polarmask_evaluate_fn(tensormask_dataset(train, False, args.size), 4)
    eval_val = polarmask_evaluate_fn(tensormask_dataset(val, False, args.size), 4)

    def evaluate(model: TensorMask) -> dict[str, float]:
        val_metrics = {f"val_{k}": v for k, v in eval_val(model).items()}
        return {**eval_train(model), **val_metrics, "cpu_s": _cpu_seconds()}

    torch.manual_seed(0)
    kwargs = {"num_classes": 1, **LIGHT_KWARGS}
    model = TensorMask(**kwargs)
    start = time.perf_counter()
    cfg = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        schedule="cosine",
        warmup_steps=30,
        eval_every=args.eval_every,
        log_every=20,
        grad_clip=35.0,
        device="cpu",
        seed=0,
    )
    trainer = Trainer(
        model,
        train_set,
        cfg,
        loss_fn=tensormask_loss,
        evaluate_fn=evaluate,
        collate_fn=collate_detection,
        primary_metric="AP50",
        higher_is_better=True,
        meta=CheckpointMeta(model="tensormask_r50", kwargs=kwargs),
    )
    trainer.evaluate()
    print(json.dumps(trainer.history.evals[-1]), flush=True)
    history = trainer.fit(progress=False)
    for record in history.evals:
        print(json.dumps(record))
    losses = history.train
    print(
        "train loss:",
        [round(r.get("loss", float("nan")), 3) for r in losses[:: max(1, len(losses) // 10)]],
    )
    print(
        f"steps: {trainer.step}  wall: {time.perf_counter() - start:.0f} s  cpu: {_cpu_seconds():.0f} s"
    )


if __name__ == "__main__":
    main()
