"""Training jobs for ``test_distributed.py``: run in one process, or under torchrun in N.

``torchrun --standalone --nproc-per-node 2 tests/engine/ddp_worker.py JOBS.json`` runs each job of
the JSON list ``[{"out": DIR, "steps": S, "resume": bool, "interrupt_at": K|null, "grad_accum": A,
"per_rank_out": bool}]`` in every process, inside ``distributed_session`` (gloo on CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from detseg.engine.distributed import distributed_session, rank_world
from detseg.engine.trainer import TrainConfig, Trainer, TrainingInterrupted

GLOBAL_BATCH = 4


class NoisyItems(Dataset):
    """Items drawn from numpy's global RNG (so they depend on the trainer's per-item seeding);
    ``interrupt_after`` fetches, it raises KeyboardInterrupt as Ctrl-C would."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.calls, self.interrupt_after = 0, interrupt_after

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        x = torch.from_numpy(np.random.normal(size=(4,)).astype(np.float32)) + i
        return x, torch.tanh(x).sum().reshape(1)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    return loss, {"half": loss.detach() / 2}


def _score(model: nn.Module) -> dict[str, float]:
    return {"score": -float(model[0].weight.abs().sum())}


def make_trainer(
    out: str | Path,
    steps: int,
    interrupt_at: int | None = None,
    grad_accum: int = 1,
) -> Trainer:
    """A tiny MLP on ``NoisyItems`` with global batch 4; ``interrupt_at``: Ctrl-C during that step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    _, world = rank_world()
    per_step = GLOBAL_BATCH // world  # items one process fetches per step
    cfg = TrainConfig(
        out_dir=str(out),
        max_steps=steps,
        batch_size=GLOBAL_BATCH,
        lr=1e-2,
        log_every=1,
        eval_every=2,
        schedule="cosine",
        warmup_steps=1,
        device="cpu",
        grad_accum=grad_accum,
    )
    items = NoisyItems(None if interrupt_at is None else interrupt_at * per_step)
    return Trainer(model, items, cfg, _loss, _score, primary_metric="score")


def run_job(job: dict) -> None:
    """Fit one job (catching the planned interruption)."""
    rank, _ = rank_world()
    out = Path(job["out"]) / f"rank{rank}" if job.get("per_rank_out") else Path(job["out"])
    trainer = make_trainer(out, job["steps"], job.get("interrupt_at"), job.get("grad_accum", 1))
    try:
        trainer.fit(resume=job.get("resume", False), progress=False)
    except TrainingInterrupted:
        pass


if __name__ == "__main__":
    torch.set_num_threads(1)
    with distributed_session("cpu"):
        for job in json.loads(Path(sys.argv[1]).read_text()):
            run_job(job)
