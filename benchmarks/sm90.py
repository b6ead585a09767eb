"""Triton's JIT pointed at an sm_90 (H100) GPU that is not there, for host-side tools.

Inside ``jit_without_gpu()``, calling a Triton kernel goes through ``JITFunction.run`` as on
a GPU (argument binding and specialization, cache key, compilation for sm_90 on first use)
and stops where the launch would be; the compiled kernels are collected in the list it
yields. ``benchmarks.sass`` reads their machine code; ``benchmarks.host --launcher`` times
this launch path. Triton must not be in interpreter mode (TRITON_INTERPRET unset before
triton.jit decorates the kernels).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def jit_without_gpu():
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class Sm90:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    built = []
    run = JITFunction.run

    def until_launch(self, *args, grid, warmup, **kwargs):
        built.append(run(self, *args, grid=grid, warmup=True, **kwargs))

    previous = driver._active  # None on a machine without a GPU
    driver.set_active(Sm90())
    JITFunction.run = until_launch
    try:
        yield built
    finally:
        JITFunction.run = run
        driver.set_active(previous)
