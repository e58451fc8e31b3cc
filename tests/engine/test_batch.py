"""Ray batch prediction: a local 2-CPU cluster gives the results of `detseg predict`, resumes, and
records bad inputs per row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detseg import api
from detseg.checkpoint import save_checkpoint
from detseg.cli import app
from detseg.engine.batch import finished_paths, predict_on_ray, read_inputs
from detseg.errors import InputFileError
from tests.conftest import need

ray = pytest.importorskip("ray")

OPTIONS = {"score_threshold": 0.0, "max_size": 128}  # random weights: keep every score
N_IMAGES = 4


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory, shared) -> Path:
    folder = tmp_path_factory.mktemp("coco128")
    source = sorted(need(shared / "data" / "coco128" / "images").glob("*.jpg"))[:N_IMAGES]
    for path in source:
        shutil.copy(path, folder / path.name)
    return folder


def _model():
    """A random-weight FCOS that keeps its (low) scores: 20 detections an image."""
    kwargs = {"num_classes": 3, "score_thresh": 0.0, "detections_per_img": 20}
    return api.load_model("fcos_mnv2_fpn", device="cpu", **kwargs)


def _rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "results").to_pylist()


def _cli_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["predict", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ray_equals_single_process_predict_then_resumes(cluster, images, tmp_path):
    loaded = _model()
    weights = tmp_path / "random.safetensors"
    save_checkpoint(weights, loaded.model, loaded.checkpoint_meta())
    common = [str(images), "--weights", str(weights), "--max-size", "128"]
    common += ["--score-threshold", "0", "--device", "cpu"]
    reference = _cli_json(*common, "-o", str(tmp_path / "local"))["images"]
    assert sum(len(r["detections"]) for r in reference) > 0  # a comparison of something
    out = tmp_path / "ray"
    ray_args = [*common, "-o", str(out), "--backend", "ray", "--actors", "2"]
    summary = _cli_json(*ray_args, "--rows-per-batch", "3", "--pictures")
    assert (summary["predicted"], summary["errors"], summary["actors"]) == (N_IMAGES, 0, 2)
    assert len(list((out / "results").glob("part-*.parquet"))) == 2  # 4 rows in batches of 3
    rows = {row["path"]: row for row in _rows(out)}
    for record in reference:
        row = rows[record["file"]]
        assert row["error"] is None
        assert (row["width"], row["height"]) == (record["width"], record["height"])
        assert json.loads(row["prediction"])["detections"] == record["detections"]
        assert row["num_detections"] == len(record["detections"])
        assert Path(row["picture"]).is_file()

    again = _cli_json(*ray_args)
    assert (again["skipped"], again["predicted"]) == (N_IMAGES, 0)
    assert len(_rows(out)) == N_IMAGES


def test_a_corrupt_image_becomes_an_error_row(cluster, images, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    good = sorted(folder.glob("*.jpg"))[0]
    (folder / "broken.jpg").write_bytes(good.read_bytes()[:300])
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# two images\n{good.relative_to(tmp_path)}\nin/broken.jpg\n")
    out = tmp_path / "out"
    summary = predict_on_ray(_model(), manifest, out, actors=1, progress=False, **OPTIONS)
    assert (summary["predicted"], summary["errors"]) == (1, 1)
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    broken = str(folder / "broken.jpg")
    assert rows["broken.jpg"]["error"].startswith(f"{broken}: not a readable image")
    assert rows["broken.jpg"]["prediction"] is None
    assert rows[good.name]["error"] is None
    assert finished_paths(out) == {str(good), broken}


def test_inputs_from_a_parquet_manifest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.jpg", "b/c.png"]}), tmp_path / "in.parquet")
    assert read_inputs(tmp_path / "in.parquet") == ["a.jpg", "b/c.png"]
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputFileError, match="no 'path' column"):
        read_inputs(tmp_path / "bad.parquet")
