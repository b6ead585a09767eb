"""Build script. Installs the pure-Python package everywhere; the CUDA C++ extension in csrc/
(``moe_adapter_kernels._C``: csrc/ops.cpp and csrc/*.cu) is built only when a CUDA toolchain
and a CUDA build of torch are present, for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says
otherwise (set MOE_ADAPTER_NO_EXT=1 to skip it anyway). Where it was not built, the ``cuda``
backend JIT-builds it on first use from a source checkout."""

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
    print(f"moe-adapter-kernels: building the CUDA extension for sm "
          f"{os.environ['TORCH_CUDA_ARCH_LIST']} (set TORCH_CUDA_ARCH_LIST to change)")
    ext = CUDAExtension("moe_adapter_kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
