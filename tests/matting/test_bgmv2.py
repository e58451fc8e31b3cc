"""BackgroundMattingV2: parity with the official model, refine-mode identities, official checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from detseg.errors import CheckpointError
from detseg.matting.bgmv2 import MattingBase, MattingRefine, Refiner
from detseg.registry import get_entry
from tests.parity import fixture_names, parity_dir, run_fixture

FIXTURES = fixture_names("bgmv2_")


def test_fixtures_present(shared) -> None:
    assert len(FIXTURES) >= 8, FIXTURES


@pytest.mark.parametrize("name", FIXTURES)
def test_parity(name: str) -> None:
    tolerance = json.loads((parity_dir() / f"{name}.json").read_text())["tolerance"]
    diffs = run_fixture(name)
    assert diffs and all(d <= tolerance for d in diffs.values()), diffs


def _randomize_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 48, 64, generator=g), torch.rand(2, 3, 48, 64, generator=g)


@pytest.mark.parametrize("kernel", [1, 3])
def test_patch_path_with_every_cell_equals_full(kernel: int, pair) -> None:
    src, bgr = pair
    model = MattingRefine("mobilenetv2", refine_mode="full", refine_kernel_size=kernel).eval()
    _randomize_bn(model)
    with torch.no_grad():
        full = model(src, bgr)
        model.refiner.mode = "thresholding"
        model.refiner.threshold = -1.0
        patched = model(src, bgr)
    assert patched[-1].min() == 1 and full[-1].min() == 1
    for a, b in zip(full, patched, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_partial_refinement_replaces_only_selected_cells(pair) -> None:
    src, bgr = pair
    model = MattingRefine("mobilenetv2", refine_mode="full").eval()
    _randomize_bn(model)
    with torch.no_grad():
        full_pha, *_, err_full, _ = model(src, bgr)
        model.refiner.mode = "thresholding"
        model.refiner.threshold = float(err_full.median())
        pha, _, pha_sm, _, err_sm, ref = model(src, bgr)
    cells = ref.repeat_interleave(4, 2).repeat_interleave(4, 3).bool()
    assert 0 < ref.mean() < 1
    coarse = torch.nn.functional.interpolate(pha_sm, size=pha.shape[-2:], mode="bilinear")
    torch.testing.assert_close(pha[cells], full_pha[cells], atol=1e-5, rtol=0)
    torch.testing.assert_close(pha[~cells], coarse[~cells], atol=1e-6, rtol=0)
    torch.testing.assert_close(ref, (err_sm > model.refiner.threshold).float())


def test_sampling_selects_k_largest_per_image_and_guards_zero() -> None:
    refiner = Refiner("sampling", sample_pixels=16 * 3, threshold=0.1, prevent_oversampling=True)
    err = torch.tensor([[0.0, 0.5, 0.2, 0.9], [0.0, 0.0, 0.0, 0.3]]).reshape(2, 1, 2, 2)
    ref = refiner.select(err)
    assert ref.flatten(1).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    refiner.prevent_oversampling = False
    assert refiner.select(err)[0].flatten().tolist() == [0, 1, 1, 1]
    refiner.sample_pixels = 16 * 100  # more cells than exist: all of them
    assert refiner.select(err).sum() == 8


def test_sampling_without_any_error_falls_back_to_coarse(pair) -> None:
    src, bgr = pair
    model = MattingRefine("mobilenetv2", refine_sample_pixels=1600).eval()
    torch.nn.init.zeros_(model.decoder.conv4.weight)
    torch.nn.init.zeros_(model.decoder.conv4.bias)
    with torch.no_grad():
        pha, fgr, *_, ref = model(src, bgr)
    assert ref.sum() == 0 and pha.abs().max() == 0
    torch.testing.assert_close(fgr, src)


def test_shapes_and_errors(pair) -> None:
    src, bgr = pair
    model = MattingRefine("mobilenetv2", backbone_scale=0.125, refine_mode="thresholding").eval()
    with torch.no_grad():
        out = model(src, bgr)
    assert [tuple(t.shape) for t in out] == [
        (2, 1, 48, 64),
        (2, 3, 48, 64),
        (2, 1, 6, 8),
        (2, 3, 6, 8),
        (2, 1, 6, 8),
        (2, 1, 12, 16),
    ]
    with pytest.raises(ValueError, match="divisible by 4"):
        model(src[..., :47, :], bgr[..., :47, :])
    with pytest.raises(ValueError, match="backbone"):
        MattingBase("resnet18")
    with pytest.raises(ValueError, match="refine_kernel_size"):
        MattingRefine("mobilenetv2", refine_kernel_size=5)


@pytest.mark.parametrize(
    ("cls", "args", "entries", "params"),
    [
        (MattingBase, ("mobilenetv2",), 362, 4_991_395),
        (MattingRefine, ("mobilenetv2",), 382, 5_006_839),
        (MattingRefine, ("resnet50",), 394, 40_247_703),
    ],
)
def test_official_sizes(cls, args, entries: int, params: int) -> None:
    model = cls(*args)
    assert len(model.state_dict()) == entries
    assert sum(p.numel() for p in model.parameters()) == params


def _official_file(tmp_path, model: torch.nn.Module, name: str = "official.pth"):
    _randomize_bn(model)
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kernel", [1, 3])
def test_from_official_roundtrip(tmp_path, pair, kernel: int) -> None:
    src, bgr = pair
    reference = MattingRefine("mobilenetv2", refine_mode="full", refine_kernel_size=kernel).eval()
    path = _official_file(tmp_path, reference)
    loaded = MattingRefine.from_official(path, refine_mode="full").eval()
    assert loaded.refiner.kernel_size == kernel
    base = MattingBase.from_official(path).eval()
    with torch.no_grad():
        for a, b in zip(reference(src, bgr), loaded(src, bgr), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert base(src, bgr)[0].shape == (2, 1, 48, 64)


def test_from_official_rejects_other_files(tmp_path) -> None:
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, other)
    with pytest.raises(CheckpointError, match="not a BackgroundMattingV2"):
        MattingRefine.from_official(other)
    with pytest.raises(CheckpointError, match="not a BackgroundMattingV2"):
        MattingBase.from_official(other)
    base_only = _official_file(tmp_path, MattingBase("mobilenetv2"), "base.pth")
    with pytest.raises(CheckpointError, match="MattingBase"):
        MattingRefine.from_official(base_only)


def test_registry_official_convert(tmp_path) -> None:
    state = MattingRefine("mobilenetv2", refine_kernel_size=1).state_dict()
    state = {f"module.{k}": v for k, v in state.items()}
    kwargs, converted = get_entry("bgmv2_mobilenetv2").official.convert(state)
    assert kwargs == {"refine_kernel_size": 1}
    model = get_entry("bgmv2_mobilenetv2").build(**kwargs)
    model.load_state_dict(converted, strict=True)
    with pytest.raises(CheckpointError, match="bgmv2_mobilenetv2"):
        get_entry("bgmv2_resnet50").official.convert(state)
    kwargs, converted = get_entry("bgmv2_base_mobilenetv2").official.convert(state)
    base = get_entry("bgmv2_base_mobilenetv2").build(**kwargs)
    base.load_state_dict(converted, strict=True)
    assert isinstance(base, MattingBase) and not isinstance(base, MattingRefine)
    with pytest.raises(CheckpointError, match="bgmv2_base_mobilenetv2"):
        get_entry("bgmv2_mobilenetv2").official.convert(base.state_dict())
