"""Fast inference paths: same outputs as the reference path, BN folding, precision handling."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detseg.api import load_model
from detseg.engine.fast import (
    FastPlan,
    accelerate,
    autocast_dtype,
    example_inputs,
    fold_batchnorm,
    for_inference,
)
from detseg.errors import DetsegError
from detseg.matting.bgmv2 import _SKIP_CHANNELS, Decoder, MattingRefine, Refiner, _crop, _resize
from detseg.matting.bgmv2_windows import ConvWindows, group_tiles, resized_crop, shrink
from detseg.registry import get_entry, list_models
from tests.parity import fixture_names, parity_dir, run_fixture


def _random_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding them is actually tested."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
            n = m.running_mean.shape[0]
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def _outputs(out: object) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple | list) else [out]  # type: ignore[arg-type]


def _assert_same(
    reference: nn.Module, fast: nn.Module, inputs: tuple, atol: float, flips: float = 0.0
) -> None:
    """Outputs within ``atol`` (relative to each output's largest value); 0/1 mask stacks
    (R, H, W) may differ in a ``flips`` share of their pixels: a probability on the 0.5
    threshold that float rounding moves (random mask heads put many near it)."""
    with torch.inference_mode():
        expected, actual = _outputs(reference(*inputs)), _outputs(fast(*inputs))
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        if flips and a.dim() == 3 and a.numel() and bool(((a == 0) | (a == 1)).all()):
            assert float((a != b).float().mean()) <= flips
            continue
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        torch.testing.assert_close(b, a, atol=atol * scale, rtol=0)


def test_fold_batchnorm_removes_bn_and_keeps_outputs() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        FrozenBatchNorm2d(4),
        nn.BatchNorm2d(4),  # after a BN, not a conv: stays
    )
    model = _random_statistics(model)
    fused = fold_batchnorm(model)
    kinds = [type(m) for m in fused]
    assert kinds == [nn.Conv2d, nn.Identity, nn.ReLU, nn.Conv2d, nn.Identity, nn.BatchNorm2d]
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    _assert_same(model, fused, (torch.randn(2, 3, 9, 7),), 1e-5)


def test_fold_batchnorm_skips_batch_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    assert isinstance(fold_batchnorm(model)[1], nn.BatchNorm2d)


@pytest.mark.parametrize(
    "name",
    ["espnet", "unet", "deeplabv3plus_mobilenetv2", "fcos_mnv2_fpn"],
)
def test_fast_path_matches_reference(name: str) -> None:
    torch.manual_seed(0)
    model = _random_statistics(get_entry(name).build())
    inputs = example_inputs(model, 2, 64, 96)
    _assert_same(model, accelerate(model, name), inputs, 1e-4)
    _assert_same(model, accelerate(model, name, plan=FastPlan(channels_last=False)), inputs, 1e-4)


# Random ResNet-101 weights drive BGMv2's decoder to raw outputs of about 3,000 before the [0, 1]
# clamp of alpha and foreground: float rounding of 2e-6 relative there (the hidden channels, not
# clamped, differ by 0.0056 at that scale) reaches 2.7e-3 in two of 4,096 clamped alpha pixels.
CLAMPED_DRIFT = {"bgmv2_base_resnet101": 5e-3}


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in list_models() if e.name != "hog_svm"])
def test_every_model_fast_path_matches_reference(name: str) -> None:
    torch.manual_seed(0)
    model = _random_statistics(get_entry(name).build())
    atol = CLAMPED_DRIFT.get(name, 1e-4)
    _assert_same(model, accelerate(model, name), example_inputs(model, 1, 64, 64), atol, 1e-4)


@pytest.mark.parametrize("mode", ["sampling", "thresholding"])
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("tile_sizes", [(1,), (2,), (8,), (1, 2, 4, 8)])
def test_bgmv2_fast_refiner_matches_reference(
    mode: str, kernel_size: int, tile_sizes: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = MattingRefine(
        "mobilenetv2",
        refine_mode=mode,
        refine_sample_pixels=16 * 60,
        refine_threshold=0.3,
        refine_kernel_size=kernel_size,
    )
    model = _random_statistics(model)
    model.refiner.chunk = 16  # several chunks
    fast = accelerate(model)
    fast.refiner.tile_sizes = tile_sizes  # 8: tiles reaching past the 18 x 25 cell grid
    assert fast.refiner.fast_inference and not model.refiner.fast_inference
    inputs = (torch.rand(2, 3, 72, 100), torch.rand(2, 3, 72, 100))
    _assert_same(model, fast, inputs, 1e-5)


def test_bgmv2_fast_path_with_hidden_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few cells on a larger frame: the hidden channels are computed on the windows alone."""
    torch.manual_seed(0)
    model = _random_statistics(
        MattingRefine(
            "mobilenetv2", refine_sample_pixels=16 * 12, refine_prevent_oversampling=False
        )
    )
    calls = []
    windows = ConvWindows.windows
    monkeypatch.setattr(
        ConvWindows, "windows", lambda self, *a: calls.append(1) or windows(self, *a)
    )
    inputs = (torch.rand(1, 3, 256, 320), torch.rand(1, 3, 256, 320))
    _assert_same(model, accelerate(model), inputs, 1e-5)
    assert calls


def test_bgmv2_hidden_channels_on_windows_equal_the_dense_map() -> None:
    torch.manual_seed(0)
    decoder = Decoder(feature_channels=_SKIP_CHANNELS["mobilenetv2"]).eval()
    x, x0 = torch.randn(2, 48, 20, 30), torch.randn(2, 6, 20, 30)
    lazy = ConvWindows(decoder, (x, x0), slice(5, None))
    with torch.no_grad():
        dense = decoder.last_conv(x, x0, slice(5, None)).relu()
        batch = torch.tensor([0, 1, 1])
        start = torch.tensor([[-2], [7], [15]])  # windows over the top, inside, past the bottom
        rows = (start + torch.arange(6)).clamp(0, 19)
        cols = (torch.tensor([[26], [-1], [10]]) + torch.arange(5)).clamp(0, 29)
        expected = dense.permute(0, 2, 3, 1)[batch[:, None, None], rows[:, :, None], cols[:, None]]
        torch.testing.assert_close(lazy.windows(batch, rows, cols), expected, atol=1e-5, rtol=0)
        assert lazy.dense_if_cheaper(3, 6) is lazy  # 3 windows: a fraction of the map
        torch.testing.assert_close(lazy.dense_if_cheaper(40, 6), dense, atol=1e-5, rtol=0)


def test_bgmv2_refiner_tiles_follow_the_selection() -> None:
    refiner = Refiner("sampling", sample_pixels=80_000, threshold=0.1)
    block = torch.cartesian_prod(torch.zeros(1).long(), torch.arange(16), torch.arange(16))
    assert refiner._tile_size(block, (64, 64)) == 8  # a dense 16 x 16 block of cells
    scattered = torch.cartesian_prod(
        torch.zeros(1).long(), torch.arange(0, 64, 9), torch.arange(0, 64, 9)
    )
    assert refiner._tile_size(scattered, (64, 64)) == 1  # isolated cells: one window each
    tiles, cells, first = group_tiles(block, (64, 64), 8)
    assert tiles.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert first.tolist() == [0, 64, 128, 192, 256]
    assert ((cells[64:128, 1] < 8) & (cells[64:128, 2] >= 8)).all()  # tile (0, 1)'s cells


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if "mnv2" in n else pytest.mark.slow)
        for n in fixture_names("bgmv2_refine")
    ],
)
def test_bgmv2_fast_path_on_parity_fixtures(name: str) -> None:
    tolerance = json.loads((parity_dir() / f"{name}.json").read_text())["tolerance"]
    for output, diff in run_fixture(name, prepare=accelerate).items():
        assert diff <= tolerance, (output, diff)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in ("gfm_r34_tt", "gfm_r34_2b_tt") else pytest.mark.slow)
        for n in fixture_names("gfm")
    ],
)
def test_gfm_fast_path_on_parity_fixtures(name: str) -> None:
    """The official GFM outputs through the fast path (random weights put the discrete glance
    decision of some pixels on a tie, which float rounding flips; real weights do not)."""
    tolerance = json.loads((parity_dir() / f"{name}.json").read_text())["tolerance"]
    for output, diff in run_fixture(name, prepare=accelerate).items():
        assert diff <= tolerance, (output, diff)


