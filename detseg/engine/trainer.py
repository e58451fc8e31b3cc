"""The training loop shared by every task: step-based, seeded, resumable, interruptible.

Exact resume: the data order and every random draw are functions of ``(seed, step)`` alone (each
item is fetched after seeding python/numpy/torch from its step and slot, and the model's own random
ops are seeded per step), so a run stopped after step k and resumed produces the same loss curve as
one that never stopped. The optimizer and schedule states travel in ``last.state.safetensors``.

Under ``torchrun`` (see ``detseg.engine.distributed``) the same loop is data-parallel: the model is
wrapped in DDP, ``batch_size`` stays the *global* batch of one optimizer step, split into
``batch_size / (world_size * grad_accum)`` items per process and micro-step, and item ``j`` of step
``s`` is the same image with the same augmentation draw whatever the process count. So a run gives
the same parameters (up to float summation order) on 1 or N processes, and its checkpoint resumes
on any process count. Only rank 0 evaluates, logs and writes files; logged losses are averaged
over ranks.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from detseg.checkpoint import CheckpointMeta, load_tensors, save_checkpoint, save_tensors
from detseg.engine import distributed
from detseg.engine.device import resolve_device
from detseg.errors import DetsegError
from detseg.fileio import write_text_atomic

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, float]]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


class TrainingInterrupted(DetsegError):
    """Ctrl-C during training; ``last`` was saved and the run can be resumed."""


@dataclass
class TrainConfig:
    """Settings of one run (saved beside its checkpoints).

    Attributes:
        out_dir: folder for ``last``/``best`` checkpoints, ``history.json`` and ``curves.png``.
        max_steps: optimizer steps in the whole run.
        schedule: "poly" (power 0.9), "cosine" or "constant", after ``warmup_steps`` linear warm-up.
        eval_every: steps between evaluations (0: only at the end).
        grad_clip: max gradient norm, or None.
        batch_size: items per optimizer step over all processes (the global batch).
        grad_accum: micro-steps per optimizer step (gradients accumulated between them).
        sync_bn: under DDP, BatchNorm statistics over the global micro-batch (CUDA only).
        find_unused_parameters: under DDP, tolerate parameters a step leaves unused (on by
            default so that every task trains, e.g. heads a loss skips; off saves one autograd
            graph walk per step).
    """

    out_dir: str = "runs/train"
    max_steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "poly"
    warmup_steps: int = 0
    eval_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    grad_clip: float | None = None
    grad_accum: int = 1
    sync_bn: bool = False
    find_unused_parameters: bool = True


@dataclass
class History:
    """What a run measured: one record per logged step and per evaluation."""

    train: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_value: float | None = None


def _item_seed(seed: int, step: int, slot: int) -> int:
    return (seed * 1_000_003 + step * 4099 + slot) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _SeededItems(Dataset):
    """Fetches ``dataset[index]`` after seeding every RNG from the item's own seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        seed_everything(seed)
        return self.dataset[index]


