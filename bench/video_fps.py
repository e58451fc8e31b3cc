"""Frames per second of ``detseg predict VIDEO`` for a semantic and a detection model.

    PYTHONPATH=. python bench/video_fps.py [--seconds 10] [--fps 30] [--batch-size 4]

Makes a ``--seconds`` long video at ``--fps`` from the 101 CamVid val frames (sequence 0016E5,
sorted, cycled; 480x360), then runs the command line on it, end to end (decode, inference, drawing,
H.264 encoding), for ESPNet with the authors' CamVid weights and FCOS MobileNetV2-FPN (random
weights: speed only). Prints one JSON line per model with the frames, the wall time and the
frames/s, the CPU seconds of the command (all its threads; on a shared machine frames per CPU
second says more than wall time) and the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

SHARED = Path(os.environ.get("DETSEG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
RUNS = Path("runs/video_fps")
MODELS = {
    "espnet": ["--weights", str(SHARED / "data/weights/espnet_p_2_q_8_camvid.pth")],
    "fcos_mnv2_fpn": [],
}


def make_video(path: Path, seconds: int, fps: int) -> None:
    """``seconds * fps`` CamVid frames (cycled in name order) as an H.264 video at ``fps``."""
    from detseg.data.images import list_images, read_image
    from detseg.data.video import VideoWriter

    files = sorted(list_images(SHARED / "data/camvid/val"), key=lambda p: p.name)
    with VideoWriter(path, Fraction(fps)) as writer:
        for i in range(seconds * fps):
            writer.write(read_image(files[i % len(files)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    video = RUNS / f"camvid_{args.seconds}s.mp4"
    if not video.exists():
        make_video(video, args.seconds, args.fps)
    for name in args.models.split(","):
        load = os.getloadavg()[0]
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "detseg", "predict", str(video), "--model", name]
        cmd += [*MODELS[name], "--batch-size", str(args.batch_size), "--device", "cpu"]
        cmd += ["-o", str(RUNS / name), "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        (record,) = json.loads(out)["images"]
        print(
            json.dumps(
                {
                    "model": name,
                    "frames": record["frames"],
                    "size": f"{record['width']}x{record['height']}",
                    "video_fps": record["fps"],
                    "loop_seconds": record["seconds"],
                    "frames_per_second": record["frames_per_second"],
                    "command_seconds": round(wall, 2),
                    "command_cpu_seconds": round(cpu_s, 2),
                    "frames_per_cpu_second": round(record["frames"] / cpu_s, 2),
                    "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
                    "load_before": round(load, 1),
                    "load_after": round(os.getloadavg()[0], 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
