"""The benchmark code runs (small, on the CPU): every per-kernel step and the CLI."""

import json

import pytest
import torch

from moe_adapter_kernels import MoEAdapter

from helpers import small_config


def test_every_kernel_step_runs():
    pytest.importorskip("triton")
    from benchmarks.kernels import steps
    torch.manual_seed(0)
    model = MoEAdapter(small_config(), backend="triton")
    x = torch.randn(40, 72)
    with torch.no_grad():
        table = steps(model, x)
        for name, fn, flops, nbytes in table:
            fn()
            assert nbytes > 0 and flops >= 0, name
    assert {"route", "permute", "expert_up", "expert_down", "combine"} <= {t[0] for t in table}


def test_bench_cli_on_cpu(tmp_path, capsys):
    from benchmarks.bench import main
    out = tmp_path / "b.json"
    assert main(["--tokens", "8", "--modes", "fwd", "--skip-check", "--json", str(out),
                 "--markdown", str(tmp_path / "b.md")]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["device"].startswith("CPU") and len(res["results"]) == 2
    moe = [r for r in res["results"] if r["model"] == "moe-torch"][0]
    assert moe["ratio"] > 0 and "| 8 | fwd | moe-torch |" in capsys.readouterr().out


def test_tuning_records_picks_and_saves(tmp_path, monkeypatch):
    """tune_model visits every GEMM launch shape of a forward+backward, keeps the fastest
    candidate (a fake timer here), and the table round-trips through its JSON file."""
    pytest.importorskip("triton")
    from benchmarks.tune import tune_model
    from moe_adapter_kernels.ops import tuning

    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    tuning.table.cache_clear()
    torch.manual_seed(0)
    model = MoEAdapter(small_config(expert_activation="swiglu"), backend="triton")
    timed = []

    def fake_timer(fn):  # runs the candidate, then prefers BLOCK_N=64, BLOCK_K=32
        fn()
        cfg = tuning.CANDIDATES[len(timed) % len(tuning.CANDIDATES)]
        timed.append(cfg)
        return 1.0 if (cfg["BLOCK_N"], cfg["BLOCK_K"]) == (64, 32) else 2.0

    try:
        n = tune_model(model, [40], "fake-gpu", fake_timer, log=lambda s: None)
        # up, down, shared up/down; dact expert/shared; expert dx, shared dx
        assert n == 8
        path = tuning.save("fake-gpu")
        tuning.table.cache_clear()
        saved = tuning.table("fake-gpu")
        assert path.exists() and len(saved) == 8
        assert all((c["BLOCK_N"], c["BLOCK_K"]) == (64, 32) for c in saved.values())
        assert "fwd|grouped-swiglu|float32|N24|K72|M256" in saved  # 40 tokens x 4 slots
    finally:
        tuning.table.cache_clear()
