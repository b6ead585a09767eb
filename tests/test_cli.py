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
