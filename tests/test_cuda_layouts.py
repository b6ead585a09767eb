"""The tensor-core fragment layouts of the CUDA GEMMs (csrc/grouped_gemm.cu: ldmatrix and
mma.sync), probed with operands whose products name their sources.

The CPU emulator implements the PTX ISA's fragment layouts as we read them, so the kernels and
the emulator would agree even if that reading were wrong; only a GPU can say. These probes make
a GPU failure readable: each fills A and B with one-hot rows or columns and small integers
(exact in fp16 and bf16, as are their fp32 sums), so every output element says which A row, B
column or k index the hardware combined, and the message shows how the wrong ones differ (a
histogram of got XOR expected index, and 16 x 16 grids of the tile). Each operand layout the
kernels use is probed: B n-fast (forward), B k-fast (the activation backward, dc @ W^T) and
A m-fast (weight gradient, a^T @ b).
"""

import math
from collections import Counter

import pytest
import torch

from helpers import DEVICE, require_fused

M = N = K = 128  # one output tile, four K steps


def _gemm(layout: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b ([M, K] @ [K, N]) through the CUDA kernel that reads its operands in ``layout``."""
    from moe_adapter_kernels.cuda import ops as cops
    if layout == "B-n-fast":
        return cops.linear(a, b.contiguous(), "identity")[0]
    if layout == "B-k-fast":
        preact = torch.zeros(M, N, dtype=a.dtype, device=a.device)  # identity: not read
        return cops.linear_dact(a, b.t().contiguous(), preact, "identity")
    return cops.weight_grad_op(a.t().contiguous(), b, None, None, 0, 0, None, "identity")[0]


def _probes():
    """(name, a, b, expected C, what a value of C names): C[m, n] - 1 is the row, column or
    k index that the hardware used for (m, n)."""
    g = torch.Generator().manual_seed(0)
    sigma, tau = torch.randperm(K, generator=g), torch.randperm(K, generator=g)
    ar = torch.arange(1, K + 1, dtype=torch.float32)
    one_hot_a = torch.zeros(M, K).index_put_((torch.arange(M), sigma), torch.tensor(1.0))
    one_hot_b = torch.zeros(K, N).index_put_((tau, torch.arange(N)), torch.tensor(1.0))
    rows, cols = torch.arange(M)[:, None].expand(M, N), torch.arange(N).expand(M, N)
    return [
        ("row", torch.arange(1, M + 1.0)[:, None].expand(M, K), one_hot_b, rows + 1, "A row"),
        ("column", one_hot_a, torch.arange(1, N + 1.0).expand(K, N), cols + 1, "B column"),
        ("k through A", one_hot_a, ar[:, None].expand(K, N), sigma[rows] + 1,
         "k of B (for A's k = sigma[m])"),
        ("k through B", ar.expand(M, K), one_hot_b, tau[cols] + 1,
         "k of A (for B's k = tau[n])"),
    ]


def _report(name, got, want, names) -> str:
    """How ``got`` differs from ``want``: the count, a histogram of got XOR expected index (a
    swapped pair of 8x8 matrices shows as 8, swapped halves of a register as 1), and both as
    16 x 16 grids around the first wrong element (row / column in the tile on the margins)."""
    idx = got - 1
    valid = (idx == idx.round()) & (idx >= 0) & (idx < K)
    bad = got != want
    xor = Counter((idx[bad & valid].long() ^ (want - 1)[bad & valid].long()).tolist())
    hist = dict(sorted(xor.items()))
    m, n = (bad.nonzero()[0] // 16 * 16).tolist()
    lines = [f"{name} probe: {int(bad.sum())} of {got.numel()} wrong, {int((bad & ~valid).sum())}"
             f" of them not one index; C - 1 names the {names}; got XOR expected: {hist}",
             f"  expected (left) and got (right), rows {m}.., columns {n}..:"]
    for r in range(m, m + 16):
        cells = [" ".join(f"{int(v):3d}" if math.isfinite(v) and v == int(v) else "  ?"
                          for v in grid[r, n:n + 16].tolist()) for grid in (want - 1, idx)]
        lines.append(f"  {r:3d} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["B-n-fast", "B-k-fast", "A-m-fast"])
def test_fragment_layouts_pair_the_right_rows_columns_and_k(layout, dtype):
    require_fused("cuda")
    failures = []
    for name, a, b, want, names in _probes():
        got = _gemm(layout, a.to(DEVICE, dtype), b.to(DEVICE, dtype)).float().cpu()
        assert got.shape == (M, N)
        if not torch.equal(got, want.float()):
            failures.append(_report(name, got, want, names))
    assert not failures, f"{layout}, {dtype}:\n" + "\n".join(failures)
