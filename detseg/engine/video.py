"""Video inference for every task: decode frames in batches, infer, draw, encode at the source fps.

``map_video`` is the one loop (``detseg predict VIDEO`` and ``detseg matte VIDEO`` both use it):
frames are decoded with PyAV, handed to a function in batches, and each frame's rendered outputs
are encoded to their own H.264 file at the source frame rate; every file appears only when the
whole video succeeded. ``predict_video`` runs a ``Predictor`` over a video and draws its results.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detseg.data.video import DEFAULT_PRESET, VideoInfo, VideoWriter, read_frames, video_info
from detseg.engine.prefetch import BackgroundWriter, prefetch
from detseg.engine.progress import count_progress
from detseg.errors import DetsegError

if TYPE_CHECKING:
    from detseg.predictor import Predictor

Frames = list[np.ndarray]  # (H, W, 3) uint8 RGB
Infer = Callable[[Frames], Sequence[Any]]
Draw = Callable[[Any, np.ndarray], Mapping[str, np.ndarray]]
VIDEO_GREEN = (120, 255, 155)  # the background of matted videos (they have no alpha channel)


def batches(frames: Iterable[np.ndarray], size: int) -> Iterator[Frames]:
    """Consecutive lists of ``size`` frames (the last one may be shorter)."""
    if size < 1:
        raise DetsegError(f"batch size {size} is invalid; use 1 or more frames per batch.")
    it = iter(frames)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def map_video(
    source: str | Path,
    targets: Mapping[str, str | Path],
    infer: Infer,
    draw: Draw,
    batch_size: int = 8,
    advance: Callable[[int], None] | None = None,
    preset: str = DEFAULT_PRESET,
) -> tuple[VideoInfo, int]:
    """Run ``infer`` over ``source``'s frames, ``batch_size`` at a time, and write what ``draw``
    makes of each result.

    Args:
        targets: output kind -> video path.
        infer: ``infer(frames)`` -> one result per frame (the model's work, on this thread).
        draw: ``draw(result, frame)`` -> a mapping from every kind to an (H, W, 3) uint8 RGB (or
            (H, W) gray, or RGBA) frame; runs on the writer thread, beside the next ``infer``.
        advance: called with the number of frames after every batch (a progress bar).
        preset: the x264 preset of the written videos (``VideoWriter``).

    Returns:
        The source's ``VideoInfo`` and the number of frames written.
    """
    info = video_info(source)
    writers = {kind: VideoWriter(path, info.fps, preset=preset) for kind, path in targets.items()}
    count = 0
    with contextlib.ExitStack() as stack:
        for writer in writers.values():
            stack.enter_context(writer)
        background = stack.enter_context(BackgroundWriter())
        # decoding (prefetch thread), inference (here), drawing and encoding (writer thread)
        for frames in prefetch(batches(read_frames(source), batch_size)):
            background.submit(_write_batch, writers, draw, infer(frames), frames)
            count += len(frames)
            if advance is not None:
                advance(len(frames))
    return info, count


def _write_batch(
    writers: Mapping[str, VideoWriter], draw: Draw, results: Sequence[Any], frames: Frames
) -> None:
    for result, frame in zip(results, frames, strict=True):
        outputs = draw(result, frame)
        for kind, writer in writers.items():
            writer.write(_writer_frame(outputs[kind]))


def _writer_frame(frame: np.ndarray) -> np.ndarray:
    """(H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> the writer's frame: gray stays
    (H, W) (``VideoWriter`` encodes it without an RGB copy), RGBA goes over green."""
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 4:
        alpha = frame[..., 3:].astype(np.float32) / 255.0
        green = np.asarray(VIDEO_GREEN, np.float32)
        mixed = frame[..., :3].astype(np.float32) * alpha + green * (1.0 - alpha)
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return frame


def predict_video(
    predictor: Predictor,
    source: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    bgr: np.ndarray | None = None,
    progress: bool = True,
    video_preset: str = DEFAULT_PRESET,
) -> dict[str, Any]:
    """Annotate every frame of ``source`` with ``predictor`` into ``<out_dir>/<stem>_<task>.mp4``.

    The picture of each frame is ``Prediction.render`` (label overlay, boxes, masks; matting
    cut-outs over green). ``bgr``: the background plate for BGMv2 (frame-sized);
    ``video_preset``: the x264 preset of the written video.

    Returns:
        ``{"file", "task", "frames", "fps", "width", "height", "seconds",
        "frames_per_second", "outputs": [path]}`` (seconds: decode + inference + encode).
    """
    source = Path(source)
    target = Path(out_dir) / f"{source.stem}_{predictor.task}.mp4"

    def infer(frames: Frames) -> list[Any]:
        return predictor.predict_batch(frames, bgr=bgr)

    def draw(prediction: Any, frame: np.ndarray) -> dict[str, np.ndarray]:
        return {"video": prediction.render(frame)}

    total = video_info(source).frames
    start = time.perf_counter()
    with count_progress(total, "frames", enabled=progress) as advance:
        info, count = map_video(
            source, {"video": target}, infer, draw, batch_size, advance, video_preset
        )
    seconds = time.perf_counter() - start
    return {
        "file": str(source),
        "task": predictor.task,
        "frames": count,
        "fps": float(info.fps),
        "width": info.width,
        "height": info.height,
        "seconds": round(seconds, 3),
        "frames_per_second": round(count / seconds, 3) if seconds > 0 else None,
        "outputs": [str(target)],
    }


def predict_video_file(
    loaded: Any,
    source: str | Path,
    out_dir: str | Path | None,
    *,
    bgr: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    save_coco: str | Path | None = None,
    video_preset: str = DEFAULT_PRESET,
    **options: Any,
) -> dict[str, Any]:
    """``detseg predict VIDEO``: a ``Predictor`` of ``loaded`` (``options`` are its keyword
    arguments) over every frame; ``bgr`` is the plate image of BGMv2 models."""
    from detseg.data.images import read_image
    from detseg.predictor import Predictor

    if save_coco is not None:
        raise DetsegError("--save-coco is for image folders; a video has no COCO image ids.")
    if out_dir is None:
        raise DetsegError("predicting a video needs an output folder (--out).")
    # ``loaded`` runs as given, like the image paths: `detseg predict` passes the fast path (or the
    # reference with --exact, or an ONNX session), so the predictor must not transform it again
    predictor = Predictor(loaded, exact=True, batch_size=batch_size, **options)
    plate = read_image(bgr) if bgr is not None else None
    if predictor.needs_plate and plate is None:
        raise DetsegError(f"{loaded.name} needs the background plate of the video: pass --bgr.")
    return predict_video(
        predictor,
        source,
        out_dir,
        batch_size=batch_size,
        bgr=plate,
        progress=progress,
        video_preset=video_preset,
    )
