"""Training BackgroundMattingV2: on-the-fly composites with the official augmentations, losses, SAD.

Two stages as in the official scripts (``shared/specs/bgmv2.md`` section 5): ``MattingBase`` first,
then ``MattingRefine`` initialised from it (``initial_model``). ``train_bgmv2`` runs a stage on
``detseg.engine.trainer.Trainer`` with these pieces:

- ``MattingPairs``: foreground + alpha + background items with the per-sample augmentations
  (cover-scaled random affine, flip, box blur, sharpen, colour jitter); default collate works.
- ``make_loss_fn(crop)`` -> ``loss_fn(model, batch)``: per-batch random crop, then the per-batch augmentations (shadow,
  compositing, noise, background colour jitter and misalignment), the forward pass and the loss of
  the model's stage (base or refine).
- ``make_evaluate_fn(val_set)``: clean composites, alpha SAD (sum |d| / 1000 per image), MSE, loss.

All randomness uses torch's global generator, which the trainer seeds per item and per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, RandomAffine
from torchvision.transforms.v2 import ColorJitter

from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.data.images import list_images, read_image
from detseg.engine.trainer import TrainConfig
from detseg.errors import DetsegError, InputFileError
from detseg.matting.bgmv2 import BACKBONES as _BACKBONES
from detseg.matting.bgmv2 import MattingBase, MattingRefine, official_config

Batch = Mapping[str, Tensor]  # "fgr" (B,3,H,W), "pha" (B,1,H,W), "bgr" (B,3,H,W), floats in [0,1]

# PIL's ImageFilter.SHARPEN kernel (sum 16, scale 16).
_SHARPEN = torch.tensor([[-2.0, -2.0, -2.0], [-2.0, 32.0, -2.0], [-2.0, -2.0, -2.0]]) / 16.0


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))


def _chance(p: float) -> bool:
    return bool(torch.rand(()) < p)


# -- per-sample augmentation (spec 5.2) ------------------------------------------------------------


def random_affine_resize(
    image: Tensor,
    size: tuple[int, int],
    scale: tuple[float, float],
    degrees: float = 5.0,
    translate: float = 0.1,
    shear: float = 5.0,
) -> Tensor:
    """Random affine "covering" ``size`` (h, w): (C, H, W) -> (C, h, w), bilinear, zero fill.

    The scale range and translation are relative to the cover factor max(w/W, h/H), so scale 1
    means "just fills the output"; the image is zero-padded to at least ``size`` first and the
    transform is about its centre, then the centre ``size`` window is kept.
    """
    _, h0, w0 = image.shape
    th, tw = size
    cover = max(tw / w0, th / h0)
    pad_w, pad_h = max(tw - w0, 0), max(th - h0, 0)
    if pad_w or pad_h:
        image = F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    angle, _, s, shears = RandomAffine.get_params(
        [-degrees, degrees],
        None,
        [scale[0] * cover, scale[1] * cover],
        [-shear, shear, -shear, shear],
        [w0, h0],
    )
    tx = round(_uniform(-translate, translate) * cover * w0)
    ty = round(_uniform(-translate, translate) * cover * h0)
    out = TF.affine(image, angle, [tx, ty], s, list(shears), InterpolationMode.BILINEAR, fill=0.0)
    return TF.center_crop(out, [th, tw])


def box_blur(x: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)^2 box with replicated borders, like PIL's BoxBlur; (..., C, H, W)."""
    if radius == 0:
        return x
    k = 2 * radius + 1
    flat = x.reshape(-1, 1, *x.shape[-2:])
    flat = F.avg_pool2d(F.pad(flat, (radius,) * 4, mode="replicate"), k, stride=1)
    return flat.reshape(x.shape)


def sharpen(x: Tensor) -> Tensor:
    """PIL's SHARPEN filter (3x3, replicated borders), clamped to [0, 1]; (C, H, W)."""
    kernel = _SHARPEN.to(x)[None, None]
    flat = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(flat, kernel).reshape(x.shape).clamp(0.0, 1.0)


def _flip_blur_sharpen(x: Tensor) -> Tensor:
    if _chance(0.5):
        x = x.flip(-1)
    if _chance(0.1):
        x = box_blur(x, int(torch.randint(0, 6, ())))
    if _chance(0.1):
        x = sharpen(x)
    return x


