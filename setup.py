"""Build script. Installs the pure-Python package everywhere; the CUDA C++ extension in csrc/
is built only when csrc/ has CUDA sources and a CUDA toolchain plus a CUDA build of torch are
present (set MOE_ADAPTER_NO_EXT=1 to skip it anyway)."""

import glob
import os

from setuptools import setup


def cuda_extension():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    if os.environ.get("MOE_ADAPTER_NO_EXT") == "1":
        print("moe-adapter-kernels: MOE_ADAPTER_NO_EXT=1, skipping the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("moe-adapter-kernels: torch is not importable at build time, skipping the CUDA "
              "extension (pure-Python install; the 'cuda' backend will be unavailable)")
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        print("moe-adapter-kernels: no CUDA toolchain or CPU-only torch, skipping the CUDA "
              "extension (pure-Python install; the 'cuda' backend will be unavailable)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension("moe_adapter_kernels._C", sources,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
