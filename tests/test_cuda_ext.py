"""The CUDA C++ extension itself: every csrc/*.cu compiles with nvcc, installs without CUDA skip
it cleanly, the backend reports itself unavailable where it cannot run, and (on the CPU
emulator or a GPU) it agrees with the Triton backend. Its kernels' correctness is tested with
the other backends in test_fused_ops.py, test_fused_module.py and test_fused_backward.py."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from moe_adapter_kernels import MoEAdapter

from helpers import DEVICE, ROOT, checkout_env, rel_err, require_fused, small_config


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc").glob("*.cu")))
def test_nvcc_compiles_every_kernel_file(source, tmp_path):
    """No link and no torch headers needed: each .cu is plain CUDA behind csrc/kernels.h."""
    cmd = ["nvcc", "-c", str(ROOT / "csrc" / source), "-o", str(tmp_path / "k.o"), "-std=c++17",
           "-I", str(ROOT / "csrc"), "-Werror", "all-warnings"]
    for arch in ("80", "90"):
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_kernels_stay_in_bounds_under_address_sanitizer():
    """The kernel tests of the cuda backend (every kernel, forward and backward) again, on the
    emulator built with AddressSanitizer (MOE_ADAPTER_CUDA_EMULATE=asan): a kernel reading or
    writing past a tensor's end, which faults on a GPU but may go unnoticed on the emulator,
    aborts them. Their bf16 cases (dtype2) are left out: bf16 and fp16 instantiate the same
    kernel templates with the same indexing."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real kernels run there")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc, so no AddressSanitizer runtime")
    libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                           text=True).stdout.strip() for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(lib) for lib in libs):
        pytest.skip("gcc has no AddressSanitizer runtime (libasan.so)")
    env = checkout_env(MOE_ADAPTER_CUDA_EMULATE="asan", LD_PRELOAD=" ".join(libs),
                       ASAN_OPTIONS="detect_leaks=0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "-k", "cuda and not dtype2", "tests/test_fused_ops.py"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    out = proc.stdout + proc.stderr  # -s: an ASan report reaches us before the abort
    report = out.find("ERROR: AddressSanitizer")
    assert report < 0, out[report:report + 4000]
    assert proc.returncode == 0 and " passed" in out and " failed" not in out, out[-6000:]


def test_setup_skips_the_extension_without_cuda():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: setup.py would build the extension")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipping the CUDA extension" in proc.stdout
    assert "moe-adapter-kernels" in proc.stdout


def test_backend_unavailable_without_gpu_or_emulator():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = ("from moe_adapter_kernels import MoEAdapter, backends\n"
            "ok, why = backends.status('cuda')\n"
            "assert not ok and 'MOE_ADAPTER_CUDA_EMULATE' in why, why\n"
            "assert 'cuda' not in backends.available_backends()\n"
            "try:\n"
            "    MoEAdapter(backend='cuda')\n"
            "except RuntimeError as e:\n"
            "    assert 'not available' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('no error')\n"
            "print('unavailable as expected')\n")
    env = checkout_env("MOE_ADAPTER_CUDA_EMULATE")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_and_cuda_backends_agree(dtype):
    """The two independent implementations cross-check each other, forward and backward."""
    require_fused("triton")
    require_fused("cuda")
    cfg = small_config(expert_activation="swiglu", bias=True)
    torch.manual_seed(0)
    tri = MoEAdapter(cfg, backend="triton").to(DEVICE, dtype)
    cu = MoEAdapter(cfg, backend="cuda").to(DEVICE, dtype)
    cu.load_state_dict(tri.state_dict())
    x = torch.randn(45, cfg.d_in, device=DEVICE, dtype=dtype)
    dy = torch.randn(45, cfg.d_out, device=DEVICE)
    out = []
    for m in (tri, cu):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        ((y.float() * dy).sum() + m.aux_loss).backward()
        out.append([y, xi.grad] + [p.grad for p in m.parameters()])
    assert torch.equal(tri._routing.topk_ids, cu._routing.topk_ids)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(out[1], out[0]):
        assert rel_err(a, b) < tol


def test_auto_prefers_triton_then_cuda_then_torch(monkeypatch):
    from moe_adapter_kernels import backends
    gpu = torch.device("cuda", 0)
    usable = {"torch": True, "triton": True, "cuda": True}
    monkeypatch.setattr(backends, "status", lambda name: (usable[name], "test"))
    impls = ("torch", "triton", "cuda")
    assert backends.resolve("auto", gpu, impls) == "triton"
    assert backends.resolve("auto", gpu, impls, fused_ok=False) == "torch"  # e.g. float64
    usable["triton"] = False
    assert backends.resolve("auto", gpu, impls) == "cuda"
    usable["cuda"] = False
    assert backends.resolve("auto", gpu, impls) == "torch"
    assert backends.resolve("auto", torch.device("cpu"), impls) == "torch"
