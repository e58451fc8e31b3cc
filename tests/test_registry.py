"""The model registry: lookup, aliases, unknown names."""

import pytest

from detseg.errors import UnknownModelError
from detseg.registry import get_entry, list_models


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("maskrcnn_r50", "maskrcnn_r50_fpn"),
        ("pointrend_r50", "pointrend_r50_fpn"),
        ("tensormask_r50", "tensormask_r50_fpn"),
    ],
)
def test_alias_resolves_to_the_entry(alias: str, name: str) -> None:
    assert get_entry(alias).name == name
    assert alias not in {e.name for e in list_models()}


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="maskrcnn_r50"):
        get_entry("maskrcnn_r5")
