"""The drop-in modules: shapes, dtypes, input validation, backends, stats."""

import pytest
import torch

from moe_adapter_kernels import (DenseAdapter, FeatureFusion, FeatureFusionConfig, MoEAdapter,
                                 reference, stack_frames)
from moe_adapter_kernels import backends
from moe_adapter_kernels.config import DenseAdapterConfig

from helpers import rel_err, small_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MoEAdapter(small_config(), backend="torch")


def test_any_leading_dims_and_plain_tensor_output(model):
    x = torch.randn(2, 3, 5, 72)
    y = model(x)
    assert type(y) is torch.Tensor and y.shape == (2, 3, 5, 40)
    assert torch.equal(y.reshape(-1, 40), model(x.reshape(-1, 72)))
    assert model.backend_used == "torch"


def test_aux_loss_is_scaled_by_the_coefficient():
    torch.manual_seed(0)
    a = MoEAdapter(small_config(aux_loss_coef=0.5), backend="torch")
    x = torch.randn(9, 72)
    a(x)
    stats = a.routing_stats()
    assert a.aux_loss.requires_grad
    assert a.aux_loss.item() == pytest.approx(0.5 * stats.aux_loss.item())
    assert int(stats.tokens_per_expert.sum()) == 9 * 4
    assert stats.mean_gate.sum().item() == pytest.approx(1.0, rel=1e-5)
    b = MoEAdapter(small_config(aux_loss_coef=0.0), backend="torch")
    b(x)
    assert b.aux_loss.item() == 0.0 and b.routing_stats().aux_loss.item() > 0


def test_a_step_releases_the_previous_steps_graph(model):
    """The next forward drops the graph that aux_loss keeps from the last step before touching
    x or the parameters, so their gradient-accumulation nodes are rebuilt each step (on a GPU
    they remember the stream they were made on: one kept from an eager step on the default
    stream breaks a later CUDA-graph capture). Node metadata marks the old nodes."""
    x = torch.randn(16, 72).requires_grad_(True)
    tensors = {"x": x, **dict(model.named_parameters())}

    def accumulator(t):
        return t.view_as(t).grad_fn.next_functions[0][0]

    def step():  # keeps no reference to its output or loss, as a training loop's body
        (model(x).square().mean() + model.aux_loss).backward()

    step()
    for t in tensors.values():
        accumulator(t).metadata["step0"] = True
    step()
    kept = [n for n, t in tensors.items() if "step0" in accumulator(t).metadata]
    assert not kept


def test_routing_stats_before_forward_raises(model):
    with pytest.raises(RuntimeError, match="forward"):
        model.routing_stats()


@pytest.mark.parametrize("shape", [(0, 72), (2, 0, 72)])
def test_empty_batch(model, shape):
    x = torch.randn(*shape, requires_grad=True)
    y = model(x)
    assert y.shape == shape[:-1] + (40,)
    assert torch.isfinite(model.aux_loss) and model.aux_loss.item() == 0.0
    (y.sum() + model.aux_loss).backward()
    assert x.grad.shape == x.shape


def test_single_token(model):
    x = torch.randn(1, 72)
    assert rel_err(model(x), reference.moe_adapter_per_token(
        x, dict(model.named_parameters()), model.config)) < 1e-5


def test_bad_inputs_raise_clear_errors(model, monkeypatch):
    with pytest.raises(ValueError, match=r"\[\.\.\., 72\]"):
        model(torch.randn(4, 71))
    with pytest.raises(ValueError, match=r"\[\.\.\., 72\]"):
        model(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(4, 72, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0] * 72])
    with pytest.raises(TypeError, match="float16.*float32"):
        model(torch.randn(4, 72, dtype=torch.float16))
    with pytest.raises(ValueError, match="meta"):
        model(torch.randn(4, 72, device="meta"))
    with pytest.raises(ValueError, match="backend.*auto"):
        MoEAdapter(small_config(), backend="jax")
    monkeypatch.setattr(backends, "cuda_ext_status", lambda: (False, "no extension here"))
    with pytest.raises(RuntimeError, match="'cuda' is not available: no extension here"):
        MoEAdapter(small_config(), backend="cuda")
    with pytest.raises(TypeError, match="DenseAdapter"):
        DenseAdapter(small_config())
    with pytest.raises(ValueError, match=r"\[\.\.\., 5120\]"):
        FeatureFusion()(torch.randn(2, 2560))


