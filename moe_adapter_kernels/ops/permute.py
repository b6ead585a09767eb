"""Permutation: a deterministic counting sort of the T*k (token, slot) pairs by expert,
stable by pair index (token-major), with no host sync. Two launches:

- a one-program scan over the router's per-block counts: each block's first sorted slot per
  expert (exclusive prefix over blocks), the expert offsets, and, from the same totals and the
  per-block gate sums, the load-balancing loss L_aux = E * sum_e P_e f_e;
- one program per router block that ranks its own pairs within each expert (cumsum) and
  scatters them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, check_tensor, custom_op, pow2
from .router import BLOCK_T

SCAN_CHUNK = 256  # router blocks per step of the scan


@triton.jit
def _scan_kernel(BlockCounts, BlockGates, BlockBase, Offsets, Aux, NB, aux_scale,
                 E: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    ecols = tl.arange(0, BLOCK_E)
    e_ok = ecols < E
    steps = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    gate_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for b0 in range(0, NB, CHUNK):
        b = b0 + steps
        m = (b[:, None] < NB) & e_ok[None, :]
        at = b[:, None].to(tl.int64) * E + ecols[None, :]
        c = tl.load(BlockCounts + at, mask=m, other=0)
        tl.store(BlockBase + at, tl.cumsum(c, 0) - c + carry[None, :], mask=m)
        carry += tl.sum(c, 0)
        gate_sum += tl.sum(tl.load(BlockGates + at, mask=m, other=0.0), 0)
    tl.store(Offsets + 1 + ecols, tl.cumsum(carry, 0), mask=e_ok)
    tl.store(Offsets, 0)
    tl.store(Aux, tl.sum(gate_sum * carry.to(tl.float32), 0) * aux_scale)


@triton.jit
def _permute_kernel(Ids, BlockBase, Offsets, SortedPair, PairPos, T, E: tl.constexpr,
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
        base = tl.load(Offsets + e) + tl.load(BlockBase + pid * E + e)
        pos = tl.where(mine == 1, base + rank, pos)
    tl.store(SortedPair + pos, p.to(tl.int32), mask=ok)
    tl.store(PairPos + p, pos, mask=ok)


def permute_forward(topk_ids: torch.Tensor, block_counts: torch.Tensor,
                    block_gates: torch.Tensor, num_experts: int):
    """Sort pairs by expert.

    topk_ids [T, k] int32, block_counts [cdiv(T, BLOCK_T), E] int32 and block_gates (same
    shape, fp32) from the router. Returns sorted_pair [T*k] int32 (pair id t*k+j at each
    sorted position), pair_pos [T*k] int32 (the inverse map), expert_offsets [E+1] int32
    (expert e owns sorted positions expert_offsets[e] .. expert_offsets[e+1]) and aux [] fp32,
    L_aux = E * sum_e P_e f_e with P_e the mean top-k gate of expert e and f_e the fraction of
    tokens routed to it (0 when T = 0; the gradient is the caller's: E * f_e / T per gate).
    The ids must be what the router gives (in [0, E), distinct within a row, consistent with
    block_counts): checking values on the device would cost a host sync, so they are not.
    """
    check_tensor(topk_ids, "permute", "topk_ids", 2, dtypes=(torch.int32,))
    check_tensor(block_counts, "permute", "block_counts", 2, dtypes=(torch.int32,),
                 device=topk_ids.device)
    check_tensor(block_gates, "permute", "block_gates", 2, dtypes=(torch.float32,),
                 device=topk_ids.device)
    T, k = topk_ids.shape
    E = num_experts
    nb = cdiv(T, BLOCK_T)
    for name, t in (("block_counts", block_counts), ("block_gates", block_gates)):
        check(tuple(t.shape) == (nb, E), "permute", "{} must be [{}, {}], got {}", name, nb, E,
              tuple(t.shape))
    dev = topk_ids.device
    block_base = torch.empty(nb, E, device=dev, dtype=torch.int32)
    offsets = torch.empty(E + 1, device=dev, dtype=torch.int32)
    aux = torch.empty((), device=dev, dtype=torch.float32)
    _scan_kernel[(1,)](block_counts, block_gates, block_base, offsets, aux, nb,
                       E / (T * T) if T else 0.0, E=E, BLOCK_E=pow2(E), CHUNK=SCAN_CHUNK,
                       num_warps=4)
    sorted_pair = torch.empty(T * k, device=dev, dtype=torch.int32)
    pair_pos = torch.empty(T * k, device=dev, dtype=torch.int32)
    if T:
        _permute_kernel[(nb,)](topk_ids, block_base, offsets, sorted_pair, pair_pos, T, E=E,
                               K=k, PAIRS=BLOCK_T * k, BLOCK_P=pow2(BLOCK_T * k))
    return sorted_pair, pair_pos, offsets, aux


@custom_op("moe_adapter::permute")
def permute(topk_ids: torch.Tensor, block_counts: torch.Tensor, block_gates: torch.Tensor,
            num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`permute_forward`: (sorted_pair, pair_pos, expert_offsets, aux)."""
    return permute_forward(topk_ids, block_counts, block_gates, num_experts)


@permute.register_fake
def _(topk_ids, block_counts, block_gates, num_experts):
    P = topk_ids.numel()
    return (topk_ids.new_empty(P), topk_ids.new_empty(P), topk_ids.new_empty(num_experts + 1),
            block_gates.new_empty(()))
