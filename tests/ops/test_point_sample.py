"""point_sample and point selection against hand-worked cases."""

from __future__ import annotations

import torch

from detseg.ops.point_sample import (
    box_points_to_image,
    point_sample,
    regular_grid,
    uncertain_points_on_grid,
    uncertain_points_with_randomness,
)


def test_point_sample_hits_pixel_centres_and_pads_with_zero() -> None:
    x = torch.arange(1.0, 7.0).view(1, 1, 2, 3)
    centres = torch.tensor([[[0.5 / 3, 0.25], [2.5 / 3, 0.75], [0.0, 0.25]]])
    out = point_sample(x, centres)
    assert out.shape == (1, 1, 3)
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 6.0, 0.5]))  # border: half zero padding
    grid = point_sample(x, centres.view(1, 1, 3, 2))
    assert torch.allclose(grid.flatten(), out.flatten())


def test_regular_grid_is_row_major_cell_centres() -> None:
    grid = regular_grid(3, 2)
    assert grid.shape == (3, 4, 2)
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    assert torch.allclose(grid[1], expected)


def test_uncertain_points_on_grid_picks_largest() -> None:
    u = torch.zeros(1, 1, 2, 4)
    u[0, 0, 1, 2], u[0, 0, 0, 1] = 3.0, 2.0
    idx, coords = uncertain_points_on_grid(u, 2)
    assert idx.tolist() == [[6, 1]]
    assert torch.allclose(coords[0], torch.tensor([[0.625, 0.75], [0.375, 0.25]]))
    assert uncertain_points_on_grid(u, 100)[0].shape == (1, 8)


def test_training_selection_prefers_uncertain_points() -> None:
    logits = torch.full((2, 1, 8, 8), 10.0)
    logits[:, :, :, :4] = 0.0  # uncertain only in the left half
    g = torch.Generator().manual_seed(0)
    pts = uncertain_points_with_randomness(logits, lambda t: -t.abs(), 40, 3.0, 0.75, g)
    assert pts.shape == (2, 40, 2)
    assert (pts[:, :30, 0] < 0.5625).all()
    assert (pts[:, 30:, 0] > 0.5625).any()


def test_box_points_to_image() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    pts = box_points_to_image(boxes, torch.tensor([[[0.0, 0.0], [0.5, 1.0]]]))
    assert torch.equal(pts, torch.tensor([[[10.0, 20.0], [20.0, 60.0]]]))


def test_points_in_parallel_pieces_equal_one_call() -> None:
    """threads > N: the points are sampled in pieces on several threads, the same values."""
    torch.manual_seed(0)
    feature = torch.randn(1, 5, 9, 7)
    coords = torch.rand(1, 10, 2) * 1.2 - 0.1  # some outside: zero padding
    whole = point_sample(feature, coords)
    for threads in (2, 3):
        assert torch.equal(point_sample(feature, coords, threads), whole)
    assert point_sample(feature, coords, 3).shape == (1, 5, 10)
