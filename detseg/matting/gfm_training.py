"""GFM training pieces for ``detseg.engine.trainer.Trainer``: RSSN dataset, losses, evaluation.

Follows the official ``core/data.py`` / ``core/train.py`` / ``core/evaluate.py`` (spec
``shared/specs/gfm.md`` section 2): composites made at full resolution with RSSN, trimap (k=25),
dilation and erosion (k=50) from the full-resolution alpha, a random square crop (top-left corner
on a transition pixel with probability 0.5), horizontal flip, resize to ``size`` with bilinear
interpolation; losses as the official ones (sigmoid outputs fed to cross-entropy as logits, focus
losses inside the trimap's unknown band, whole-image fusion and composition losses). The official
optimiser is Adam, lr 1e-5, constant, batch 32.

Official quirks kept on purpose (and reported): FT/BT single-representation glance targets use
the dilation (FT) and the hard foreground (BT), which look swapped against the fusion rules; the
RIM loss feeds the FT outputs to the BT term (``rim_bt_uses_ft=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from detseg.data.images import list_images, read_image
from detseg.errors import DetsegError
from detseg.matting import metrics
from detseg.matting.composite import (
    RSSNConfig,
    dilate_mask,
    erode_mask,
    estimate_foreground,
    rssn_composite,
    trimap_from_alpha,
)


class RSSNMattingDataset(Dataset):
    """Foregrounds with alphas, composited over backgrounds by RSSN, with GFM's targets.

    Args:
        foregrounds: (H, W, 3) uint8 RGB foreground colours (e.g. ``estimate_foreground``).
        alphas: (H, W) uint8 alphas, same sizes as the foregrounds.
        backgrounds: (h, w, 3) uint8 RGB photos of any size; sample i uses background
            ``i % len(backgrounds)`` (the official pairing is fixed, not random).
        size: output side (official 320).
        crop_sizes: crop sides drawn uniformly (official 640, 960, 1280); a side that does not
            fit the image falls back to ``size`` (official), and is clamped to the image.
        rssn: RSSN step probabilities.
        length: samples per epoch (default: one per foreground, as official).
        seed: base seed; the per-item generator also draws from numpy's global state, which
            the trainer seeds per step, so runs are reproducible.

    Items: dict of float32 tensors, values 0..255 like the official loader: ``image``, ``fg``,
    ``bg`` (3, S, S); ``mask`` (the alpha), ``trimap``, ``dilation``, ``erosion``,
    ``dilation_sub``, ``erosion_sub`` (1, S, S).
    """

    def __init__(
        self,
        foregrounds: Sequence[np.ndarray],
        alphas: Sequence[np.ndarray],
        backgrounds: Sequence[np.ndarray],
        size: int = 320,
        crop_sizes: Sequence[int] = (640, 960, 1280),
        rssn: RSSNConfig = RSSNConfig(),
        length: int | None = None,
        seed: int = 0,
    ) -> None:
        if len(foregrounds) != len(alphas) or not foregrounds or not backgrounds:
            raise ValueError("need as many alphas as foregrounds, and at least one background")
        self.foregrounds, self.alphas, self.backgrounds = foregrounds, alphas, backgrounds
        self.size, self.crop_sizes, self.rssn = size, tuple(crop_sizes), rssn
        self.length = length or len(foregrounds)
        self.seed = seed
        self._maps = [_target_maps(a) for a in alphas]

    @classmethod
    def from_folders(
        cls,
        image_dir: str | Path,
        alpha_dir: str | Path,
        background_dir: str | Path,
        foreground_dir: str | Path | None = None,
        max_side: int | None = None,
        **kwargs: Any,
    ) -> RSSNMattingDataset:
        """Dataset from same-named photos and alphas (+ optional foreground colour files) and a
        folder of backgrounds; without ``foreground_dir`` the colours are estimated with
        pymatting's ``estimate_foreground_ml``. ``max_side`` first shrinks every loaded image to
        that longest side (CPU budgets). ``kwargs`` go to the constructor.
        """
        photos = _by_stem(image_dir)
        alphas = _by_stem(alpha_dir)
        missing = sorted(set(photos) - set(alphas))
        if missing:
            raise DetsegError(
                f"{len(missing)} photo(s) have no same-named alpha, e.g. {missing[0]}."
            )
        names = sorted(photos)
        alpha_maps = [shrink_to(metrics.read_matte(alphas[n]), max_side) for n in names]
        if foreground_dir is not None:
            fgs = _by_stem(foreground_dir)
            foregrounds = [shrink_to(read_image(fgs[n]), max_side) for n in names]
        else:
            foregrounds = [
                estimate_foreground(shrink_to(read_image(photos[n]), max_side), a)
                for n, a in zip(names, alpha_maps, strict=True)
            ]
        backgrounds = [shrink_to(read_image(p), max_side) for p in list_images(background_dir)]
        return cls(foregrounds, alpha_maps, backgrounds, **kwargs)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, index, int(np.random.randint(2**31))])
        k = index % len(self.foregrounds)
        alpha = self.alphas[k]
        sample = rssn_composite(
            self.foregrounds[k],
            self.backgrounds[index % len(self.backgrounds)],
            alpha,
            rng,
            self.rssn,
        )
        arrays = {"image": sample.image, "fg": sample.fg, "bg": sample.bg, **self._maps[k]}
        top, left, side = self._crop_box(self._maps[k]["trimap"], rng)
        flip = rng.random() < 0.5
        out = {}
        for name, arr in arrays.items():
            crop = arr[top : top + side, left : left + side]
            crop = crop[:, ::-1] if flip else crop
            crop = cv2.resize(
                np.ascontiguousarray(crop), (self.size, self.size), interpolation=cv2.INTER_LINEAR
            )
            t = torch.from_numpy(crop.astype(np.float32))
            out[name] = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
        return out

    def _crop_box(self, trimap: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
        h, w = trimap.shape
        side = int(rng.choice(self.crop_sizes))
        if side >= min(h, w):
            side = self.size
        side = min(side, min(h, w) - 1)
        region = trimap[: h - side, : w - side]
        ys, xs = np.nonzero(region == 128)
        if rng.random() < 0.5 and ys.size:
            i = int(rng.integers(ys.size))
            return int(ys[i]), int(xs[i]), side
        return int(rng.integers(h - side)), int(rng.integers(w - side)), side


def shrink_to(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``image`` (H, W[, C]) resized (area) so its longest side is at most ``max_side``."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _by_stem(folder: str | Path) -> dict[str, Path]:
    files = {p.stem: p for p in list_images(folder)}
    if not files:
        raise DetsegError(f"{folder} holds no images.")
    return files


def _target_maps(alpha: np.ndarray) -> dict[str, np.ndarray]:
    """Full-resolution GFM maps of a uint8 alpha (official kernels 25 and 50)."""
    dilation, erosion = dilate_mask(alpha, 50), erode_mask(alpha, 50)
    return {
        "mask": alpha,
        "trimap": trimap_from_alpha(alpha, 25),
        "dilation": dilation,
        "erosion": erosion,
        "dilation_sub": dilation - alpha,
        "erosion_sub": alpha - erosion,
    }


def glance_target(values: Tensor, classes: int) -> Tensor:
    """Official class ids from a resized 0..255 map (N, 1, H, W) -> (N, H, W) int64.

    3 classes: 0 -> 0, 255 -> 2, other values above 2 -> 1 (1 and 2 stay as they are, an
    official edge case); 2 classes: 255 -> 1, everything else 0.
    """
    v = values[:, 0]
    if classes == 2:
        return (v == 255).long()
    out = v.clone()
    out[(v > 2) & (v != 255)] = 1
    out[v == 255] = 2
    return out.long()


def _pyramid_kernel(device: torch.device, dtype: torch.dtype) -> Tensor:
    i = torch.arange(5, device=device, dtype=dtype) - 2
    # A sum, not a product, of 1-D Gaussians: the official (gist-derived) kernel.
    k = torch.exp(-(i[:, None] ** 2)) + torch.exp(-(i[None, :] ** 2))
    return (k / k.sum())[None, None]


def laplacian_loss(pred: Tensor, target: Tensor, levels: int = 5) -> Tensor:
    """Sum over 5 band-pass levels and the final low-pass of mean |pyr(pred) - pyr(target)|."""
    kernel = _pyramid_kernel(pred.device, pred.dtype)
    x = torch.cat([pred, target], 0)
    n = pred.shape[0]
    total = pred.new_zeros(())
    for _ in range(levels):
        blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel)
        band = x - blurred
        total = total + (band[:n] - band[n:]).abs().mean()
        x = F.avg_pool2d(blurred, 2)
    return total + (x[:n] - x[n:]).abs().mean()


def _charbonnier(d: Tensor) -> Tensor:
    return torch.sqrt(d**2 + 1e-12)


def _focus_losses(focus: Tensor, target: Tensor, region: Tensor) -> Tensor:
    alpha_t = _charbonnier((focus - target) * region).sum() / (region.sum() + 1.0)
    return alpha_t + laplacian_loss(focus * region, target * region)


def _fusion_losses(fusion: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(whole-image alpha + Laplacian loss, composition loss) of a fusion (N, 1, H, W)."""
    alpha = batch["mask"] / 255.0
    whole = _charbonnier(fusion - alpha).mean() + laplacian_loss(fusion, alpha)
    composite = fusion * batch["fg"] + (1.0 - fusion) * batch["bg"]
    n, _, h, w = fusion.shape
    comp = (_charbonnier(composite - batch["image"]) / 255.0).sum() / (n * h * w)
    return whole, comp


