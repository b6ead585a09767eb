"""benchmarks/gpu_session.sh checked without a GPU. A GPU lease is one call of a few minutes,
so what would make that call fail for nothing (a pytest -k selection that selects no test, a
test file that moved, a flag a tool no longer takes) must fail here instead."""

import functools
import importlib
import re
import subprocess
import sys

import pytest

from helpers import ROOT, checkout_env

SCRIPT = (ROOT / "benchmarks" / "gpu_session.sh").read_text().replace("\\\n", " ")
SELECTION = r'gpu_tests "([^"$]+)"'  # the literal -k expressions (not ${GPU_TESTS_K:-})


@functools.lru_cache(maxsize=None)
def _selected(expr: str) -> set:
    """The GPU test ids that ``pytest -m gpu -k expr tests/test_gpu.py`` collects."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", "-m", "gpu", "-k", expr, "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True, env=checkout_env(), timeout=300)
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: nothing selected
    return {line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line}


def _stage(name: str) -> str:
    return re.search(rf"^\s+{name}\)(.*?);;", SCRIPT, re.S | re.M).group(1)


@pytest.mark.slow
def test_the_first_stage_runs_the_gpu_checks_the_open_issues_wait_for():
    """`build first` is the one call of a lease (NOTES.md): its selections must hold issue 4's
    and 6's GPU checks for both backends, and the CUDA GEMMs' layout probes must run."""
    first = _stage("first")
    selected = set().union(*(_selected(e) for e in re.findall(SELECTION, first)))
    for test in ("test_large_token_counts_forward_backward_bf16",
                 "test_cuda_graph_training_step_replays_with_new_inputs",
                 "test_no_host_sync_forward_and_backward",
                 "test_bitwise_deterministic_forward_and_backward",
                 "test_paper_sizes_forward_backward"):
        for backend in ("triton", "cuda"):
            assert any(t.startswith(test + "[") and backend in t for t in selected), \
                (test, backend)
    assert any(t.startswith("test_triton_and_cuda_backends_agree") for t in selected)
    assert "layout_probes" in first and "--backends $fused" in first


@pytest.mark.slow
def test_every_selection_selects_tests():
    exprs = re.findall(SELECTION, SCRIPT)
    assert len(exprs) >= 4
    for expr in exprs:
        assert _selected(expr), f"gpu_session.sh: -k {expr!r} selects no GPU test"


def test_the_test_files_it_names_exist():
    paths = set(re.findall(r"\btests/[\w/]+\.py\b", SCRIPT))
    assert "tests/test_cuda_layouts.py" in paths
    assert [p for p in paths if not (ROOT / p).is_file()] == []


def test_every_tool_takes_the_flags_it_is_given(capsys):
    """Each `python -m <tool> [subcommand] --flag ...` line: the tool's --help lists every
    flag (pip and pytest, not ours, are left out)."""
    calls = {}
    for module, rest in re.findall(r"python -m ([\w.]+)([^\n;|&)]*)", SCRIPT):
        if module in ("pip", "pytest"):
            continue
        words = rest.split()
        sub = words[0] if words and re.fullmatch(r"[a-z]+", words[0]) else None
        calls.setdefault((module, sub), set()).update(re.findall(r"(?<!\S)--[\w-]+", rest))
    assert ("moe_adapter_kernels.cli", "bench") in calls and len(calls) >= 5
    for (module, sub), flags in sorted(calls.items(), key=str):
        with pytest.raises(SystemExit) as done:
            importlib.import_module(module).main([*filter(None, [sub]), "--help"])
        assert done.value.code == 0
        shown = capsys.readouterr().out
        missing = [f for f in flags if f not in shown]
        assert not missing, f"python -m {module} {sub or ''} does not take {missing}"
