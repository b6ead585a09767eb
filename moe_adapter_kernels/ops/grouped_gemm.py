"""Grouped GEMM over experts' variable-length row ranges, with the row gather fused into the
A-load and the activation / gate weight fused into the epilogue.

Rows are in expert-sorted order: expert g owns rows offsets[g] .. offsets[g+1]. The grid is
sized by an upper bound on the number of M tiles, cdiv(rows, BLOCK_M) + groups, so no host
sync is needed; programs past the last tile exit at once. With ``offsets=None`` it is a plain
dense GEMM (one group of all rows), used for the shared / aggregation MLP; a dense launch whose
tuned entry is ``tuning.CUBLAS`` runs in cuBLAS and PyTorch ops instead (``torch_ops``). The
backward's dact GEMM runs with its epilogue fused, or, where the tuned entry says ``split``,
as the plain GEMM followed by the epilogue in a pass of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch_ops
from . import tuning
from ._common import cdiv, check, check_tensor, custom_op, dot_in_fp32, interpreting, pow2

ACTIVATIONS = {"none": 0, "identity": 0, "silu": 1, "swiglu": 2, "gelu": 3}
SPLIT_BLOCK = (32, 128)  # rows, columns of a _dact_rows_kernel program
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """The activation of a fp32 tile (SwiGLU is applied by the callers on two tiles)."""
    if ACT == 1:
        return z * tl.sigmoid(z)
    elif ACT == 3:
        return 0.5 * z * (1.0 + tl.erf(z * SQRT1_2))
    else:
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz for SiLU (also the gate half of SwiGLU), GELU and identity."""
    if ACT == 3:
        return 0.5 * (1.0 + tl.erf(z * SQRT1_2)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == 0:
        return z * 0.0 + 1.0
    else:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _tile_of_group(pid_m, Offsets, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """Map an M-tile index to (group, first row, end row); group -1 past the last tile. The
    groups' tile counts are prefix-summed as one vector (BLOCK_G >= NUM_GROUPS lanes)."""
    gs = tl.arange(0, BLOCK_G)
    g_ok = gs < NUM_GROUPS
    lo = tl.load(Offsets + gs, mask=g_ok, other=0)
    hi = tl.load(Offsets + gs + 1, mask=g_ok, other=0)
    n_tiles = tl.cdiv(hi - lo, BLOCK_M)
    tiles_end = tl.cumsum(n_tiles, 0)
    tiles_before = tiles_end - n_tiles
    hit = g_ok & (pid_m >= tiles_before) & (pid_m < tiles_end)
    group = tl.max(tl.where(hit, gs, -1), 0)
    row_start = tl.sum(tl.where(hit, lo + (pid_m - tiles_before) * BLOCK_M, 0), 0)
    row_end = tl.sum(tl.where(hit, hi, 0), 0)
    return group, row_start, row_end


@triton.jit
def _tile_rows(pid_m, Offsets, M, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """(group, rows, row mask) of an M tile; dense (NUM_GROUPS == 0) is one group of M rows."""
    if NUM_GROUPS == 0:
        group = 0
        row_start = pid_m * BLOCK_M
        row_end = M
    else:
        group, row_start, row_end = _tile_of_group(pid_m, Offsets, NUM_GROUPS, BLOCK_G, BLOCK_M)
    rm = row_start + tl.arange(0, BLOCK_M)
    return group, rm, rm < row_end


@triton.jit
def _tile_ids(N, BLOCK_N: tl.constexpr):
    """(M tile, N tile) of this program in a 1-D grid, N tiles fastest: the programs that
    share a (gathered) row tile of A run together, so it is read from HBM about once and
    served from L2 for its other N tiles; one expert's weights stay in L2 either way."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    return pid // n_tiles, pid % n_tiles


@triton.jit
def _source_rows(pair, rows, GATHER_DIV: tl.constexpr):
    """64-bit rows of an operand: pair // GATHER_DIV when gathered (GATHER_DIV > 0), else the
    sorted rows themselves."""
    if GATHER_DIV > 0:
        return pair // GATHER_DIV
    else:
        return rows.to(tl.int64)


@triton.jit
def _pair_ids(PairIds, rows, ok, NEED_PAIR: tl.constexpr):
    """64-bit pair ids of sorted rows, loaded only when NEED_PAIR (else the rows themselves,
    which is all a caller that neither gathers, scatters nor scales uses them for)."""
    if NEED_PAIR:
        return tl.load(PairIds + rows, mask=ok, other=0).to(tl.int64)
    else:
        return rows.to(tl.int64)


@triton.jit
def _tile_operands(PairIds, rm, m_ok, pid_n, N, NEED_PAIR: tl.constexpr,
                   GATHER_DIV: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pair ids, A rows, N columns, column mask) of a tile: A rows are gathered by
    pair // GATHER_DIV when GATHER_DIV > 0; pair ids are loaded only when NEED_PAIR."""
    pair = _pair_ids(PairIds, rm, m_ok, NEED_PAIR)
    a_row = _source_rows(pair, rm, GATHER_DIV)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pair, a_row, rn, rn < N


@triton.jit
def _mainloop(A, B, a_row, m_ok, group, rn, n_ok, K, stride_am, stride_ak, stride_bg,
              stride_bk, stride_bn, B_SHIFT, TWO_B: tl.constexpr, DOT_FP32: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc = A[a_row] @ B[group][:, rn]; with TWO_B also acc2 = A[a_row] @ B[group][:, rn +
    B_SHIFT] (the up half of a SwiGLU weight). fp32 accumulation, 64-bit addressing."""
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + a_row[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptr = B + group.to(tl.int64) * stride_bg + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if TWO_B:
            b2 = tl.load(b_ptr + B_SHIFT * stride_bn, mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)
            if DOT_FP32:
                acc2 = tl.dot(a, b2.to(tl.float32), acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(a, b2, acc2)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    return acc, acc2


@triton.jit
def _grouped_gemm_kernel(
        A, B, C, Preact, Bias, PairIds, Scale, Offsets, M, N, K,
        stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_cm, stride_cn, stride_pm,
        stride_biasg, NUM_GROUPS: tl.constexpr, GATHER_DIV: tl.constexpr, SCATTER: tl.constexpr,
        HAS_SCALE: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward: C = act(A[rows] @ B[g] + bias[g]) * scale; optionally also the
    pre-activation."""
    pid_m, pid_n = _tile_ids(N, BLOCK_N)
    group, rm, m_ok = _tile_rows(pid_m, Offsets, M, NUM_GROUPS, BLOCK_G, BLOCK_M)
    if group < 0:
        return
    pair, a_row, rn, n_ok = _tile_operands(PairIds, rm, m_ok, pid_n, N,
                                           GATHER_DIV > 0 or SCATTER or HAS_SCALE, GATHER_DIV,
                                           BLOCK_N)
    acc, acc_up = _mainloop(A, B, a_row, m_ok, group, rn, n_ok, K, stride_am, stride_ak,
                            stride_bg, stride_bk, stride_bn, N, ACT == 2, DOT_FP32,
                            BLOCK_M, BLOCK_N, BLOCK_K)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        b_ptr = Bias + group.to(tl.int64) * stride_biasg + rn
        acc += tl.load(b_ptr, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 2:
            acc_up += tl.load(b_ptr + N, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:  # sorted rows; SwiGLU keeps [gate | up]
        p_ptr = Preact + rm.to(tl.int64)[:, None] * stride_pm + rn[None, :]
        tl.store(p_ptr, acc.to(Preact.dtype.element_ty), mask=mask)
        if ACT == 2:
            tl.store(p_ptr + N, acc_up.to(Preact.dtype.element_ty), mask=mask)
    if ACT == 2:
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        acc = _act(acc, ACT)
    if HAS_SCALE:
        acc = acc * tl.load(Scale + pair, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        out_row = pair
    else:
        out_row = rm.to(tl.int64)
    tl.store(C + out_row[:, None] * stride_cm + rn[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _dact_epilogue(dh, Preact, DPreact, Gate, DGate, pair, rm, m_ok, rn, n_ok, pid_n, N,
                   stride_pm, stride_dg, ACT: tl.constexpr, HAS_GATE: tl.constexpr):
    """From dh (an fp32 tile of rows rm, columns rn): dz = g * dh * act'(z) into DPreact and,
    when gated, the dg partial sum over these columns of dh * act(z) into DGate[pair, pid_n]."""
    mask = m_ok[:, None] & n_ok[None, :]
    p_ptr = Preact + rm.to(tl.int64)[:, None] * stride_pm + rn[None, :]
    d_ptr = DPreact + rm.to(tl.int64)[:, None] * stride_pm + rn[None, :]
    z = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
    if ACT == 2:
        up = tl.load(p_ptr + N, mask=mask, other=0.0).to(tl.float32)
        h = z * tl.sigmoid(z) * up
    else:
        h = _act(z, ACT)
    if HAS_GATE:
        tl.store(DGate + pair * stride_dg + pid_n, tl.sum(dh * h, 1), mask=m_ok)
        dh = dh * tl.load(Gate + pair, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if ACT == 2:
        tl.store(d_ptr, (dh * up * _act_grad(z, 1)).to(DPreact.dtype.element_ty), mask=mask)
        tl.store(d_ptr + N, (dh * z * tl.sigmoid(z)).to(DPreact.dtype.element_ty), mask=mask)
    else:
        tl.store(d_ptr, (dh * _act_grad(z, ACT)).to(DPreact.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_dact_kernel(
        A, B, Preact, DPreact, PairIds, Gate, DGate, Offsets, M, N, K,
        stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_pm, stride_dg,
        NUM_GROUPS: tl.constexpr, GATHER_DIV: tl.constexpr, ACT: tl.constexpr,
        HAS_GATE: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward through ``C = g * act(z) @ W``: with dh = dC[rows] @ W[g]^T (this GEMM),
    dz = g * dh * act'(z) and, when gated, dg partials = sum over this N tile of dh * act(z).
    z (the saved pre-activation) and dz are in sorted rows; dg partials in pair order."""
    pid_m, pid_n = _tile_ids(N, BLOCK_N)
    group, rm, m_ok = _tile_rows(pid_m, Offsets, M, NUM_GROUPS, BLOCK_G, BLOCK_M)
    if group < 0:
        return
    pair, a_row, rn, n_ok = _tile_operands(PairIds, rm, m_ok, pid_n, N,
                                           GATHER_DIV > 0 or HAS_GATE, GATHER_DIV, BLOCK_N)
    dh, _ = _mainloop(A, B, a_row, m_ok, group, rn, n_ok, K, stride_am, stride_ak, stride_bg,
                      stride_bk, stride_bn, 0, False, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
    _dact_epilogue(dh, Preact, DPreact, Gate, DGate, pair, rm, m_ok, rn, n_ok, pid_n, N,
                   stride_pm, stride_dg, ACT, HAS_GATE)


@triton.jit
def _dact_rows_kernel(Preact, DPreact, PairIds, Gate, DGate, M, N, stride_pm, stride_dg,
                      ACT: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """The split path's second pass: the dact epilogue over dh that a plain GEMM wrote into
    DPreact (its first N columns), in place (each element is read before it is written, by
    the same program)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    pair = _pair_ids(PairIds, rm, m_ok, HAS_GATE)
    d_ptr = DPreact + rm.to(tl.int64)[:, None] * stride_pm + rn[None, :]
    dh = tl.load(d_ptr, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    _dact_epilogue(dh, Preact, DPreact, Gate, DGate, pair, rm, m_ok, rn, n_ok, pid_n, N,
                   stride_pm, stride_dg, ACT, HAS_GATE)


def default_config(dtype: torch.dtype) -> dict:
    """Tile shapes when nothing is tuned: small under the interpreter (partial tiles in small
    tests), tensor-core sized on the GPU."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def fwd_key(a, b, *, offsets=None, pair_ids=None, activation="none", **_) -> str:
    """The tuning key of a :func:`grouped_gemm` launch (see ``tuning.shape_key``)."""
    grouped = offsets is not None
    n_out = b.shape[-1] // 2 if activation == "swiglu" else b.shape[-1]
    M = pair_ids.shape[0] if grouped else a.shape[0]
    return tuning.shape_key("fwd", f"{'grouped' if grouped else 'dense'}-{activation}",
                            a.dtype, M, n_out, a.shape[1])


def dact_key(dc, w, preact, activation, *, offsets=None, **_) -> str:
    """The tuning key of a :func:`grouped_dact` launch."""
    return tuning.shape_key("dact", f"{'dense' if offsets is None else 'grouped'}-{activation}",
                            dc.dtype, preact.shape[0], w.shape[-2], dc.shape[1])


def tuned_config(table: str | None, key: str, dtype: torch.dtype) -> dict:
    """The entry for ``key`` in the tuned ``table`` (without its timing), else the default."""
    tuned = tuning.lookup(table, key) if table else None
    if tuned is None:
        return default_config(dtype)
    return {k: v for k, v in tuned.items() if k != "ms"}


def pick_config(key: str, a: torch.Tensor) -> dict:
    """The committed tuned config for this device (or its stand-in) and shape, else the
    default."""
    table = tuning.launch_table(a.device.index or 0) if a.is_cuda and not interpreting() else None
    return tuned_config(table, key, a.dtype)


def _via_cublas(op: str, cfg: dict, routed) -> bool:
    """Whether ``cfg`` (a tuned entry) sends this dense launch to cuBLAS + PyTorch ops
    (``tuning.CUBLAS``); only plain dense GEMMs can go there."""
    if cfg.get("path") != "cublas":
        return False
    check(not routed, op, "the cuBLAS path takes dense launches only (no groups, pairs or "
          "gates)")
    return True


def _check_gemm(op, a, b, offsets, activation, pair_ids, needs_pairs):
    check_tensor(a, op, "a", 2)
    grouped = offsets is not None
    dims = 3 if grouped else 2
    check(isinstance(b, torch.Tensor) and b.dim() == dims, op, "b must be a {}-dim tensor", dims)
    check(b.dtype == a.dtype and b.device == a.device, op,
          "b (dtype {}, {}) must match a (dtype {}, {})", b.dtype, b.device, a.dtype, a.device,
          exc=TypeError)
    check(activation in ACTIVATIONS, op, "activation must be one of {}", list(ACTIVATIONS))
    check(b.shape[-2] == a.shape[1], op, "b's reduction dim is {}, a has K={}", b.shape[-2],
          a.shape[1])
    check(not needs_pairs or pair_ids is not None, op, "gather/scatter/scale need pair_ids")
    if grouped:
        check_tensor(offsets, op, "offsets", 1, dtypes=(torch.int32,), device=a.device)
        check(offsets.shape[0] == b.shape[0] + 1, op, "offsets must have G+1 entries")
    bs = b.stride() if grouped else (0,) + tuple(b.stride())
    return (b.shape[0] if grouped else 0), bs


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, *, offsets: torch.Tensor | None = None,
                 pair_ids: torch.Tensor | None = None, gather_div: int = 0,
                 scatter: bool = False, scale: torch.Tensor | None = None,
                 activation: str = "none", save_preact: bool = False,
                 bias: torch.Tensor | None = None, config: dict | None = None,
                 out: torch.Tensor | None = None):
    """C[rows] = act(A[rows] @ B[group]) (* scale[pair]) for every group's rows.

    a: [Ma, K]. b: [G, K, Nb] (any strides) with offsets [G+1] int32 (grouped), or [K, Nb]
    (dense, one group of Ma rows). Grouped output has M = len(pair_ids) rows. C is [M, N] with
    N = Nb, or Nb / 2 for ``swiglu`` (b holds [gate | up]).
    pair_ids [M] int32: the pair id at each sorted row; ``gather_div`` > 0 reads A row
    pair // gather_div; ``scatter`` writes C row pair instead of the sorted row; ``scale`` [P]
    multiplies each row by scale[pair]. ``bias`` [G, Nb] or [Nb] is added before the
    activation. ``save_preact`` also returns the pre-activation [M, Nb] in sorted rows (for the
    backward): (C, preact). ``config``: tile config (default: the tuned one for this device
    and shape), or ``tuning.CUBLAS`` for a dense launch in cuBLAS. ``out``: C written there
    ([M, N], a.dtype, unit column stride) instead of a new tensor.
    """
    op = "grouped_gemm"
    needs_pairs = gather_div > 0 or scatter or scale is not None
    groups, bs = _check_gemm(op, a, b, offsets, activation, pair_ids, needs_pairs)
    n_out = b.shape[-1] // 2 if activation == "swiglu" else b.shape[-1]
    M = pair_ids.shape[0] if groups else a.shape[0]
    if bias is not None:
        check(bias.shape[-1] == b.shape[-1] and bias.dim() == (2 if groups else 1) and
              bias.stride(-1) == 1, op, "bias must be [{}{}] and contiguous, got {}",
              "G, " if groups else "", b.shape[-1], tuple(bias.shape))
    cfg = dict(config or pick_config(fwd_key(a, b, offsets=offsets, pair_ids=pair_ids,
                                             activation=activation), a))
    if out is not None:
        check_tensor(out, op, "out", 2, dtypes=(a.dtype,), device=a.device)
        check(tuple(out.shape) == (M, n_out), op, "out must be [{}, {}], got {}", M, n_out,
              tuple(out.shape))
        check(cfg.get("path") != "cublas", op, "out= is not taken on the cuBLAS path")
    if _via_cublas(op, cfg, groups or needs_pairs):
        out, preact = torch_ops.linear(a, b, activation, save_preact, bias)
        return (out, preact) if save_preact else out
    if out is None:
        out = torch.empty(M, n_out, device=a.device, dtype=a.dtype)
    preact = torch.empty(M, b.shape[-1], device=a.device, dtype=a.dtype) if save_preact else None
    if M and n_out:
        grid = ((cdiv(M, cfg["BLOCK_M"]) + groups) * cdiv(n_out, cfg["BLOCK_N"]),)
        _grouped_gemm_kernel[grid](
            a, b, out, preact, bias, pair_ids, scale, offsets, M, n_out, a.shape[1],
            a.stride(0), a.stride(1), bs[0], bs[1], bs[2], out.stride(0), out.stride(1),
            0 if preact is None else preact.stride(0),
            0 if bias is None or not groups else bias.stride(0),
            NUM_GROUPS=groups, GATHER_DIV=gather_div, SCATTER=scatter,
            HAS_SCALE=scale is not None, ACT=ACTIVATIONS[activation], STORE_PREACT=save_preact,
            HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(a.dtype), BLOCK_G=pow2(groups),
            **cfg)
    return (out, preact) if save_preact else out


def grouped_dact(dc: torch.Tensor, w: torch.Tensor, preact: torch.Tensor, activation: str, *,
                 offsets: torch.Tensor | None = None, pair_ids: torch.Tensor | None = None,
                 gather_div: int = 0, gate: torch.Tensor | None = None,
                 config: dict | None = None):
    """Backward of ``C = gate * act(Z) @ W`` into the pre-activation Z (sorted rows).

    dc: [Ma, N] upstream gradient (rows gathered by pair // gather_div when > 0); w: [G, F, N]
    or [F, N] (the forward weight; transposed here through strides); preact: Z [M, F'].
    Returns dZ [M, F'] and, with ``gate`` [P] (flattened topk weights), dgate [P] fp32.
    ``config`` as in :func:`grouped_gemm`; one with ``split=True`` (``tuning.SPLIT``) runs the
    GEMM alone, writing dh into dZ's buffer, then the epilogue as its own pass over the rows
    (``_dact_rows_kernel``): more bytes moved, but neither pass carries the other's registers.
    """
    op = "grouped_dact"
    wt = w.transpose(-1, -2)
    groups, bs = _check_gemm(op, dc, wt, offsets, activation, pair_ids,
                             gather_div > 0 or gate is not None)
    F = wt.shape[-1]
    check(preact.shape[-1] == (2 * F if activation == "swiglu" else F), op,
          "preact has {} columns for activation {} and F={}", preact.shape[-1], activation, F)
    M = preact.shape[0]
    cfg = dict(config or pick_config(dact_key(dc, w, preact, activation, offsets=offsets),
                                     dc))
    if _via_cublas(op, cfg, groups or gather_div > 0 or gate is not None):
        return torch_ops.linear_dact(dc, w, preact, activation)
    split = cfg.pop("split", False)
    n_tiles = cdiv(F, SPLIT_BLOCK[1] if split else cfg["BLOCK_N"])
    dpre = torch.empty_like(preact)
    dgate_part = (torch.empty(gate.numel(), n_tiles, device=dc.device, dtype=torch.float32)
                  if gate is not None else None)
    strides = (preact.stride(0), 0 if dgate_part is None else dgate_part.stride(0))
    consts = dict(ACT=ACTIVATIONS[activation], HAS_GATE=gate is not None)
    if M and F and split:
        grouped_gemm(dc, wt, offsets=offsets, pair_ids=pair_ids, gather_div=gather_div,
                     config=cfg, out=dpre[:, :F])
        _dact_rows_kernel[(cdiv(M, SPLIT_BLOCK[0]), n_tiles)](
            preact, dpre, pair_ids, gate, dgate_part, M, F, *strides, **consts,
            BLOCK_M=SPLIT_BLOCK[0], BLOCK_N=SPLIT_BLOCK[1], num_warps=4)
    elif M and F:
        grid = ((cdiv(M, cfg["BLOCK_M"]) + groups) * n_tiles,)
        _grouped_dact_kernel[grid](
            dc, wt, preact, dpre, pair_ids, gate, dgate_part, offsets, M, F, dc.shape[1],
            dc.stride(0), dc.stride(1), bs[0], bs[1], bs[2], *strides, NUM_GROUPS=groups,
            GATHER_DIV=gather_div, **consts, DOT_FP32=dot_in_fp32(dc.dtype),
            BLOCK_G=pow2(groups), **cfg)
    if gate is None:
        return dpre
    dgate = dgate_part.sum(1) if M else torch.zeros(gate.numel(), device=dc.device)
    return dpre, dgate


@custom_op("moe_adapter::expert_up")
def expert_up(u: torch.Tensor, w1: torch.Tensor, sorted_pair: torch.Tensor,
              expert_offsets: torch.Tensor, top_k: int, activation: str,
              save_preact: bool = False, b1: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed up-projection. u [T, d] (gathered by token = pair // k inside the GEMM), w1
    [E, d, F'], optional bias b1 [E, F'] -> (h [T*k, F], preact) in expert-sorted order, the
    activation (``silu``, ``swiglu``, ``gelu`` or ``identity``) applied in the epilogue.
    preact [T*k, F'] is the pre-activation when ``save_preact``, else empty."""
    out = grouped_gemm(u, w1, offsets=expert_offsets, pair_ids=sorted_pair, gather_div=top_k,
                       activation=activation, save_preact=save_preact, bias=b1)
    return out if save_preact else (out, u.new_empty(0))


@expert_up.register_fake
def _(u, w1, sorted_pair, expert_offsets, top_k, activation, save_preact=False, b1=None):
    n = w1.shape[-1] // 2 if activation == "swiglu" else w1.shape[-1]
    P = sorted_pair.shape[0]
    return u.new_empty(P, n), u.new_empty(P, w1.shape[-1]) if save_preact else u.new_empty(0)


@custom_op("moe_adapter::expert_down")
def expert_down(h: torch.Tensor, w2: torch.Tensor, sorted_pair: torch.Tensor,
                expert_offsets: torch.Tensor, topk_weights: torch.Tensor,
                b2: torch.Tensor | None = None) -> torch.Tensor:
    """Routed down-projection. h [T*k, F] (sorted), w2 [E, F, N], optional bias b2 [E, N] ->
    y_pairs [T*k, N] in pair order (row t*k+j), each row already multiplied by its gate
    weight topk_weights[t, j]."""
    return grouped_gemm(h, w2, offsets=expert_offsets, pair_ids=sorted_pair, scatter=True,
                        scale=topk_weights.reshape(-1), bias=b2)


@expert_down.register_fake
def _(h, w2, sorted_pair, expert_offsets, topk_weights, b2=None):
    return h.new_empty(h.shape[0], w2.shape[-1])


@custom_op("moe_adapter::linear")
def linear(a: torch.Tensor, w: torch.Tensor, activation: str, save_preact: bool = False,
           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense act(a [M, K] @ w [K, N] + bias [N]) (w may be a transposed view), for the shared
    / aggregation MLP: (c [M, N'], preact [M, N] when ``save_preact``, else empty)."""
    out = grouped_gemm(a, w, activation=activation, save_preact=save_preact, bias=bias)
    return out if save_preact else (out, a.new_empty(0))


@linear.register_fake
def _(a, w, activation, save_preact=False, bias=None):
    n = w.shape[-1] // 2 if activation == "swiglu" else w.shape[-1]
    return a.new_empty(a.shape[0], n), (a.new_empty(a.shape[0], w.shape[-1]) if save_preact
                                        else a.new_empty(0))


@custom_op("moe_adapter::expert_dact")
def expert_dact(dz: torch.Tensor, w2: torch.Tensor, preact: torch.Tensor,
                sorted_pair: torch.Tensor, expert_offsets: torch.Tensor,
                topk_weights: torch.Tensor, top_k: int, activation: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the routed experts' down-projection into their pre-activation.

    dz [T, N] (gradient of the routed sum, gathered by token), w2 [E, F, N], preact [T*k, F']
    (sorted). Returns (dpreact [T*k, F'] sorted, dgate [T, k] fp32)."""
    dpre, dgate = grouped_dact(dz, w2, preact, activation, offsets=expert_offsets,
                               pair_ids=sorted_pair, gather_div=top_k,
                               gate=topk_weights.reshape(-1))
    return dpre, dgate.view(topk_weights.shape)


@expert_dact.register_fake
def _(dz, w2, preact, sorted_pair, expert_offsets, topk_weights, top_k, activation):
    return torch.empty_like(preact), topk_weights.new_empty(topk_weights.shape,
                                                            dtype=torch.float32)


@custom_op("moe_adapter::linear_dact")
def linear_dact(dc: torch.Tensor, w: torch.Tensor, preact: torch.Tensor, activation: str
                ) -> torch.Tensor:
    """Backward of ``c = act(z) @ w`` into z: dc [M, N], w [F, N], preact z [M, F']."""
    return grouped_dact(dc, w, preact, activation)


@linear_dact.register_fake
def _(dc, w, preact, activation):
    return torch.empty_like(preact)


@custom_op("moe_adapter::expert_dx")
def expert_dx(dpreact: torch.Tensor, w1: torch.Tensor, sorted_pair: torch.Tensor,
              expert_offsets: torch.Tensor) -> torch.Tensor:
    """Input gradient of the routed up-projection per pair: dpreact [T*k, F'] (sorted) @
    w1[e]^T -> [T*k, d] in pair order (the caller sums the k slots of each token)."""
    return grouped_gemm(dpreact, w1.transpose(1, 2), offsets=expert_offsets,
                        pair_ids=sorted_pair, scatter=True)


@expert_dx.register_fake
def _(dpreact, w1, sorted_pair, expert_offsets):
    return dpreact.new_empty(dpreact.shape[0], w1.shape[1])