# (glance target map, focus target map) per representation; "rim_*" are RIM's own heads.
_TARGETS = {
    "TT": ("trimap", "mask"),
    "FT": ("dilation", "erosion_sub"),
    "BT": ("mask", "dilation_sub"),
    "rim_ft": ("erosion", "erosion_sub"),
    "rim_bt": ("dilation", "dilation_sub"),
}


def _head_terms(
    glance: Tensor, focus: Tensor, fusion: Tensor, batch: Mapping[str, Tensor], targets: str
) -> dict[str, Tensor]:
    g_map, f_map = _TARGETS[targets]
    region = (batch["trimap"] == 128).to(focus.dtype)
    whole, comp = _fusion_losses(fusion, batch)
    return {
        "ce": F.cross_entropy(glance, glance_target(batch[g_map], glance.shape[1])),
        "focus": _focus_losses(focus, batch[f_map] / 255.0, region),
        "whole": whole,
        "comp": comp,
    }


def gfm_loss(
    outputs: Sequence[Tensor], batch: Mapping[str, Tensor], rosta: str, rim_bt_uses_ft: bool = True
) -> tuple[Tensor, dict[str, float]]:
    """Official GFM training loss of the forward ``outputs`` on a dataset ``batch``.

    TT/FT/BT: 0.25 * (CE + focus + whole + composition). RIM: unweighted sum over the tt/ft/bt
    heads of CE + focus + whole + composition, plus whole + composition of the RIM output;
    ``rim_bt_uses_ft`` reproduces the official bug (the BT term scores the FT outputs).
    """
    if rosta != "RIM":
        terms = _head_terms(*outputs[:3], batch, rosta)
        total = 0.25 * sum(terms.values())
        return total, {"loss": total.item(), **{k: v.item() for k, v in terms.items()}}
    heads = {"tt": (outputs[0:3], "TT"), "ft": (outputs[3:6], "rim_ft")}
    heads["bt"] = (outputs[3:6] if rim_bt_uses_ft else outputs[6:9], "rim_bt")
    logs: dict[str, float] = {}
    total = outputs[0].new_zeros(())
    for name, (outs, targets) in heads.items():
        part = sum(_head_terms(*outs, batch, targets).values())
        logs[name] = part.item()
        total = total + part
    whole, comp = _fusion_losses(outputs[9], batch)
    total = total + whole + comp
    logs["rim"] = (whole + comp).item()
    return total, {"loss": total.item(), **logs}


