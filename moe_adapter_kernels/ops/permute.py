"""Permutation: a deterministic counting sort of the T*k (token, slot) pairs by expert,
stable by pair index (token-major), with no host sync.

The router already counted pairs per expert in each block of BLOCK_T tokens; an exclusive
prefix sum over blocks and experts gives each block's first slot per expert, and one program
per block ranks its own pairs within each expert (cumsum) and scatters them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_tensor, custom_op, pow2
from .router import BLOCK_T


@triton.jit
def _permute_kernel(Ids, BlockBase, SortedPair, PairPos, T, E: tl.constexpr,
                    K: tl.constexpr, PAIRS: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK_P)
    p = pid.to(tl.int64) * PAIRS + local  # pair ids t * K + j of this block, token-major
    ok = (local < PAIRS) & (p < T * K)
    ids = tl.where(ok, tl.load(Ids + p, mask=ok, other=-1), -1)
    pos = tl.zeros([BLOCK_P], dtype=tl.int32)
    for e in tl.static_range(E):
        mine = (ids == e).to(tl.int32)
        rank = tl.cumsum(mine, 0) - mine
        base = tl.load(BlockBase + pid * E + e)
        pos = tl.where(mine == 1, base + rank, pos)
    tl.store(SortedPair + pos, p.to(tl.int32), mask=ok)
    tl.store(PairPos + p, pos, mask=ok)


def permute_forward(topk_ids: torch.Tensor, block_counts: torch.Tensor, num_experts: int):
    """Sort pairs by expert.

    topk_ids [T, k] int32 and block_counts [cdiv(T, BLOCK_T), E] int32 from the router.
    Returns sorted_pair [T*k] int32 (pair id t*k+j at each sorted position), pair_pos [T*k]
    int32 (the inverse map) and expert_offsets [E+1] int32 (expert e owns sorted positions
    expert_offsets[e] .. expert_offsets[e+1]).
    """
    check_tensor(topk_ids, "permute", "topk_ids", 2, dtypes=(torch.int32,))
    check_tensor(block_counts, "permute", "block_counts", 2, dtypes=(torch.int32,),
                 device=topk_ids.device)
    T, k = topk_ids.shape
    E = num_experts
    nb = triton.cdiv(T, BLOCK_T)
    check(tuple(block_counts.shape) == (nb, E), "permute",
          f"block_counts must be [{nb}, {E}], got {tuple(block_counts.shape)}")
    dev = topk_ids.device
    counts = block_counts.sum(0, dtype=torch.int32)
    offsets = torch.zeros(E + 1, device=dev, dtype=torch.int32)
    torch.cumsum(counts, 0, out=offsets[1:])
    block_base = (torch.cumsum(block_counts, 0, dtype=torch.int32) - block_counts
                  + offsets[:-1]).contiguous()
    sorted_pair = torch.empty(T * k, device=dev, dtype=torch.int32)
    pair_pos = torch.empty(T * k, device=dev, dtype=torch.int32)
    if T:
        _permute_kernel[(nb,)](topk_ids, block_base, sorted_pair, pair_pos, T, E=E, K=k,
                               PAIRS=BLOCK_T * k, BLOCK_P=pow2(BLOCK_T * k))
    return sorted_pair, pair_pos, offsets


@custom_op("moe_adapter::permute")
def permute(topk_ids: torch.Tensor, block_counts: torch.Tensor, num_experts: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`permute_forward`: (sorted_pair, pair_pos, expert_offsets)."""
    return permute_forward(topk_ids, block_counts, num_experts)


@permute.register_fake
def _(topk_ids, block_counts, num_experts):
    P = topk_ids.numel()
    return (topk_ids.new_empty(P), topk_ids.new_empty(P), topk_ids.new_empty(num_experts + 1))
