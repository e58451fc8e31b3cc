"""Running BackgroundMattingV2 on image pairs, folders and videos, writing com/pha/fgr/err/ref.

Output layout (as the official inference scripts): ``OUT/<kind>/<stem>.png`` for images and
``OUT/<kind>/<stem>.mp4`` for a video, ``kind`` in ``OUTPUTS``. ``com`` is an RGBA PNG
(RGB = foreground where alpha > 0, A = alpha) unless a background colour or image is given, then an
RGB composite ``fgr * pha + background * (1 - pha)``; videos have no alpha channel, so their ``com``
defaults to the official green (120, 255, 155).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from detseg.data.images import list_images, read_image, write_image
from detseg.data.video import DEFAULT_PRESET, is_video, video_info
from detseg.engine.prefetch import BackgroundWriter, prefetch
from detseg.engine.video import VIDEO_GREEN, map_video
from detseg.errors import DetsegError
from detseg.matting.bgmv2 import MattingBase, MattingRefine

OUTPUTS = ("com", "pha", "fgr", "err", "ref")
Background = tuple[int, int, int] | np.ndarray | None
Progress = Callable[[int, int], None]  # (frames done, total or 0 when unknown)


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1], NCHW-contiguous (the uint8 planes are
    laid out first: a quarter of the bytes of a float copy)."""
    planes = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device)
    return planes.permute(2, 0, 1).contiguous()[None].float().div_(255)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def matte_pair(
    model: nn.Module, src: np.ndarray, bgr: np.ndarray, device: torch.device | str | None = None
) -> dict[str, np.ndarray]:
    """Matte one photo against its background plate.

    Args:
        model: ``MattingRefine`` or ``MattingBase`` (put in eval mode here).
        src, bgr: (H, W, 3) uint8 RGB of the same size.
        device: where to run; default the model's device (the model is moved there).

    Returns:
        ``pha`` (H, W) float32 alpha, ``fgr`` (H, W, 3) float32 foreground, ``err`` (H, W) float32
        error map (bilinear to full size), and for ``MattingRefine`` ``ref`` (H, W) float32 0/1
        refined regions (nearest to full size); all in [0, 1]. Sizes not divisible by 4 are
        replicate-padded for ``MattingRefine`` and cropped back.
    """
    return matte_batch(model, [src], bgr, device)[0]