def make_loss_fn(rosta: str = "TT") -> Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]:
    """``loss_fn(model, batch)`` for the trainer."""

    def loss_fn(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return gfm_loss(model(batch["image"]), batch, rosta)

    return loss_fn


def make_evaluate_fn(
    images: Sequence[np.ndarray], alphas: Sequence[np.ndarray], strategy: str | None = None
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate_fn(model)``: mean SAD / MSE / MAD (GFM convention) of the predicted alpha.

    ``images`` (H, W, 3) uint8 and ``alphas`` (H, W) uint8. With ``strategy=None`` each image is
    fed at its own size (H, W multiples of 32, raw 0..255 like the training input) and the
    network's fusion is scored; otherwise ``gfm_infer.infer_gfm`` runs that test strategy
    (``"hybrid"`` / ``"resize"``) at any size. The trainer calls it in eval mode under ``no_grad``.
    """
    from detseg.matting.gfm_infer import infer_gfm

    def predict(model: nn.Module, image: np.ndarray) -> np.ndarray:
        if strategy is not None:
            return infer_gfm(model, image, strategy)["alpha"]
        device = next(model.parameters()).device
        x = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))[None].to(device)
        outs = model(x)
        return (outs[9] if len(outs) == 10 else outs[2])[0, 0].double().cpu().numpy()

    def evaluate_fn(model: nn.Module) -> dict[str, float]:
        scores = []
        for image, alpha in zip(images, alphas, strict=True):
            pred = predict(model, image)
            scores.append(
                {
                    "SAD": metrics.sad(pred, alpha),
                    "MSE": metrics.mse(pred, alpha),
                    "MAD": metrics.mad(pred, alpha),
                }
            )
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}

    return evaluate_fn
