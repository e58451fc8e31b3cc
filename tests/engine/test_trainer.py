"""Trainer: exact resume, Ctrl-C checkpoint, best/last files, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from detseg.checkpoint import read_state_dict
from detseg.engine.trainer import TrainConfig, Trainer, TrainingInterrupted


class _Noisy(Dataset):
    """Items drawn from numpy's global RNG, so data depends on the trainer's per-item seeding."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.random.normal(size=(4,)).astype(np.float32)) + i
        return x, x.sum().reshape(1) * 0.5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))


def _loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y), {}


def _trainer(out, steps=8, dataset=None, **kw) -> Trainer:
    cfg = TrainConfig(
        out_dir=str(out),
        max_steps=steps,
        batch_size=3,
        lr=1e-2,
        log_every=1,
        eval_every=2,
        schedule="cosine",
        warmup_steps=2,
        **kw,
    )
    evaluate = lambda m: {"score": -float(m[0].weight.abs().sum())}  # noqa: E731
    return Trainer(
        _model(),
        dataset if dataset is not None else _Noisy(),
        cfg,
        _loss,
        evaluate,
        primary_metric="score",
    )


def _losses(history):
    return [r["loss"] for r in history.train]


def test_runs_are_deterministic_and_differ_by_seed(tmp_path):
    one = _losses(_trainer(tmp_path / "a", 4).fit(progress=False))
    two = _losses(_trainer(tmp_path / "b", 4).fit(progress=False))
    other = _losses(_trainer(tmp_path / "c", 4, seed=1).fit(progress=False))
    assert one == two and one != other


def test_outputs_and_best(tmp_path):
    history = _trainer(tmp_path, 4).fit(progress=False)
    for name in (
        "best.safetensors",
        "last.safetensors",
        "last.state.safetensors",
        "history.json",
        "curves.png",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["best_step"] == history.best_step
    assert max(e["score"] for e in history.evals) == history.best_value


class _InterruptedOnce(_Noisy):
    """Raises KeyboardInterrupt (as Ctrl-C would) on its 10th fetch: the batch of step 4."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == 10:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_ctrl_c_then_resume_gives_the_uninterrupted_loss_curve(tmp_path):
    full = _losses(_trainer(tmp_path / "full").fit(progress=False))
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3"):
        _trainer(tmp_path / "part", dataset=_InterruptedOnce()).fit(progress=False)
    _, meta = read_state_dict(tmp_path / "part" / "last.safetensors")
    assert meta.extra["step"] == 3
    resumed = _trainer(tmp_path / "part").fit(resume=True, progress=False)
    assert _losses(resumed) == full  # bit-identical, not approximately equal
    a, _ = read_state_dict(tmp_path / "full" / "last.safetensors")
    b, _ = read_state_dict(tmp_path / "part" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in resumed.evals] == [2.0, 4.0, 6.0, 8.0]