@pytest.mark.parametrize("out_hw", [(13, 21), (26, 42), (52, 84), (7, 10)])
@pytest.mark.parametrize("channels", [3, 12])
def test_resized_crop_equals_crop_of_resize(out_hw: tuple[int, int], channels: int) -> None:
    x = torch.randn(2, channels, 13, 21)
    cells = torch.tensor([[0, 0, 0], [1, 2, 3], [0, 3, 5], [1, 1, 4]])  # corners and inside
    cells = cells[(cells[:, 1] * 2 < out_hw[0]) & (cells[:, 2] * 2 < out_hw[1])]
    expected = _crop(_resize(x, out_hw), cells, 2, 3)
    torch.testing.assert_close(resized_crop(x, cells, 2, 3, out_hw), expected, atol=1e-5, rtol=0)
    expected = _crop(x if out_hw == (13, 21) else _resize(x, out_hw), cells, 2, 0)
    torch.testing.assert_close(resized_crop(x, cells, 2, 0, out_hw), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((1, 3, 108, 192), (27, 48)), ((2, 3, 101, 77), (25, 19)), ((1, 6, 40, 40), (13, 7))],
)
def test_shrink_equals_interpolate(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shrink(x, size), _resize(x, size), atol=1e-6, rtol=0)


def test_bf16_path_returns_float32_close_to_reference() -> None:
    torch.manual_seed(0)
    model = get_entry("fcn_resnet18").build(num_classes=3).eval()
    x = example_inputs(model, 1, 64, 64)
    fast = accelerate(model, "fcn_resnet18", "bf16")
    with torch.inference_mode():
        ref, out = model(*x), fast(*x)
    assert out.dtype == torch.float32
    assert 0 < float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_precision_errors() -> None:
    assert autocast_dtype("f32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(DetsegError, match="cuda"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(DetsegError, match="precision"):
        autocast_dtype("int8", "cpu")
    loaded = load_model("espnet_c", device="cpu")
    assert for_inference(loaded, exact=True) is loaded
    with pytest.raises(DetsegError, match="--exact"):
        for_inference(loaded, exact=True, precision="bf16")
    fast = for_inference(loaded)
    assert fast.model is not loaded.model and type(fast.model) is type(loaded.model)
    _assert_same(loaded.model, fast.model, (torch.rand(1, 3, 30, 40),), 1e-4)
    with pytest.raises(DetsegError, match="not a fast copy"):
        accelerate(fast.model)  # its copy would still run fast.model's own forward


def test_keep_freed_memory_applies_once_on_glibc() -> None:
    import platform

    from detseg.engine.memory import keep_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
    assert keep_freed_memory() is expected  # cached: the mallopt calls run once per process


def test_the_fast_forward_and_predict_run_in_the_fast_modes() -> None:
    """accelerate wraps ``forward`` and the two-stage models' ``predict`` (what the instance
    pipeline calls): inside ``heap_blocks`` and, with bf16, under autocast."""
    from detseg.engine import memory
    from detseg.instance.maskrcnn import MaskRCNN

    seen: list[tuple[bool, int]] = []
    fast = accelerate(MaskRCNN(num_classes=3).eval(), precision="bf16")
    fast.roi_heads.register_forward_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), memory._HEAP_BLOCKS.running))
    )
    image = torch.rand(3, 64, 64) * 255
    with torch.no_grad():
        instances = fast.predict(image)
        fast(image, torch.tensor([64, 64]))
    in_heap = 1 if memory._glibc() is not None else 0
    assert seen == [(True, in_heap), (True, in_heap)]
    assert memory._HEAP_BLOCKS.running == 0  # left again
    assert instances.scores.dtype == torch.float32 and instances.masks.dtype == torch.bool
