"""Each fused op of both kernel sets (``kn``: the Triton ops, then the CUDA extension's, with
the same names and signatures) against PyTorch, at small odd shapes (partial tiles
everywhere).

Without a GPU these run on the CPU: the Triton kernels under TRITON_INTERPRET=1 and the CUDA
kernels under their emulator (set in conftest), fp32 and fp16. Outputs are poisoned before
the kernels run, so an unwritten element fails the comparison, and float inputs lie between
NaN guard bands, so a read past either end of one (a missing mask) does too.
"""

import importlib

import pytest
import torch

from moe_adapter_kernels import reference
from moe_adapter_kernels.autograd import KERNELS, op_set

from helpers import DEVICE, TOL, between_bands, rel_err

BLOCK_T = 32  # tokens per router block, in both kernel sets

DTYPES = [torch.float32, torch.float16]
# The GEMM tests add bf16: the CUDA kernels run it on the emulator (the Triton interpreter's
# bf16 is not the GPU's, so Triton's bf16 is tested on GPUs: tests/test_gpu.py, and these
# tests when run on one).
GEMM_DTYPES = DTYPES + [torch.bfloat16]


def skip_interpreted_bf16(dtype, kn):
    if dtype == torch.bfloat16 and DEVICE == "cpu" and kn is KERNELS.get("triton"):
        pytest.skip("Triton bf16 under the interpreter is not the GPU's; tested on GPUs")

pytestmark = pytest.mark.usefixtures("poison")


@pytest.fixture
def kn(backend):
    """The op set of the backend under test."""
    op_set(backend)  # registers it
    return KERNELS[backend]


GUARD = 1 << 15  # elements of NaN before and after each input: more than a 128-row tile of it


