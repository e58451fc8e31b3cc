"""ESPNet: the authors' CamVid / Cityscapes weights load strictly and reproduce their logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detseg.checkpoint import read_state_dict
from detseg.data.images import read_image, read_label
from detseg.data.preprocess import Preprocess
from detseg.errors import CheckpointError, DetsegError
from detseg.registry import get_entry
from detseg.semantic.espnet import (
    ESPNet,
    ESPNetC,
    convert_official,
    convert_official_c,
    official_preprocess,
)
from tests.conftest import need

REFERENCE_IMAGES = [
    ("val", "0016E5_07959"),
    ("val", "0016E5_08059"),
    ("test", "0001TP_009480"),
    ("test", "Seq05VD_f02550"),
]


@pytest.fixture(scope="module")
def weights(shared):
    return shared / "data" / "weights"


@pytest.fixture(scope="module")
def camvid_model(weights) -> ESPNet:
    return ESPNet.from_official(need(weights / "espnet_p_2_q_8_camvid.pth"))


@pytest.mark.parametrize(
    ("name", "num_classes", "skip"), [("camvid", 12, "b1"), ("cityscapes", 20, "level1")]
)
def test_official_files_load_strictly(weights, name, num_classes, skip):
    path = need(weights / f"espnet_p_2_q_8_{name}.pth")
    state, _ = read_state_dict(path)
    kwargs, converted = convert_official(state)
    names = kwargs.pop("class_names")
    assert kwargs == {"num_classes": num_classes, "p": 2, "q": 8, "decoder_skip": skip}
    assert len(names) == num_classes and names[0] == ("Sky" if name == "camvid" else "road")
    model = ESPNet(**kwargs)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert unexpected == []
    assert all(k.endswith("num_batches_tracked") for k in missing)
    for key, value in converted.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert ESPNet.from_official(path).training is False


def test_parameter_count_matches_release(camvid_model):
    assert sum(p.numel() for p in camvid_model.parameters()) == 354_517


@pytest.mark.parametrize(("split", "name"), REFERENCE_IMAGES)
def test_logits_match_authors(shared, weights, camvid_model, split, name):
    ref_dir = weights / "espnet_camvid_reference"
    reference = np.load(need(ref_dir / "logits_stride16.npz"))[f"{split}__{name}__logits_stride16"]
    preprocess = Preprocess(**official_preprocess({"num_classes": 12}))
    image = read_image(need(shared / "data" / "camvid" / split / f"{name}.png"))
    with torch.no_grad():
        logits = camvid_model(preprocess(image)[None])[0]
    assert logits.shape == (12, 360, 480)
    np.testing.assert_allclose(logits[:, ::16, ::16].numpy(), reference, rtol=0, atol=1e-3)
    labels = read_label(need(ref_dir / f"{split}_{name}_pred.png"))
    assert int((logits.argmax(0).numpy() != labels).sum()) <= 30


def test_official_preprocess_is_bgr_with_double_division(shared):
    meta = json.loads(
        need(shared / "data" / "weights" / "espnet_camvid_reference" / "metrics.json").read_text()
    )["preprocessing"]
    pre = official_preprocess({"num_classes": 12})
    assert pre["channel_order"] == "BGR"
    assert pre["mean"] == tuple(meta["mean_bgr"]) and pre["std"] == tuple(meta["std_bgr"])
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = ((image[..., ::-1].astype(np.float32) - meta["mean_bgr"]) / meta["std_bgr"]) / 255
    x = Preprocess(**pre)(image)
    np.testing.assert_allclose(x.numpy(), expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-7)
    assert official_preprocess({"num_classes": 20})["channel_order"] == "BGR"
    assert official_preprocess({"num_classes": 7}) is None


def test_registry_entry_converts_official_files(weights):
    entry = get_entry("espnet")
    state, _ = read_state_dict(need(weights / "espnet_p_2_q_8_cityscapes.pth"))
    kwargs, _ = entry.official.convert(state)
    assert kwargs.pop("class_names")[-1] == "void"
    assert isinstance(entry.build(**kwargs), ESPNet)
    assert entry.official.preprocess(kwargs)["mean"][0] == pytest.approx(72.3923111)


def test_wrong_model_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(CheckpointError, match="not an ESPNet checkpoint"):
        ESPNet.from_official(path)


def test_unknown_decoder_layout_is_refused():
    state = ESPNet(num_classes=5).state_dict()
    state["conv.conv.weight"] = torch.zeros(5, 5 + 7, 3, 3)
    with pytest.raises(CheckpointError, match="decoder layout"):
        convert_official(state)


def test_encoder_file_is_pointed_to_espnet_c():
    state = ESPNetC(num_classes=6, p=2, q=3).state_dict()
    with pytest.raises(CheckpointError, match="espnet_c"):
        convert_official(state)
    kwargs, _ = convert_official_c(state)
    assert kwargs == {"num_classes": 6, "p": 2, "q": 3}
    with pytest.raises(CheckpointError):
        convert_official_c(ESPNet(num_classes=6).state_dict())


def test_dataparallel_prefix_is_stripped():
    state = {f"module.{k}": v for k, v in ESPNet(num_classes=5, q=3).state_dict().items()}
    kwargs, converted = convert_official(state)
    assert kwargs["q"] == 3 and "conv.conv.weight" in converted


def test_sizes_not_divisible_by_8_are_padded_and_cropped():
    model = ESPNet(num_classes=5, q=2).eval()
    x = torch.randn(2, 3, 21, 30)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3), mode="replicate")
    with torch.no_grad():
        out = model(x)
        reference = model(padded)[..., :21, :30]
    assert out.shape == (2, 5, 21, 30)
    torch.testing.assert_close(out, reference)


def test_too_few_classes_is_a_user_error():
    with pytest.raises(DetsegError, match="at least 5 classes"):
        ESPNet(num_classes=4)


def test_espnet_c_outputs_full_resolution_logits():
    model = ESPNetC(num_classes=4, p=1, q=1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 24))
    assert out.shape == (1, 4, 40, 24)


def test_backward_reaches_every_parameter():
    model = ESPNet(num_classes=5, p=1, q=1, decoder_skip="level1")
    model(torch.randn(2, 3, 16, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow
def test_camvid_val_reference_miou(shared, camvid_model):
    """All 101 val images: 70.10 mIoU with void ignored, 68.68 under the authors' convention."""
    from detseg.semantic.metrics import ConfusionMatrix

    root = shared / "data" / "camvid"
    images = sorted(need(root / "val").glob("*.png"))
    assert len(images) == 101
    preprocess = Preprocess(**official_preprocess({"num_classes": 12}))
    cm = ConfusionMatrix(11, ignore_index=11)
    with torch.no_grad():
        for path in images:
            logits = camvid_model(preprocess(read_image(path))[None])
            cm.update(logits.argmax(1)[0], read_label(root / "valannot" / path.name))
    stored = json.loads(
        need(shared / "data" / "weights" / "espnet_camvid_reference" / "metrics.json").read_text()
    )
    moved = np.abs(cm.matrix.numpy() - np.array(stored["val"]["confusion_matrix"])).sum()
    assert moved <= 60  # a few near-tied pixels may flip, nothing more
    assert cm.compute()["mIoU"] == pytest.approx(70.103, abs=0.05)
    authors = cm.compute("authors")
    assert authors["mIoU"] == pytest.approx(68.681, abs=0.05)
    assert authors["mean_class_acc"] == pytest.approx(79.709, abs=0.05)
