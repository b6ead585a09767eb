import pytest

from moe_adapter_kernels import (MOE_PRESETS, DenseAdapter, DenseAdapterConfig, MoEAdapter,
                                 MoEAdapterConfig)


def close_to(n: int, millions: float) -> bool:
    return abs(n / 1e6 - millions) < 0.1


@pytest.mark.parametrize("cfg", [MoEAdapterConfig.paper(), MoEAdapterConfig.paper_post_swiglu()],
                         ids=["paper", "post-swiglu"])
def test_moe_parameter_counts_match_table4(cfg):
    assert close_to(cfg.total_parameters(), 94.4)
    assert close_to(cfg.active_parameters(), 70.8)
    counts = MoEAdapter(cfg, backend="torch").parameter_counts()
    assert counts == {"total": cfg.total_parameters(), "active": cfg.active_parameters()}


def test_dense_parameter_count_matches_table4():
    cfg = DenseAdapterConfig.paper()
    assert close_to(cfg.total_parameters(), 94.4)
    assert DenseAdapter(cfg).parameter_counts()["total"] == cfg.total_parameters()


def test_paper_default_exact_counts():
    # routed 8 x (2560*1280 + 1280*2048), shared 2560*10240 + 10240*2048, gate 2560*8, 2 LNs
    cfg = MoEAdapterConfig.paper()
    expert = 2560 * 1280 + 1280 * 2048
    shared = 2560 * 10240 + 10240 * 2048
    norms = 2 * 2560 + 2 * 2048
    assert cfg.total_parameters() == 8 * expert + shared + 2560 * 8 + norms
    assert cfg.active_parameters() == 4 * expert + shared + 2560 * 8 + norms
    assert cfg.flops_per_token() == 2 * (4 * expert + shared + 2560 * 8)
    assert DenseAdapterConfig.paper().flops_per_token() == 2 * (2560 * 20480 + 20480 * 2048)


def test_presets_are_the_ablations():
    p = {n: MoEAdapterConfig.preset(n) for n in MOE_PRESETS}
    assert (p["16c4"].num_experts, p["16c4"].top_k) == (16, 4)
    assert (p["8c1"].num_experts, p["8c1"].top_k) == (8, 1)
    assert (p["4c2"].num_experts, p["4c2"].top_k) == (4, 2)
    assert p["width-half"].expert_dim == 640 and p["width-double"].expert_dim == 2560
    assert p["post-swiglu"] == MoEAdapterConfig.paper_post_swiglu()
    assert MoEAdapterConfig.preset("8c1", top_k=1, d_in=64).d_in == 64


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=9), "top_k"),
    (dict(d_in=0), "d_in"),
    (dict(d_out=-3), "d_out"),
    (dict(expert_dim=2.5), "expert_dim"),
    (dict(num_experts=True), "num_experts"),
    (dict(shared_dim=-1), "shared_dim"),
    (dict(topology="serial"), "topology"),
    (dict(expert_activation="relu"), "expert_activation"),
    (dict(shared_activation="swiglu"), "shared_activation"),
    (dict(bias="yes"), "bias"),
    (dict(input_norm=None), "input_norm"),
    (dict(norm="batchnorm"), "norm"),
    (dict(aux_loss_variant="switch"), "aux_loss_variant"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(router_dtype="bfloat16"), "router_dtype"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(topology="post", shared_dim=0), "shared_dim"),
])
def test_invalid_moe_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEAdapterConfig(**kwargs)


def test_invalid_dense_config_and_unknown_preset():
    with pytest.raises(ValueError, match="hidden_dim"):
        DenseAdapterConfig(hidden_dim=0)
    with pytest.raises(ValueError, match="norm"):
        DenseAdapterConfig(norm="groupnorm")
    with pytest.raises(ValueError, match="preset"):
        MoEAdapterConfig.preset("32c8")


def test_module_rejects_wrong_config_type():
    with pytest.raises(TypeError, match="MoEAdapterConfig"):
        MoEAdapter(DenseAdapterConfig())


def test_bias_and_norm_flags_change_the_counts():
    base = MoEAdapterConfig.paper()
    biased = base.replace(bias=True)
    per_expert = 1280 + 2048
    assert biased.total_parameters() - base.total_parameters() == 8 * per_expert + 10240 + 2048
    assert biased.active_parameters() - base.active_parameters() == 4 * per_expert + 10240 + 2048
    assert biased.flops_per_token() == base.flops_per_token()
    bare = base.replace(input_norm=False, output_norm=False)
    assert base.total_parameters() - bare.total_parameters() == 2 * 2560 + 2 * 2048
    assert MoEAdapter(biased, backend="torch").parameter_counts() == {
        "total": biased.total_parameters(), "active": biased.active_parameters()}
