"""GPU checks of the fused backends (``triton`` and ``cuda``, the ``backend`` fixture; marked
``gpu``, skipped without CUDA). Run on a device with ``python -m pytest -m gpu -q`` (see
benchmarks/gpu_session.sh)."""

import importlib

import pytest
import torch

from moe_adapter_kernels import MoEAdapter, MoEAdapterConfig

from helpers import readme_python_blocks, rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def pair(cfg, dtype, backend, seed=0):
    torch.manual_seed(seed)
    ref = MoEAdapter(cfg, backend="torch").cuda().to(dtype)
    with torch.no_grad():  # non-trivial norm affine parameters
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    tri = MoEAdapter(cfg, backend=backend).cuda().to(dtype)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def grads(model, x, dy):
    xi = x.clone().requires_grad_(True)
    y = model(xi)
    ((y.float() * dy).sum() + model.aux_loss).backward()
    out = {"y": y.detach(), "x": xi.grad}
    out.update({n: p.grad for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return out


def routed_rows_agree(ref, tri):
    """Tokens whose routing matches (fp32-accumulation order can flip near-ties)."""
    return (ref._routing.topk_ids.long() == tri._routing.topk_ids.long()).all(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("preset", ["paper", "post-swiglu", "16c4", "8c1"])
@pytest.mark.parametrize("T", [1, 777, 8192])
def test_paper_sizes_forward_backward(preset, dtype, T, backend):
    cfg = MoEAdapterConfig.preset(preset)
    ref, tri = pair(cfg, dtype, backend)
    x = torch.randn(T, cfg.d_in, device="cuda", dtype=dtype)
    dy = torch.randn(T, cfg.d_out, device="cuda")
    g_ref, g_tri = grads(ref, x, dy), grads(tri, x, dy)
    assert routed_rows_agree(ref, tri).float().mean() > 0.99
    for name in g_ref:
        assert rel_err(g_tri[name], g_ref[name]) < TOL[dtype] * (3 if name != "y" else 1), name


@pytest.mark.parametrize("T", [32768, 65536])
def test_large_token_counts_forward_backward_bf16(T, backend):
    cfg = MoEAdapterConfig.paper()
    ref, tri = pair(cfg, torch.bfloat16, backend)
    x = torch.randn(T, cfg.d_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, cfg.d_out, device="cuda")
    g_ref, g_tri = grads(ref, x, dy), grads(tri, x, dy)
    assert routed_rows_agree(ref, tri).float().mean() > 0.99
    for name in g_ref:
        tol = TOL[torch.bfloat16] * (3 if name != "y" else 1)
        assert rel_err(g_tri[name], g_ref[name]) < tol, name


def test_no_host_sync_forward_and_backward(backend):
    cfg = MoEAdapterConfig.paper()
    _, tri = pair(cfg, torch.bfloat16, backend)
    x = torch.randn(4096, cfg.d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4096, cfg.d_out, device="cuda", dtype=torch.bfloat16)
    grads(tri, x.detach(), dy.float())  # compile every kernel first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = tri(x)
        ((y * dy).sum() + tri.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_training_step_replays_with_new_inputs(backend):
    cfg = MoEAdapterConfig.paper()
    _, tri = pair(cfg, torch.bfloat16, backend)
    eager_model = MoEAdapter(cfg, backend=backend).cuda().bfloat16()
    eager_model.load_state_dict(tri.state_dict())
    T = 2048
    static_x = torch.randn(T, cfg.d_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, cfg.d_out, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernels) on a side stream
        for _ in range(2):
            grads(tri, static_x, dy)
    torch.cuda.current_stream().wait_stream(stream)
    for p in tri.parameters():
        p.grad = torch.zeros_like(p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tri(static_x)
        ((static_y.float() * dy).sum() + tri.aux_loss).backward()
    for _ in range(2):
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        for p in tri.parameters():
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        eager = grads(eager_model, new_x, dy)
        assert torch.equal(static_y, eager["y"])
        for name, p in tri.named_parameters():
            assert torch.equal(p.grad, eager[name]), name


def test_bitwise_deterministic_forward_and_backward(backend):
    cfg = MoEAdapterConfig.paper()
    _, tri = pair(cfg, torch.bfloat16, backend)
    x = torch.randn(8192, cfg.d_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8192, cfg.d_out, device="cuda")
    a, b = grads(tri, x, dy), grads(tri, x, dy)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_more_than_2_31_elements_in_the_pair_gather(backend):
    """T * k * d_in > 2^31: 64-bit offsets in every gather/scatter."""
    cfg = MoEAdapterConfig.paper()
    T = 2**31 // (cfg.top_k * cfg.d_in) + 1000
    _, tri = pair(cfg, torch.bfloat16, backend)
    x = torch.randn(T, cfg.d_in, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = tri(x)
        tail = MoEAdapter(cfg, backend="torch").cuda().bfloat16()
        tail.load_state_dict(tri.state_dict())
        y_tail = tail(x[-512:])
    assert torch.isfinite(y).all()
    assert rel_err(y[-512:], y_tail) < TOL[torch.bfloat16]


def test_training_run_tracks_the_reference(backend):
    """200 AdamW steps on a synthetic regression with clustered tokens: the fused backend's
    loss curve stays within 5% of the reference backend's."""
    cfg = MoEAdapterConfig.paper(d_in=256, d_out=128, expert_dim=128, shared_dim=512)
    torch.manual_seed(0)
    centers = torch.randn(6, cfg.d_in, device="cuda") * 3
    target_map = torch.randn(cfg.d_in, cfg.d_out, device="cuda") / cfg.d_in ** 0.5
    curves = {}
    for name in ("torch", backend):
        torch.manual_seed(1)
        model = MoEAdapter(cfg, backend=name).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(2)
        losses = []
        for _ in range(200):
            c = torch.randint(0, 6, (512,), device="cuda", generator=gen)
            x = centers[c] + torch.randn(512, cfg.d_in, device="cuda", generator=gen)
            target = torch.nn.functional.layer_norm(torch.tanh(x @ target_map), (cfg.d_out,))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(x)
            loss = torch.nn.functional.mse_loss(y.float(), target) + model.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[name] = torch.tensor(losses)
    assert curves[backend][-20:].mean() < 0.5 * curves[backend][:20].mean()  # it learns
    rel = (curves[backend] - curves["torch"]).abs() / curves["torch"]
    assert rel[-50:].mean() < 0.05


def test_fullgraph_compile_triton_bf16():
    cfg = MoEAdapterConfig.paper()
    _, tri = pair(cfg, torch.bfloat16, "triton")
    compiled = torch.compile(tri, fullgraph=True)
    x = torch.randn(4096, cfg.d_in, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(compiled(x), tri(x))


def test_swapped_tiny_qwen2_audio_trains_with_triton_bf16():
    pytest.importorskip("transformers")
    from moe_adapter_kernels.integrations.transformers import moe_aux_loss, swap_adapter
    from test_transformers_integration import audio_batch, qwen2_audio

    torch.manual_seed(0)
    model = qwen2_audio().cuda().bfloat16().train()
    adapter = swap_adapter(model, backend="triton")
    assert adapter.w1.dtype == torch.bfloat16 and adapter.w1.is_cuda
    batch, _ = audio_batch("qwen2_audio")
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["input_features"] = batch["input_features"].bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=batch["input_ids"]).loss + moe_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert adapter.backend_used == "triton"
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_and_cuda_backends_agree(dtype):
    """The two independent implementations cross-check each other at the paper's sizes."""
    pytest.importorskip("triton")
    cfg = MoEAdapterConfig.paper()
    _, tri = pair(cfg, dtype, "triton")
    cu = MoEAdapter(cfg, backend="cuda").cuda().to(dtype)
    cu.load_state_dict(tri.state_dict())
    x = torch.randn(4099, cfg.d_in, device="cuda", dtype=dtype)
    dy = torch.randn(4099, cfg.d_out, device="cuda")
    g_tri, g_cu = grads(tri, x, dy), grads(cu, x, dy)
    assert routed_rows_agree(tri, cu).float().mean() > 0.99
    for name in g_tri:
        assert rel_err(g_cu[name], g_tri[name]) < TOL[dtype] * (3 if name != "y" else 1), name


@pytest.mark.parametrize("path", ["cublas", "split"])
@pytest.mark.parametrize("T", [1, 4099])
def test_triton_on_the_tuned_cublas_and_split_paths(path, T, monkeypatch):
    """Where the tuned table sends the shared MLP's dense launches to cuBLAS (tuning.CUBLAS)
    or the routed experts' dact to the split path (tuning.SPLIT), as benchmarks.tune does
    where they are the faster, the Triton backend takes that path and still matches the
    reference, forward and backward."""
    pytest.importorskip("triton")
    from moe_adapter_kernels import torch_ops
    from moe_adapter_kernels.ops import tuning
    gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")
    keys, entry = {"cublas": ("|dense-", tuning.CUBLAS), "split": ("dact|grouped-",
                                                                  tuning.SPLIT[-1])}[path]
    lookup, calls = tuning.lookup, []
    monkeypatch.setattr(tuning, "lookup", lambda dev, key: (
        dict(entry) if keys in key else lookup(dev, key)))
    if path == "cublas":  # shared up and down
        linear = torch_ops.linear
        monkeypatch.setattr(torch_ops, "linear", lambda *a: calls.append(1) or linear(*a))
    else:  # the split dact's GEMM writes into dz's buffer
        gemm = gg.grouped_gemm
        monkeypatch.setattr(gg, "grouped_gemm", lambda *a, **kw: (
            "out" in kw and calls.append(1)) or gemm(*a, **kw))
    cfg = MoEAdapterConfig.paper()
    ref, tri = pair(cfg, torch.bfloat16, "triton")
    x = torch.randn(T, cfg.d_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, cfg.d_out, device="cuda")
    g_ref, g_tri = grads(ref, x, dy), grads(tri, x, dy)
    assert len(calls) == (2 if path == "cublas" else 1)
    assert routed_rows_agree(ref, tri).float().mean() > 0.99
    for name in g_ref:
        assert rel_err(g_tri[name], g_ref[name]) < TOL[torch.bfloat16] * (3 if name != "y"
                                                                           else 1), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 4099])
def test_triton_backward_glue_matches_torch_ops_at_paper_sizes(dtype, T):
    """input_grad, gate_grad and scaled_activation (one token per step on the GPU, d = 2560)
    against their PyTorch versions, in every dtype."""
    pytest.importorskip("triton")
    from moe_adapter_kernels import ops, torch_ops
    cfg = MoEAdapterConfig.paper()
    d, E, k, F = cfg.d_in, cfg.num_experts, cfg.top_k, cfg.expert_dim
    x = torch.randn(T, d, device="cuda", dtype=dtype)
    w, b = torch.randn(d, device="cuda", dtype=dtype), torch.randn(d, device="cuda", dtype=dtype)
    wg = torch.randn(d, E, device="cuda", dtype=dtype) * 0.05
    u, mean, rstd = ops.norm(x, w, b, "layernorm", 1e-5)
    logits, ids, gates, counts, gsum = ops.route(u, wg, k)
    sp, _, off, _ = ops.permute(ids, counts, gsum, E)
    args = (torch.randn(T * k, d, device="cuda", dtype=dtype),
            torch.randn(T, d, device="cuda", dtype=dtype), torch.randn_like(gates),
            torch.randn_like(gates), torch.randn_like(logits), gates, ids, off,
            torch.tensor(0.3, device="cuda"), E / T**2, wg, x, w, b, mean, rstd, "layernorm")
    got = ops.input_grad(*args)
    want = torch_ops.input_grad(ops.norm_bwd, *args)
    for g, r in zip(got, want):
        assert rel_err(g, r) < TOL[dtype]
    assert rel_err(ops.gate_grad(u, got[1]), torch_ops.gate_grad(u, got[1])) < 1e-5
    pre = torch.randn(T * k, F, device="cuda", dtype=dtype)
    assert rel_err(ops.scaled_activation(pre, "silu", gates, sp),
                   torch_ops.scaled_activation(pre, "silu", gates, sp)) < TOL[dtype]


def test_bench_cli_with_cuda_graphs(tmp_path):
    """`moe-adapter bench --graphs` captures dense and every fused backend, forward and
    forward+backward, and reports ratios from the replays."""
    import json

    from benchmarks.bench import main
    out = tmp_path / "b.json"
    assert main(["--graphs", "--tokens", "512", "--backends", "triton", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["execution"] == "cuda-graphs" and len(res["results"]) == 4
    assert all(r["ms"] > 0 for r in res["results"])
    assert all(r["ratio"] > 0 for r in res["results"] if r["model"] != "dense")
    assert {v["target"] for v in res["targets"]} == {  # the verdicts at T = 512, bf16
        "forward <= 1.5 x dense at T = 512", "training peak memory <= 0.8 x dense"}


def test_readme_cuda_graph_example_matches_eager():
    """The README's CUDA-graph snippet runs here (on the CPU it is skipped by its own guard),
    and its replayed output equals an eager forward on the same input."""
    code = next(b for b in readme_python_blocks() if "CUDAGraph" in b)
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    with torch.no_grad():
        assert torch.equal(env["static_y"], env["adapter"](env["static_x"]))
