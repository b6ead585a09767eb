"""The backward's last step, one pass over the tokens: the router's logit gradient and the
adapter input's gradient.

Per token t: the gate gradient (from the experts, the caller's topk_weights gradient and the
top-k aux loss) goes back through the softmax over the k kept logits and into the E logits;
then du = sum_j dU_pairs[t*k + j] (the k routed slots, in fp32, fixed order) + dU_shared[t]
+ dlogits[t] @ W_g^T, and the input norm's backward turns du into dx. Done as separate torch
ops this was ~20 launches and four fp32 [T, d] temporaries; here every input is read once and
only dx is written (plus per-program partial sums of the norm's weight and bias gradients,
reduced in a fixed order: deterministic). Programs walk their tokens as the norm backward's do
(``norm.rows_per_step``) and share its arithmetic (``norm._norm_bwd_rows``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check, check_tensor, custom_op, pow2
from .norm import NORM_BWD_ROWS, NORM_CODES, _norm_bwd_rows, rows_per_step


@triton.jit
def _input_grad_kernel(
        DUp, DUs, DG, DGo, Gates, Ids, Offsets, DAux, DLo, WgT, X, W, Mean, Rstd,
        DX, DL, DWp, DBp, T, N, aux_scale, stride_dup, stride_dus, stride_x, stride_dx,
        K: tl.constexpr, E: tl.constexpr, ROWS: tl.constexpr, NORM: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHARED: tl.constexpr,
        NEED_DX: tl.constexpr, AUX: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """ROWS tokens, BLOCK_R at a time, and this program's partial sums of the norm's dw, db."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    es = tl.arange(0, BLOCK_E)
    if NEED_DX and HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = None
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    daux = 0.0
    if AUX:
        daux = tl.load(DAux).to(tl.float32) * aux_scale
    for r0 in range(0, ROWS, BLOCK_R):
        rows = pid * ROWS + r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < T
        rows64 = rows.to(tl.int64)
        # router: d gate -> d kept logits (softmax over the k) -> scattered into the E logits
        km = r_ok[:, None] & (ks[None, :] < K)
        rk = rows64[:, None] * K + ks[None, :]
        g = tl.load(Gates + rk, mask=km, other=0.0)
        dg = tl.load(DG + rk, mask=km, other=0.0) + tl.load(DGo + rk, mask=km,
                                                              other=0.0).to(tl.float32)
        ids = tl.load(Ids + rk, mask=km, other=0)
        if AUX:  # d L_aux / d gate = E / T^2 * (pairs routed to the gate's expert)
            routed = (tl.load(Offsets + ids + 1, mask=km, other=0)
                      - tl.load(Offsets + ids, mask=km, other=0))
            dg += daux * routed.to(tl.float32)
        dkept = g * (dg - tl.sum(g * dg, 1)[:, None])
        hit = (ids[:, :, None] == es[None, None, :]) & km[:, :, None]
        em = r_ok[:, None] & (es[None, :] < E)
        re = rows64[:, None] * E + es[None, :]
        dl = tl.load(DLo + re, mask=em, other=0.0).to(tl.float32)
        dl += tl.sum(tl.where(hit, dkept[:, :, None], 0.0), 1)
        tl.store(DL + re, dl, mask=em)
        if NEED_DX:
            mask = r_ok[:, None] & cmask[None, :]
            du = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(K):
                du += tl.load(DUp + ((rows64 * K + j) * stride_dup)[:, None] + cols[None, :],
                              mask=mask, other=0.0).to(tl.float32)
            if HAS_SHARED:
                du += tl.load(DUs + (rows64 * stride_dus)[:, None] + cols[None, :], mask=mask,
                              other=0.0).to(tl.float32)
            for e in tl.static_range(E):  # dlogits[t] @ W_g^T, E is small
                dle = tl.sum(tl.where(es[None, :] == e, dl, 0.0), 1)
                wge = tl.load(WgT + e * N + cols, mask=cmask, other=0.0).to(tl.float32)
                du += dle[:, None] * wge[None, :]
            if NORM >= 0:
                x = tl.load(X + (rows64 * stride_x)[:, None] + cols[None, :], mask=mask,
                            other=0.0).to(tl.float32)
                mean = tl.load(Mean + rows, mask=r_ok, other=0.0)
                rstd = tl.load(Rstd + rows, mask=r_ok, other=0.0)
                dx, xhat = _norm_bwd_rows(du, x, mean, rstd, w, mask, N, NORM == 1, HAS_W)
                dw += tl.sum(du * xhat, 0)
                db += tl.sum(du, 0)
            else:
                dx = du
            tl.store(DX + (rows64 * stride_dx)[:, None] + cols[None, :],
                     dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_DX and HAS_W:
        tl.store(DWp + pid.to(tl.int64) * N + cols, dw, mask=cmask)
    if NEED_DX and HAS_B:
        tl.store(DBp + pid.to(tl.int64) * N + cols, db, mask=cmask)


def input_grad_forward(du_pairs, du_shared, dgates, dgates_out, dlogits_out, gates, ids, offsets,
                       daux, aux_scale: float, w_gate, x, weight, bias, mean, rstd, kind: str):
    """Gradients of the logits and the adapter input x [T, d].

    du_pairs [T*k, d]: the routed experts' input gradient per (token, slot) pair in pair
    order (``expert_dx``), or None when x's gradient is not needed (then only dlogits is
    computed); du_shared [T, d] or None: the shared expert's input gradient. dgates [T, k]
    fp32: the experts' gate gradient; dgates_out [T, k], dlogits_out [T, E]: the gradients
    arriving at the module's topk_weights and logits outputs; gates, ids: the routing; offsets
    [E+1] and daux (0-d) with aux_scale = E / T^2 give the top-k aux loss's term (aux_scale 0:
    none). x, weight, bias, mean, rstd, kind: the input norm (``none``: dx = du).

    Returns (dx [T, d] in x.dtype (empty without du_pairs), dlogits [T, E] fp32, dweight,
    dbias): the norm's parameter gradients in their dtypes, empty where there is no such
    parameter or no du_pairs.
    """
    op = "input_grad"
    check_tensor(x, op, "x", 2)
    check_tensor(w_gate, op, "w_gate", 2, device=x.device)
    check_tensor(gates, op, "gates", 2, dtypes=(torch.float32,), device=x.device)
    check_tensor(ids, op, "ids", 2, dtypes=(torch.int32,), device=x.device)
    check(kind in NORM_CODES or kind == "none", op, "unknown norm {!r}", kind)
    T, N = x.shape
    k, E = ids.shape[1], w_gate.shape[1]
    check(w_gate.shape[0] == N and gates.shape == ids.shape == (T, k), op,
          "shapes disagree: x {}, w_gate {}, gates {}, ids {}", tuple(x.shape),
          tuple(w_gate.shape), tuple(gates.shape), tuple(ids.shape))
    need_dx = du_pairs is not None
    if need_dx:
        check_tensor(du_pairs, op, "du_pairs", 2, device=x.device)
        check(du_pairs.shape == (T * k, N), op, "du_pairs must be [{}, {}], got {}", T * k, N,
              tuple(du_pairs.shape))
    if du_shared is not None:
        check_tensor(du_shared, op, "du_shared", 2, device=x.device)
        check(du_shared.shape == (T, N), op, "du_shared must be [{}, {}], got {}", T, N,
              tuple(du_shared.shape))
    dev = x.device
    dx = torch.empty(T if need_dx else 0, N, device=dev, dtype=x.dtype)
    dlogits = torch.empty(T, E, device=dev, dtype=torch.float32)
    nprog = cdiv(T, NORM_BWD_ROWS)
    norm_on = need_dx and kind != "none"
    has_w, has_b = norm_on and weight is not None, norm_on and bias is not None
    dwp = torch.empty(nprog if has_w else 0, N, device=dev, dtype=torch.float32)
    dbp = torch.empty(nprog if has_b else 0, N, device=dev, dtype=torch.float32)
    if T:
        _input_grad_kernel[(nprog,)](
            du_pairs, du_shared, dgates.contiguous(), dgates_out.contiguous(),
            gates.contiguous(), ids.contiguous(), offsets, daux, dlogits_out.contiguous(),
            w_gate.t().contiguous(), x, weight, mean, rstd, dx, dlogits, dwp, dbp, T, N,
            float(aux_scale), du_pairs.stride(0) if need_dx else 0,
            du_shared.stride(0) if du_shared is not None else 0, x.stride(0),
            dx.stride(0), K=k, E=E, ROWS=NORM_BWD_ROWS, NORM=NORM_CODES.get(kind, -1),
            HAS_W=has_w, HAS_B=has_b, HAS_SHARED=du_shared is not None, NEED_DX=need_dx,
            AUX=aux_scale != 0, BLOCK_R=rows_per_step(), BLOCK_N=pow2(N),
            BLOCK_K=pow2(k, 2), BLOCK_E=pow2(E, 2), num_warps=4 if N <= 4096 else 8)
    return (dx, dlogits, dwp.sum(0).to(weight.dtype) if has_w else dwp.new_empty(0),
            dbp.sum(0).to(bias.dtype) if has_b else dbp.new_empty(0))


@custom_op("moe_adapter::input_grad")
def input_grad(du_pairs: torch.Tensor | None, du_shared: torch.Tensor | None,
               dgates: torch.Tensor, dgates_out: torch.Tensor, dlogits_out: torch.Tensor,
               gates: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
               daux: torch.Tensor, aux_scale: float, w_gate: torch.Tensor, x: torch.Tensor,
               weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
               rstd: torch.Tensor, kind: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch op of :func:`input_grad_forward`: (dx, dlogits, dweight, dbias)."""
    return input_grad_forward(du_pairs, du_shared, dgates, dgates_out, dlogits_out, gates, ids,
                              offsets, daux, aux_scale, w_gate, x, weight, bias, mean, rstd,
                              kind)


@input_grad.register_fake
def _(du_pairs, du_shared, dgates, dgates_out, dlogits_out, gates, ids, offsets, daux,
      aux_scale, w_gate, x, weight, bias, mean, rstd, kind):
    T, N = x.shape
    need_dx = du_pairs is not None
    norm_on = need_dx and kind != "none"
    return (x.new_empty(T if need_dx else 0, N),
            x.new_empty(T, w_gate.shape[1], dtype=torch.float32),
            torch.empty_like(weight) if norm_on and weight is not None else
            x.new_empty(0, dtype=torch.float32),
            torch.empty_like(bias) if norm_on and bias is not None else
            x.new_empty(0, dtype=torch.float32))
