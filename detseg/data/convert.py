"""Read any supported annotation format, and convert between them (``detseg convert``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from detseg.data.coco import DetectionSet, load_json, parse_coco, write_coco
from detseg.data.via import read_via
from detseg.data.yolo import read_yolo, write_yolo
from detseg.errors import InputFileError

Format = Literal["coco", "via", "yolo"]


def detect_format(src: str | Path) -> tuple[Format, Path]:
    """The format of ``src`` and the file or folder to read.

    A JSON with ``images``/``categories`` is COCO, any other JSON object is VIA; a folder with
    ``images/`` is YOLO, one holding ``via_region_data.json`` is VIA, one with
    ``annotations/instances*.json`` is COCO.
    """
    src = Path(src)
    if src.is_dir():
        if (src / "via_region_data.json").is_file():
            return "via", src / "via_region_data.json"
        coco = sorted((src / "annotations").glob("instances*.json"))
        if coco:
            return "coco", coco[0]
        if (src / "images").is_dir():
            return "yolo", src
        raise InputFileError(
            f"{src}: no via_region_data.json, annotations/instances*.json or images/ folder; "
            "pass the annotation file itself."
        )
    if src.suffix.lower() == ".json":
        data = load_json(src)
        is_coco = isinstance(data, dict) and "images" in data and "categories" in data
        return ("coco" if is_coco else "via"), src
    raise InputFileError(f"{src}: not a folder or a .json annotation file.")


def read_dataset(src: str | Path, class_name: str = "object") -> DetectionSet:
    """Read COCO, VIA or YOLO annotations (format detected by ``detect_format``).

    ``class_name`` names the single class of VIA files without class attributes.
    """
    fmt, path = detect_format(src)
    if fmt == "coco":
        return parse_coco(load_json(path), path)
    if fmt == "via":
        return read_via(path, class_name=class_name)
    return read_yolo(path)


def convert(
    src: str | Path,
    dst: str | Path,
    to: Literal["coco", "yolo"] = "coco",
    class_name: str = "object",
    segments: bool = True,
) -> DetectionSet:
    """Convert an annotation set: ``to="coco"`` writes the JSON ``dst``; ``to="yolo"`` writes the
    folder ``dst`` (images copied, labels, data.yaml; polygons kept as segments when ``segments``).

    Returns the dataset that was read.
    """
    dataset = read_dataset(src, class_name=class_name)
    if to == "coco":
        write_coco(dataset, dst)
    elif to == "yolo":
        write_yolo(dataset, dst, segments=segments)
    else:
        raise InputFileError(f"unknown target format {to!r}; use coco or yolo.")
    return dataset
