"""Plot the AP curves of ``bench/instance_train.py`` runs from their logs (one JSON line per record).

    PYTHONPATH=. python bench/instance_curves.py runs/maskrcnn_balloon.log:Mask\\ R-CNN \
        runs/pointrend_balloon.log:PointRend --out docs/instance_rcnn_balloon.png

Panels: mask AP50, mask AP90 (IoU 0.9, the boundary-sensitive threshold) and box AP50 against the
step, train (solid) and val (dashed) for every run. Also prints the evaluations as a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detseg.fileio import atomic_output

PANELS = (("AP50", "mask AP50"), ("AP90", "mask AP at IoU 0.9"), ("box_AP50", "box AP50"))


def evaluations(log: Path) -> list[dict[str, float]]:
    """The evaluation records (``"kind": 1``) of a run log, in order."""
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("kind") == 1.0:
                out.append(record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LOG:LABEL")
    parser.add_argument("--out", type=Path, default=Path("docs/instance_rcnn_balloon.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    print(
        "| run | step | train AP50 | train AP | train AP90 | val AP50 | val AP | val AP90 |"
        " val box AP50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.runs:
        path, _, label = spec.partition(":")
        evals = evaluations(Path(path))
        steps = [r["step"] for r in evals]
        for ax, (key, title) in zip(axes, PANELS, strict=True):
            line = ax.plot(steps, [r[f"train_{key}"] for r in evals], marker="o", label=label)
            ax.plot(
                steps, [r[f"val_{key}"] for r in evals], "--", marker="x", color=line[0].get_color()
            )
            ax.set(xlabel="step", title=title + " (train solid, val dashed)")
            ax.grid(alpha=0.3)
        for r in evals:
            print(
                f"| {label} | {r['step']:.0f} | {r['train_AP50']:.4f} | {r['train_AP']:.4f} |"
                f" {r['train_AP90']:.4f} | {r['val_AP50']:.4f} | {r['val_AP']:.4f} |"
                f" {r['val_AP90']:.4f} | {r['val_box_AP50']:.4f} |"
            )
    axes[0].legend()
    fig.tight_layout()
    with atomic_output(args.out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
