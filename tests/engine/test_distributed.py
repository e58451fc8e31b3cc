"""Data-parallel training: 2 gloo processes under torchrun equal 1 process, and resume across counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detseg.checkpoint import read_state_dict
from detseg.engine import distributed
from detseg.engine.trainer import TrainConfig, Trainer, _StepBatches
from detseg.errors import DetsegError
from tests.engine.ddp_worker import make_trainer, run_job

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
FILES = ("best.safetensors", "last.safetensors", "last.state.safetensors", "history.json")


def _torchrun(*args: str, nproc: int = 2) -> str:
    """stdout of ``torchrun --standalone --nproc-per-node nproc ARGS`` (which must succeed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(out / "last.safetensors")[0]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One torchrun launch (2 processes) for every test here, beside the 1-process references."""
    tmp = tmp_path_factory.mktemp("ddp")
    for name, steps in (("single4", 4), ("single6", 6)):
        run_job({"out": str(tmp / name), "steps": steps})
    run_job({"out": str(tmp / "one_to_two"), "steps": 6, "interrupt_at": 3})
    jobs = [
        {"out": str(tmp / "ddp4"), "steps": 4, "per_rank_out": True},
        {"out": str(tmp / "two_to_one"), "steps": 6, "interrupt_at": 3},
        {"out": str(tmp / "one_to_two"), "steps": 6, "resume": True, "grad_accum": 2},
    ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    _torchrun(str(WORKER), str(tmp / "jobs.json"))
    return tmp


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    ddp, single = runs / "ddp4" / "rank0", runs / "single4"
    assert _max_diff(ddp, single) < 1e-6
    ours, ref = _history(ddp), _history(single)
    assert [r["loss"] for r in ours["train"]] == pytest.approx(
        [r["loss"] for r in ref["train"]], rel=1e-5
    )
    assert [r["half"] * 2 for r in ours["train"]] == pytest.approx(
        [r["loss"] for r in ours["train"]], rel=1e-9
    )  # every logged part is averaged over ranks the same way
    assert ours["scale"] == {
        "world_size": 2,
        "backend": "gloo",
        "micro_batch": 2,
        "grad_accum": 1,
        "global_batch": 4,
        "lr": 1e-2,
    }
    assert [e["step"] for e in ours["evals"]] == [2.0, 4.0]


def test_only_rank_zero_writes_files(runs):
    assert all((runs / "ddp4" / "rank0" / name).is_file() for name in FILES)
    assert not (runs / "ddp4" / "rank1").exists()


def test_checkpoint_of_two_processes_resumes_in_one(runs):
    part = runs / "two_to_one"
    _, meta = read_state_dict(part / "last.safetensors")
    assert meta.extra["step"] == 3
    run_job({"out": str(part), "steps": 6, "resume": True})
    assert _max_diff(part, runs / "single6") < 1e-6


def test_checkpoint_of_one_process_resumes_in_two_with_accumulation(runs):
    assert _max_diff(runs / "one_to_two", runs / "single6") < 1e-6
    assert _history(runs / "one_to_two")["scale"]["micro_batch"] == 1


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    make_trainer(tmp_path / "full", 3).fit(progress=False)
    make_trainer(tmp_path / "accum", 3, grad_accum=4).fit(progress=False)
    assert _max_diff(tmp_path / "accum", tmp_path / "full") < 1e-6


def test_a_step_holds_the_same_items_however_it_is_split():
    def items(world: int, accum: int) -> list[tuple[int, int]]:
        micro = 6 // (world * accum)
        out = []
        for rank in range(world):
            for batch in _StepBatches(5, micro, 3, 2, 4, rank, world, accum):
                out += batch
        return sorted(out)

    assert items(1, 1) == items(2, 1) == items(3, 2) == items(1, 6)
    assert len(set(items(1, 1))) == 12  # 2 steps x 6 distinct (index, seed) pairs


def test_global_batch_must_split_over_processes_and_micro_steps(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=4, grad_accum=3)
    with pytest.raises(DetsegError, match="multiple of 3"):
        Trainer(torch.nn.Linear(1, 1), [0], cfg, lambda m, b: (b, {}))


def test_launch_env_reads_torchrun_variables():
    assert distributed.launch_env({}) is None
    env = distributed.launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == distributed.LaunchEnv(rank=3, world_size=4, local_rank=1)
    with pytest.raises(DetsegError, match="integers"):
        distributed.launch_env({"RANK": "x", "WORLD_SIZE": "2"})
    assert distributed.backend_for("cpu") == "gloo"


def test_detseg_train_under_torchrun(tmp_path):
    """`torchrun -m detseg train`: one model trained by 2 processes, one summary printed and saved."""
    from detseg.semantic.demo import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "shapes", train=4, val=2, size=32)
    out = tmp_path / "run"
    args = ["-m", "detseg", "train", "--model", "unet", "--model-arg", "base_channels=8"]
    args += ["--model-arg", "depth=2", "--data", str(data), "--num-classes", "4"]
    args += ["--ignore-index", "255", "--steps", "2", "--batch-size", "4", "--crop", "32"]
    args += ["--eval-every", "0", "--device", "cpu", "--out", str(out), "--json"]
    lines = [line for line in _torchrun(*args).splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    assert json.loads(lines[0])["steps"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert _history(out)["scale"]["world_size"] == 2
