"""GFM test-time strategies (official ``core/test.py``) and the ``detseg matte`` entry point.

Resizing follows the official code: ``skimage.transform.resize`` (bilinear, half-pixel centres,
reflect borders, Gaussian anti-aliasing when shrinking) of the uint8 RGB photo, times 255, to a
size floored to a multiple of 32 (capped at 1600), aspect ratio not preserved exactly, no padding.

- ``resize``: one pass at ratio 1/2; glance argmax map, focus and the network's own fusion are
  resized back to the photo.
- ``hybrid`` (the official default): glance from a pass at 1/3, focus from a pass at 1/2, merged
  at full resolution (TT: exactly 255 -> 1, exactly 0 -> 0, everything else -> focus; BT:
  G/255 - F clamped at 0; FT: G/255 + F clamped at 1).
- RIM networks ignore the strategy: one pass at 1/3, the RIM output is the alpha (unbounded,
  clipped to [0, 1] only when written to a PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from skimage.transform import resize

from detseg.data.images import list_images, read_image, write_image
from detseg.engine.device import resolve_device
from detseg.engine.fast import fast_or_exact
from detseg.engine.prefetch import BackgroundWriter, prefetch
from detseg.engine.progress import count_progress
from detseg.errors import CheckpointError, DetsegError
from detseg.matting.gfm import GFM

STRATEGIES = ("hybrid", "resize")
MAX_SIZE = 1600


def scaled_size(h: int, w: int, ratio: float, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """Official test size: floor(h * ratio) floored to a multiple of 32, capped at ``max_size``."""
    rh, rw = int(h * ratio), int(w * ratio)
    size = (min(max_size, rh - rh % 32), min(max_size, rw - rw % 32))
    if min(size) == 0:
        raise DetsegError(
            f"image {w}x{h} is too small for GFM at ratio {ratio:.3g}: each side times the ratio "
            "must be at least 32 pixels; upscale the image first."
        )
    return size


def _coded_glance(glance: torch.Tensor) -> np.ndarray:
    """(gd, h, w) glance -> (h, w) uint8: TT classes 0/128/255, two-class maps 0/255."""
    index = glance.argmax(0).cpu().numpy()
    levels = np.array([0, 128, 255] if glance.shape[0] == 3 else [0, 255], dtype=np.uint8)
    return levels[index]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _forward_at(model: GFM, image: np.ndarray, ratio: float) -> tuple[torch.Tensor, ...]:
    """Run ``model`` on the uint8 (H, W, 3) photo resized by ``ratio``; outputs without batch dim."""
    size = scaled_size(*image.shape[:2], ratio)
    x = resize(image, size) * 255.0
    x = torch.from_numpy(x.transpose(2, 0, 1).copy()).float()[None].to(_device(model))
    return tuple(o[0] for o in model(x))


def _back(x: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """skimage-resize a (h, w) map (uint8 -> [0, 1]) to ``shape``, float64."""
    if isinstance(x, torch.Tensor):
        x = x.squeeze(0).double().cpu().numpy()
    return resize(x, shape)


def infer_gfm(model: GFM, image: np.ndarray, strategy: str = "hybrid") -> dict[str, np.ndarray]:
    """Official test-time inference on one photo.

    Args:
        model: a ``GFM`` in eval mode.
        image: (H, W, 3) uint8 RGB.
        strategy: ``"hybrid"`` or ``"resize"`` (ignored for RIM, see module doc).

    Returns:
        (H, W) float64 maps: ``glance`` (coded 0/128/255 or 0/255, bilinearly resized),
        ``focus`` in [0, 1] and ``alpha`` (the evaluated output: fusion, or the RIM output).
    """
    if strategy not in STRATEGIES:
        raise DetsegError(f"unknown GFM test strategy {strategy!r}; use one of {STRATEGIES}.")
    shape = image.shape[:2]
    if model.rosta == "RIM":
        outs = _forward_at(model, image, 1 / 3)
        return {
            "glance": _back(_coded_glance(outs[0]), shape) * 255.0,
            "focus": _back(outs[1], shape),
            "alpha": _back(outs[9], shape),
        }
    if strategy == "resize":
        glance, focus, fusion = _forward_at(model, image, 1 / 2)
        return {
            "glance": _back(_coded_glance(glance), shape) * 255.0,
            "focus": _back(focus, shape),
            "alpha": _back(fusion, shape),
        }
    glance_map = _back(_coded_glance(_forward_at(model, image, 1 / 3)[0]), shape) * 255.0
    focus = _back(_forward_at(model, image, 1 / 2)[1], shape)
    return {
        "glance": glance_map,
        "focus": focus,
        "alpha": hybrid_merge(model.rosta, glance_map, focus),
    }


def hybrid_merge(rosta: str, glance: np.ndarray, focus: np.ndarray) -> np.ndarray:
    """Full-resolution merge of the HYBRID strategy; ``glance`` (H, W) in [0, 255], focus [0, 1]."""
    if rosta == "TT":
        out = focus.copy()
        out[glance == 255] = 1.0
        out[glance == 0] = 0.0
        return out
    if rosta == "BT":
        return np.maximum(glance / 255.0 - focus, 0.0)
    return np.minimum(glance / 255.0 + focus, 1.0)


def shrink_to_short_side(image: np.ndarray, short: int = 1080) -> np.ndarray:
    """Official samples mode: photos whose shorter side exceeds ``short`` are resized to it."""
    import cv2

    h, w = image.shape[:2]
    if min(h, w) <= short:
        return image
    size = (short, int(short * w / h)) if h < w else (int(short * h / w), short)
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def load_gfm(
    model: str = "gfm_r34", weights: str | Path | None = None, device: str = "auto"
) -> GFM:
    """A GFM from a detseg checkpoint or an official ``.pth`` (variant read from the file).

    Raises:
        DetsegError: no weights given (GFM ships without bundled weights).
        CheckpointError: the file is not a GFM checkpoint.
    """
    from detseg.checkpoint import load_state_dict_strict, read_state_dict
    from detseg.registry import get_entry

    entry = get_entry(model)
    if not model.startswith("gfm"):
        raise DetsegError(f"{model} is not a GFM model; choose one of `detseg models` gfm_*.")
    if weights is None:
        raise DetsegError(
            f"{model} has no bundled weights: pass --weights with an official GFM .pth "
            "(e.g. gfm_r34_tt.pth from JizhiziLi/GFM) or a detseg checkpoint."
        )
    state, meta = read_state_dict(weights)
    if meta is None:
        kwargs, state = entry.official.convert(state)
    elif meta.model.startswith("gfm"):
        kwargs = meta.kwargs
    else:
        raise CheckpointError(f"{weights}: a checkpoint of {meta.model!r}, not of a GFM model.")
    net = entry.build(**kwargs)
    load_state_dict_strict(net, state, str(weights), model)
    return net.to(resolve_device(device)).eval()


def _trimap_for(image_path: Path, trimap: Path, many: bool) -> Path:
    if not trimap.is_dir():
        if many:
            raise DetsegError("several images need a trimap folder (matched by file name).")
        return trimap
    found = [p for p in list_images(trimap) if p.stem == image_path.stem]
    if not found:
        raise DetsegError(f"no trimap named like {image_path.name} in {trimap}.")
    return found[0]


def matte_images(
    source: str | Path,
    out_dir: str | Path,
    model: str = "gfm_r34",
    weights: str | Path | None = None,
    method: str = "gfm",
    trimap: str | Path | None = None,
    strategy: str = "hybrid",
    device: str = "auto",
    cutout: bool = True,
    exact: bool = False,
    precision: str = "f32",
    progress: bool = False,
) -> list[Path]:
    """``detseg matte``: write ``OUT_DIR/<stem>.png`` (8-bit alpha) and, with ``cutout``,
    ``<stem>_rgba.png``.

    Args:
        source: an image file, a folder or a glob.
        method: ``"gfm"`` (trimap-free, needs ``weights``) or ``"closed-form"`` / ``"knn"``
            (pymatting, needs ``trimap``: a file for one image, or a folder matched by name).
        strategy: GFM test strategy, ``"hybrid"`` (official) or ``"resize"``.
        exact, precision: GFM runs its fast path at ``precision`` (``"f32"``, ``"bf16"``) unless
            ``exact`` (the reference path; ``detseg.engine.fast.fast_or_exact``).
        progress: a bar over the images on stderr. Reading the next photo and writing the
            last one's PNGs overlap with the current one's matting.

    Returns:
        The alpha PNG paths written. The RGBA cut-out holds the photo with the alpha as its
        fourth channel (straight, not premultiplied). GFM runs photos whose shorter side is
        above 1080 at 1080 (official samples mode); the alpha is resized back to the photo.
    """
    from detseg.matting.classic import METHODS, classic_matte
    from detseg.matting.metrics import read_matte

    if method != "gfm" and method not in METHODS:
        raise DetsegError(f"unknown matting method {method!r}; use gfm, {', '.join(METHODS)}.")
    if method != "gfm" and trimap is None:
        raise DetsegError(f"--method {method} needs --trimap (a trimap PNG or a folder of them).")
    if method != "gfm" and precision != "f32":
        raise DetsegError(
            f"--precision {precision} is for models; --method {method} runs in float64 (pymatting)."
        )
    paths = list_images(source)
    net = None
    if method == "gfm":
        net = fast_or_exact(load_gfm(model, weights, device), model, exact, precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with (
        count_progress(len(paths), "images", enabled=progress) as advance,
        BackgroundWriter() as writer,
    ):
        for path, image in prefetch((p, read_image(p)) for p in paths):
            if net is not None:
                alpha = infer_gfm(net, shrink_to_short_side(image), strategy)["alpha"]
                alpha = _back(alpha, image.shape[:2]) if alpha.shape != image.shape[:2] else alpha
            else:
                tri = read_matte(_trimap_for(path, Path(trimap), len(paths) > 1))
                alpha = classic_matte(image, tri, method)
            written.append(out_dir / f"{path.stem}.png")
            writer.submit(_write_matte, written[-1], image, alpha, cutout)
            advance()
    return written


def _write_matte(target: Path, image: np.ndarray, alpha: np.ndarray, cutout: bool) -> None:
    """``target``: the 8-bit alpha; with ``cutout``, ``<stem>_rgba.png`` beside it."""
    a8 = (np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)  # truncation, as the official code
    write_image(target, a8)
    if cutout:
        write_image(target.with_name(f"{target.stem}_rgba.png"), np.dstack([image, a8]))


def evaluate_matting_model(
    data_dir: str | Path,
    pred_dir: str | Path,
    model: str = "gfm_r34",
    weights: str | Path | None = None,
    method: str = "gfm",
    trimap_subdir: str = "trimap",
    convention: str = "gfm",
    strategy: str = "hybrid",
    device: str = "auto",
    precision: str = "f32",
) -> dict:
    """``detseg eval --task matting --model ... --data DIR``: matte ``DIR/input`` into
    ``pred_dir``, then ``evaluate_folder(pred_dir, DIR/alpha, DIR/<trimap_subdir>)``.

    ``precision`` "f32" scores the reference path (as ``detseg eval`` does for every task), "bf16"
    the fast path in bfloat16.

    The trimap folder is optional for GFM (used for the trimap metrics when present) and
    required for the classical methods. Scores the saved 8-bit PNGs (the official GFM script
    scores the float prediction; the difference is below 1/255 per pixel).
    """
    from detseg.matting.metrics import evaluate_folder

    data_dir = Path(data_dir)
    trimaps = data_dir / trimap_subdir
    trimap_dir = trimaps if trimaps.is_dir() else None
    matte_images(
        data_dir / "input",
        pred_dir,
        model,
        weights,
        method,
        trimap_dir,
        strategy,
        device,
        cutout=False,
        exact=precision == "f32",
        precision=precision,
    )
    return evaluate_folder(pred_dir, data_dir / "alpha", trimap_dir, convention)
