"""The ``detseg`` command line: parses arguments, calls ``detseg.api``, prints. Nothing else.

User errors (``DetsegError``) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from detseg import api
from detseg.engine.distributed import is_main_process
from detseg.engine.trainer import TrainingInterrupted
from detseg.errors import DetsegError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="detseg: detection, segmentation and matting in practice.",
)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])

DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto (CUDA when present).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout.")
ExactOpt = typer.Option(False, "--exact", help="Run the reference path (eager NCHW float32).")
PrecisionOpt = typer.Option("f32", "--precision", help="f32, bf16 (CPU/GPU) or fp16 (GPU).")
VideoPresetOpt = typer.Option(
    None,
    "--video-preset",
    help="x264 preset of written videos: veryfast (default); ultrafast encodes ~2x faster, "
    "~3x larger files; medium ... veryslow: smaller, slower.",
)


def fail(message: str, code: int = 2) -> None:
    """Print ``detseg: error: message`` (one line) on stderr and exit with ``code``."""
    print(f"detseg: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn DetsegError into one stderr line + exit 2, Ctrl-C in training into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TrainingInterrupted as exc:
            fail(str(exc), 130)
        except DetsegError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().replace("x", " ").split()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise DetsegError(f"--crop {text!r}: expected a size like 256 or 256x320 (HxW).")
    return parts[0], parts[1]


def _parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["base_channels=16", "backbone=resnet18"]`` -> kwargs (values parsed as JSON when they can be)."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise DetsegError(f"--model-arg {item!r}: expected NAME=VALUE, e.g. base_channels=16.")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def _metrics_table(metrics: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    table.add_column("acc %", justify="right")
    for name, iou in metrics["per_class_IoU"].items():
        acc = metrics["per_class_acc"].get(name)
        table.add_row(
            name, "-" if iou is None else f"{iou:.2f}", "-" if acc is None else f"{acc:.2f}"
        )
    table.add_section()
    table.add_row("mean", f"{metrics['mIoU']:.2f}", f"{metrics['mean_class_acc']:.2f}")
    return table


@app.command("models")
@user_errors
def models_cmd(
    task: str = typer.Option(None, help="Only models of this task."),
    wide: bool = typer.Option(False, "--wide", help="Also the official-weights format; wrap."),
    as_json: bool = JsonOpt,
) -> None:
    """List the registered models: task, parameters, GFLOPs at 512x512, official weights."""
    rows = api.models_table(task)
    if as_json:
        _emit_json({"models": rows})
        return
    console.print(_models_table(rows, wide, console.width))


def _models_table(rows: list[dict[str, Any]], wide: bool, width: int) -> Table:
    """One line per model that fits ``width`` (summary cut, or left out below 24 characters of
    room); ``wide``: the official-weights format and the summary in full, wrapped."""
    cells = [
        [
            r["name"],
            r["task"],
            "-" if r["params"] is None else f"{r['params'] / 1e6:.2f} M",
            "-" if r["gflops_512"] is None else f"{r['gflops_512']:.1f}",
            (r["official"] or "-") if wide else ("yes" if r["official"] else "-"),
        ]
        for r in rows
    ]
    heads = ["name", "task", "params", "GFLOPs", "official weights" if wide else "official"]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(heads)]
    room = width - sum(widths) - 3 * len(heads) - 4  # 3 per column and 4 at the edges
    table = Table(title="detseg models", caption="GFLOPs: one 512x512 image, eval mode")
    for i, head in enumerate(heads):
        fixed = wide and i == 4
        table.add_column(
            head,
            justify="right" if head in ("params", "GFLOPs") else "left",
            no_wrap=not fixed,
            min_width=None if fixed else widths[i],
            ratio=1 if fixed else None,
            overflow="fold" if fixed else "ellipsis",
        )
    summary = wide or room >= 24
    if summary:
        table.add_column(
            "summary",
            ratio=2 if wide else None,
            no_wrap=not wide,
            overflow="fold" if wide else "ellipsis",
            max_width=None if wide else room,
        )
    for c, r in zip(cells, rows, strict=True):
        table.add_row(*c, *([r["summary"]] if summary else []))
    return table


@app.command("train")
@user_errors
def train_cmd(
    task: str = typer.Option("semantic", help="semantic, detection or matting."),
    model: str = typer.Option(..., help="Registered model name (see `detseg models`)."),
    data: Path = typer.Option(
        ..., help="Dataset: CamVid/VOC folder, COCO/VIA/YOLO, matting folder."
    ),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder."),
    split: str = typer.Option("train"),
    val_split: str = typer.Option("val"),
    steps: int = typer.Option(1000, min=1),
    batch_size: int = typer.Option(4, min=1),
    lr: float = typer.Option(1e-3),
    optimizer: str = typer.Option("adamw", help="adamw or sgd."),
    eval_every: int = typer.Option(200, min=0),
    val_limit: int = typer.Option(None, min=1),
    crop: str = typer.Option("256x256", help="semantic: training crop HxW."),
    num_classes: int = typer.Option(None, min=1, help="semantic: classes."),
    ignore_index: int = typer.Option(None, help="semantic: void label."),
    class_weights: str = typer.Option(None, help="semantic: 'enet' for 1/ln(1.02+p) weights."),
    dice: float = typer.Option(0.0, help="semantic: weight of an added Dice loss."),
    max_size: int = typer.Option(512, help="detection: longest image side."),
    class_name: str = typer.Option("object", help="detection: class of single-class VIA data."),
    backgrounds: Path = typer.Option(None, help="matting: folder of background images."),
    size: int = typer.Option(512, help="matting: training crop size."),
    weights: Path = typer.Option(None, help="Initial weights (ours or official)."),
    imagenet: Path = typer.Option(None, help="semantic: torchvision ImageNet file, encoder."),
    model_arg: list[str] = typer.Option(None, help="Constructor argument NAME=VALUE (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out exactly."),
    device: str = DeviceOpt,
    seed: int = typer.Option(0),
    workers: int = typer.Option(0, min=0),
    grad_accum: int = typer.Option(1, min=1, help="Micro-steps per optimizer step."),
    sync_bn: bool = typer.Option(False, help="Under torchrun on GPUs: SyncBatchNorm."),
    as_json: bool = JsonOpt,
) -> None:
    """Train a model; writes best/last checkpoints, history.json and curves.png to --out.

    --batch-size is the global batch of one optimizer step. Data-parallel on N GPUs or processes:
    `torchrun --nproc-per-node N -m detseg train ...` (docs/scale.md).
    """
    common = dict(
        model=model,
        data=data,
        out_dir=out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        val_limit=val_limit,
        resume=resume,
        device=device,
        seed=seed,
        num_workers=workers,
        progress=not as_json,
        weights=str(weights) if weights else None,
        grad_accum=grad_accum,
        sync_bn=sync_bn,
    )
    if task == "semantic":
        extra = dict(
            split=split,
            val_split=val_split or None,
            optimizer=optimizer,
            crop=_parse_size(crop),
            num_classes=num_classes,
            ignore_index=ignore_index,
            class_weights=class_weights,
            dice_weight=dice,
            imagenet=imagenet,
            model_kwargs=_parse_model_args(model_arg),
        )
    elif task in ("detection", "instance"):
        extra = dict(
            split=split,
            val_split=val_split or None,
            optimizer=optimizer,
            max_size=max_size,
            class_name=class_name,
            model_kwargs=_parse_model_args(model_arg),
        )
    elif task == "matting":
        if backgrounds is None:
            raise DetsegError("--task matting needs --backgrounds DIR (images to composite over).")
        extra = dict(backgrounds=backgrounds, size=size)
    else:
        raise DetsegError(f"--task {task!r}: use semantic, detection, instance or matting.")
    summary = api.train(task, **common, **extra)
    if not is_main_process():
        return
    if as_json:
        _emit_json(summary)
    else:
        console.print(summary)


@app.command("eval")
@user_errors
def eval_cmd(
    task: str = typer.Option("semantic", help="semantic, detection or matting."),
    data: Path = typer.Option(None, help="Dataset folder."),
    split: str = typer.Option("val"),
    model: str = typer.Option(None, help="Model to run on the data."),
    weights: Path = typer.Option(None, help="Our checkpoint or an official file."),
    pred: Path = typer.Option(None, help="Folder of saved predictions to score instead."),
    alpha: Path = typer.Option(None, help="Matting: folder of ground-truth alphas."),
    trimap: Path = typer.Option(None, help="Matting: folder of trimaps (region SADs)."),
    convention: str = typer.Option(
        None, help="semantic: standard (void ignored) | authors; matting: gfm | dim."
    ),
    num_classes: int = typer.Option(None, min=1),
    ignore_index: int = typer.Option(None),
    sliding: bool = typer.Option(False, help="Sliding-window inference."),
    crop: int = typer.Option(512),
    stride: int = typer.Option(None),
    limit: int = typer.Option(None, min=1, help="Only the first N images."),
    results: Path = typer.Option(None, help="detection: a COCO results JSON to score."),
    iou_type: str = typer.Option(
        "bbox", help="detection: bbox, segm or boundary (Boundary AP of mask results)."
    ),
    class_name: str = typer.Option("object", help="detection: class of single-class VIA data."),
    precision: str = typer.Option(
        "f32", help="f32: the reference path; bf16 / fp16: the fast path at that precision."
    ),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Score a model on a dataset, or saved predictions against ground truth."""
    if precision != "f32" and model is None and weights is None:
        raise DetsegError(
            f"--precision {precision} runs a model (--model / --weights); saved predictions are "
            "scored as they are."
        )
    if task in ("detection", "instance"):
        if data is None:
            raise DetsegError("--data is required (COCO JSON, VIA or YOLO folder).")
        loaded = api.load_model(model, weights, device) if (model or weights) else None
        if loaded is not None and precision != "f32":
            loaded = api.fast_model(loaded, precision=precision)
        if task == "instance" and loaded is None:
            raise DetsegError("--task instance needs --model and/or --weights.")
        metrics = api.evaluate(
            task,
            data=data,
            split=split,
            model=loaded,
            results_json=results,
            iou_type=iou_type,
            limit=limit,
            class_name=class_name,
            progress=not as_json,
        )
        if as_json:
            _emit_json(metrics)
        else:
            console.print({k: metrics[k] for k in ("AP", "AP50", "AP75", "images") if k in metrics})
        return
    if task == "matting":
        metrics = api.evaluate(
            "matting",
            data=data,
            model=model,
            weights=weights,
            pred_dir=pred,
            alpha_dir=alpha,
            trimap_dir=trimap,
            convention=convention or "gfm",
            device=device,
            precision=precision,
        )
        if as_json:
            _emit_json(metrics)
        else:
            console.print({k: v for k, v in metrics.items() if k != "per_image"})
        return
    if data is None:
        raise DetsegError("--data is required (the dataset folder with the split's labels).")
    loaded = None
    if model is not None or weights is not None:
        loaded = api.load_model(model, weights, device)
        if precision != "f32":
            loaded = api.fast_model(loaded, precision=precision)
    elif pred is None:
        raise DetsegError("pass --model/--weights to run a model, or --pred to score saved labels.")
    convention = convention or "standard"
    metrics = api.evaluate(
        task,
        data=data,
        split=split,
        model=loaded,
        pred_dir=pred,
        convention=convention,
        num_classes=num_classes,
        ignore_index=ignore_index,
        limit=limit,
        progress=not as_json,
        sliding=sliding,
        crop=crop,
        stride=stride,
    )
    if as_json:
        _emit_json(metrics)
        return
    console.print(_metrics_table(metrics, f"{split}: {metrics['images']} images, {convention}"))
    console.print(f"mIoU {metrics['mIoU']:.2f}  pixel acc {metrics['pixel_acc']:.2f}")


