"""Fast inference paths: the same network and weights, cheaper to run.

``accelerate(model, name, precision)`` returns an inference copy of ``model`` (same class, so every
``isinstance`` check and ``postprocess`` keep working) with:

- every BatchNorm folded into the convolution just before it (``fold_batchnorm``);
- the modules' own fast paths switched on: a module class with a ``fast_inference`` attribute
  (e.g. the BackgroundMattingV2 refiner) gets it set to True;
- per model family, as measured by ``bench/run.py`` (``PLANS``): channels-last weights;
- its forward under ``torch.autocast`` with ``precision="bf16"`` (or ``"fp16"`` on CUDA), floating
  outputs cast back to float32, and inside ``engine.memory.heap_blocks``;
- process-wide, glibc keeps freed blocks up to 32 MB for reuse (``keep_freed_memory``).

The float32 fast path keeps the outputs within 1e-4 of the reference (eager, NCHW, float32), which
``--exact`` still selects; reduced precision trades accuracy for speed (``docs/performance.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from detseg.engine.memory import heap_blocks, keep_freed_memory
from detseg.errors import DetsegError

if TYPE_CHECKING:
    from detseg.api import LoadedModel

PRECISIONS = ("f32", "bf16", "fp16")


@dataclass(frozen=True)
class FastPlan:
    """What the fast path of one model family does beyond BN folding and ``fast_inference``.

    Attributes:
        channels_last: channels-last (NHWC) convolution weights; a convolution's output takes its
            weight's layout, so the feature maps follow (inputs are left as they are).
    """

    channels_last: bool = False


# Chosen per family by ``python -m bench.run --layouts`` on the CPU (docs/performance.md):
# channels-last ran 1.1-1.45x faster than NCHW for every family measured, float32 and bf16. (The
# dilated FCN-ResNet and SegNet stayed NCHW until a session found that the layouts harness had
# timed one NCHW copy twice; measured again: 1.11-1.16x in float32, 1.15-1.25x in bf16.) The
# first matching name prefix wins; families not listed take ``DEFAULT_PLAN``.
PLANS: dict[str, FastPlan] = {}
DEFAULT_PLAN = FastPlan(channels_last=True)


def plan_for(name: str | None) -> FastPlan:
    """The measured ``FastPlan`` of registry name ``name`` (``DEFAULT_PLAN`` when unknown)."""
    for prefix, plan in PLANS.items():
        if name is not None and name.startswith(prefix):
            return plan
    return DEFAULT_PLAN


def _foldable(bn: nn.Module) -> bool:
    if isinstance(bn, FrozenBatchNorm2d):
        return True
    return isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats


def _fold(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` (``bn`` in eval mode)."""
    fused = copy.deepcopy(conv)
    weight, bias = fuse_conv_bn_weights(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
    )
    fused.weight, fused.bias = weight, bias
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm2d / FrozenBatchNorm2d folded into the
    Conv2d registered just before it in the same parent (how the conv-BN pairs of these networks
    are wired), or into the Conv2d whose own ``norm`` it is (detectron2's ``Conv2d(norm=...)``,
    ``backbones.d2.ConvNorm``), the BN made an Identity.

    Same outputs up to float rounding, one pass over each feature map less; for inference only (the
    copy's state dict no longer has the BN keys). Every registered model's folded outputs are checked
    against its reference in the tests.
    """
    fused = copy.deepcopy(model).eval()
    for parent in fused.modules():
        previous: tuple[str, nn.Module] | None = None
        for name, child in list(parent.named_children()):
            if previous and isinstance(previous[1], nn.Conv2d) and _foldable(child):
                setattr(parent, previous[0], _fold(previous[1], child))
                setattr(parent, name, nn.Identity())
            previous = (name, child)
    for conv in fused.modules():  # detectron2's layout: the norm is the conv's own ``.norm``
        norm = getattr(conv, "norm", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.Module) and _foldable(norm):
            folded = _fold(conv, norm)
            conv.weight, conv.bias = folded.weight, folded.bias
            conv.norm = nn.Identity()
    return fused


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """``"f32" | "bf16" | "fp16"`` -> the autocast dtype on ``device`` (None for float32).

    Raises ``DetsegError`` for an unknown precision, and for float16 on the CPU (no fast float16
    kernels there; bfloat16 is the CPU's reduced precision).
    """
    if precision not in PRECISIONS:
        raise DetsegError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    device = torch.device(device)
    if precision == "f32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise DetsegError("--precision fp16 needs --device cuda; on the CPU use bf16.")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a (nested) tuple / list / dict / dataclass output."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # ``Instances``
        fields = {
            f.name: _map_tensors(getattr(value, f.name), fn)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **fields)
    return value


def _to_output(t: torch.Tensor) -> torch.Tensor:
    """Floating outputs back to float32, contiguous NCHW (what the reference path returns).

    A reduced-precision output converts in one pass (``to`` with the memory format): a bfloat16
    channels-last (1, 21, 512, 512) map took 1.7 ms that way, 4.7 as ``float().contiguous()``,
    a cast and then a layout copy. ``to`` leaves a float32 tensor as it is, strides included, so
    ``contiguous`` follows (a no-op when the first step copied)."""
    if t.is_floating_point():
        return t.to(torch.float32, memory_format=torch.contiguous_format).contiguous()
    return t


def _wrap_forward(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Give ``module`` (in place) a ``forward``, and a ``predict`` where it has one (the
    two-stage instance models', which the instance pipeline calls), that run inside
    ``heap_blocks`` and under autocast (``dtype``, or none) and return float32, NCHW-contiguous
    floating outputs."""

    def fast(inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def call(*args: Any, **kwargs: Any) -> Any:
            device = next(module.parameters()).device.type
            autocast = torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=bool(dtype))
            with heap_blocks(), autocast:
                out = inner(*args, **kwargs)
            return _map_tensors(out, _to_output)

        return call

    module.forward = fast(module.forward)  # type: ignore[method-assign]
    if callable(getattr(module, "predict", None)):
        module.predict = fast(module.predict)  # type: ignore[attr-defined]
    module.is_fast_copy = True  # type: ignore[assignment]


def accelerate(
    model: nn.Module,
    name: str | None = None,
    precision: str = "f32",
    plan: FastPlan | None = None,
) -> nn.Module:
    """The fast inference copy of ``model`` (eval mode; ``model`` itself is left unchanged).

    Args:
        model: a built network (any registered model).
        name: its registry name, to look up the measured ``FastPlan`` (``plan`` overrides).
        precision: ``"f32"``, ``"bf16"`` (autocast; CPUs with AVX512-BF16/AMX, and GPUs) or
            ``"fp16"`` (CUDA only).

    The copy's ``forward`` takes and returns what the model's does (floating outputs float32).
    """
    if getattr(model, "is_fast_copy", False):
        # its forward is bound to the copy it was made from: a copy of it would run that one
        raise DetsegError("accelerate takes the model itself, not a fast copy of it.")
    plan = plan or plan_for(name)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
    dtype = autocast_dtype(precision, device)
    keep_freed_memory()
    fast = fold_batchnorm(model)
    for module in fast.modules():
        if hasattr(type(module), "fast_inference"):
            module.fast_inference = True  # type: ignore[assignment]
    if plan.channels_last:
        fast = fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if dtype is not None:
        store_weights(fast, dtype)
    _wrap_forward(fast, dtype)
    return fast


# the layers whose weights autocast casts to its dtype on every call
_AUTOCAST_WEIGHTS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def store_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """In place: the weights of ``module``'s convolutions and linear layers stored in ``dtype``
    (layout kept), which autocast would otherwise cast again on every call; the biases stay
    float32 (autocast casts them with the weight). The same products, the same values (max diff
    0 on GFM R101, FCN-32s, PSPNet R101, DUC R101, U-Net, FCOS R50) and half the weights'
    memory; bf16 1.01-1.13x faster on those models (GFM R101's 3x3 convolutions of 2048-4096
    channels hold 300 MB of float32 weights: 1.08-1.13x)."""
    for layer in module.modules():
        if isinstance(layer, _AUTOCAST_WEIGHTS):
            layer.weight.data = layer.weight.data.to(dtype)


def fast_or_exact(
    model: nn.Module, name: str | None, exact: bool = False, precision: str = "f32"
) -> nn.Module:
    """``model`` itself with ``exact`` (the reference path, float32 only: ``DetsegError`` for
    ``exact`` with another precision), else its fast copy at ``precision`` (``accelerate``)."""
    if exact:
        _check_exact(precision)
        return model
    return accelerate(model, name, precision)


def _check_exact(precision: str) -> None:
    """``--exact`` is the float32 reference path: ``DetsegError`` for any other precision."""
    if precision != "f32":
        raise DetsegError(
            f"--exact runs the float32 reference path; drop --precision {precision} or --exact."
        )


def for_inference(loaded: LoadedModel, exact: bool = False, precision: str = "f32") -> LoadedModel:
    """``loaded`` with its fast inference copy (``fast_or_exact``), or unchanged with ``exact``.

    What ``detseg predict`` / ``detseg matte`` run: the fast path by default, the reference path
    with ``--exact``.
    """
    if loaded.runtime != "torch":  # an exported graph already is its own inference path
        if exact:
            _check_exact(precision)
        return loaded
    model = fast_or_exact(loaded.model, loaded.name, exact, precision)
    return loaded if model is loaded.model else dataclasses.replace(loaded, model=model)


def example_inputs(
    model: nn.Module, batch: int, height: int, width: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``model.forward``, on the model's device: one (batch, 3, height, width)
    float32 tensor in [0, 1] per required positional argument (an image; BackgroundMattingV2's
    photo and plate), or for the two-stage instance models' ``forward(image, output_size)`` one
    (3, height, width) image in 0..255 and its size (``batch`` is ignored there)."""
    signature = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    if list(signature) == ["image", "output_size"]:
        image = torch.rand(3, height, width, generator=generator) * 255
        return image.to(device), torch.tensor([height, width], device=device)
    params = signature.values()
    count = sum(
        p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params
    )
    return tuple(
        torch.rand(batch, 3, height, width, generator=generator).to(device)
        for _ in range(max(count, 1))
    )