class _StepBatches(Sampler[list[tuple[int, int]]]):
    """Micro-batches of this rank for steps ``start..stop-1`` of an endless stream of per-epoch
    permutations.

    Step ``s`` covers positions ``s * global_batch + j`` (``j`` < ``global_batch``) of the stream;
    slot ``j = (micro_step * world_size + rank) * micro_batch + i``, and its item seed depends on
    ``(seed, s, j)`` only, so the data of a step does not depend on how it is split.
    """

    def __init__(
        self,
        n: int,
        micro_batch: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ) -> None:
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        self.grad_accum = grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.micro_batch * self.world_size * self.grad_accum
        perm_cache: dict[int, torch.Tensor] = {}
        for step in range(self.start, self.stop):
            for micro in range(self.grad_accum):
                batch = []
                for i in range(self.micro_batch):
                    slot = (micro * self.world_size + self.rank) * self.micro_batch + i
                    epoch, offset = divmod(step * global_batch + slot, self.n)
                    if epoch not in perm_cache:
                        perm_cache = {
                            epoch: torch.randperm(
                                self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
                            )
                        }
                    batch.append(
                        (int(perm_cache[epoch][offset]), _item_seed(self.seed, step, slot))
                    )
                yield batch

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.grad_accum


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested dicts / lists / tuples to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        t = min(t, 1.0)
        if cfg.schedule == "poly":
            return (1 - t) ** 0.9
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["plain_state"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


class Trainer:
    """Fits ``model`` on ``train_set`` with ``loss_fn``; evaluates with ``evaluate_fn``.

    Args:
        model: the network (moved to the configured device).
        train_set: map-style dataset; its items go through ``collate_fn`` and to the device.
        loss_fn: ``(model, batch) -> (loss, {name: float})``, called in train mode.
        evaluate_fn: ``model -> {metric: float}``, called in eval mode under ``no_grad``.
        primary_metric: the metric that picks ``best``; ``higher_is_better`` its direction.
        meta: what the saved model checkpoints record (registry name, kwargs, preprocess).
        on_log: callbacks receiving every train/eval record (e.g. a distributed logger).
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        config: TrainConfig,
        loss_fn: LossFn,
        evaluate_fn: EvalFn | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        primary_metric: str = "mIoU",
        higher_is_better: bool = True,
        meta: CheckpointMeta | None = None,
        on_log: Sequence[Callable[[dict[str, float]], None]] = (),
    ) -> None:
        self.cfg = config
        self.device = resolve_device(config.device)
        self.rank, self.world_size = distributed.rank_world()
        self.micro_batch = _micro_batch(config, self.world_size)
        self.model = distributed.wrap_model(
            model.to(self.device),
            self.device,
            sync_bn=config.sync_bn,
            find_unused=config.find_unused_parameters,
        )
        self.train_set = train_set
        self.loss_fn, self.evaluate_fn = loss_fn, evaluate_fn
        self.collate_fn = collate_fn or default_collate
        self.primary_metric, self.higher_is_better = primary_metric, higher_is_better
        self.meta = meta or CheckpointMeta(model=type(model).__name__)
        self.on_log = list(on_log)
        self.out_dir = Path(config.out_dir)
        if len(train_set) == 0:  # type: ignore[arg-type]
            raise DetsegError("the training set is empty; check --data and --split.")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        elif config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                params, lr=config.lr, weight_decay=config.weight_decay
            )
        else:
            raise DetsegError(f"unknown optimizer {config.optimizer!r}; use 'adamw' or 'sgd'.")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(config))
        self.step = 0
        self.history = History()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- checkpoints -------------------------------------------------------------------------
    def _save(self, name: str) -> None:
        if not self.is_main:
            return
        net = distributed.unwrap(self.model)
        meta = CheckpointMeta(
            **{**self.meta.__dict__, "extra": {**self.meta.extra, "step": self.step}}
        )
        save_checkpoint(self.out_dir / f"{name}.safetensors", net, meta)

    def _save_state(self) -> None:
        if not self.is_main:
            return
        tensors, optim_meta = _flatten_optimizer(self.optimizer.state_dict())
        meta = {
            "step": self.step,
            "optimizer": optim_meta,
            "scheduler": self.scheduler.state_dict(),
            "history": asdict(self.history),
            "config": asdict(self.cfg),
        }
        save_tensors(self.out_dir / "last.state.safetensors", tensors, meta)
        self._save("last")

    def _resume(self) -> None:
        state_path = self.out_dir / "last.state.safetensors"
        if not state_path.exists():
            raise DetsegError(f"--resume: {state_path} not found; start without --resume.")
        from detseg.checkpoint import load_state_dict_strict, read_state_dict

        weights, _ = read_state_dict(self.out_dir / "last.safetensors")
        load_state_dict_strict(
            distributed.unwrap(self.model),
            weights,
            str(self.out_dir / "last.safetensors"),
            self.meta.model,
        )
        tensors, meta = load_tensors(state_path)
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = int(meta["step"])
        self.history = History(**meta["history"])

    # -- loop --------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        sampler = _StepBatches(
            len(self.train_set),  # type: ignore[arg-type]
            self.micro_batch,
            self.cfg.seed,
            self.step,
            self.cfg.max_steps,
            self.rank,
            self.world_size,
            self.cfg.grad_accum,
        )
        return DataLoader(
            _SeededItems(self.train_set),
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
        )

    def _log(self, record: dict[str, float]) -> None:
        for callback in self.on_log:
            callback(record)

    def evaluate(self) -> dict[str, float]:
        """Run ``evaluate_fn`` in eval mode; records it and updates ``best``.

        Under DDP rank 0 evaluates the bare network and the others receive its metrics.
        """
        if self.evaluate_fn is None:
            return {}
        metrics: dict[str, float] | None = None
        if self.is_main:
            net = distributed.unwrap(self.model)
            net.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.evaluate_fn(net).items()}
            self.model.train()
        metrics = distributed.broadcast_from_main(metrics)
        assert metrics is not None
        record = {"step": float(self.step), **metrics}
        self.history.evals.append(record)
        self._log({"kind": 1.0, **record})
        value = metrics.get(self.primary_metric)
        if value is not None:
            best = self.history.best_value
            better = best is None or (value > best if self.higher_is_better else value < best)
            if better:
                self.history.best_step, self.history.best_value = self.step, value
                self._save("best")
        return metrics

    def _train_step(self, micro_batches: Sequence[Any]) -> dict[str, float]:
        """One optimizer step over this rank's ``grad_accum`` micro-batches."""
        self.optimizer.zero_grad(set_to_none=True)
        accum = len(micro_batches)
        sums: torch.Tensor | None = None
        names: list[str] = []
        for k, batch in enumerate(micro_batches):
            stream = 10_007 + self.rank * accum + k  # the model's own random ops, per micro-step
            torch.manual_seed(_item_seed(self.cfg.seed, self.step, stream))
            with distributed.no_sync(self.model, skip=k < accum - 1):
                loss, parts = self.loss_fn(self.model, to_device(batch, self.device))
                (loss / accum).backward()
            names = sorted(parts)
            values = torch.tensor(
                [float(loss.detach())] + [float(parts[n]) for n in names], dtype=torch.float64
            )
            sums = values if sums is None else sums + values
        assert sums is not None
        means = distributed.mean_across_ranks(sums / accum).tolist()
        if not math.isfinite(means[0]):
            raise DetsegError(f"the loss became {means[0]} at step {self.step}; lower --lr.")
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {
            "step": float(self.step),
            "loss": means[0],
            "lr": float(lr),
            **dict(zip(names, means[1:], strict=True)),
        }

    def fit(self, resume: bool = False, progress: bool = True) -> History:
        """Train to ``max_steps`` (continuing ``last`` when ``resume``); returns the history.

        Raises:
            TrainingInterrupted: on Ctrl-C, after saving ``last`` at the last finished step.
        """
        if resume:
            self._resume()
        self.model.train()
        from detseg.engine.progress import step_progress

        self._announce(progress)
        started = time.perf_counter()
        try:
            with step_progress(
                self.cfg.max_steps, self.step, enabled=progress and self.is_main
            ) as bar:
                micro_batches = iter(self._loader())
                for step_batches in zip(*[micro_batches] * self.cfg.grad_accum, strict=False):
                    record = self._train_step(step_batches)
                    if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                        self.history.train.append(record)
                        self._log(record)
                    bar(self.step, record["loss"])
                    if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                        self.evaluate()
                        self._save_state()
        except KeyboardInterrupt:
            self._save_state()
            self._write_history()
            raise TrainingInterrupted(
                f"interrupted at step {self.step}; saved {self.out_dir / 'last.safetensors'}; "
                "continue with --resume."
            ) from None
        if not self.history.evals or self.history.evals[-1]["step"] != self.step:
            self.evaluate()
        self._save_state()
        self._write_history(time.perf_counter() - started)
        return self.history

    def scale(self) -> dict[str, Any]:
        """How the global batch is made: processes, items per process and micro-step, lr."""
        return {
            "world_size": self.world_size,
            "backend": torch.distributed.get_backend() if self.world_size > 1 else None,
            "micro_batch": self.micro_batch,
            "grad_accum": self.cfg.grad_accum,
            "global_batch": self.cfg.batch_size,
            "lr": self.cfg.lr,
        }

    def _announce(self, progress: bool) -> None:
        """One stderr line on how the global batch is split (only when it is split)."""
        split = self.world_size > 1 or self.cfg.grad_accum > 1
        if not (progress and split and self.is_main):
            return
        from detseg.engine.progress import stderr_console

        s = self.scale()
        where = (
            f"{s['world_size']} processes ({s['backend']})" if s["world_size"] > 1 else "1 process"
        )
        stderr_console.print(
            f"training on {where}, {self.device.type}: global batch {s['global_batch']} = "
            f"{s['micro_batch']} per process x {s['world_size']} x {s['grad_accum']} "
            f"accumulation; lr {s['lr']:g} ({self.cfg.optimizer}, {self.cfg.schedule})"
        )

    def _write_history(self, seconds: float | None = None) -> None:
        if not self.is_main:
            return
        payload = {
            **asdict(self.history),
            "seconds": seconds,
            "config": asdict(self.cfg),
            "scale": self.scale(),
        }
        write_text_atomic(self.out_dir / "history.json", json.dumps(payload, indent=1))
        from detseg.engine.plots import plot_history

        plot_history(self.history, self.out_dir / "curves.png", self.primary_metric)


def _micro_batch(cfg: TrainConfig, world_size: int) -> int:
    """Items per process and micro-step: the global batch split over processes and micro-steps."""
    if cfg.grad_accum < 1:
        raise DetsegError(f"--grad-accum {cfg.grad_accum}: use 1 or more.")
    shares = world_size * cfg.grad_accum
    if cfg.batch_size % shares:
        raise DetsegError(
            f"--batch-size {cfg.batch_size} (the global batch) does not split over {world_size} "
            f"processes x {cfg.grad_accum} accumulation steps; use a multiple of {shares}."
        )
    return cfg.batch_size // shares