def randn(*shape, dtype=torch.float32, scale=1.0):
    """Fresh normal values in a tensor stored between NaN guard bands."""
    t, _ = between_bands(shape, dtype, float("nan"), GUARD)
    return t.copy_(torch.randn(*shape, device=DEVICE) * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("T,N", [(0, 40), (1, 37), (45, 72)])
def test_norm(dtype, kind, T, N, kn):
    x = randn(T, N, dtype=dtype, scale=3.0) + 1.0
    w, b = randn(N, dtype=dtype), randn(N, dtype=dtype)
    bias = b if kind == "layernorm" else None
    y, mean, rstd = kn.norm(x, w, bias, kind, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    if T:
        assert rel_err(y, reference.norm(x, kind, w, bias, 1e-5)) < TOL[dtype]
        xf = x.float()
        ref_rstd = torch.rsqrt((xf - (xf.mean(1, keepdim=True) if kind == "layernorm" else 0))
                               .pow(2).mean(1) + 1e-5)
        assert rel_err(rstd, ref_rstd) < 1e-5


def check_routing(u, w_gate, k, kn):
    logits, ids, weights, block_counts, block_gates = kn.route(u, w_gate, k)
    ref = reference.route(u, w_gate, k)
    T, E = logits.shape
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert all(len(set(row)) == k for row in ids.tolist())
    # The reference's ids, except where its logits tie to within fp32 rounding (the kernels
    # sum in another order, so near-ties may rank either way; exact ties go to the lower
    # index, tested below): each rank's expert has the reference's logit for that rank.
    chosen, ranked = ref.logits.gather(1, ids.long()), ref.logits.gather(1, ref.topk_ids)
    assert ((chosen - ranked).abs() <= 1e-5 * ref.logits.abs().amax(1, keepdim=True)).all()
    assert rel_err(weights, ref.topk_weights) < 1e-5
    assert rel_err(logits, ref.logits) < 1e-5
    expected = torch.zeros_like(block_counts)
    expected_gates = torch.zeros_like(block_gates, dtype=torch.float64)
    for t in range(T):
        for e, g in zip(ids[t].tolist(), weights[t].tolist()):
            expected[t // BLOCK_T, e] += 1
            expected_gates[t // BLOCK_T, e] += g
    assert torch.equal(block_counts, expected)
    assert block_gates.dtype == torch.float32
    if T:
        assert rel_err(block_gates, expected_gates) < 1e-6
    return ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", [(1, 8, 4), (45, 8, 4), (70, 16, 4), (33, 8, 1), (20, 4, 4),
                                   (37, 5, 3)])
def test_route(dtype, T, E, k, kn):
    u = randn(T, 72, dtype=dtype)
    w_gate = randn(72, E, dtype=dtype, scale=0.3)
    check_routing(u, w_gate, k, kn)


def test_route_ties_go_to_the_lowest_index(kn):
    u = randn(40, 24)
    w = randn(24, 6)
    w[:, 4] = w[:, 1]      # experts 1 and 4 always tie
    w[:, 5] = 0.0          # expert 5 ties with every other zero logit
    u[3] = 0.0             # token 3: all logits zero, a six-way tie
    ids = check_routing(u, w, 3, kn)
    assert ids[3].tolist() == [0, 1, 2]
    assert not ((ids == 4).any(1) & ~(ids == 1).any(1)).any()  # 4 never chosen without 1


def test_route_empty_and_non_finite_rows_get_distinct_experts(kn):
    """NaN logits rank above every other (as in torch.topk): a row of NaN logits, or of some
    NaN logits, still names k distinct in-range experts, and the block counts agree with the
    ids (the permutation relies on it); only that row's gates are NaN."""
    logits, ids, weights, counts, gate_sums = kn.route(randn(0, 16), randn(16, 8), 2)
    assert ids.shape == (0, 2) and counts.shape == gate_sums.shape == (0, 8)
    u, w = randn(37, 16), randn(16, 8)
    u[2] = float("nan")                      # every logit NaN
    w[:, 6] = 0.0
    w[4, 6] = float("inf")                   # column 6: +-inf logits, NaN where u[:, 4] is 0
    u[[9, 30], 4] = 0.0
    for k in (1, 3, 8):
        logits, ids, weights, counts, _ = kn.route(u, w, k)
        assert ids.min() >= 0 and ids.max() < 8
        assert all(len(set(row)) == k for row in ids.tolist())
        assert torch.equal(counts.sum(0), torch.bincount(ids.flatten().long(), minlength=8).int())
        assert torch.isnan(weights[2]).all()
        nan_rows = logits.isnan().any(1)
        assert nan_rows.nonzero().flatten().tolist() == [2, 9, 30]
        assert torch.isfinite(weights[logits.isfinite().all(1)]).all()
        assert (ids[nan_rows, 0] == torch.where(logits[nan_rows].isnan(), 0, 1).argmin(1)).all()


def permute_case(ids: torch.Tensor, E: int, kn):
    """Permute random routing ``ids`` with random gates; check the sort, the inverse map, the
    offsets and L_aux against PyTorch."""
    T, k = ids.shape
    gates = torch.softmax(torch.randn(T, k, device=ids.device), -1)
    nb = -(-T // BLOCK_T)
    cell = (torch.arange(T, device=ids.device)[:, None] // BLOCK_T * E + ids).flatten()
    block_counts = torch.bincount(cell, minlength=nb * E).view(nb, E).int()
    block_gates = torch.zeros(nb * E, dtype=torch.float64, device=ids.device).index_add_(
        0, cell, gates.flatten().double()).view(nb, E).float()
    sorted_pair, pair_pos, offsets, aux = kn.permute(ids, block_counts, block_gates, E)
    flat = ids.reshape(-1).long()
    assert torch.equal(sorted_pair.long(), torch.argsort(flat, stable=True))
    assert torch.equal(pair_pos.long()[sorted_pair.long()],
                       torch.arange(T * k, device=ids.device))
    counts = torch.bincount(flat, minlength=E)
    assert offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert aux.shape == () and aux.dtype == torch.float32
    ref_aux = reference.aux_loss(reference.Routing(torch.zeros(T, E, device=ids.device),
                                                   ids.long(), gates), E)
    assert abs(aux.item() - ref_aux.item()) <= 1e-5 * max(ref_aux.item(), 1e-30)


def distinct_ids(T, E, k, experts=None):
    """Random routing: k distinct experts per token, drawn from ``experts`` (default all)."""
    pool = torch.tensor(experts if experts is not None else list(range(E)))
    rows = [pool[torch.randperm(len(pool))[:k]] for _ in range(T)]
    return (torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)).to(
        device=DEVICE, dtype=torch.int32)


@pytest.mark.parametrize("T,E,k", [(0, 8, 4), (1, 8, 4), (31, 8, 4), (100, 8, 4), (77, 16, 4),
                                   (65, 8, 1), (40, 4, 4), (50, 5, 3)])
def test_permute(T, E, k, kn):
    permute_case(distinct_ids(T, E, k), E, kn)


def test_permute_all_tokens_to_one_expert_and_empty_experts(kn):
    permute_case(distinct_ids(90, 8, 1, experts=[6]), 8, kn)
    permute_case(distinct_ids(90, 8, 2, experts=[1, 6]), 8, kn)


def test_permute_scan_over_many_blocks(kn):
    """More router blocks than one step of the Triton scan (256) holds: the prefix carries."""
    permute_case(distinct_ids(300 * BLOCK_T + 5, 8, 2), 8, kn)


def grouped_reference(a, b, ids, activation, weights=None):
    """Per-pair act(a[token] @ b[expert]) * weight, in pair order, fp32."""
    T, k = ids.shape
    rows = []
    for p, e in enumerate(ids.reshape(-1).tolist()):
        r = reference.activation(a[p // k].float()[None] @ b[e].float(), activation)
        if weights is not None:
            r = r * weights.reshape(-1)[p].float()
        rows.append(r)
    return torch.cat(rows) if rows else a.new_zeros(0, 1).float()


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("activation", ["none", "silu", "swiglu", "gelu"])
@pytest.mark.parametrize("T,E,k,experts", [(37, 8, 4, None), (1, 8, 4, None), (50, 8, 1, [2]),
                                           (29, 6, 3, [0, 1, 5]), (20, 4, 4, None)])
def test_expert_up_and_down(dtype, activation, T, E, k, experts, kn):
    skip_interpreted_bf16(dtype, kn)
    K, F, N = 72, 40, 24
    u = randn(T, K, dtype=dtype)
    w1 = randn(E, K, 2 * F if activation == "swiglu" else F, dtype=dtype, scale=0.2)
    w2 = randn(E, F, N, dtype=dtype, scale=0.2)
    ids = distinct_ids(T, E, k, experts)
    weights = torch.softmax(torch.randn(T, k, device=DEVICE), -1)
    sorted_pair = torch.argsort(ids.reshape(-1).long(), stable=True).to(torch.int32)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=DEVICE)
    offsets[1:] = torch.cumsum(torch.bincount(ids.reshape(-1).long(), minlength=E), 0)
    h, pre = kn.expert_up(u, w1, sorted_pair, offsets, k, activation, True)
    assert h.shape == (T * k, F) and h.dtype == dtype
    ref_pre = grouped_reference(u, w1, ids, "none")[sorted_pair.long()]
    assert pre.shape == (T * k, w1.shape[-1]) and rel_err(pre, ref_pre) < TOL[dtype]
    assert kn.expert_up(u, w1, sorted_pair, offsets, k, activation)[1].numel() == 0
    ref_h = grouped_reference(u, w1, ids, activation)  # pair order
    assert rel_err(h, ref_h[sorted_pair.long()]) < TOL[dtype]
    y_pairs = kn.expert_down(h, w2, sorted_pair, offsets, weights)
    h_pairs = torch.empty_like(h)
    h_pairs[sorted_pair.long()] = h
    ref_y = grouped_reference(h_pairs, w2, ids.reshape(-1, 1), "none", weights)
    assert rel_err(y_pairs, ref_y) < TOL[dtype]


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 24, 40), (70, 136, 56), (33, 100, 17)])
def test_linear(dtype, M, K, N, kn):
    skip_interpreted_bf16(dtype, kn)
    a, w = randn(M, K, dtype=dtype), randn(K, N, dtype=dtype, scale=0.2)
    c, pre = kn.linear(a, w, "silu", True)
    assert rel_err(c, torch.nn.functional.silu(a.float() @ w.float())) < TOL[dtype]
    assert rel_err(pre, a.float() @ w.float()) < TOL[dtype]
    assert rel_err(kn.linear(a, w, "none")[0], a.float() @ w.float()) < TOL[dtype]
    wt = randn(N, K, dtype=dtype, scale=0.2).t()  # a transposed view works too
    assert rel_err(kn.linear(a, wt, "none")[0], a.float() @ wt.float()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("T,k", [(0, 4), (1, 4), (23, 3)])
def test_combine(dtype, norm, shared, T, k, kn):
    N = 40
    y_pairs = randn(T * k, N, dtype=dtype)
    s = randn(T, N, dtype=dtype) if shared else None
    w = randn(N, dtype=dtype) if norm != "none" else None
    b = randn(N, dtype=dtype) if norm == "layernorm" else None
    y, _, _, z = kn.combine(y_pairs, s, k, norm, w, b, 1e-5, True)
    h = y_pairs.float().view(T, k, N).sum(1) + (s.float() if shared else 0)
    assert y.shape == (T, N) and y.dtype == dtype and z.shape == (T, N)
    if T:
        assert rel_err(y, reference.norm(h, norm, w, b, 1e-5)) < TOL[dtype]
        assert rel_err(z, h) < TOL[dtype]


def test_ops_reject_bad_arguments(kn):
    u = randn(4, 16)
    with pytest.raises(ValueError, match="w_gate"):
        kn.route(u, randn(15, 8), 2)
    with pytest.raises(ValueError, match="top_k"):
        kn.route(u, randn(16, 8), 9)
    with pytest.raises(TypeError, match="dtype"):
        kn.route(u.double(), randn(16, 8).double(), 2)
    with pytest.raises(TypeError, match="dtype"):
        kn.linear(u, randn(16, 8, dtype=torch.float16), "none")
    with pytest.raises(ValueError, match="b must be"):
        kn.linear(u, randn(3, 16, 8), "none")
    with pytest.raises(ValueError, match="reduction"):
        kn.linear(u, randn(15, 8), "none")
    with pytest.raises(ValueError, match="activation"):
        kn.linear(u, randn(16, 8), "relu")
    with pytest.raises(ValueError, match="contiguous"):
        kn.norm(randn(8, 4).t(), None, None, "rmsnorm", 1e-5)


def test_fake_implementations_match_real_shapes(kn):
    from torch._subclasses.fake_tensor import FakeTensorMode
    u, wg = randn(37, 16), randn(16, 8)
    real = kn.route(u, wg, 3)
    ids_real = real[1]
    perm_real = kn.permute(ids_real, real[3], real[4], 8)
    w1, w2 = randn(8, 16, 24), randn(8, 12, 10)
    up_real = kn.expert_up(u, w1, perm_real[0], perm_real[2], 3, "swiglu")[0]
    down_real = kn.expert_down(up_real, w2, perm_real[0], perm_real[2], real[2])
    comb_real = kn.combine(down_real, None, 3, "rmsnorm", None, None, 1e-6)
    with FakeTensorMode() as mode:
        fu, fwg = mode.from_tensor(u), mode.from_tensor(wg)
        fake = kn.route(fu, fwg, 3)
        perm = kn.permute(fake[1], fake[3], fake[4], 8)
        up = kn.expert_up(fu, mode.from_tensor(w1), perm[0], perm[2], 3, "swiglu")[0]
        down = kn.expert_down(up, mode.from_tensor(w2), perm[0], perm[2], fake[2])
        comb = kn.combine(down, None, 3, "rmsnorm", None, None, 1e-6)
        lin = kn.linear(fu, fwg, "silu")[0]
        nrm = kn.norm(fu, None, None, "rmsnorm", 1e-6)
    pairs = [(fake, real), (perm, perm_real), ((up,), (up_real,)), ((down,), (down_real,)),
             (comb, comb_real), ((lin,), (torch.empty(37, 8),)), (nrm, kn.norm(u, None, None,
                                                                                "rmsnorm", 1e-6))]
    for fakes, reals in pairs:
        for f, r in zip(fakes, reals):
            assert f.shape == r.shape and f.dtype == r.dtype


def routing_case(T, E, k, experts=None):
    ids = distinct_ids(T, E, k, experts)
    sorted_pair = torch.argsort(ids.reshape(-1).long(), stable=True).to(torch.int32)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=DEVICE)
    offsets[1:] = torch.cumsum(torch.bincount(ids.reshape(-1).long(), minlength=E), 0)
    return ids, sorted_pair, offsets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_norm_backward(dtype, kind, T, kn):
    N = 45
    x = randn(T, N, dtype=dtype, scale=2.0)
    w = randn(N, dtype=dtype)
    b = randn(N, dtype=dtype) if kind == "layernorm" else None
    dy = randn(T, N, dtype=dtype)
    _, mean, rstd = kn.norm(x, w, b, kind, 1e-5)
    dx, dw, db = kn.norm_bwd(dy, x, w, b, mean, rstd, kind)
    leaves = [t.float().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    ref = reference.norm(leaves[0], kind, leaves[1], leaves[2] if b is not None else None, 1e-5)
    ref.backward(dy.float())
    assert dx.shape == x.shape and dw.shape == w.shape
    if T:
        assert rel_err(dx, leaves[0].grad) < TOL[dtype]
        assert rel_err(dw, leaves[1].grad) < TOL[dtype]
        if b is not None:
            assert rel_err(db, leaves[2].grad) < TOL[dtype]
    else:
        assert not dw.any()


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("activation", ["silu", "swiglu", "gelu", "identity"])
@pytest.mark.parametrize("T,E,k,experts", [(37, 8, 4, None), (1, 8, 4, None), (40, 8, 2, [2, 5]),
                                           (29, 6, 3, None)])
def test_routed_backward_ops(dtype, activation, T, E, k, experts, kn):
    """expert_dact, weight_grad (both experts' weights) and expert_dx against autograd of the
    per-pair reference, including exact-zero gradients for experts with no rows."""
    skip_interpreted_bf16(dtype, kn)
    K, F, N = 40, 24, 33
    ids, sorted_pair, offsets = routing_case(T, E, k, experts)
    u = randn(T, K, dtype=dtype)
    w1 = randn(E, K, 2 * F if activation == "swiglu" else F, dtype=dtype, scale=0.3)
    w2 = randn(E, F, N, dtype=dtype, scale=0.3)
    gates = torch.softmax(torch.randn(T, k, device=DEVICE), -1)
    dz = randn(T, N, dtype=dtype)
    b1 = randn(E, w1.shape[-1], dtype=dtype, scale=0.3)
    b2 = randn(E, N, dtype=dtype, scale=0.3)
    h, pre = kn.expert_up(u, w1, sorted_pair, offsets, k, activation, True, b1)
    dpre, dgates = kn.expert_dact(dz, w2, pre, sorted_pair, offsets, gates, k, activation)
    dw2, db2 = kn.weight_grad_op(pre, dz, offsets, sorted_pair, 0, k, gates.reshape(-1),
                                  activation, True)
    dw1, db1 = kn.weight_grad_op(u, dpre, offsets, sorted_pair, k, 0, None, "none", True)
    du_pairs = kn.expert_dx(dpre, w1, sorted_pair, offsets)

    leaves = [t.float().requires_grad_(True) for t in (u, w1, w2, gates, b1, b2)]
    lu, lw1, lw2, lg, lb1, lb2 = leaves
    flat = ids.reshape(-1).long()
    z = torch.einsum("pk,pkf->pf", lu[torch.arange(T * k, device=DEVICE) // k], lw1[flat])
    hh = reference.activation(z + lb1[flat], activation)
    o = torch.einsum("pf,pfn->pn", hh, lw2[flat])
    y_pairs = (o + lb2[flat]) * lg.reshape(-1, 1)
    (y_pairs.view(T, k, N).sum(1) * dz.float()).sum().backward()
    # the kernel's gate gradient covers h @ W2; the caller adds <dz, b2[e]> (autograd.py)
    dg_h = ((o.view(T, k, N) * dz.float()[:, None]).sum(-1)).detach()
    assert rel_err(dgates, dg_h) < TOL[dtype]
    assert rel_err(dw2, lw2.grad) < TOL[dtype] and rel_err(dw1, lw1.grad) < TOL[dtype]
    assert rel_err(db1, lb1.grad) < TOL[dtype] and rel_err(db2, lb2.grad) < TOL[dtype]
    assert rel_err(du_pairs.float().view(T, k, K).sum(1), lu.grad) < TOL[dtype]
    used = set(flat.tolist())
    for e in range(E):
        if e not in used:
            assert not dw1[e].any() and not dw2[e].any()


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("activation", ["identity", "silu", "swiglu"])
@pytest.mark.parametrize("NB", [24, 17])
def test_weight_grad_over_long_row_ranges(dtype, activation, NB, kn):
    """weight_grad_op with each used expert owning 100 rows (several K steps of the kernels'
    row loop, so multi-stage pipelines wrap around), gathered and gate-scaled B rows, empty
    experts, and an odd width (no vectorised loads) against a per-expert matmul."""
    skip_interpreted_bf16(dtype, kn)
    T, E, k, KA = 100, 4, 2, 40
    ids, sorted_pair, offsets = routing_case(T, E, k, [1, 3])
    a = randn(T * k, 2 * KA if activation == "swiglu" else KA, dtype=dtype)
    b = randn(T, NB, dtype=dtype)
    scale = torch.rand(T * k, device=DEVICE) + 0.5
    dw, db = kn.weight_grad_op(a, b, offsets, sorted_pair, 0, k, scale, activation, True)
    h = reference.activation(a.float(), activation)
    sp = sorted_pair.long()
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        pairs = sp[lo:hi]
        rows_b = b.float()[pairs // k] * scale[pairs, None]
        if hi == lo:
            assert not dw[e].any() and not db[e].any()
            continue
        assert rel_err(dw[e], h[lo:hi].t() @ rows_b) < TOL[dtype], e
        assert rel_err(db[e], rows_b.sum(0)) < TOL[dtype], e


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_linear_backward_ops(dtype, kn):
    skip_interpreted_bf16(dtype, kn)
    M, K, S, N = 45, 40, 56, 24
    a, w1, w2 = randn(M, K, dtype=dtype), randn(K, S, dtype=dtype, scale=0.3), randn(
        S, N, dtype=dtype, scale=0.3)
    dc = randn(M, N, dtype=dtype)
    hs, pre = kn.linear(a, w1, "silu", True)
    dpre = kn.linear_dact(dc, w2, pre, "silu")
    dw2 = kn.weight_grad_op(pre, dc, None, None, 0, 0, None, "silu")[0]
    dw1 = kn.weight_grad_op(a, dpre, None, None, 0, 0, None, "none")[0]
    da = kn.linear(dpre, w1.t(), "none")[0]
    la, l1, l2 = (t.float().requires_grad_(True) for t in (a, w1, w2))
    (reference.mlp(la, l1, l2) * dc.float()).sum().backward()
    for got, want in ((dw1, l1.grad), (dw2, l2.grad), (da, la.grad)):
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "swiglu", "identity"])
def test_torch_linear_dact_is_the_activation_backward(activation, dtype):
    """torch_ops.linear_dact (the cuda backend's shared-MLP dact: cuBLAS, then PyTorch ops)
    against autograd through act(pre) @ w."""
    from moe_adapter_kernels import torch_ops
    M, S, N = 37, 24, 40
    width = 2 * S if activation == "swiglu" else S
    pre, w, dc = randn(M, width, dtype=dtype), randn(S, N, dtype=dtype, scale=0.3), randn(
        M, N, dtype=dtype)
    got = torch_ops.linear_dact(dc, w, pre, activation)
    lp = pre.float().requires_grad_(True)
    (reference.activation(lp, activation) @ w.float() * dc.float()).sum().backward()
    assert got.shape == pre.shape and got.dtype == dtype
    assert rel_err(got, lp.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "silu", "swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_dense_launches_on_the_cublas_path(activation, bias, dtype):
    """A dense launch whose tuned entry is tuning.CUBLAS (the tuner races it against the
    tiles for the shared MLP's shapes) runs in cuBLAS + PyTorch ops with the same results;
    a routed launch refuses it."""
    ops = pytest.importorskip("moe_adapter_kernels.ops")
    from moe_adapter_kernels.ops import tuning
    M, K, N = 37, 40, 48
    a, w = randn(M, K, dtype=dtype), randn(K, N, dtype=dtype, scale=0.3)
    b = randn(N, dtype=dtype) if bias else None
    pre_ref = a.float() @ w.float() + (b.float() if bias else 0)
    c, pre = ops.grouped_gemm(a, w, activation=activation, save_preact=True, bias=b,
                              config=tuning.CUBLAS)
    assert c.dtype == pre.dtype == dtype and c.data_ptr() != pre.data_ptr()
    assert rel_err(pre, pre_ref) < TOL[dtype]
    assert rel_err(c, reference.activation(pre_ref, activation)) < TOL[dtype]
    c_only = ops.grouped_gemm(a, w, activation=activation, bias=b, config=tuning.CUBLAS)
    assert torch.equal(c_only, c)
    n = N // 2 if activation == "swiglu" else N
    w2, dc = randn(n, 24, dtype=dtype, scale=0.3), randn(M, 24, dtype=dtype)
    lp = pre_ref.requires_grad_(True)
    (reference.activation(lp, activation) @ w2.float() * dc.float()).sum().backward()
    dpre = ops.grouped_dact(dc, w2, pre, activation, config=tuning.CUBLAS)
    assert dpre.shape == pre.shape and rel_err(dpre, lp.grad) < TOL[dtype]
    ids, sorted_pair, offsets = routing_case(10, 4, 2)
    with pytest.raises(ValueError, match="cuBLAS path takes dense launches only"):
        ops.grouped_gemm(a[:10], randn(4, K, N, dtype=dtype), offsets=offsets,
                         pair_ids=sorted_pair, gather_div=2, config=tuning.CUBLAS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "swiglu", "gelu", "identity"])
@pytest.mark.parametrize("T,k,experts", [(37, 2, None), (1, 2, None), (30, 1, [3]),
                                         (25, 2, [1, 4]), (0, 2, None)])
def test_triton_dact_split_path(activation, T, k, experts, dtype):
    """A dact launch whose tuned entry says ``split`` (tuning.SPLIT, which the tuner races
    against the fused kernel for the routed experts) runs the GEMM into dz's buffer, then the
    epilogue pass: same dz and gate gradient as autograd and as the fused kernel, routed
    (with empty experts, all rows on one expert, T = 0 and 1) and dense. F = 150 spans two
    column blocks of the epilogue pass."""
    pytest.importorskip("triton")
    from moe_adapter_kernels.ops import tuning
    gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")
    E, F, N = 6, 150, 40
    ids, sorted_pair, offsets = routing_case(T, E, k, experts)
    width = 2 * F if activation == "swiglu" else F
    pre, w2 = randn(T * k, width, dtype=dtype), randn(E, F, N, dtype=dtype, scale=0.3)
    dz, gates = randn(T, N, dtype=dtype), torch.rand(T * k, device=DEVICE) + 0.5
    split = dict(tuning.SPLIT[0], **{n: v for n, v in gg.default_config(dtype).items()
                                     if n.startswith("BLOCK")})
    routed = dict(offsets=offsets, pair_ids=sorted_pair, gather_div=k, gate=gates)
    dpre, dgate = gg.grouped_dact(dz, w2, pre, activation, config=split, **routed)
    fused_dpre, fused_dgate = gg.grouped_dact(dz, w2, pre, activation, **routed)
    lp, lg = pre.detach().float().requires_grad_(True), gates.clone().requires_grad_(True)
    sp = sorted_pair.long()
    o = torch.einsum("pf,pfn->pn", reference.activation(lp, activation), w2.float()[
        ids.reshape(-1).long()[sp]])  # sorted rows
    ((o * lg[sp, None]) * dz.float()[sp // k]).sum().backward()
    assert dpre.shape == pre.shape and dgate.shape == (T * k,)
    assert rel_err(dpre, lp.grad) < TOL[dtype] and rel_err(dgate, lg.grad) < TOL[dtype]
    assert rel_err(dpre, fused_dpre) < TOL[dtype] and rel_err(dgate, fused_dgate) < TOL[dtype]
    dense = gg.grouped_dact(dz, w2[0], pre[:T], activation, config=split)
    lp = pre[:T].detach().float().requires_grad_(True)
    (reference.activation(lp, activation) @ w2[0].float() * dz.float()).sum().backward()
    assert rel_err(dense, lp.grad) < TOL[dtype]
    with pytest.raises(ValueError, match="out must be"):
        gg.grouped_gemm(dz, w2[0].t(), out=pre[:T, :N + 1])


def test_grouped_mlp_is_up_then_down():
    ops = pytest.importorskip("moe_adapter_kernels.ops")
    ids, sorted_pair, offsets = routing_case(33, 8, 4)
    u, w1, w2 = randn(33, 40), randn(8, 40, 24, scale=0.3), randn(8, 24, 16, scale=0.3)
    gates = torch.softmax(torch.randn(33, 4, device=DEVICE), -1)
    h, _ = ops.expert_up(u, w1, sorted_pair, offsets, 4, "silu")
    want = ops.expert_down(h, w2, sorted_pair, offsets, gates)
    got = ops.grouped_mlp(u, w1, w2, sorted_pair, offsets, gates, 4, "silu")
    assert torch.equal(got, want)
    ref = grouped_reference(u, w1, ids, "silu")
    assert rel_err(got, grouped_reference(ref, w2, ids.reshape(-1, 1), "none", gates)) < 1e-5


def test_triton_route_rejects_pair_counts_past_int32():
    """Pair ids are int32: T * k >= 2^31 is refused before anything is allocated (an expanded
    view stands in for the ~32 GiB input)."""
    pytest.importorskip("triton")
    router = importlib.import_module("moe_adapter_kernels.ops.router")
    u = torch.zeros(1, 8, device=DEVICE).expand(2**30, 8)
    with pytest.raises(ValueError, match=r"T \* top_k must be < 2\^31"):
        router.route_forward(u, randn(8, 4), 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "none"])
@pytest.mark.parametrize("T,shared,aux", [(0, True, True), (1, True, True), (37, True, True),
                                          (37, False, False), (20, True, False)])
def test_input_grad(dtype, kind, T, shared, aux, kn):
    """input_grad against autograd of its definition: the gates' softmax over the k kept
    logits (plus the caller's logit gradient and the top-k aux loss's term) for dlogits, and
    du = sum of the k slots' rows + shared + dlogits @ W_g^T through the input norm for dx."""
    E, k, N = 8, 3, 45
    ids, _, offsets = routing_case(T, E, k)
    x = randn(T, N, dtype=dtype, scale=2.0)
    w = randn(N, dtype=dtype) if kind != "none" else None
    b = randn(N, dtype=dtype) if kind == "layernorm" else None
    wg = randn(N, E, dtype=dtype, scale=0.3)
    logits = torch.randn(T, E, device=DEVICE)
    gates = torch.softmax(logits.gather(1, ids.long()), -1)
    dgates, dgates_out = randn(T, k), randn(T, k)
    dlogits_out, daux = randn(T, E), torch.tensor(0.7, device=DEVICE)
    du_pairs = randn(T * k, N, dtype=dtype)
    du_shared = randn(T, N, dtype=dtype) if shared else None
    aux_scale = E / max(T, 1) ** 2 if aux else 0.0
    mean = rstd = x.new_empty(0)
    if kind != "none":
        _, mean, rstd = kn.norm(x, w, b, kind, 1e-5)
    dx, dl, dw, db = kn.input_grad(du_pairs, du_shared, dgates, dgates_out, dlogits_out, gates,
                                   ids, offsets, daux, aux_scale, wg, x, w, b, mean, rstd, kind)

    lg = logits.clone().requires_grad_(True)
    g = torch.softmax(lg.gather(1, ids.long()), -1)
    routed = (offsets[1:] - offsets[:-1]).float()[ids.long()]
    ((g * (dgates + dgates_out)).sum() + daux * aux_scale * (g * routed).sum()
     + (lg * dlogits_out).sum()).backward()
    assert dl.dtype == torch.float32 and rel_err(dl, lg.grad) < 1e-5
    leaves = [t.float().requires_grad_(True) for t in (x, w, b) if t is not None]
    u = reference.norm(leaves[0], kind, *(leaves[1:] + [None] * (3 - len(leaves))), 1e-5)
    du = du_pairs.float().view(T, k, N).sum(1) + (du_shared.float() if shared else 0)
    ((u * du).sum() + (u @ wg.float() * lg.grad).sum()).backward()
    assert dx.shape == x.shape and dx.dtype == x.dtype
    if T:
        assert rel_err(dx, leaves[0].grad) < TOL[dtype]
    for got, p, leaf in zip((dw, db), (w, b), leaves[1:]):
        assert got.shape == p.shape and got.dtype == p.dtype
        assert rel_err(got, leaf.grad) < TOL[dtype] if T else not got.any()
    # without du_pairs only the logits' gradient is computed
    dx0, dl0, _, _ = kn.input_grad(None, None, dgates, dgates_out, dlogits_out, gates, ids,
                                   offsets, daux, aux_scale, wg, x, w, b, mean, rstd, kind)
    assert dx0.numel() == 0 and torch.equal(dl0, dl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 37, 1100])
def test_gate_grad(dtype, T, kn):
    """u^T @ dlogits in fp32, across several of the kernel's token splits (512 each)."""
    u, dl = randn(T, 72, dtype=dtype), randn(T, 6)
    got = kn.gate_grad(u, dl)
    assert got.shape == (72, 6) and got.dtype == torch.float32
    want = u.double().t() @ dl.double()
    assert rel_err(got, want) < 1e-5 if T else not got.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "swiglu", "gelu", "identity"])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_scaled_activation(dtype, activation, T, kn):
    """g * act(pre) in sorted rows, each row's gate found through its pair id; the saved
    pre-activation is left as it was."""
    E, k, F = 8, 4, 136
    _, sorted_pair, _ = routing_case(T, E, k)
    pre = randn(T * k, 2 * F if activation == "swiglu" else F, dtype=dtype, scale=2.0)
    before = pre.clone()
    gates = torch.softmax(torch.randn(T, k, device=DEVICE), -1)
    h = kn.scaled_activation(pre, activation, gates, sorted_pair)
    want = reference.activation(pre.float(), activation) * gates.reshape(-1)[
        sorted_pair.long()][:, None]
    assert h.shape == (T * k, F) and h.dtype == dtype
    assert rel_err(h, want) < TOL[dtype] if T else h.numel() == 0
    assert torch.equal(pre, before)


def test_triton_backward_ops_reject_bad_arguments():
    ops = pytest.importorskip("moe_adapter_kernels.ops")
    T, E, k, N = 6, 4, 2, 16
    ids, sp, off = routing_case(T, E, k)
    x, wg, gates = randn(T, N), randn(N, E), torch.full((T, k), 0.5, device=DEVICE)
    args = dict(du_pairs=randn(T * k, N), du_shared=None, dgates=gates, dgates_out=gates,
                dlogits_out=randn(T, E), gates=gates, ids=ids, offsets=off,
                daux=torch.zeros((), device=DEVICE), aux_scale=0.0, w_gate=wg, x=x, weight=None,
                bias=None, mean=x.new_empty(0), rstd=x.new_empty(0), kind="none")
    with pytest.raises(ValueError, match="du_pairs must be"):
        ops.input_grad(**dict(args, du_pairs=randn(T * k + 1, N)))
    with pytest.raises(ValueError, match="du_shared must be"):
        ops.input_grad(**dict(args, du_shared=randn(T, N + 1)))
    with pytest.raises(ValueError, match="shapes disagree"):
        ops.input_grad(**dict(args, w_gate=randn(N + 1, E)))
    with pytest.raises(TypeError, match="ids has dtype"):
        ops.input_grad(**dict(args, ids=ids.long()))
    with pytest.raises(ValueError, match="unknown norm"):
        ops.input_grad(**dict(args, kind="batchnorm"))
    with pytest.raises(ValueError, match="dlogits must have"):
        ops.gate_grad(x, randn(T + 1, E))
    with pytest.raises(ValueError, match="sorted_pair must be"):
        ops.scaled_activation(randn(T * k, 8), "silu", gates, sp[:-1])
    with pytest.raises(ValueError, match="activation"):
        ops.scaled_activation(randn(T * k, 8), "relu", gates, sp)
