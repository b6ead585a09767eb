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
