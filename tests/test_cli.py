from moe_adapter_kernels import cli


def test_info_lists_presets_and_counts(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "| paper | 8c4 |" in out and "94.40M | 70.81M" in out
    assert "| dense (baseline) |" in out and "backend torch" in out


def test_check_passes_for_the_torch_backend(capsys):
    assert cli.main(["check", "--device", "cpu", "--tokens", "21"]) == 0
    out = capsys.readouterr().out
    assert "torch   PASS" in out and "agree with the reference" in out


def test_check_bf16_on_cpu_runs_cuda_emulated_and_skips_interpreted_triton(capsys):
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("CPU-only behaviour")
    assert cli.main(["check", "--device", "cpu", "--tokens", "21", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "cuda    PASS     bfloat16" in out
    assert "triton  SKIPPED  bfloat16 under the Triton interpreter" in out
