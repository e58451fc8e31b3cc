"""End to end vs model alone: images/s of ``detseg predict`` over a folder and ``detseg matte`` over
a video, beside the same fast model's images/s on images already in memory (at the same batch size).

Detection: FCOS R50-FPN (random weights, longest side 640) on the first ``N`` COCO128 images; the
model figure is ``detect([image])`` (pre-processing, network, decoding) on decoded images, the
pipeline ``predict_detection_files`` (JPEG decoding, drawing, JPEG writing, read-ahead and writer
threads). Matting: BGMv2 MobileNetV2 (HD, sampling 80,000 px) on an H.264 video made of the
bgm_pairs photos (0001, 0500 alternating) against the plate; model = ``matte_batch`` on decoded
frames in the pipeline's batches (``video_batch_size``: 1 on the CPU, 8 on a GPU; the maps com and
pha need, on the CPU), pipeline =
``matte_files`` writing the com and pha videos (decoding, compositing, two H.264 encoders).
"""

from __future__ import annotations

import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from detseg.api import fast_model, load_model
from detseg.data.images import list_images, read_image
from detseg.data.video import VideoWriter, read_frames
from detseg.detection.pipeline import detector_fn, predict_detection_files
from detseg.matting.bgmv2_infer import matte_batch, matte_files, video_batch_size

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rate(count: int, seconds: float) -> float:
    return count / seconds


def detection_row(device: torch.device, count: int, out: Path) -> tuple[str, float, float]:
    torch.manual_seed(0)
    loaded = fast_model(load_model("fcos_r50_fpn", device=device))
    paths = list_images(SHARED / "coco128" / "images")[:count]
    folder = out / "images"
    folder.mkdir()
    for p in paths:
        (folder / p.name).symlink_to(p)
    images = [read_image(p) for p in paths]
    detect = detector_fn(loaded, max_size=640)
    detect(images[:1])  # warm-up
    start = time.perf_counter()
    for image in images:
        detect([image])
    model = _rate(len(images), time.perf_counter() - start)
    start = time.perf_counter()
    predict_detection_files(loaded, folder, out / "pred", max_size=640, progress=False)
    pipeline = _rate(len(images), time.perf_counter() - start)
    return f"detect folder, fcos_r50_fpn, {len(images)} COCO128 images", model, pipeline


def matting_row(device: torch.device, count: int, out: Path) -> tuple[str, float, float]:
    pairs = SHARED / "bgm_pairs"
    frames = [read_image(pairs / f"{n}_img.png") for n in ("0001", "0500")]
    plate = read_image(pairs / "0001_back.png")
    video = out / "pairs.mp4"
    with VideoWriter(video, Fraction(25)) as writer:
        for i in range(count):
            writer.write(frames[i % 2])
    torch.manual_seed(0)  # random weights: the refined cells follow them, so fix them
    loaded = fast_model(load_model("bgmv2_mobilenetv2", device=device))
    decoded = list(read_frames(video))
    batch = video_batch_size(device)
    matte_batch(loaded.model, decoded[:batch], plate, outputs=("com", "pha"))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(decoded), batch):  # the pipeline's batches and outputs
        matte_batch(loaded.model, decoded[i : i + batch], plate, outputs=("com", "pha"))
    model = _rate(len(decoded), time.perf_counter() - start)
    start = time.perf_counter()
    matte_files(loaded.model, video, pairs / "0001_back.png", out / "matte", ("com", "pha"))
    pipeline = _rate(len(decoded), time.perf_counter() - start)
    return f"matte video, bgmv2_mobilenetv2, {count} HD frames", model, pipeline


def main(device: torch.device, quick: bool = False) -> None:
    count = 8 if quick else 48  # images, frames (6 batches of the video)
    print("| pipeline | model images/s | pipeline images/s | pipeline / model |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate((detection_row, matting_row)):
            out = Path(tmp) / str(i)
            out.mkdir()
            label, model, pipeline = row(device, count, out)
            print(
                f"| {label} | {model:.2f} | {pipeline:.2f} | {pipeline / model:.2f} |", flush=True
            )
