"""Data-parallel training under ``torchrun``: the process group, DDP wrapping, cross-rank reductions.

``torchrun --nproc-per-node N -m detseg train ...`` starts N copies of ``detseg train`` with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment
(``--nnodes``/``--node-rank``/``--rdzv-endpoint`` spread them over machines; those are torchrun's
options, not ours). ``distributed_session`` turns that environment into an initialised process
group (NCCL on GPUs, one GPU per process by ``LOCAL_RANK``; gloo on CPU); without it every
function here is a no-op and training runs in one process, unchanged.

The ``Trainer`` asks this module for its rank and world size, wraps its model with
``wrap_model`` and averages its logged losses with ``mean_across_ranks``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from detseg.errors import DetsegError

TIMEOUT_ENV = "DETSEG_DIST_TIMEOUT"  # seconds a rank waits for the others (rank-0 evaluation)


@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` told this process: its global rank, the process count, its GPU slot."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The torchrun environment of this process, or None when it was not started by torchrun."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return LaunchEnv(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
        )
    except ValueError as exc:
        raise DetsegError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); launch with torchrun."
        ) from exc


def backend_for(device: str) -> str:
    """``"nccl"`` when the run trains on CUDA (``device`` auto with GPUs, or cuda*), else gloo."""
    wants_cuda = device.startswith("cuda") or device == "auto"
    return "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[LaunchEnv | None]:
    """Initialise the default process group from torchrun's environment for the block's duration.

    Yields the ``LaunchEnv`` (None outside torchrun, where nothing happens). On NCCL each process
    takes GPU ``LOCAL_RANK`` as its current device, so ``--device cuda`` means "my GPU". An already
    initialised group (a caller's own) is used as it is and left alone.
    """
    env = launch_env()
    if env is None or env.world_size == 1 or dist.is_initialized():
        yield env
        return
    backend = backend_for(device)
    if backend == "nccl":
        if env.local_rank >= torch.cuda.device_count():
            raise DetsegError(
                f"LOCAL_RANK {env.local_rank} but this machine has {torch.cuda.device_count()} "
                "GPUs; use --nproc-per-node <= the GPU count."
            )
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 3600)))
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield env
        dist.barrier()  # rank 0 finishes its files before anyone tears the group down
    finally:
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (inside or after a torchrun session) and in plain single-process runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = launch_env()
    return env is None or env.rank == 0


def wrap_model(
    model: nn.Module, device: torch.device, *, sync_bn: bool = False, find_unused: bool = False
) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when a process group is up, else as is.

    ``sync_bn`` converts BatchNorm layers to ``SyncBatchNorm`` (statistics over the global batch;
    CUDA only, as PyTorch implements it). ``find_unused`` lets DDP skip parameters a step did not
    use (models whose loss leaves a branch out).
    """
    _, world = rank_world()
    if world == 1:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise DetsegError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm); drop it.")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (the model itself when not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` when ``skip`` (accumulation micro-steps before the last), else nothing."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Elementwise mean of ``values`` (any shape, float) over all ranks; itself in one process."""
    _, world = rank_world()
    if world == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if _on_nccl() else "cpu"
    summed = values.to(device=device, dtype=torch.float64)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return (summed / world).to(values.device)


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object, e.g. evaluation metrics)."""
    _, world = rank_world()
    if world == 1:
        return obj
    box = [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if _on_nccl() else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _on_nccl() -> bool:
    return dist.get_backend() == "nccl"
