"""``detseg train --task matting --model gfm_*``: GFM on RSSN composites with the trainer.

A matting folder holds ``input/`` photos and same-named ``alpha/`` mattes (alphamatting.com
layout; optional ``fg/`` foreground colours, else estimated with pymatting), composited over a
folder of backgrounds by RSSN (``detseg.matting.composite``). The evaluation composites the
first ``val_limit`` photos' foregrounds over fixed backgrounds (no RSSN randomness) and scores the
hybrid test-time alpha by SAD/1000 (GFM convention): on a small folder this measures fitting, not
generalisation. The official recipe is Adam (here AdamW without decay), lr 1e-5, constant, batch
32, crops 640/960/1280 resized to 320.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from detseg.errors import InputFileError
from detseg.matting.composite import RSSNConfig, alpha_composite


def _layout(data: Path) -> tuple[Path, Path, Path | None]:
    if not ((data / "input").is_dir() and (data / "alpha").is_dir()):
        raise InputFileError(f"{data}: expected input/ and alpha/ subfolders (same file names).")
    return data / "input", data / "alpha", (data / "fg") if (data / "fg").is_dir() else None


def _clean_composites(dataset: Any, limit: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images, alphas) of the first ``limit`` foregrounds over backgrounds in turn, uint8."""
    images, alphas = [], []
    for i in range(min(limit, len(dataset.foregrounds))):
        fg, alpha = dataset.foregrounds[i], dataset.alphas[i]
        bg = dataset.backgrounds[i % len(dataset.backgrounds)]
        if bg.shape[:2] != fg.shape[:2]:
            import cv2

            bg = cv2.resize(bg, (fg.shape[1], fg.shape[0]), interpolation=cv2.INTER_AREA)
        composite = alpha_composite(fg.astype(np.float64), bg.astype(np.float64), alpha / 255.0)
        images.append(np.trunc(composite).astype(np.uint8))
        alphas.append(alpha)
    return images, alphas


def train_gfm(
    *,
    model: str,
    data: str | Path,
    backgrounds: str | Path,
    out_dir: str | Path = "runs/gfm",
    weights: str | Path | None = None,
    val_limit: int | None = 4,
    steps: int = 1000,
    batch_size: int = 4,
    lr: float = 1e-5,
    size: int = 320,
    max_side: int | None = None,
    eval_every: int = 200,
    log_every: int = 10,
    resume: bool = False,
    device: str = "auto",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    grad_accum: int = 1,
    sync_bn: bool = False,
) -> dict[str, Any]:
    """Train a registered ``gfm_*`` model; returns the run summary (see ``fit_and_summarise``).

    ``size`` is the training input side; crops are drawn from (2, 3, 4) x ``size`` as the
    official 640/960/1280 for 320 (clamped to the image). ``max_side`` shrinks the loaded images
    first. ``weights``: our checkpoint or an official GFM file to start from.
    """
    from detseg.api import load_model
    from detseg.checkpoint import CheckpointMeta
    from detseg.engine.summary import fit_and_summarise
    from detseg.engine.trainer import Trainer
    from detseg.matting.bgmv2_training import constant_adam_config
    from detseg.matting.gfm import RAW_RGB
    from detseg.matting.gfm_training import RSSNMattingDataset, make_evaluate_fn, make_loss_fn

    loaded = load_model(model, weights, device)
    if loaded.task != "matting" or not hasattr(loaded.model, "rosta"):
        raise InputFileError(f"{model!r} is not a GFM model (gfm_r34, gfm_d121, ...).")
    images, alphas, foregrounds = _layout(Path(data))
    train_set = RSSNMattingDataset.from_folders(
        images,
        alphas,
        backgrounds,
        foregrounds,
        max_side=max_side,
        size=size,
        crop_sizes=(2 * size, 3 * size, 4 * size),
        rssn=RSSNConfig(),
        seed=seed,
    )
    val_images, val_alphas = _clean_composites(train_set, val_limit or 0)
    cfg = constant_adam_config(
        out_dir,
        steps,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        log_every=log_every,
        seed=seed,
        device=device,
        num_workers=num_workers,
        grad_accum=grad_accum,
        sync_bn=sync_bn,
    )
    trainer = Trainer(
        loaded.model.train(),
        train_set,
        cfg,
        loss_fn=make_loss_fn(loaded.model.rosta),
        evaluate_fn=make_evaluate_fn(val_images, val_alphas, "hybrid") if val_images else None,
        primary_metric="SAD",
        higher_is_better=False,
        meta=CheckpointMeta(model=loaded.name, kwargs=loaded.kwargs, preprocess=dict(RAW_RGB)),
    )
    return fit_and_summarise(trainer, resume=resume, progress=progress)