def _check_runtime(runtime: str, onnx: Path | None, exact: bool, precision: str) -> None:
    """``predict``'s runtime options are consistent, else DetsegError (exit code 2)."""
    if runtime not in ("torch", "onnx"):
        raise DetsegError(f"--runtime {runtime!r}: use torch or onnx.")
    if onnx is not None and runtime != "onnx":
        raise DetsegError("--onnx FILE runs with --runtime onnx.")
    if runtime == "onnx" and (exact or precision != "f32"):
        raise DetsegError(
            "--runtime onnx runs the exported graph in float32; --exact and --precision are for "
            "--runtime torch."
        )


@app.command("predict")
@user_errors
def predict_cmd(
    source: str = typer.Argument(
        ...,
        help="Image file, folder, glob or video; --backend ray also takes a .txt or .parquet list.",
    ),
    task: str = typer.Option(None, help="Optional check: the model's task must be this one."),
    model: str = typer.Option(None, help="Registered model name."),
    weights: Path = typer.Option(None, help="Our checkpoint or an official file."),
    out: Path = typer.Option(Path("detseg-out"), "--out", "-o", help="Output folder."),
    sliding: bool = typer.Option(False, help="Sliding-window inference (any image size)."),
    crop: int = typer.Option(512),
    stride: int = typer.Option(None),
    batch_size: int = typer.Option(4, min=1, help="Windows / slices per forward pass."),
    score_threshold: float = typer.Option(0.3, help="detection: drawn and listed above this."),
    slice_size: int = typer.Option(None, "--slice", help="detection/instance: slice tile."),
    overlap: float = typer.Option(0.2, help="detection: slice overlap ratio."),
    merge: str = typer.Option("nms", help="detection: nms or nmm (greedy merging)."),
    match: str = typer.Option("iou", help="detection: iou or ios match metric."),
    full_image: bool = typer.Option(False, help="detection: add a whole-image pass to slices."),
    save_coco: Path = typer.Option(None, help="detection/instance: COCO results JSON."),
    exact: bool = ExactOpt,
    precision: str = PrecisionOpt,
    runtime: str = typer.Option(
        "torch",
        help="torch, or onnx: onnxruntime on the --onnx file, else on the model's graph "
        "exported once into the cache (docs/export.md).",
    ),
    onnx: Path = typer.Option(None, help="An ONNX file written by `detseg export`."),
    bgr: Path = typer.Option(None, help="BGMv2 video: the clean background plate."),
    video_preset: str = VideoPresetOpt,
    max_size: int = typer.Option(None, min=32, help="detection/instance: longest input side."),
    backend: str = typer.Option("local", help="local (this process) or ray (Ray Data)."),
    address: str = typer.Option(None, help="ray: cluster to join ('auto'); none starts one."),
    actors: int = typer.Option(None, min=1, help="ray: model copies (default: GPUs or CPUs)."),
    num_cpus: int = typer.Option(None, min=1, help="ray: CPUs of a local cluster."),
    rows_per_batch: int = typer.Option(8, min=1, help="ray: images per actor call."),
    pictures: bool = typer.Option(False, help="ray: also draw results into --out/pictures."),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Predict: overlays + label PNGs (semantic), boxes drawn with scores (detection); a video
    gives an annotated video (every task).

    --backend ray writes Parquet rows to --out/results instead (docs/scale.md); a rerun skips
    the inputs already there.
    """
    if backend not in ("local", "ray"):
        raise DetsegError(f"--backend {backend!r}: use local or ray.")
    if backend == "ray" and (save_coco is not None or runtime == "onnx" or video_preset):
        raise DetsegError(
            "--save-coco, --runtime onnx and --video-preset are for --backend local; Ray writes "
            "Parquet rows."
        )
    _check_runtime(runtime, onnx, exact, precision)
    if onnx is not None:
        loaded = api.load_onnx(onnx, device)
    elif runtime == "onnx":
        loaded = api.onnx_model(api.load_model(model, weights, "cpu"), device)
    elif backend == "ray":  # shipped to the actors, whose predictors take the fast path
        loaded = api.load_model(model, weights, "cpu")
    else:
        loaded = api.fast_model(api.load_model(model, weights, device), exact, precision)
    if task is not None and task != loaded.task:
        raise DetsegError(f"--task {task}: model {loaded.name!r} is a {loaded.task} model.")
    if weights is None and onnx is None and not as_json:
        console.print("[yellow]no --weights given: the model has random weights[/yellow]")
    if loaded.task in ("detection", "instance"):
        options = dict(
            score_threshold=score_threshold,
            slice=slice_size,
            overlap=overlap,
            merge=merge,
            match=match,
            full_image=full_image,
            batch_size=batch_size,
            **({"max_size": max_size} if max_size else {}),
        )
    else:
        options = dict(sliding=sliding, crop=crop, stride=stride, batch_size=batch_size)
    if backend == "ray":
        summary = api.predict_ray(
            loaded,
            source,
            out,
            address=address,
            actors=actors,
            num_cpus=num_cpus,
            rows_per_batch=rows_per_batch,
            pictures=pictures,
            device=device,
            progress=not as_json,
            exact=exact,
            precision=precision,
            **options,
        )
        if as_json:
            _emit_json(summary)
        else:
            console.print(summary)
        return
    if loaded.task in ("detection", "instance"):
        options["save_coco"] = save_coco
    if bgr is not None:
        options["bgr"] = bgr
    if video_preset is not None:
        options["video_preset"] = video_preset
    records = api.predict(loaded, source, out, progress=not as_json, **options)
    if as_json:
        _emit_json({"model": loaded.name, "images": records})
    else:
        console.print(f"predicted {len(records)} images into {out}")


@app.command("demo")
@user_errors
def demo_cmd(
    out: Path = typer.Option(Path("detseg-demo"), "--out", "-o"),
    steps: int = typer.Option(None, min=1, help="Training steps (default: ~2 min)."),
    as_json: bool = JsonOpt,
) -> None:
    """Make a synthetic dataset, train a small U-Net on it, evaluate, draw overlays and plots."""
    summary = api.demo(out, steps=steps, progress=not as_json)
    if as_json:
        _emit_json(summary)
    else:
        console.print(summary)


@app.command("matte")
@user_errors
def matte_cmd(
    source: str = typer.Argument(..., help="Image, folder, glob or video."),
    model: str = typer.Option(None, help="bgmv2_* (needs --bgr) or gfm_* model."),
    weights: Path = typer.Option(None, help="Our checkpoint or an official file."),
    bgr: Path = typer.Option(None, help="Clean background plate (BackgroundMattingV2)."),
    out: Path = typer.Option(Path("detseg-matte"), "--out", "-o", help="Output folder."),
    outputs: str = typer.Option(None, help="Comma list of com,pha,fgr,err,ref (BGMv2)."),
    background: str = typer.Option(None, help="Composite over #rrggbb, r,g,b or an image."),
    resize_bgr: bool = typer.Option(False, help="Resize the plate to the source."),
    method: str = typer.Option("model", help="model, closed-form or knn (with --trimap)."),
    trimap: Path = typer.Option(None, help="Trimap PNG or folder (classical methods)."),
    strategy: str = typer.Option("hybrid", help="GFM test strategy: hybrid or resize."),
    video_preset: str = VideoPresetOpt,
    exact: bool = ExactOpt,
    precision: str = PrecisionOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Alpha matting: BackgroundMattingV2 with a plate, GFM trimap-free, or closed-form."""
    written = api.matte(
        source,
        out,
        model=model,
        weights=weights,
        bgr=bgr,
        method=method,
        trimap=trimap,
        outputs=outputs.split(",") if outputs else None,
        background=background,
        resize_bgr=resize_bgr,
        strategy=strategy,
        device=device,
        progress=not as_json,
        exact=exact,
        precision=precision,
        video_preset=video_preset,
    )
    if as_json:
        _emit_json({"written": [str(p) for p in written]})
    else:
        console.print(f"wrote {len(written)} files to {out}")


@app.command("export")
@user_errors
def export_cmd(
    model: str = typer.Option(..., help="Registered model name."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .onnx path."),
    weights: Path = typer.Option(None, help="Our checkpoint or an official file."),
    export_format: str = typer.Option("onnx", "--format", help="onnx."),
    height: int = typer.Option(512, min=8),
    width: int = typer.Option(512, min=8),
    as_json: bool = JsonOpt,
) -> None:
    """Export a network to ONNX and check onnxruntime against PyTorch."""
    if export_format != "onnx":
        raise DetsegError(f"--format {export_format!r}: only onnx is supported.")
    result = api.export(model, out, weights=weights, height=height, width=width)
    if as_json:
        _emit_json(result)
    else:
        console.print(result)


@app.command("serve")
@user_errors
def serve_cmd(
    model: list[str] = typer.Option(None, "--model", help="Model to serve (repeatable)."),
    weights: list[Path] = typer.Option(
        None, "--weights", help="One per --model, in order ('random': none)."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, min=0, max=65535),
    workers: int = typer.Option(1, min=1, help="Inference threads per model."),
    queue_size: int = typer.Option(8, min=0, help="Requests waiting per model before 503."),
    timeout: float = typer.Option(60.0, min=0.001, help="Seconds per request before 504."),
    max_body_mb: float = typer.Option(20.0, min=0.001, help="Largest request body (413)."),
    max_pixels: int = typer.Option(40_000_000, min=1, help="Largest image, w x h (422)."),
    score_threshold: float = typer.Option(0.3, help="detection: default score threshold."),
    device: str = DeviceOpt,
) -> None:
    """Serve models over HTTP (JSON API, web page at /); needs the serve extra."""
    from detseg.serve.limits import ServeLimits
    from detseg.serve.run import load_predictors, pair_weights, serve

    limits = ServeLimits(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        queue_size=queue_size,
        workers=workers,
        timeout_s=timeout,
    )
    pairs = pair_weights(model or [], weights or [])
    if not weights:
        console.print("[yellow]no --weights given: the models have random weights[/yellow]")
    predictors = load_predictors(pairs, device, score_threshold=score_threshold)
    console.print(f"serving {', '.join(predictors)} on http://{host}:{port}/")
    serve(predictors, host=host, port=port, limits=limits)


@app.command("coco-eval")
@user_errors
def coco_eval_cmd(
    gt: Path = typer.Argument(..., help="COCO ground-truth JSON."),
    results: Path = typer.Argument(..., help="COCO results JSON."),
    iou_type: str = typer.Option(
        "bbox", help="bbox, segm or boundary (Boundary AP of mask results)."
    ),
    plot: Path = typer.Option(None, help="Write precision-recall curves (PNG) here."),
    as_json: bool = JsonOpt,
) -> None:
    """COCO AP (12 stats, identical to pycocotools) and per-class AP."""
    evaluation = api.coco_eval(gt, results, iou_type, plot)
    if as_json:
        _emit_json(evaluation.to_dict())
    else:
        console.print(evaluation.table())


@app.command("convert")
@user_errors
def convert_cmd(
    src: Path = typer.Argument(..., help="COCO JSON, VIA JSON/folder or YOLO folder."),
    dst: Path = typer.Argument(..., help="Output JSON (coco) or folder (yolo)."),
    to: str = typer.Option(..., "--to", help="coco or yolo."),
    class_name: str = typer.Option("object", help="Class of single-class sources (VIA)."),
) -> None:
    """Convert detection / instance annotations between COCO, VIA and YOLO."""
    summary = api.convert(src, dst, to, class_name)
    console.print(summary)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