def augment_sample(
    fgr: Tensor, pha: Tensor, bgr: Tensor, size: tuple[int, int], fg_scale: tuple[float, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """Official per-sample augmentation: (3,H,W), (1,H,W), (3,H',W') -> three tensors at ``size``."""
    jitter = ColorJitter(0.15, 0.15, 0.15, 0.05)
    pair = random_affine_resize(torch.cat([fgr, pha], dim=0), size, fg_scale)
    pair = _flip_blur_sharpen(pair)
    fgr_out = jitter(pair[:3].clamp(0.0, 1.0))
    bgr_out = random_affine_resize(bgr, size, (1.0, 2.0))
    bgr_out = jitter(_flip_blur_sharpen(bgr_out).clamp(0.0, 1.0))
    return fgr_out, pair[3:].clamp(0.0, 1.0), bgr_out


def _to_float(image: np.ndarray) -> Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(np.require(image, requirements=["C", "W"]))
    return (t[..., None] if t.ndim == 2 else t).permute(2, 0, 1).float() / 255.0


def _shrink(t: Tensor, max_side: int | None) -> Tensor:
    if max_side is None or max(t.shape[-2:]) <= max_side:
        return t
    s = max_side / max(t.shape[-2:])
    size = [max(1, round(t.shape[-2] * s)), max(1, round(t.shape[-1] * s))]
    return F.interpolate(t[None], size=size, mode="area")[0]


class MattingPairs(Dataset):
    """Foregrounds with alphas composited on the fly over backgrounds.

    Args:
        fgr: foreground images (RGB), pha: alpha mattes (same stems, any single-channel PNG/JPG),
            bgr: background images; all lists of paths.
        size: (h, w) of every item.
        train: apply the official per-sample augmentations; else a fixed centre cover-resize
            (deterministic validation).
        fg_scale: affine scale range of the foreground (official: base (0.4, 1), refine (0.3, 1)).
        max_side: downscale loaded images to this longest side first (speed on small crops).

    Items: ``{"fgr": (3,h,w), "pha": (1,h,w), "bgr": (3,h,w)}`` float32 in [0, 1]. The length is
    max(#foregrounds, #backgrounds); item i uses foreground i % F and background i % B.
    """

    def __init__(
        self,
        fgr: Sequence[Path],
        pha: Sequence[Path],
        bgr: Sequence[Path],
        size: tuple[int, int] = (512, 512),
        train: bool = True,
        fg_scale: tuple[float, float] = (0.4, 1.0),
        max_side: int | None = None,
    ) -> None:
        if len(fgr) != len(pha) or not fgr:
            raise DetsegError(
                f"{len(fgr)} foregrounds but {len(pha)} alphas; give one alpha per foreground."
            )
        if not bgr:
            raise DetsegError("no background images; pass a folder of backgrounds.")
        self.fgr, self.pha, self.bgr = list(fgr), list(pha), list(bgr)
        self.size, self.train, self.fg_scale, self.max_side = size, train, fg_scale, max_side

    @classmethod
    def from_folders(
        cls, matting_dir: str | Path, background_dir: str | Path, **kwargs
    ) -> MattingPairs:
        """A matting folder holding ``fgr/`` + ``pha/`` (official layout) or ``input/`` + ``alpha/``
        (alphamatting.com, where the photo stands in for the foreground), matched by file stem."""
        root = Path(matting_dir)
        for fg_name, alpha_name in (("fgr", "pha"), ("input", "alpha")):
            if (root / fg_name).is_dir() and (root / alpha_name).is_dir():
                break
        else:
            raise InputFileError(
                f"{root}: expected fgr/ and pha/ (or input/ and alpha/) subfolders."
            )
        alphas = {p.stem: p for p in list_images(root / alpha_name)}
        fgrs = [p for p in list_images(root / fg_name) if p.stem in alphas]
        if not fgrs:
            raise InputFileError(
                f"{root}: no {fg_name}/ image has an alpha of the same name in {alpha_name}/."
            )
        return cls(fgrs, [alphas[p.stem] for p in fgrs], list_images(background_dir), **kwargs)

    def __len__(self) -> int:
        return max(len(self.fgr), len(self.bgr))

    def _load(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        j, k = i % len(self.fgr), i % len(self.bgr)
        fgr = _shrink(_to_float(read_image(self.fgr[j])), self.max_side)
        pha = _shrink(_to_float(read_image(self.pha[j])[..., 0]), self.max_side)
        if fgr.shape[-2:] != pha.shape[-2:]:
            raise InputFileError(f"{self.fgr[j]} and {self.pha[j]} differ in size.")
        return fgr, pha, _shrink(_to_float(read_image(self.bgr[k])), self.max_side)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        fgr, pha, bgr = self._load(i)
        if self.train:
            fgr, pha, bgr = augment_sample(fgr, pha, bgr, self.size, self.fg_scale)
        else:
            pair = _cover(torch.cat([fgr, pha]), self.size)
            fgr, pha, bgr = pair[:3], pair[3:], _cover(bgr, self.size)
        return {"fgr": fgr, "pha": pha, "bgr": bgr}


def _cover(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (C, H, W) so it covers ``size`` (h, w), then centre-crop it (bilinear)."""
    s = max(size[0] / x.shape[-2], size[1] / x.shape[-1])
    scaled = [max(size[0], math.ceil(x.shape[-2] * s)), max(size[1], math.ceil(x.shape[-1] * s))]
    x = F.interpolate(x[None], size=scaled, mode="bilinear", align_corners=False)[0]
    return TF.center_crop(x, list(size))


# -- per-batch augmentation (spec 5.3) ------------------------------------------------------------


def random_crop(batch: Batch, lo: int, hi: int, multiple: int = 1) -> dict[str, Tensor]:
    """Official batch crop: w, h uniform in [lo, hi) (rounded down to ``multiple``), the batch
    resized to the square max(w, h), centre-cropped to (h, w). Same window for every tensor."""
    w = int(torch.randint(lo, hi, ())) // multiple * multiple
    h = int(torch.randint(lo, hi, ())) // multiple * multiple
    side = max(w, h)
    out = {}
    for key, value in batch.items():
        resized = F.interpolate(value, size=(side, side), mode="bilinear", align_corners=False)
        out[key] = TF.center_crop(resized, [h, w])
    return out


def _selected(batch_size: int, p: float, device: torch.device) -> Tensor:
    return torch.rand(batch_size, device=device) < p


def _shadow(src: Tensor, pha: Tensor) -> Tensor:
    """Darken the plate copy with a blurred, shifted silhouette (one parameter set per batch)."""
    shadow = pha * (0.3 * _uniform(0.0, 1.0))
    h, w = pha.shape[-2:]
    angle, (tx, ty), s, shears = RandomAffine.get_params(
        [-5, 5], [0.2, 0.2], [0.5, 1.5], [-5, 5, -5, 5], [w, h]
    )
    shadow = TF.affine(
        shadow, angle, [tx, ty], s, list(shears), InterpolationMode.NEAREST, fill=0.0
    )
    k = min(int(torch.randint(20, 40, ())), h - 1, w - 1)
    padded = F.pad(shadow, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="reflect")
    return (src - F.avg_pool2d(padded, k, stride=1)).clamp(0.0, 1.0)


def _jitter_background(x: Tensor) -> Tensor:
    """kornia 0.4.1 ``ColorJitter(0.18, 0.18, 0.18, 0.1)`` on one (3, H, W) image: additive
    brightness, contrast, saturation, hue, in one random order."""
    ops = [
        lambda t: (t + (_uniform(0.82, 1.18) - 1.0)).clamp(0.0, 1.0),
        lambda t: TF.adjust_contrast(t, _uniform(0.82, 1.18)),
        lambda t: TF.adjust_saturation(t, _uniform(0.82, 1.18)),
        lambda t: TF.adjust_hue(t, _uniform(-0.1, 0.1)),
    ]
    for i in torch.randperm(4).tolist():
        x = ops[i](x)
    return x.clamp(0.0, 1.0)


def augment_batch(fgr: Tensor, pha: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor]:
    """Official per-batch augmentation: (fgr, pha, plate) -> (src, bgr) network inputs.

    Shadow (p 0.3) on the plate copy behind the subject, compositing, noise (p 0.4) on src and bgr
    independently, colour jitter (p 0.8) and a small affine misalignment (p 0.3) on bgr only.
    """
    b, device = fgr.shape[0], fgr.device
    src = bgr.clone()
    sel = _selected(b, 0.3, device)
    if sel.any():
        src[sel] = _shadow(src[sel], pha[sel])
    src = fgr * pha + src * (1.0 - pha)
    bgr = bgr.clone()
    sel = _selected(b, 0.4, device)
    if sel.any():
        src[sel] = (src[sel] + torch.randn_like(src[sel]) * 0.03 * _uniform(0.0, 1.0)).clamp(
            0.0, 1.0
        )
        bgr[sel] = (bgr[sel] + torch.randn_like(bgr[sel]) * 0.03 * _uniform(0.0, 1.0)).clamp(
            0.0, 1.0
        )
    for i in torch.nonzero(_selected(b, 0.8, device)).flatten().tolist():
        bgr[i] = _jitter_background(bgr[i])
    sel = _selected(b, 0.3, device)
    if sel.any():
        h, w = bgr.shape[-2:]
        angle, (tx, ty), s, shears = RandomAffine.get_params(
            [-1, 1], [0.01, 0.01], None, None, [w, h]
        )
        bgr[sel] = TF.affine(
            bgr[sel], angle, [tx, ty], s, list(shears), InterpolationMode.NEAREST, fill=0.0
        )
    return src, bgr


# -- losses (spec 5.4) ------------------------------------------------------------------------------


def sobel(x: Tensor) -> Tensor:
    """kornia 0.4.1 ``sobel``: per channel, normalised 3x3 Sobel (/8), replicated borders,
    magnitude sqrt(gx^2 + gy^2 + 1e-6); (B, C, H, W) -> (B, C, H, W)."""
    gx = (
        torch.tensor(
            [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype
        )
        / 8
    )
    kernels = torch.stack([gx, gx.t()])[:, None]  # (2, 1, 3, 3)
    b, c, h, w = x.shape
    flat = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(flat, kernels).reshape(b, c, 2, h, w)
    return torch.sqrt(g.pow(2).sum(dim=2) + 1e-6)


def _floats(**terms: Tensor) -> dict[str, float]:
    return {name: float(t.detach()) for name, t in terms.items()}


def _matte_terms(
    pha: Tensor, fgr: Tensor, pha_true: Tensor, fgr_true: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    mask = (pha_true != 0).to(fgr.dtype)
    return (
        F.l1_loss(pha, pha_true),
        F.l1_loss(sobel(pha), sobel(pha_true)),
        F.l1_loss(fgr * mask, fgr_true * mask),
    )


def base_loss(
    pred: Sequence[Tensor], pha_true: Tensor, fgr_true: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """MattingBase loss: L1 alpha + L1 Sobel(alpha) + L1 fgr where alpha* > 0 + MSE(err, |pha - pha*|)."""
    pha, fgr, err = pred[0], pred[1], pred[2]
    l_pha, l_grad, l_fgr = _matte_terms(pha, fgr, pha_true, fgr_true)
    l_err = F.mse_loss(err, (pha.detach() - pha_true).abs())
    loss = l_pha + l_grad + l_fgr + l_err
    return loss, _floats(pha=l_pha, grad=l_grad, fgr=l_fgr, err=l_err)


def refine_loss(
    pred: Sequence[Tensor], pha_true: Tensor, fgr_true: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """MattingRefine loss: the base terms at full and coarse resolution, and the coarse error map
    (resized to full size) against |resized coarse alpha - pha*| (not detached, as the official)."""
    pha, fgr, pha_sm, fgr_sm, err_sm = pred[:5]
    full, coarse = pha_true.shape[-2:], pha_sm.shape[-2:]
    pha_true_sm = F.interpolate(pha_true, size=coarse, mode="bilinear", align_corners=False)
    fgr_true_sm = F.interpolate(fgr_true, size=coarse, mode="bilinear", align_corners=False)
    lg = _matte_terms(pha, fgr, pha_true, fgr_true)
    sm = _matte_terms(pha_sm, fgr_sm, pha_true_sm, fgr_true_sm)
    err_lg, pha_lg = (
        F.interpolate(t, size=full, mode="bilinear", align_corners=False) for t in (err_sm, pha_sm)
    )
    l_err = F.mse_loss(err_lg, (pha_lg - pha_true).abs())
    loss = sum(lg) + sum(sm) + l_err
    parts = {n: a + b for n, a, b in zip(("pha", "grad", "fgr"), lg, sm, strict=True)}
    return loss, _floats(**parts, err=l_err)


def _stage_loss(model: nn.Module) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    net = getattr(model, "module", model)
    return refine_loss if isinstance(net, MattingRefine) else base_loss


def make_loss_fn(
    crop: tuple[int, int] | None = None,
) -> Callable[[nn.Module, Batch], tuple[Tensor, dict[str, float]]]:
    """The trainer's ``loss_fn``: random batch crop with sides in ``[crop[0], crop[1])`` (None:
    use the items' size; refine crops are multiples of 4), official batch augmentation, loss."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        net = getattr(model, "module", model)
        multiple = 4 if isinstance(net, MattingRefine) else 1
        if crop is not None:
            batch = random_crop(batch, crop[0], crop[1], multiple)
        src, bgr = augment_batch(batch["fgr"], batch["pha"], batch["bgr"])
        return _stage_loss(model)(model(src, bgr), batch["pha"], batch["fgr"])

    return loss_fn


def make_evaluate_fn(
    val_set: Dataset, batch_size: int = 4
) -> Callable[[nn.Module], dict[str, float]]:
    """The trainer's ``evaluate_fn``: clean composites ``pha*fgr + (1-pha)*bgr`` of ``val_set``;
    returns mean per-image alpha ``SAD`` (sum |d| / 1000), ``MSE`` and the stage ``loss``."""

    def evaluate_fn(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        sads, sq, losses, count = [], 0.0, [], 0
        for batch in DataLoader(val_set, batch_size=batch_size):
            fgr, pha, bgr = (batch[k].to(device) for k in ("fgr", "pha", "bgr"))
            pred = model(pha * fgr + (1.0 - pha) * bgr, bgr)
            d = pred[0] - pha
            sads.append(d.abs().flatten(1).sum(1) / 1000.0)
            sq += float(d.pow(2).sum())
            count += d.numel()
            losses.append(float(_stage_loss(model)(pred, pha, fgr)[0]) * len(pha))
        n = sum(len(s) for s in sads)
        return {"SAD": float(torch.cat(sads).mean()), "MSE": sq / count, "loss": sum(losses) / n}

    return evaluate_fn


def load_base_weights(model: MattingRefine, base_state: Mapping[str, Tensor]) -> None:
    """Stage two's start: copy a trained ``MattingBase`` state dict into ``model``'s backbone, ASPP
    and decoder; the refiner keeps its fresh initialisation (as ``train_refine.py``)."""
    own = model.state_dict()
    base = {k: v for k, v in base_state.items() if not k.startswith("refiner.")}
    unfit = [
        k
        for k in own
        if not k.startswith("refiner.") and (k not in base or base[k].shape != own[k].shape)
    ]
    unexpected = [k for k in base if k not in own]
    if unfit or unexpected:
        raise DetsegError(
            f"the base checkpoint does not fit MattingRefine({model.backbone_name!r}) "
            f"({len(unfit)} missing or of another shape, {len(unexpected)} unexpected keys); "
            "train the base stage with the same backbone first."
        )
    model.load_state_dict(base, strict=False)


REFINE_TRAINING = {
    "backbone_scale": 0.25,
    "refine_mode": "sampling",
    "refine_sample_pixels": 80_000,
    "refine_threshold": 0.7,
}


def build_training_model(
    backbone: str, stage: str, base_state: Mapping[str, Tensor] | None = None
) -> MattingBase:
    """``stage`` "base" -> ``MattingBase(backbone)``; "refine" -> ``MattingRefine`` with the
    official training settings (``REFINE_TRAINING``), initialised from ``base_state`` if given."""
    if stage == "base":
        return MattingBase(backbone)
    if stage != "refine":
        raise DetsegError(f"unknown bgmv2 training stage {stage!r}; use 'base' or 'refine'.")
    model = MattingRefine(backbone, **REFINE_TRAINING)
    if base_state is not None:
        load_base_weights(model, base_state)
    return model


def _evenly_spaced(dataset: MattingPairs, limit: int | None) -> MattingPairs:
    """At most ``limit`` foregrounds of ``dataset``, evenly spaced (the official validation: 50)."""
    n = len(dataset.fgr)
    if limit is None or n <= limit:
        return dataset
    keep = np.linspace(0, n - 1, limit).round().astype(int).tolist()
    dataset.fgr = [dataset.fgr[i] for i in keep]
    dataset.pha = [dataset.pha[i] for i in keep]
    return dataset


def initial_model(
    name: str, weights: str | Path | None = None
) -> tuple[MattingBase, dict[str, Any]]:
    """The network to train for registry ``name`` and its constructor kwargs.

    ``bgmv2_base_<backbone>`` -> ``MattingBase`` (stage one); ``bgmv2_<backbone>`` ->
    ``MattingRefine`` with ``REFINE_TRAINING`` (stage two). ``weights`` (our checkpoint or an
    official ``.pth``: same key names) initialise it; a base checkpoint initialises only the base
    parts of a refine model, a refine checkpoint serves a base model without its refiner.
    """
    backbone = name.removeprefix("bgmv2_").removeprefix("base_")
    stage = "base" if name.startswith("bgmv2_base_") else "refine"
    if backbone not in _BACKBONES:
        raise DetsegError(
            f"{name!r} is not a bgmv2 model; use bgmv2_[base_]{'|'.join(_BACKBONES)}."
        )
    if weights is None:
        model = build_training_model(backbone, stage)
        return model, {} if stage == "base" else dict(REFINE_TRAINING)
    state, _ = read_state_dict(weights)
    config = official_config(state, str(weights))
    if config["backbone"] != backbone:
        raise DetsegError(f"{weights}: is a {config['backbone']} checkpoint, not {backbone}.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if stage == "refine" and "refine_kernel_size" not in config:
        return build_training_model(backbone, "refine", state), dict(REFINE_TRAINING)
    if stage == "base":
        model, kwargs = MattingBase(backbone), {}
        state = {k: v for k, v in state.items() if not k.startswith("refiner.")}
    else:
        kwargs = {**REFINE_TRAINING, "refine_kernel_size": config["refine_kernel_size"]}
        model = MattingRefine(backbone, **kwargs)
    load_state_dict_strict(model, state, str(weights), name)
    return model, kwargs


def constant_adam_config(out_dir: str | Path, steps: int, **run: Any) -> TrainConfig:
    """The matting recipes' ``TrainConfig``: Adam (AdamW without weight decay) at a constant
    learning rate, as the official BGMv2 and GFM scripts train; ``run`` holds the other
    ``TrainConfig`` fields (batch_size, lr, eval_every, log_every, seed, device, ...)."""
    return TrainConfig(
        out_dir=str(out_dir),
        max_steps=steps,
        optimizer="adamw",
        weight_decay=0.0,
        schedule="constant",
        **run,
    )


def train_bgmv2(
    *,
    model: str,
    data: str | Path,
    backgrounds: str | Path,
    out_dir: str | Path = "runs/bgmv2",
    weights: str | Path | None = None,
    val_data: str | Path | None = None,
    val_limit: int | None = 50,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-4,
    size: int = 512,
    max_side: int | None = None,
    eval_every: int = 200,
    log_every: int = 10,
    resume: bool = False,
    device: str = "auto",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    grad_accum: int = 1,
    sync_bn: bool = False,
) -> dict[str, Any]:
    """``detseg train --task matting --model bgmv2_[base_]<backbone>``: returns the run summary.

    Stage one trains ``bgmv2_base_<backbone>`` (items ``size`` x ``size``, batch crops of sides in
    [size/2, size)); stage two trains ``bgmv2_<backbone>`` from stage one's checkpoint
    (``weights``). ``data`` holds fgr/ + pha/ (or input/ + alpha/), ``backgrounds`` any images;
    ``val_data`` (same layout) is scored by alpha SAD (lower is better) on clean composites.
    AdamW without weight decay (= Adam) and a constant LR, as the official scripts (which use
    per-module LRs; the trainer has one).
    """
    from detseg.checkpoint import CheckpointMeta
    from detseg.engine.summary import fit_and_summarise
    from detseg.engine.trainer import Trainer

    if batch_size < 2:
        raise DetsegError(
            "bgmv2 training needs --batch-size >= 2: the ASPP image-pooling BatchNorm sees one "
            "value per channel per sample."
        )
    net, kwargs = initial_model(model, weights)
    refine = isinstance(net, MattingRefine)
    fg_scale = (0.3, 1.0) if refine else (0.4, 1.0)
    common = {"size": (size, size), "fg_scale": fg_scale, "max_side": max_side}
    train_set = MattingPairs.from_folders(data, backgrounds, **common)
    val_set = (
        _evenly_spaced(
            MattingPairs.from_folders(val_data, backgrounds, train=False, **common), val_limit
        )
        if val_data is not None
        else None
    )
    cfg = constant_adam_config(
        out_dir,
        steps,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        log_every=log_every,
        seed=seed,
        device=device,
        num_workers=num_workers,
        grad_accum=grad_accum,
        sync_bn=sync_bn,
    )
    trainer = Trainer(
        net,
        train_set,
        cfg,
        make_loss_fn((size // 2, size)),
        make_evaluate_fn(val_set, batch_size) if val_set is not None else None,
        primary_metric="SAD",
        higher_is_better=False,
        meta=CheckpointMeta(model=model, kwargs=kwargs),
    )
    return fit_and_summarise(trainer, resume=resume, progress=progress)