def test_non_finite_inputs_are_not_fixed(model):
    x = torch.randn(6, 72)
    clean = model(x)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    y = model(x)
    assert torch.isnan(y[2]).all() and torch.isnan(y[4]).all()
    keep = [0, 1, 3, 5]
    assert torch.allclose(y[keep], clean[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    torch.manual_seed(3)
    cfg = small_config()
    m32 = MoEAdapter(cfg, backend="torch")
    with torch.no_grad():
        m32.w_gate.mul_(20)  # well-separated logits: no routing flips from rounding
    m16 = MoEAdapter(cfg, backend="torch").to(dtype)
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(29, cfg.d_in)
    y16 = m16(x.to(dtype))
    assert y16.dtype == dtype
    y32 = m32(x.to(dtype).float())
    assert torch.equal(m16.routing_stats().tokens_per_expert, m32.routing_stats().tokens_per_expert)
    assert rel_err(y16, y32) < 2e-2
    y16.float().sum().backward()
    assert all(p.grad.dtype == dtype for p in m16.parameters())


def test_autocast_accepts_fp32_weights_with_bf16_compute(model):
    x = torch.randn(7, 72)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (7, 40) and torch.isfinite(y).all()


def test_one_state_dict_layout(model):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "norm_in.weight": (72,), "norm_in.bias": (72,), "w_gate": (72, 8),
        "w1": (8, 72, 24), "w2": (8, 24, 40), "shared_w1": (72, 56), "shared_w2": (56, 40),
        "norm_out.weight": (40,), "norm_out.bias": (40,)}
    post = MoEAdapter(small_config(topology="post", expert_activation="swiglu"), backend="torch")
    assert post.w1.shape == (8, 72, 48) and post.w2.shape == (8, 24, 72)
    assert "norm_mid.weight" in post.state_dict()


def test_dense_adapter_and_flops():
    cfg = DenseAdapterConfig(d_in=24, d_out=16, hidden_dim=40)
    m = DenseAdapter(cfg)
    y = m(torch.randn(3, 4, 24))
    assert y.shape == (3, 4, 16)
    assert m.flops_per_token() == 2 * (24 * 40 + 40 * 16)


def test_feature_fusion_with_and_without_tokens():
    torch.manual_seed(0)
    f = FeatureFusion(FeatureFusionConfig(d_enc=32, d_model=24, vocab_size=11))
    frames = torch.randn(2, 10, 8)
    x_enc = stack_frames(frames, 4)
    assert x_enc.shape == (2, 2, 32) and torch.equal(x_enc[0, 1, 8:16], frames[0, 5])
    cont = f(x_enc)
    tokens = torch.randint(0, 11, (2, 2))
    both = f(x_enc, tokens)
    assert torch.allclose(both - cont, f.embed(tokens))
    with pytest.raises(ValueError, match="tokens shape"):
        f(x_enc, tokens[:, :1])
    with pytest.raises(ValueError, match="vocab_size"):
        FeatureFusion(FeatureFusionConfig(d_enc=32, d_model=24))(x_enc, tokens)


@pytest.mark.parametrize("cls", ["moe", "dense"])
def test_parametrized_weights_are_used(cls):
    """The forward reads its weights by attribute, so a torch.nn.utils.parametrize'd weight is
    used as its parametrization computes it (and gets its gradient), like nn.Linear's."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    if cls == "moe":
        model = MoEAdapter(small_config(), backend="torch")
        twin = MoEAdapter(small_config(), backend="torch")
    else:
        cfg = DenseAdapterConfig(d_in=72, hidden_dim=48, d_out=40)
        model, twin = DenseAdapter(cfg), DenseAdapter(cfg)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        twin.norm_in.weight.mul_(2)
        twin.w2.mul_(2)
    parametrize.register_parametrization(model.norm_in, "weight", Double())
    parametrize.register_parametrization(model, "w2", Double())
    x = torch.randn(9, 72)
    y = model(x)
    assert rel_err(y, twin(x)) < 1e-5
    y.sum().backward()
    assert model.parametrizations.w2.original.grad is not None
    assert model.norm_in.parametrizations.weight.original.grad.abs().sum() > 0


def test_auto_leaves_what_the_fused_kernels_do_not_compute_to_torch(monkeypatch):
    """``auto`` tells the backend choice whether the fused kernels can run the case: not for
    a float64 input, nor for a float64 router (the choice itself: test_cuda_ext)."""
    seen = []
    resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *a: seen.append(a[3]) or resolve(*a))
    x = torch.randn(5, 72)
    MoEAdapter(small_config())(x)
    MoEAdapter(small_config()).double()(x.double())
    MoEAdapter(small_config(router_dtype="float64"))(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        MoEAdapter(small_config())(x)
    assert seen == [True, False, False, True]


def test_deepcopy_and_pickle_after_a_training_forward(model):
    """copy.deepcopy (an EMA copy taken mid-training) and pickling work after a forward that
    built a graph: the copy's aux_loss is the value without the graph, the original keeps
    its graph and still trains."""
    import copy
    import io
    x = torch.randn(6, 72)
    y = model(x)
    twin = copy.deepcopy(model)
    assert model.aux_loss.requires_grad and not twin.aux_loss.requires_grad
    assert torch.equal(twin.aux_loss, model.aux_loss.detach())
    assert torch.equal(twin(x), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert not loaded.aux_loss.requires_grad and torch.equal(loaded(x), y)
    (y.sum() + model.aux_loss).backward()
    assert model.w_gate.grad is not None