@torch.no_grad()
def matte_batch(
    model: nn.Module,
    srcs: Sequence[np.ndarray],
    bgr: np.ndarray,
    device: torch.device | str | None = None,
    outputs: Sequence[str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``matte_pair`` of several same-size photos (video frames) against one plate, in one
    forward pass; one dict of maps per photo. ``outputs`` (kinds of ``OUTPUTS``): only the maps
    they need are brought to full size and to the CPU (None: all)."""
    maps = _matte_tensors(model, srcs, bgr, device, outputs)
    return [{k: _to_numpy(v[i]) for k, v in maps.items()} for i in range(len(srcs))]


@torch.no_grad()
def render_batch(
    model: nn.Module,
    srcs: Sequence[np.ndarray],
    bgr: np.ndarray,
    kinds: Sequence[str],
    background: Background = None,
    device: torch.device | str | None = None,
) -> list[dict[str, np.ndarray]]:
    """``matte_batch`` and ``render`` in one: each photo's ``kinds`` as uint8 frames, rendered
    where the model ran (only uint8 pictures travel to the CPU side; video frames)."""
    maps = _matte_tensors(model, srcs, bgr, device, kinds)
    return [
        {kind: _render(_hwc(maps, i), kind, background).cpu().numpy() for kind in kinds}
        for i in range(len(srcs))
    ]


def _matte_tensors(
    model: nn.Module,
    srcs: Sequence[np.ndarray],
    bgr: np.ndarray,
    device: torch.device | str | None,
    outputs: Sequence[str] | None,
) -> dict[str, torch.Tensor]:
    """The maps ``outputs`` need, (B, C, H, W) float32 at the photos' size, on the device."""
    for src in srcs:
        if src.shape != bgr.shape:
            raise DetsegError(
                f"source {src.shape[1]}x{src.shape[0]} and background plate {bgr.shape[1]}x"
                f"{bgr.shape[0]} differ in size; use a plate of the same size or --resize-bgr."
            )
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device).eval()
    h, w = bgr.shape[:2]
    s = torch.cat([_to_tensor(src, device) for src in srcs])
    b = _to_tensor(bgr, device).expand_as(s)
    refine = isinstance(model, MattingRefine)
    if refine and (h % 4 or w % 4):
        pad = (0, -w % 4, 0, -h % 4)
        s, b = F.pad(s, pad, mode="replicate"), F.pad(b, pad, mode="replicate")
    out = model(s, b)
    pha, fgr, err = (out[0], out[1], out[4]) if refine else out[:3]
    full = s.shape[-2:]
    needed = _needed_maps(outputs, refine)
    maps = {"pha": pha, "fgr": fgr}
    if "err" in needed:
        maps["err"] = F.interpolate(err, size=full, mode="bilinear", align_corners=False)
    if "ref" in needed:
        maps["ref"] = F.interpolate(out[5], size=full, mode="nearest")
    return {k: v[:, :, :h, :w] for k, v in maps.items() if k in needed}


def _needed_maps(outputs: Sequence[str] | None, refine: bool) -> set[str]:
    """The maps ``outputs`` are rendered from (``com`` is made of ``pha`` and ``fgr``)."""
    every = {"pha", "fgr", "err", "ref"} if refine else {"pha", "fgr", "err"}
    if outputs is None:
        return every
    needed = {m for kind in outputs for m in (("pha", "fgr") if kind == "com" else (kind,))}
    return needed & every


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W) when C == 1 else (H, W, C), float32 on the CPU."""
    arr = t.float().cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def _hwc(maps: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Photo ``i`` of (B, C, H, W) maps as (H, W) / (H, W, C) views (``matte_pair``'s layout)."""
    return {k: v[i, 0] if v.shape[1] == 1 else v[i].permute(1, 2, 0) for k, v in maps.items()}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float32 -> uint8, rounding half to even (one temporary, updated in place)."""
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _composite(pha: torch.Tensor, fgr: torch.Tensor, background: Background) -> torch.Tensor:
    a = pha[..., None]
    if background is None:
        return _to_uint8(torch.cat([fgr * (a > 0), a], dim=2))
    bg = torch.as_tensor(np.asarray(background), dtype=torch.float32, device=fgr.device) / 255.0
    return _to_uint8((fgr - bg).mul_(a).add_(bg))  # bg + a * (fgr - bg): fewer passes


def _render(maps: dict[str, torch.Tensor], kind: str, background: Background) -> torch.Tensor:
    if kind == "com":
        return _composite(maps["pha"], maps["fgr"], background)
    if kind not in maps:
        raise DetsegError(
            f"output {kind!r} is not produced by this model; choose from {sorted(maps)}."
        )
    return _to_uint8(maps[kind])


def composite(pha: np.ndarray, fgr: np.ndarray, background: Background = None) -> np.ndarray:
    """The ``com`` output: (H, W, 4) uint8 RGBA when ``background`` is None, else (H, W, 3) uint8.

    ``pha`` (H, W), ``fgr`` (H, W, 3) float32 in [0, 1]; ``background``: an (R, G, B) 0..255
    colour or an (H, W, 3) uint8 image.
    """
    return _composite(torch.from_numpy(pha), torch.from_numpy(fgr), background).numpy()


def render(maps: dict[str, np.ndarray], kind: str, background: Background = None) -> np.ndarray:
    """One output ``kind`` of ``matte_pair``'s maps as uint8: RGB(A) for com/fgr, (H, W) otherwise."""
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in maps.items()}
    return _render(tensors, kind, background).numpy()


