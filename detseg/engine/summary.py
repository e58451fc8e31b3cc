"""Run a ``Trainer`` the way every ``detseg train`` does and summarise the run as a dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detseg.engine.distributed import is_main_process
from detseg.engine.trainer import Trainer
from detseg.fileio import write_text_atomic


def fit_and_summarise(
    trainer: Trainer, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Evaluate the starting point (fresh runs), train to ``max_steps`` and return the summary.

    The summary (also written to ``<out_dir>/summary.json``): ``out_dir``, ``steps``, the first
    and last training-log and evaluation records, ``best_step``, ``best_<primary metric>``, the
    checkpoint paths and the curves picture.
    """
    if not resume and trainer.evaluate_fn is not None:
        trainer.evaluate()  # the starting point of the curve
    history = trainer.fit(resume=resume, progress=progress)
    out_dir = Path(trainer.cfg.out_dir)
    summary = {
        "out_dir": str(out_dir),
        "steps": trainer.step,
        "first_train": history.train[0] if history.train else None,
        "last_train": history.train[-1] if history.train else None,
        "first_eval": history.evals[0] if history.evals else None,
        "last_eval": history.evals[-1] if history.evals else None,
        "best_step": history.best_step,
        f"best_{trainer.primary_metric}": history.best_value,
        "checkpoints": [str(out_dir / n) for n in ("best.safetensors", "last.safetensors")],
        "curves": str(out_dir / "curves.png"),
    }
    if out_dir.is_dir() and is_main_process():
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
