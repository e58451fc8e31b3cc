"""GFM: parity with the official network, collaborative merge, official checkpoint loading."""

from __future__ import annotations

import json

import pytest
import torch

from detseg.errors import CheckpointError
from detseg.matting.gfm import GFM, collaborative_matting, convert_official
from detseg.registry import get_entry
from tests.parity import fixture_names, parity_dir, run_fixture

FIXTURES = fixture_names("gfm_")
# r101 regenerates ~540 M values (2 GB): slow.
SLOW = {"gfm_r101_tt"}


def test_fixtures_present(shared) -> None:
    assert len(FIXTURES) >= 12, FIXTURES


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FIXTURES]
)
def test_parity(name: str) -> None:
    tolerance = json.loads((parity_dir() / f"{name}.json").read_text())["tolerance"]
    diffs = run_fixture(name)
    assert diffs and all(d <= tolerance for d in diffs.values()), diffs


def test_collaborative_matting_rules() -> None:
    focus = torch.tensor([0.3, 0.6, 0.9]).view(1, 1, 1, 3)
    # TT: classes background / transition / foreground at the three pixels.
    tt = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.0, 0.2, 0.7]]).T.reshape(1, 3, 1, 3)
    assert collaborative_matting("TT", tt, focus).flatten().tolist() == pytest.approx([0, 0.6, 1])
    two = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]).T.reshape(1, 2, 1, 3)
    assert collaborative_matting("BT", two, focus).flatten().tolist() == pytest.approx(
        [0, 0.4, 0.1]
    )
    assert collaborative_matting("FT", two, focus).flatten().tolist() == pytest.approx([0.3, 1, 1])
    tie = torch.full((1, 3, 1, 1), 0.5)  # ties go to the lowest class, as torch.max does
    assert collaborative_matting("TT", tie, torch.full((1, 1, 1, 1), 0.4)).item() == 0.0


@pytest.mark.parametrize("backbone", ["r34", "r34_2b"])
def test_shapes_and_ranges(backbone: str) -> None:
    model = GFM(backbone, "TT").eval()
    with torch.no_grad():
        glance, focus, fusion = model(torch.rand(2, 3, 64, 96) * 255)
    assert glance.shape == (2, 3, 64, 96) and focus.shape == fusion.shape == (2, 1, 64, 96)
    assert 0 <= float(fusion.min()) and float(fusion.max()) <= 1


def test_encoder_aliases_share_the_backbone() -> None:
    model = GFM("r34", "TT")
    assert model.encoder2 is model.resnet.layer2
    assert model.encoder0[0] is model.resnet.conv1
    assert len(model.state_dict()) == 688  # official entry count (spec 1.1)


def test_from_official_infers_variant_and_strips_module_prefix(tmp_path) -> None:
    ref = GFM("r34", "BT").eval()
    path = tmp_path / "gfm_r34_bt.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    model = GFM.from_official(path, rosta="BT").eval()
    assert (model.backbone, model.rosta) == ("r34", "BT")
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        for a, b in zip(model(x), ref(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    kwargs, _ = get_entry("gfm_r34_bt").official.convert(ref.state_dict())
    assert kwargs == {"backbone": "r34", "rosta": "BT"}


def test_convert_official_rejects_other_models() -> None:
    with pytest.raises(CheckpointError):
        convert_official({"backbone.conv1.weight": torch.zeros(1)})


def test_registry_entries() -> None:
    for name in (
        "gfm_r34",
        "gfm_r34_ft",
        "gfm_r34_bt",
        "gfm_r34_2b",
        "gfm_d121",
        "gfm_r101",
        "gfm_d121_rim",
    ):
        assert get_entry(name).task == "matting"
    assert get_entry("gfm_d121_rim").build().rosta == "RIM"
