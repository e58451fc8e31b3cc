"""Checkpoints: round trips, format detection, and refusal of unsafe pickles."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from detseg.checkpoint import (
    CheckpointMeta,
    load_state_dict_strict,
    read_state_dict,
    save_checkpoint,
)
from detseg.errors import CheckpointError


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/detseg_pwned",))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_safetensors_round_trip_keeps_meta(tmp_path):
    net = _net()
    meta = CheckpointMeta(model="toy", kwargs={"width": 4}, class_names=["a", "b"])
    save_checkpoint(tmp_path / "m.safetensors", net, meta)
    state, got = read_state_dict(tmp_path / "m.safetensors")
    assert got is not None and got.model == "toy" and got.kwargs == {"width": 4}
    assert got.class_names == ["a", "b"]
    assert torch.equal(state["0.weight"], net.state_dict()["0.weight"])


def test_pth_wrapped_state_dict_is_unwrapped(tmp_path):
    net = _net()
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    state, meta = read_state_dict(tmp_path / "w.pth")
    assert meta is None and set(state) == set(net.state_dict())


def test_malicious_pth_is_refused_and_never_executed(tmp_path):
    if os.path.exists("/tmp/detseg_pwned"):
        os.remove("/tmp/detseg_pwned")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"weight": _Evil()}, f)
    torch.save({"w": torch.zeros(1), "x": _Evil()}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="refused|not a readable"):
            read_state_dict(tmp_path / name)
    assert not os.path.exists("/tmp/detseg_pwned")


def test_pkl_numpy_only(tmp_path):
    good = {"model": OrderedDict(w=np.ones((2, 2), np.float32))}
    (tmp_path / "good.pkl").write_bytes(pickle.dumps(good))
    state, _ = read_state_dict(tmp_path / "good.pkl")
    assert state["w"].shape == (2, 2)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"w": _Evil()}}))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(tmp_path / "evil.pkl")
    assert not os.path.exists("/tmp/detseg_pwned")


@pytest.mark.parametrize("content", [b"", b"garbage bytes that are no checkpoint"])
def test_corrupt_or_missing_files(tmp_path, content):
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_strict_load_names_the_mismatch():
    a, b = _net(), nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(CheckpointError, match="does not fit model 'toy'.*missing"):
        load_state_dict_strict(a, b.state_dict(), "b.pth", "toy")
    state = {k: v for k, v in a.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_state_dict_strict(_net(), state, "old.pth", "toy")  # pre-1.0 BN files lack the counter