def parse_background(value: str | None) -> Background:
    """A ``--background`` value: None, a colour ``"#78ff9b"`` / ``"120,255,155"``, or an image path."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("#") and len(text) == 7:
        try:
            return tuple(int(text[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    parts = text.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
        rgb = tuple(int(p) for p in parts)
        if all(0 <= c <= 255 for c in rgb):
            return rgb  # type: ignore[return-value]
    if Path(text).is_file():
        return read_image(text)
    raise DetsegError(
        f"background {value!r}: not a colour (#rrggbb or r,g,b in 0..255) nor an image file."
    )


def _fit(image: np.ndarray, size: tuple[int, int], what: str, resize: bool) -> np.ndarray:
    """``image`` (H, W, 3) at ``size`` (w, h): unchanged, resized (bilinear) or a DetsegError."""
    h, w = image.shape[:2]
    if (w, h) == size:
        return image
    if not resize:
        raise DetsegError(
            f"the {what} is {w}x{h} but the source is {size[0]}x{size[1]}; give one of the same "
            "size or pass --resize-bgr to resize it."
        )
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def _check_outputs(outputs: Sequence[str] | None, model: nn.Module) -> list[str]:
    if outputs is None:  # everything the model produces (MattingBase has no refined regions)
        return [o for o in OUTPUTS if o != "ref" or isinstance(model, MattingRefine)]
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad or not outputs:
        raise DetsegError(f"unknown output(s) {bad or outputs}; choose from {', '.join(OUTPUTS)}.")
    return list(dict.fromkeys(outputs))


def matte_files(
    model: nn.Module,
    source: str | Path,
    bgr_path: str | Path,
    out_dir: str | Path,
    outputs: Sequence[str] | None = None,
    background: Background = None,
    resize_bgr: bool = False,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    video_preset: str = DEFAULT_PRESET,
) -> list[Path]:
    """Matte an image, a folder / glob of images or a video against one background plate image.

    Args:
        model: ``MattingRefine`` or ``MattingBase``.
        source: image file, folder, glob pattern, or video file (by suffix, see ``VIDEO_SUFFIXES``).
        bgr_path: the clean background plate (an image).
        out_dir: outputs go to ``out_dir/<kind>/<stem>.png|.mp4``.
        outputs: any of ``OUTPUTS``; None = all that the model produces.
        background: ``com`` background (colour or image, resized to each source with
            ``resize_bgr`` semantics); None = RGBA PNG for images, green for videos.
        resize_bgr: resize a plate (and a background image) of another size to the source's size
            instead of raising ``DetsegError``.
        device: where to run (default: the model's device).
        progress: called with (done, total) after every image or frame.
        video_preset: the x264 preset of written videos (``detseg.data.video.VideoWriter``).

    Returns:
        The written files. A video keeps its frame rate; the written videos have no audio.
    """
    kinds = _check_outputs(outputs, model)
    plate = read_image(bgr_path)
    out_dir = Path(out_dir)
    if is_video(source):
        return _matte_video(
            model,
            Path(source),
            plate,
            out_dir,
            kinds,
            background,
            resize_bgr,
            device,
            progress,
            video_preset,
        )
    files = list_images(source)
    written: list[Path] = []
    with BackgroundWriter() as background_writer:  # read, infer and write overlap
        for n, (path, src) in enumerate(prefetch((p, read_image(p)) for p in files), 1):
            size = (src.shape[1], src.shape[0])
            maps = matte_pair(model, src, _fit(plate, size, "background plate", resize_bgr), device)
            bg = _fit_background(background, size, resize_bgr)
            targets = [out_dir / kind / f"{path.stem}.png" for kind in kinds]
            background_writer.submit(_write_images, targets, kinds, maps, bg)
            written += targets
            if progress is not None:
                progress(n, len(files))
    return written


def _write_images(
    targets: list[Path], kinds: list[str], maps: dict[str, np.ndarray], background: Background
) -> None:
    for target, kind in zip(targets, kinds, strict=True):
        write_image(target, render(maps, kind, background))


def _fit_background(background: Background, size: tuple[int, int], resize: bool) -> Background:
    if isinstance(background, np.ndarray):
        return _fit(background, size, "background image", resize)
    return background


def video_batch_size(device: torch.device) -> int:
    """Frames per forward pass when matting a video: 8 on a GPU; 1 on the CPU, where batching
    gains nothing (13 HD frames/s at batch 1 against 9-13 at batch 8, measured here) and one frame's
    float maps stay within the blocks the allocator keeps for reuse (``keep_freed_memory``)."""
    return 8 if device.type == "cuda" else 1


def _matte_video(
    model: nn.Module,
    source: Path,
    plate: np.ndarray,
    out_dir: Path,
    kinds: list[str],
    background: Background,
    resize_bgr: bool,
    device: torch.device | str | None,
    progress: Progress | None,
    video_preset: str,
) -> list[Path]:
    info = video_info(source)
    size = (info.width, info.height)
    plate = _fit(plate, size, "background plate", resize_bgr)
    bg = _fit_background(VIDEO_GREEN if background is None else background, size, resize_bgr)
    targets = {kind: out_dir / kind / f"{source.stem}.mp4" for kind in kinds}

    def infer(frames: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        return render_batch(model, frames, plate, kinds, bg, device)

    def draw(rendered: dict[str, np.ndarray], frame: np.ndarray) -> dict[str, np.ndarray]:
        return rendered

    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, info.frames)

    run_on = torch.device(device) if device is not None else _model_device(model)
    map_video(source, targets, infer, draw, video_batch_size(run_on), advance, video_preset)
    return list(targets.values())


def matte(
    model: str,
    source: str | Path,
    bgr: str | Path,
    out_dir: str | Path,
    weights: str | Path | None = None,
    outputs: Sequence[str] | None = None,
    background: str | None = None,
    resize_bgr: bool = False,
    device: str = "auto",
    progress: bool = True,
    exact: bool = False,
    precision: str = "f32",
    video_preset: str = DEFAULT_PRESET,
    **model_kwargs: Any,
) -> list[Path]:
    """``detseg matte SRC --bgr PLATE --model NAME [--weights W] -o OUT``: load, run, write.

    Args:
        model: a registered bgmv2 model (``bgmv2_<backbone>`` or ``bgmv2_base_<backbone>``).
        weights: our checkpoint or an official ``.pth``; None = random initialisation.
        background: ``--background`` text (colour or image path, see ``parse_background``).
        exact, precision: the reference path, or the fast path at this precision
            (``detseg.engine.fast.for_inference``).
        model_kwargs: constructor overrides, e.g. ``refine_mode="full"``.
        The rest as ``matte_files``; ``progress`` shows a bar over images or frames on stderr.
    """
    from detseg.api import load_model
    from detseg.engine.fast import for_inference
    from detseg.engine.progress import count_progress

    loaded = load_model(model, weights=weights, device=device, **model_kwargs)
    if loaded.task != "matting" or not isinstance(loaded.model, MattingBase):
        raise DetsegError(
            f"`detseg matte` runs BackgroundMattingV2 models (bgmv2_*), not {model!r}."
        )
    loaded = for_inference(loaded, exact, precision)
    video = is_video(source)
    total = video_info(source).frames if video else len(list_images(source))
    with count_progress(total, "frames" if video else "images", enabled=progress) as advance:
        return matte_files(
            loaded.model,
            source,
            bgr,
            out_dir,
            outputs,
            parse_background(background),
            resize_bgr,
            loaded.device,
            lambda done, total: advance(1),
            video_preset,
        )
