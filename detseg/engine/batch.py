"""Batch prediction on Ray Data: many images over an actor pool, results as Parquet, resumable.

    detseg predict --backend ray images/ --weights best.safetensors -o out/            # local Ray
    detseg predict --backend ray paths.parquet --weights ... --address auto -o out/   # a cluster

The inputs (a folder, a glob, a text manifest of one path per line, or a Parquet file with a
``path`` column) minus those already in ``out/results`` become a Ray Dataset of paths. An actor
pool runs ``map_batches`` over it: each actor holds one copy of the model (sent once through the
object store, so worker nodes need no checkpoint file) and a ``detseg.predictor.Predictor``, the
same in-memory inference as ``detseg predict``; actors take a GPU each when the cluster has GPUs.
Each row is read, predicted and (with ``pictures``) drawn by its actor; a bad input becomes a row
with its ``error`` instead of failing the job. The driver writes every finished block as one
Parquet file, atomically, so a rerun (or a run after a crash) skips the rows already written.

Rows (``ROW_SCHEMA``): ``path``, ``error`` (None when fine), ``task``, ``width``, ``height``,
``num_detections`` (detection/instance), ``prediction`` (the JSON of ``Prediction.to_json()``:
detections with boxes, scores and RLE masks, or the semantic class fractions, or the matte's
foreground fraction), ``picture`` (the drawn file, or None).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detseg.data.images import list_images, read_image, write_image
from detseg.engine.device import resolve_device
from detseg.errors import DetsegError, InputFileError
from detseg.fileio import atomic_output

if TYPE_CHECKING:
    import pyarrow as pa

    from detseg.api import LoadedModel

MANIFEST_SUFFIXES = (".txt", ".lst")
RESULTS = "results"
PICTURES = "pictures"


def row_schema() -> pa.Schema:
    """The Arrow schema of every result row (fixed, so every part file reads as one table)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("error", pa.string()),
            ("task", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("num_detections", pa.int64()),
            ("prediction", pa.string()),
            ("picture", pa.string()),
        ]
    )


def read_inputs(source: str | Path) -> list[str]:
    """The image paths of ``source``: a folder or glob (``list_images``), a ``.txt``/``.lst``
    manifest (one path per line, ``#`` comments, relative to the manifest's folder) or a
    ``.parquet`` file with a ``path`` column (paths used as written)."""
    src = Path(source)
    if src.suffix.lower() == ".parquet" and src.is_file():
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(src)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputFileError(f"{src}: not a readable Parquet file ({exc}).") from exc
        if "path" not in table.column_names:
            raise InputFileError(
                f"{src}: no 'path' column (columns: {', '.join(table.column_names)})."
            )
        return [str(p) for p in table.column("path").to_pylist() if p]
    if src.suffix.lower() in MANIFEST_SUFFIXES and src.is_file():
        lines = (line.strip() for line in src.read_text(encoding="utf-8").splitlines())
        return [str(src.parent / line) for line in lines if line and not line.startswith("#")]
    return [str(p) for p in list_images(source)]


def finished_paths(out_dir: str | Path) -> set[str]:
    """Paths that already have a row (result or error) in ``out_dir/results``."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in sorted((Path(out_dir) / RESULTS).glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
    return done


def _picture_name(path: str, task: str) -> str:
    """``<stem>-<8 hex of the full path>.<ext>``: unique even when stems repeat across folders."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}.{'png' if task == 'matting' else 'jpg'}"


class PredictBatch:
    """Ray Data actor: one model, predicting batches of paths into result rows.

    Args:
        loaded_ref: ``[ObjectRef]`` of the driver's ``LoadedModel`` (on CPU).
        options: ``Predictor`` options (score threshold, slicing, max size, ...).
        device: where this actor runs the model ("auto": its GPU when Ray gave it one).
        pictures_dir: folder for the drawn results, or None for none.
    """

    def __init__(
        self,
        loaded_ref: list[Any],
        options: Mapping[str, Any],
        device: str,
        pictures_dir: str | None,
    ) -> None:
        import ray
        import torch

        from detseg.predictor import Predictor

        torch.set_num_threads(1)  # one core per actor: the pool, not the op, is the parallelism
        loaded: LoadedModel = ray.get(loaded_ref[0])
        loaded.device = resolve_device(device)
        loaded.model.to(loaded.device).eval()
        self.predictor = Predictor(loaded, **options)
        self.pictures_dir = Path(pictures_dir) if pictures_dir else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        """``batch``: a table with a ``path`` column -> one ``row_schema()`` row per path."""
        import pyarrow as pa

        rows = [self.row(str(path)) for path in batch.column("path").to_pylist()]
        return pa.Table.from_pylist(rows, schema=row_schema())

    def row(self, path: str) -> dict[str, Any]:
        """The result row of one image; a ``DetsegError`` (unreadable file, bad size, ...) becomes
        the row's ``error``."""
        task = self.predictor.task
        empty = {"width": None, "height": None, "num_detections": None, "picture": None}
        try:
            image = read_image(path)
            prediction = self.predictor(image)
            picture = None
            if self.pictures_dir is not None:
                target = self.pictures_dir / _picture_name(path, task)
                write_image(target, prediction.render(image))
                picture = str(target)
        except DetsegError as exc:
            return {"path": path, "error": str(exc), "task": task, "prediction": None, **empty}
        summary = prediction.to_json()
        detections = summary.get("detections")
        return {
            "path": path,
            "error": None,
            "task": task,
            "width": prediction.width,
            "height": prediction.height,
            "num_detections": None if detections is None else len(detections),
            "prediction": json.dumps(summary),
            "picture": picture,
        }


