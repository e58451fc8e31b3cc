"""The benchmark harness (``bench/run.py``): its columns and comparisons on a tiny model (no timing
is checked: speed is measured by the benchmark itself, never by tests)."""

from __future__ import annotations

import math

import pytest
import torch

from bench.run import append_csv, header, measure, print_row
from detseg.engine.fast import example_inputs
from detseg.registry import get_entry


def _tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_entry("unet").build(num_classes=3, base_channels=4, depth=2).eval()


def test_row_with_onnxruntime_columns(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    model = _tiny_unet()
    inputs = example_inputs(model, 1, 32, 48)
    row = measure("unet", "48x32", model, inputs, 1, torch.device("cpu"), name="unet", onnx=True)
    assert row.max_diff <= 1e-5 and row.onnx_diff <= 1e-5 and row.onnx_rel <= 1e-5
    assert row.onnx_ms > 0 and row.onnx_vs_fast == pytest.approx(row.fast_ms / row.onnx_ms)
    print_row(row, onnx=True)
    line = capsys.readouterr().out.strip()
    names = header(onnx=True).splitlines()[0]
    assert line.count("|") == names.count("|") == 19
    append_csv(row, tmp_path / "t.csv")
    append_csv(row, tmp_path / "t.csv")
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 3
    (tmp_path / "old.csv").write_text("model,size\nx,y\n")
    with pytest.raises(SystemExit, match="other columns"):
        append_csv(row, tmp_path / "old.csv")


def test_row_without_onnxruntime_columns(capsys) -> None:
    model = _tiny_unet()
    row = measure("unet", "32x32", model, example_inputs(model, 1, 32, 32), 1, torch.device("cpu"))
    assert math.isnan(row.onnx_ms) and math.isnan(row.onnx_diff)
    print_row(row)
    assert capsys.readouterr().out.count("|") == header(onnx=False).splitlines()[0].count("|")
