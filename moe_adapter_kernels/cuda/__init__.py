"""Loader of the CUDA C++ extension built from ``csrc/``.

``load()`` returns the extension module, which registers the ops under
``torch.ops.moe_adapter_cuda``: the ``moe_adapter_kernels._C`` that ``setup.py`` prebuilt when a
CUDA toolchain was present, else a JIT build with ``torch.utils.cpp_extension.load`` into the
torch extensions cache (``TORCH_EXTENSIONS_DIR``; first use takes a minute or two).

With ``MOE_ADAPTER_CUDA_EMULATE=1`` it instead builds the same kernel sources for the CPU
against a small emulator of the CUDA execution model (``csrc/emulate/``), so the ``cuda``
backend runs on CPU tensors: that is how CI tests these kernels without a GPU, as
``TRITON_INTERPRET=1`` does for the Triton kernels. ``MOE_ADAPTER_CUDA_EMULATE=asan`` builds
that emulation with AddressSanitizer, so a kernel's out-of-bounds global-memory access (a fault
on a GPU) is reported; run Python with ``LD_PRELOAD="$(gcc -print-file-name=libasan.so)
$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0`` (libstdc++ too, or ASan
cannot intercept the C++ exceptions of the argument checks).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
log = logging.getLogger("moe_adapter_kernels")


def emulating() -> bool:
    """True under MOE_ADAPTER_CUDA_EMULATE=1 or =asan (the CUDA kernels run on CPU tensors)."""
    return os.environ.get("MOE_ADAPTER_CUDA_EMULATE") in ("1", "asan")


def _asan_flags() -> list[str]:
    """Compiler flags of the AddressSanitizer emulation (-g1: line tables for its reports, in
    0.6x the build time of -g); raises unless the process preloads the ASan runtime and
    libstdc++ (an instrumented module cannot be loaded otherwise)."""
    if not all(lib in os.environ.get("LD_PRELOAD", "") for lib in ("libasan", "libstdc++")):
        raise RuntimeError("MOE_ADAPTER_CUDA_EMULATE=asan needs the ASan runtime and libstdc++ "
                           "preloaded: run with LD_PRELOAD=\"$(gcc -print-file-name=libasan.so) "
                           "$(gcc -print-file-name=libstdc++.so)\" ASAN_OPTIONS=detect_leaks=0")
    return ["-O1", "-g1", "-fsanitize=address", "-fno-omit-frame-pointer"]


def _jit(name: str, sources: list[Path], cflags=("-O2",), ldflags=()):
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise RuntimeError(f"the extension was not prebuilt and its sources are missing "
                           f"({', '.join(missing)}); install from a source checkout")
    from torch.utils.cpp_extension import load as cpp_load
    print(f"moe_adapter_kernels: JIT-loading the {name} extension from {CSRC} (compiled on "
          f"first use, a minute or two; then from torch's extension cache)...", file=sys.stderr,
          flush=True)
    return cpp_load(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                    extra_ldflags=list(ldflags), extra_cuda_cflags=["-O3"],
                    extra_include_paths=[str(CSRC)])


@functools.lru_cache(maxsize=None)
def load():
    """The extension module (building it if needed). Raises RuntimeError saying why it is
    unavailable."""
    if emulating():
        source = [CSRC / "emulate" / "emulate.cpp"]
        if os.environ["MOE_ADAPTER_CUDA_EMULATE"] == "asan":
            return _jit("moe_adapter_cuda_emulated_asan", source, _asan_flags(),
                        ["-fsanitize=address"])
        return _jit("moe_adapter_cuda_emulated", source)
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch ({torch.__version__}) is a CPU-only build (set "
                           f"MOE_ADAPTER_CUDA_EMULATE=1 to run the CUDA kernels on the CPU)")
    try:
        from .. import _C
        log.debug("moe_adapter_kernels: using the prebuilt CUDA extension")
        return _C
    except ImportError:
        pass
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        raise RuntimeError("the extension was not prebuilt and no CUDA toolchain (nvcc) was "
                           "found to build it; set CUDA_HOME or reinstall with nvcc on PATH")
    return _jit("moe_adapter_cuda", [CSRC / "ops.cpp", *sorted(CSRC.glob("*.cu"))])


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(usable, reason) for the ``cuda`` backend; builds the extension on first call. Cached:
    ``auto`` asks on every forward, and a failed build must not be retried each time."""
    if not emulating() and not torch.cuda.is_available():
        return False, ("no CUDA device (set MOE_ADAPTER_CUDA_EMULATE=1 to run the CUDA kernels "
                       "on the CPU)")
    try:
        ext = load()
    except Exception as exc:  # a failed build or import: report, do not crash the caller
        return False, f"CUDA extension unavailable: {exc}"
    if ext.emulated:
        return True, (f"CUDA C++ kernels emulated on the CPU (MOE_ADAPTER_CUDA_EMULATE="
                      f"{os.environ['MOE_ADAPTER_CUDA_EMULATE']})")
    return True, f"CUDA C++ extension on {torch.cuda.get_device_name()}"
