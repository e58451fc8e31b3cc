"""YOLO txt folders: ``images/`` and ``labels/`` side by side (optionally with the same split
sub-folders, e.g. ``images/train2017`` and ``labels/train2017``), one ``<stem>.txt`` per image.

A label line is ``class cx cy w h`` (a box, normalised to 0..1) or ``class x1 y1 x2 y2 ...`` (a
segment polygon, normalised). Class names come from ``data.yaml`` (``names``) or ``classes.txt``
in the root; without either, classes are named by their index. An image without a label file is a
negative image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

from detseg.data.coco import Annotation, Category, DetectionSet, ImageRecord
from detseg.data.images import IMAGE_SUFFIXES, image_size
from detseg.errors import InputFileError
from detseg.fileio import write_text_atomic
from detseg.ops.masks import rle_area, segmentation_to_rle


def _class_names(root: Path) -> list[str] | None:
    yaml_path = root / "data.yaml"
    if yaml_path.is_file():
        try:
            names = yaml.safe_load(yaml_path.read_text(encoding="utf-8")).get("names")
        except (yaml.YAMLError, AttributeError) as exc:
            raise InputFileError(f"{yaml_path}: not a YAML mapping with 'names' ({exc}).") from exc
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names)]
        if isinstance(names, list):
            return [str(n) for n in names]
        raise InputFileError(f"{yaml_path}: 'names' must be a list or a {{index: name}} mapping.")
    txt = root / "classes.txt"
    if txt.is_file():
        return [
            line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return None


def _parse_line(line: str, path: Path, lineno: int, w: int, h: int) -> Annotation:
    parts = line.split()
    where = f"{path}:{lineno}"
    try:
        cls = int(parts[0])
        values = np.array([float(v) for v in parts[1:]], dtype=np.float64)
    except ValueError as exc:
        raise InputFileError(
            f"{where}: expected 'class cx cy w h' or 'class x1 y1 ...' numbers."
        ) from exc
    if cls < 0 or not np.isfinite(values).all():
        raise InputFileError(f"{where}: negative class or non-finite coordinate.")
    if len(values) == 4:
        cx, cy, bw, bh = values * [w, h, w, h]
        box = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        return Annotation(box=box, label=cls, area=float(bw * bh))
    if len(values) >= 6 and len(values) % 2 == 0:
        pts = values.reshape(-1, 2) * [w, h]
        poly = [float(v) for v in pts.ravel()]
        box = np.concatenate([pts.min(0), pts.max(0)])
        area = float(rle_area(segmentation_to_rle([poly], h, w)))
        return Annotation(box=box, label=cls, segmentation=[poly], area=area)
    raise InputFileError(
        f"{where}: {len(values)} coordinates; expected 4 (box) or >= 6, even (polygon)."
    )


def _label_dir(image_dir: Path, root: Path) -> Path:
    rel = image_dir.relative_to(root / "images")
    return root / "labels" / rel


def read_yolo(root: str | Path) -> DetectionSet:
    """Read a YOLO folder (``root/images/**``, ``root/labels/**``) into a ``DetectionSet``.

    Raises:
        InputFileError: no ``images/`` folder, a malformed label line (file:line), a class index
            outside the names of ``data.yaml``/``classes.txt``.
    """
    root = Path(root)
    if not (root / "images").is_dir():
        raise InputFileError(f"{root}: a YOLO dataset needs an images/ folder beside labels/.")
    paths = sorted(p for p in (root / "images").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    names = _class_names(root)
    records = []
    for image_id, image_path in enumerate(paths, start=1):
        w, h = image_size(image_path)
        rel = image_path.relative_to(root).as_posix()
        record = ImageRecord(image_id, rel, image_path, w, h)
        label_path = _label_dir(image_path.parent, root) / f"{image_path.stem}.txt"
        if label_path.is_file():
            lines = label_path.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines, start=1):
                if line.strip():
                    record.annotations.append(_parse_line(line, label_path, n, w, h))
        records.append(record)
    used = max((a.label for r in records for a in r.annotations), default=-1) + 1
    if names is None:
        names = [str(i) for i in range(used)]
    elif used > len(names):
        raise InputFileError(
            f"{root}: labels use class {used - 1} but only {len(names)} names are listed; "
            "complete data.yaml or classes.txt."
        )
    return DetectionSet(records, [Category(i + 1, n) for i, n in enumerate(names)], root)


def _yolo_line(a: Annotation, w: int, h: int, segments: bool) -> str:
    if segments and isinstance(a.segmentation, list) and a.segmentation:
        poly = np.asarray(max(a.segmentation, key=len), dtype=np.float64).reshape(-1, 2) / [w, h]
        return " ".join([str(a.label), *(f"{v:.6f}" for v in poly.clip(0, 1).ravel())])
    x1, y1, x2, y2 = np.clip(a.box, 0, [w, h, w, h])
    vals = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
    return " ".join([str(a.label), *(f"{v:.6f}" for v in vals)])


def write_yolo(dataset: DetectionSet, root: str | Path, segments: bool = False) -> None:
    """Write ``dataset`` as a YOLO folder: images copied to ``root/images``, labels, ``data.yaml``.

    Crowd regions are dropped (YOLO has no notion of them). With ``segments``, objects with polygon
    masks are written as their largest polygon; RLE-only masks fall back to boxes.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for im in dataset.images:
        name = f"{Path(im.file_name).stem}{im.path.suffix}"
        shutil.copy2(im.path, root / "images" / name)
        lines = [
            _yolo_line(a, im.width, im.height, segments) for a in im.annotations if not a.iscrowd
        ]
        write_text_atomic(
            root / "labels" / f"{Path(name).stem}.txt", "".join(f"{s}\n" for s in lines)
        )
    names = {i: n for i, n in enumerate(dataset.class_names)}
    write_text_atomic(root / "data.yaml", yaml.safe_dump({"names": names}, sort_keys=False))
