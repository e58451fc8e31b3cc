"""The Python API; the CLI calls one function here per command.

```python
import detseg
m = detseg.load_model("espnet", weights="espnet_p_2_q_8_camvid.pth")   # official file, detected
results = detseg.predict(m, "street.png", out_dir="out/")
metrics = detseg.evaluate("semantic", model=m, data="camvid/", split="val")
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detseg.checkpoint import CheckpointMeta, load_state_dict_strict, read_state_dict
from detseg.data.preprocess import Preprocess
from detseg.engine.device import resolve_device
from detseg.errors import CheckpointError, DetsegError
from detseg.registry import ModelEntry, get_entry, list_models


@dataclass
class LoadedModel:
    """A built network in eval mode with everything needed to run it on images.

    Attributes:
        name: registry name; task: its task.
        model: the ``nn.Module`` (on ``device``, eval mode).
        kwargs: constructor keyword arguments (what our checkpoints record).
        preprocess: input normalisation the weights expect.
        class_names: names indexed by class id (may be empty).
        weights: the file the weights came from, or None for random initialisation.
        official: True when ``weights`` was an authors' release file.
        runtime: "torch", or "onnx" when the forward is an exported graph (``load_onnx``).
    """

    name: str
    task: str
    model: nn.Module
    kwargs: dict[str, Any]
    preprocess: Preprocess
    class_names: tuple[str, ...] = ()
    weights: str | None = None
    official: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    runtime: str = "torch"

    def checkpoint_meta(self) -> CheckpointMeta:
        return CheckpointMeta(
            model=self.name,
            kwargs=dict(self.kwargs),
            preprocess=self.preprocess.to_dict(),
            class_names=list(self.class_names),
        )


def _build(entry: ModelEntry, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return entry.build(**kwargs)
    except TypeError as exc:
        raise DetsegError(f"model {entry.name!r}: bad constructor arguments ({exc}).") from exc


def _convert_official(
    entry: ModelEntry, state: dict[str, torch.Tensor], weights: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if entry.official is None:
        raise CheckpointError(
            f"{weights}: not a detseg checkpoint, and {entry.name!r} has no official weights "
            "format; pass a checkpoint saved by `detseg train`."
        )
    try:
        return entry.official.convert(state)
    except CheckpointError as exc:
        if weights in str(exc):
            raise
        raise CheckpointError(f"{weights}: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(
            f"{weights}: does not look like an official {entry.name!r} checkpoint "
            f"({entry.official.description}): {type(exc).__name__}: {exc}"
        ) from exc


def load_model(
    name: str | None = None,
    weights: str | Path | None = None,
    device: str | torch.device = "auto",
    **kwargs: Any,
) -> LoadedModel:
    """Build a registered model and load weights: ours (safetensors) or the authors' file.

    Args:
        name: registry name; may be omitted when ``weights`` is one of our checkpoints.
        weights: our ``.safetensors`` checkpoint, an official release file (format detected, keys
            mapped, loaded strictly), or None for random initialisation.
        device: "auto" (CUDA if present), "cpu" or "cuda".
        kwargs: constructor arguments (override those a checkpoint records).

    Raises:
        DetsegError: unknown model, checkpoint of another model, unsafe or corrupt file.
    """
    weights_str = str(weights) if weights is not None else None
    state, meta = read_state_dict(weights) if weights is not None else (None, None)
    official = state is not None and meta is None
    preprocess_dict: dict[str, Any] | None = None
    class_names: tuple[str, ...] = ()
    if meta is not None:
        if name and name != meta.model:
            raise CheckpointError(
                f"{weights_str}: is a checkpoint of model {meta.model!r}, not {name!r}; "
                "pass the matching --model (or omit it)."
            )
        entry = get_entry(meta.model)
        build_kwargs = {**meta.kwargs, **kwargs}
        preprocess_dict, class_names = meta.preprocess, tuple(meta.class_names)
    else:
        if not name:
            raise DetsegError("--model is required unless --weights is a detseg checkpoint.")
        entry = get_entry(name)
        build_kwargs = dict(kwargs)
        if state is not None:
            official_kwargs, state = _convert_official(entry, state, weights_str or "")
            build_kwargs = {**official_kwargs, **kwargs}
            if entry.official is not None and entry.official.preprocess is not None:
                preprocess_dict = entry.official.preprocess(build_kwargs)
            class_names = tuple(build_kwargs.pop("class_names", ()) or ())
    model = _build(entry, build_kwargs)
    if state is not None:
        load_state_dict_strict(model, state, weights_str or "", entry.name)
    dev = resolve_device(device)
    model.to(dev).eval()
    preprocess = (
        Preprocess.from_dict(preprocess_dict)
        if preprocess_dict
        else getattr(model, "default_preprocess", Preprocess())
    )
    if not class_names:
        class_names = tuple(getattr(model, "class_names", ()) or ())
    return LoadedModel(
        entry.name,
        entry.task,
        model,
        build_kwargs,
        preprocess,
        class_names,
        weights_str,
        official,
        dev,
    )


def fast_model(model: LoadedModel, exact: bool = False, precision: str = "f32") -> LoadedModel:
    """``model`` on its fast inference path at ``precision`` (``"f32"``, ``"bf16"``, ``"fp16"``
    on CUDA), or unchanged with ``exact`` (the reference path); see ``detseg.engine.fast``."""
    from detseg.engine.fast import for_inference

    return for_inference(model, exact, precision)


def _complexity(entry: ModelEntry) -> tuple[int | None, float | None]:
    """Parameters and GFLOPs at 512x512 of the default build, counted on the meta device.

    A builder that cannot run on meta tensors is built on the CPU for its parameters only; a
    forward pass that cannot run on meta tensors (data-dependent shapes) has no FLOPs (None).
    """
    from detseg.engine.complexity import count_flops, count_parameters

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = entry.build()
        except Exception:  # a builder that cannot run on meta tensors, or needs arguments
            continue
        try:
            gflops = count_flops(model, 512, 512) / 1e9 if device == "meta" else None
        except Exception:  # e.g. nonzero() or NMS: output sizes that depend on the values
            gflops = None
        return count_parameters(model), gflops
    return None, None


def models_table(task: str | None = None) -> list[dict[str, Any]]:
    """One row per registered model: name, task, params, GFLOPs at 512x512, official, summary."""
    rows = []
    for entry in list_models(task):
        params, gflops = _complexity(entry)
        rows.append(
            {
                "name": entry.name,
                "task": entry.task,
                "params": params,
                "gflops_512": gflops,
                "official": entry.official.description if entry.official else None,
                "summary": entry.summary,
            }
        )
    return rows


def predict(
    model: LoadedModel, source: str | Path, out_dir: str | Path | None = None, **options: Any
) -> list[dict[str, Any]]:
    """Run ``model`` on a file, folder or glob; write pictures to ``out_dir``; return summaries.

    A video file (``detseg.data.video.VIDEO_SUFFIXES``) of any task becomes an annotated video
    (``detseg.engine.video.predict_video_file``; ``bgr=PLATE`` for BGMv2, ``video_preset`` its
    x264 preset).
    """
    from detseg.data.video import is_video

    _check_video_preset(source, options.get("video_preset"))
    if is_video(source):
        from detseg.engine.video import predict_video_file

        return [predict_video_file(model, source, out_dir, **options)]
    if model.task == "semantic":
        from detseg.semantic.pipeline import predict_files

        return predict_files(model, source, out_dir, **options)
    if model.task == "detection":
        from detseg.detection.pipeline import predict_detection_files

        return predict_detection_files(model, source, out_dir, **options)
    if model.task == "instance":
        from detseg.instance.pipeline import predict_instance_files

        return predict_instance_files(model, source, out_dir, **options)
    raise DetsegError(f"`detseg predict` does not support task {model.task!r} yet.")


def predict_ray(
    model: LoadedModel, source: str | Path, out_dir: str | Path, **options: Any
) -> dict[str, Any]:
    """Batch prediction on a Ray cluster into ``out_dir/results/*.parquet`` (resumable); the
    options of ``detseg.engine.batch.predict_on_ray``. Returns the run's counts."""
    from detseg.engine.batch import predict_on_ray

    return predict_on_ray(model, source, out_dir, **options)


def evaluate(task: str, **options: Any) -> dict[str, Any]:
    """Score a model on a dataset split, or saved predictions against labels."""
    if task == "semantic":
        from detseg.semantic.pipeline import evaluate_semantic

        return evaluate_semantic(**options)
    if task == "matting":
        return _evaluate_matting(**options)
    if task == "detection":
        from detseg.detection.pipeline import evaluate_detection

        return evaluate_detection(**options)
    if task == "instance":
        from detseg.instance.pipeline import evaluate_instance

        return evaluate_instance(**options)
    raise DetsegError(f"`detseg eval` does not support task {task!r} yet.")


def _evaluate_matting(
    *,
    data: str | Path | None,
    model: str | None,
    weights: str | Path | None,
    pred_dir: str | Path | None,
    alpha_dir: str | Path | None,
    trimap_dir: str | Path | None,
    convention: str = "gfm",
    device: str = "auto",
    precision: str = "f32",
) -> dict[str, Any]:
    """Matting metrics of saved alphas (``pred_dir`` vs ``alpha_dir``) or of a model run on ``data``
    (``precision`` "f32": the reference path; "bf16": the fast path in bfloat16)."""
    if model is not None:
        if data is None or pred_dir is None:
            raise DetsegError(
                "--model needs --data DIR (with input/ and alpha/) and --pred OUT_DIR."
            )
        from detseg.matting.gfm_infer import evaluate_matting_model

        return evaluate_matting_model(
            data,
            pred_dir,
            model,
            weights,
            convention=convention,
            device=device,
            precision=precision,
        )
    if pred_dir is None or alpha_dir is None:
        raise DetsegError("pass --pred PRED_DIR and --alpha GT_DIR (or --model with --data).")
    from detseg.matting.metrics import evaluate_folder

    return evaluate_folder(pred_dir, alpha_dir, trimap_dir, convention)


def train(task: str, **options: Any) -> dict[str, Any]:
    """Train a model of ``task``; returns the run's summary (paths, first/last/best metrics).

    Under ``torchrun`` every process calls this; they train one model data-parallel (see
    ``detseg.engine.distributed``) and rank 0 writes the files.
    """
    from detseg.engine.distributed import distributed_session

    with distributed_session(str(options.get("device", "auto"))):
        return _train_task(task, **options)


def _train_task(task: str, **options: Any) -> dict[str, Any]:
    if task == "semantic":
        from detseg.semantic.pipeline import train_semantic

        return train_semantic(**options)
    if task in ("detection", "instance"):
        from detseg.detection.pipeline import train_detection

        return train_detection(**options)
    if task == "matting":
        return _train_matting(**options)
    raise DetsegError(f"`detseg train` does not support task {task!r} yet.")


def demo(out_dir: str | Path = "detseg-demo", **options: Any) -> dict[str, Any]:
    """Train, evaluate and draw a small model on built-in synthetic data (about two minutes)."""
    from detseg.semantic.demo import run_demo

    return run_demo(out_dir, **options)


def matte(
    source: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    weights: str | Path | None = None,
    bgr: str | Path | None = None,
    method: str = "model",
    trimap: str | Path | None = None,
    outputs: list[str] | None = None,
    background: str | None = None,
    resize_bgr: bool = False,
    strategy: str = "hybrid",
    device: str = "auto",
    progress: bool = True,
    exact: bool = False,
    precision: str = "f32",
    video_preset: str | None = None,
) -> list[Path]:
    """Alpha mattes for images (and videos, with a background plate; ``video_preset``: the x264
    preset of the written videos, default veryfast).

    ``bgmv2_*`` models take the clean plate ``bgr``; ``gfm_*`` models are trimap-free;
    ``method="closed-form"|"knn"`` runs the classical pymatting baselines with a ``trimap``.
    Models run their fast path at ``precision`` unless ``exact`` (``fast_model``).
    """
    _check_video_preset(source, video_preset)
    if method != "model":
        from detseg.matting.gfm_infer import matte_images

        return matte_images(
            source,
            out_dir,
            method=method,
            trimap=trimap,
            device=device,
            precision=precision,
            progress=progress,
        )
    if model is None:
        raise DetsegError("pass --model (e.g. bgmv2_mobilenetv2, gfm_r34) or --method closed-form.")
    if get_entry(model).task != "matting":
        raise DetsegError(f"{model!r} is a {get_entry(model).task} model, not a matting model.")
    if model.startswith("bgmv2"):
        if bgr is None:
            raise DetsegError(f"{model} needs the clean background plate: pass --bgr PLATE.")
        from detseg.data.video import DEFAULT_PRESET
        from detseg.matting.bgmv2_infer import matte as bgmv2_matte

        return bgmv2_matte(
            model,
            source,
            bgr,
            out_dir,
            weights=weights,
            outputs=outputs,
            background=background,
            resize_bgr=resize_bgr,
            device=device,
            progress=progress,
            exact=exact,
            precision=precision,
            video_preset=video_preset or DEFAULT_PRESET,
        )
    from detseg.matting.gfm_infer import matte_images

    return matte_images(
        source,
        out_dir,
        model=model,
        weights=weights,
        strategy=strategy,
        device=device,
        exact=exact,
        precision=precision,
        progress=progress,
    )


def _check_video_preset(source: str | Path, preset: str | None) -> None:
    """``--video-preset`` is for video sources (an image source writes no video); checked before
    any work starts (``VideoWriter`` checks it again)."""
    from detseg.data.video import check_preset, is_video

    if preset is None:
        return
    if not is_video(source):
        raise DetsegError(f"--video-preset is for video sources; {source} is not a video.")
    check_preset(preset)


def export(
    model: str,
    path: str | Path,
    *,
    weights: str | Path | None = None,
    height: int = 512,
    width: int = 512,
    opset: int = 17,
    check: bool = True,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` as its export spec says (``detseg.engine.export``).

    The file records the model name, constructor arguments, normalisation and class names, so
    ``detseg predict --runtime onnx --onnx PATH`` can run it. Returns the export summary with
    the max abs difference of onnxruntime vs torch per output (``check``).
    """
    from detseg.engine.export import export_loaded, model_metadata
    from detseg.instance.maskrcnn import MaskRCNN

    loaded = load_model(model, weights, device="cpu", **model_kwargs)
    if isinstance(loaded.model, MaskRCNN):  # two graphs: dense stage and RoI heads
        from detseg.instance.rcnn_export import export_rcnn

        return export_rcnn(loaded.model, path, height, width, check, model_metadata(loaded))
    return export_loaded(loaded, path, height, width, opset, check)


def load_onnx(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A model whose forward is an exported ONNX file (``detseg.engine.onnx_runtime``)."""
    from detseg.engine.onnx_runtime import load_onnx as load

    return load(path, device)


def onnx_model(model: LoadedModel, device: str | torch.device = "cpu") -> LoadedModel:
    """``model`` run by onnxruntime on its graph, exported once into the cache folder
    (``detseg.engine.onnx_cache``; ``detseg predict --runtime onnx`` without ``--onnx``)."""
    from detseg.engine.onnx_cache import onnx_model as cached

    return cached(model, device)


def coco_eval(
    gt: str | Path, results: str | Path, iou_type: str = "bbox", plot: str | Path | None = None
) -> Any:
    """COCO evaluation of a results file (``CocoEvaluation``: ``stats``, ``per_class()``, ``table()``)."""
    from detseg.detection.coco_eval import run_coco_eval

    evaluation = run_coco_eval(gt, results, iou_type)  # type: ignore[arg-type]  # checks it
    if plot is not None:
        evaluation.plot_pr(plot)
    return evaluation


def convert(
    src: str | Path, dst: str | Path, to: str, class_name: str = "object"
) -> dict[str, Any]:
    """Convert annotations (COCO / VIA / YOLO) to ``to`` = "coco" or "yolo"; returns counts."""
    from detseg.data.convert import convert as convert_set

    if to not in ("coco", "yolo"):
        raise DetsegError(f"--to {to!r}: use coco or yolo.")
    written = convert_set(src, dst, to=to, class_name=class_name)  # type: ignore[arg-type]
    return {
        "images": len(written.images),
        "annotations": sum(len(i.annotations) for i in written.images),
        "to": to,
        "dst": str(dst),
    }


def _train_matting(
    *, model: str, backgrounds: str | Path, val_limit: int | None = None, **options: Any
) -> dict[str, Any]:
    """BackgroundMattingV2 (base stage, or refine stage from a base ``weights``) or GFM training."""
    if model.startswith("gfm"):
        from detseg.matting.gfm_train import train_gfm

        return train_gfm(model=model, backgrounds=backgrounds, val_limit=val_limit, **options)
    if not model.startswith("bgmv2"):
        raise DetsegError(
            f"`detseg train --task matting` trains bgmv2_* and gfm_* models, not {model!r}."
        )
    from detseg.matting.bgmv2_training import train_bgmv2

    return train_bgmv2(model=model, backgrounds=backgrounds, val_limit=val_limit, **options)
