"""SwapAlign2Nat: the kernel-transcription fixture, hand-worked cases, gradcheck, sparse == dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detseg.ops.swap_align2nat import SwapAlign2Nat, swap_align2nat, swap_align2nat_windows
from tests.conftest import need, shared_root


@pytest.fixture(scope="module")
def cases() -> dict[str, np.ndarray]:
    z = np.load(need(shared_root() / "parity" / "swap_align2nat_cases.npz"))
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_fixture_cases(cases: dict[str, np.ndarray], dtype: torch.dtype, tol: float) -> None:
    num = int(cases["num_cases"])
    assert num == 11
    with_grad = 0
    for k in range(num):
        x = torch.from_numpy(cases[f"in_{k}"]).to(dtype).requires_grad_(True)
        y = swap_align2nat(x, int(cases[f"lambda_val_{k}"]), float(cases[f"pad_val_{k}"]))
        want = torch.from_numpy(cases[f"out_{k}"]).to(dtype)
        assert y.shape == want.shape and y.dtype == dtype
        assert (y - want).abs().max() <= tol, cases["case_names"][k]
        if f"grad_out_{k}" in cases:
            y.backward(torch.from_numpy(cases[f"grad_out_{k}"]).to(dtype))
            grad = torch.from_numpy(cases[f"grad_in_{k}"]).to(dtype)
            assert (x.grad - grad).abs().max() <= tol, cases["case_names"][k]
            with_grad += 1
    assert with_grad == 8


def test_lambda1_odd_is_shift_with_pad() -> None:
    x = torch.randn(1, 9, 4, 5)
    y = swap_align2nat(x, 1, -6.0)
    xv = x.view(1, 3, 3, 4, 5)
    yv = y.view(1, 3, 3, 4, 5)
    for v in range(3):
        for u in range(3):
            for r in range(4):
                for c in range(5):
                    rr, cc = r + v - 1, c + u - 1
                    inside = 0 <= rr < 4 and 0 <= cc < 5
                    want = xv[0, v, u, rr, cc] if inside else torch.tensor(-6.0)
                    # (x - pad) + pad rounds in float32, so equal up to one ulp of 6.
                    assert torch.allclose(yv[0, v, u, r, c], want, rtol=0, atol=1e-6)


def test_lambda2_constant_border_blend() -> None:
    # A constant c away from the image border: mask rows/cols 0 and Vout-1 blend 1/4 of pad in.
    c, pad = 2.0, -6.0
    y = swap_align2nat(torch.full((1, 9, 12, 12), c), 2, pad).view(6, 6, 6, 6)
    centre = y[:, :, 3, 3]
    edge = 0.75 * c + 0.25 * pad
    assert torch.allclose(centre[0, 2], torch.tensor(edge))
    assert torch.allclose(centre[2, 5], torch.tensor(edge))
    assert torch.allclose(centre[0, 0], torch.tensor(0.75 * edge + 0.25 * pad))
    assert torch.allclose(centre[1:5, 1:5], torch.full((4, 4), c))


def test_shapes_and_errors() -> None:
    assert swap_align2nat(torch.zeros(2, 4, 7, 9), 2).shape == (2, 16, 4, 5)
    assert swap_align2nat(torch.zeros(0, 4, 7, 9), 2).shape == (0, 16, 4, 5)
    assert SwapAlign2Nat(4)(torch.zeros(1, 121, 8, 12)).shape == (1, 44 * 44, 2, 3)
    with pytest.raises(ValueError, match="square"):
        swap_align2nat(torch.zeros(1, 5, 3, 3), 1)
    with pytest.raises(ValueError, match="lambda_val"):
        swap_align2nat(torch.zeros(1, 4, 3, 3), 0)


def test_gradcheck_float64() -> None:
    x = torch.rand(2, 4, 10, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: swap_align2nat(t, 2), (x,))
    x3 = torch.rand(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: swap_align2nat(t, 3, 1.5), (x3,))


@settings(max_examples=25, deadline=None)
@given(
    lam=st.sampled_from([1, 2, 3, 4]),
    vin=st.integers(1, 4),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    pad=st.sampled_from([0.0, -6.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_sparse_equals_dense(lam: int, vin: int, h: int, w: int, pad: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, vin * vin, h, w, generator=gen, dtype=torch.float64)
    dense = swap_align2nat(x, lam, pad)
    hout, wout = dense.shape[2:]
    k = 5
    n = torch.randint(0, 2, (k,), generator=gen)
    r = torch.randint(0, hout, (k,), generator=gen)
    c = torch.randint(0, wout, (k,), generator=gen)
    sparse = swap_align2nat_windows(x, lam, n, r, c, pad)
    vout = lam * vin
    assert sparse.shape == (k, vout, vout)
    assert torch.equal(sparse, dense[n, :, r, c].view(k, vout, vout))


def test_sparse_gradient_matches_dense() -> None:
    x = torch.randn(1, 9, 6, 6, dtype=torch.float64, requires_grad=True)
    n, r, c = torch.tensor([0, 0]), torch.tensor([0, 2]), torch.tensor([1, 2])
    swap_align2nat_windows(x, 2, n, r, c).sum().backward()
    sparse_grad = x.grad.clone()
    x.grad = None
    swap_align2nat(x, 2)[n, :, r, c].sum().backward()
    assert torch.allclose(sparse_grad, x.grad)
    assert swap_align2nat_windows(x, 2, n[:0], r[:0], c[:0]).shape == (0, 6, 6)
