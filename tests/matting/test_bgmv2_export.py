"""bgmv2 ONNX export: every refine mode and the base network, checked with onnxruntime."""

from __future__ import annotations

import pytest
import torch

from detseg.matting.bgmv2 import MattingBase, MattingRefine
from detseg.matting.bgmv2_export import check_onnx, export, export_onnx, export_size

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    ("mode", "kernel"), [("full", 3), ("thresholding", 3), ("sampling", 3), ("thresholding", 1)]
)
def test_refine_modes_export_and_match(tmp_path, mode: str, kernel: int) -> None:
    model = MattingRefine(
        "mobilenetv2",
        refine_mode=mode,
        refine_sample_pixels=16 * 60,
        refine_threshold=0.0,
        refine_kernel_size=kernel,
    )
    diffs = export_onnx(model, tmp_path / "m.onnx", height=48, width=64)
    assert set(diffs) == {"pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm"}
    assert max(diffs.values()) < 1e-4, diffs


def test_empty_selection_and_base(tmp_path) -> None:
    model = MattingRefine("mobilenetv2", refine_mode="thresholding", refine_threshold=1.0)
    export_onnx(model, tmp_path / "none.onnx", height=32, width=32, check=False)
    diffs = check_onnx(model.eval(), tmp_path / "none.onnx", (40, 52))
    assert max(diffs.values()) < 1e-4, diffs
    base = export_onnx(MattingBase("mobilenetv2"), tmp_path / "base.onnx", height=30, width=42)
    assert set(base) == {"pha", "fgr", "err", "hid"} and max(base.values()) < 1e-4


def test_sampling_export_size_has_k_cells() -> None:
    model = MattingRefine("mobilenetv2", refine_sample_pixels=80_000)
    h, w = export_size(model, 270, 481)
    assert h % 4 == 0 and w % 4 == 0 and h * w >= 80_000
    assert export_size(MattingBase("mobilenetv2"), 1080, 1920) == (1080, 1920)


def test_export_command_with_official_weights(tmp_path) -> None:
    weights = tmp_path / "official.pth"
    torch.save(MattingRefine("mobilenetv2").state_dict(), weights)
    out = export(
        "bgmv2_mobilenetv2",
        tmp_path / "m.onnx",
        weights=weights,
        height=40,
        width=60,
        refine_mode="thresholding",
        refine_threshold=0.0,
    )
    assert out["size"] == [40, 60] and max(out["max_abs_diff"].values()) < 1e-4