def _write_part(out_dir: Path, run_id: str, index: int, table: pa.Table) -> Path:
    import pyarrow.parquet as pq

    target = out_dir / RESULTS / f"part-{run_id}-{index:06d}.parquet"
    with atomic_output(target) as tmp:
        pq.write_table(table.cast(row_schema()), tmp)
    return target


def _start_ray(address: str | None, num_cpus: int | None, quiet: bool) -> tuple[Any, bool]:
    """(the ray module, whether this call connected it: then the caller shuts it down)."""
    try:
        import ray
    except ImportError as exc:
        raise DetsegError(
            "--backend ray needs Ray Data: pip install 'detseg[ray]' (or 'ray[data]')."
        ) from exc
    connect = not ray.is_initialized()
    if connect:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
        else:
            try:
                ray.init(address=address, log_to_driver=not quiet)
            except (ConnectionError, RuntimeError) as exc:
                raise DetsegError(
                    f"--address {address}: cannot join the Ray cluster ({exc}); start it with "
                    "`ray start --head` or drop --address for a local one."
                ) from exc
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    return ray, connect


def _pool(ray: Any, device: str, actors: int | None) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor): one GPU each when the cluster has GPUs and the
    device allows them, else one CPU each; ``actors`` defaults to the GPU or CPU count."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    if device.startswith("cuda") and gpus == 0:
        raise DetsegError(f"--device {device}: the Ray cluster has no GPUs; use --device auto.")
    default = gpus if gpus else max(int(resources.get("CPU", 1)), 1)
    size = actors or default
    return size, (1.0 if gpus else 0.0), 1.0


def predict_on_ray(
    loaded: LoadedModel,
    source: str | Path,
    out_dir: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    actors: int | None = None,
    rows_per_batch: int = 8,
    pictures: bool = False,
    device: str = "auto",
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Predict every input of ``source`` not yet in ``out_dir/results`` on a Ray actor pool.

    Args:
        loaded: the model, as ``detseg.api.load_model`` returns it (moved to CPU to ship).
        address: a running cluster ("auto" or "ray://host:10001"), or None to start a local one
            with ``num_cpus`` CPUs (None: all).
        actors: pool size (default: one per GPU, else one per CPU).
        rows_per_batch: images per ``map_batches`` call (and per result file).
        pictures: also draw each result into ``out_dir/pictures``.
        options: ``Predictor`` options.

    Returns:
        ``{"inputs", "skipped", "predicted", "errors", "results", "seconds", "actors"}``.
    """
    if loaded.name.startswith("bgmv2"):
        raise DetsegError(
            f"{loaded.name} needs background plates; --backend ray runs single images."
        )
    started = time.perf_counter()
    out = Path(out_dir)
    inputs = read_inputs(source)
    done = finished_paths(out)
    todo = [p for p in dict.fromkeys(inputs) if p not in done]
    summary: dict[str, Any] = {
        "inputs": len(inputs),
        "skipped": len(inputs) - len(todo),
        "predicted": 0,
        "errors": 0,
        "results": str(out / RESULTS),
    }
    if todo:
        ray, connected = _start_ray(address, num_cpus, quiet=not progress)
        try:
            summary.update(
                _run_pool(ray, loaded, todo, out, device, actors, rows_per_batch, pictures, options)
            )
        finally:
            if connected:
                ray.shutdown()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _run_pool(
    ray: Any,
    loaded: LoadedModel,
    todo: list[str],
    out: Path,
    device: str,
    actors: int | None,
    rows_per_batch: int,
    pictures: bool,
    options: Mapping[str, Any],
) -> dict[str, int]:
    """Predict ``todo`` on an actor pool, writing each finished block; the counts."""
    size, gpus, cpus = _pool(ray, device, actors)
    loaded.model.to("cpu")
    loaded.device = resolve_device("cpu")
    ds = ray.data.from_items([{"path": p} for p in todo]).map_batches(
        PredictBatch,
        batch_size=rows_per_batch,
        batch_format="pyarrow",
        concurrency=size,
        num_gpus=gpus,
        num_cpus=cpus,
        fn_constructor_kwargs={
            "loaded_ref": [ray.put(loaded)],
            "options": dict(options),
            "device": device,
            "pictures_dir": str(out / PICTURES) if pictures else None,
        },
    )
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    counts = {"predicted": 0, "errors": 0, "actors": size}
    for index, table in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        _write_part(out, run_id, index, table)
        errors = table.num_rows - table.column("error").null_count
        counts["errors"] += errors
        counts["predicted"] += table.num_rows - errors
    return counts
