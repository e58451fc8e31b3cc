"""SwapAlign2Nat at the sizes of a real TensorMask forward (800x1333 input, padded to 800x1344).

For every bipyramid level k (λ = 2^k) and window size m ∈ {11, 15}, the aligned tensor is
(1, m², 200, 336) on the P2 grid. Printed per (k, m): the dense op's time and output size (what the
training/equality path materialises) and the per-window op's time for ``--windows`` random
windows (the inference path), and the largest difference between the two at those windows.

Run from the repository root: ``PYTHONPATH=. python bench/tensormask_swap.py [--levels 0 5]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from detseg.ops.swap_align2nat import swap_align2nat, swap_align2nat_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=list(range(6)))
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print("| level | m | out side | dense s | dense out (M floats) | sparse s | max diff |")
    print("|---|---|---|---|---|---|---|")
    for k in args.levels:
        lam = 2**k
        for m in (11, 15):
            x = torch.randn(1, m * m, 200, 336, generator=gen)
            t0 = time.perf_counter()
            dense = swap_align2nat(x, lam)
            t_dense = time.perf_counter() - t0
            hout, wout = dense.shape[2:]
            rows = torch.randint(0, hout, (args.windows,), generator=gen)
            cols = torch.randint(0, wout, (args.windows,), generator=gen)
            batch = torch.zeros_like(rows)
            t0 = time.perf_counter()
            sparse = swap_align2nat_windows(x, lam, batch, rows, cols)
            t_sparse = time.perf_counter() - t0
            side = lam * m
            diff = (dense[0, :, rows, cols].t().reshape(-1, side, side) - sparse).abs().max()
            print(
                f"| P{k + 2} | {m} | {side} | {t_dense:.3f} | {dense.numel() / 1e6:.1f} "
                f"| {t_sparse:.4f} | {diff:.1e} |"
            )
            del dense


if __name__ == "__main__":
    main()
