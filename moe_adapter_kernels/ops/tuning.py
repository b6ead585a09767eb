"""Tile configs for the GEMM kernels, tuned per device and shape and committed as JSON
(``ops/tuned/<device>.json``), so runs after the first do not retune. A device without a table
of its own reads the committed table of a device with the same compute capability
(:data:`STAND_INS`), so e.g. an H200 runs the H100's tiles until it is tuned itself.

``python -m benchmarks.tune`` (on a GPU) times the few :data:`CANDIDATES` for every GEMM of
the adapter at the given token counts and writes the winners; the launchers look them up by
(kernel, variant, dtype, N, K, row bucket) and fall back to ``default_config``. Dense launches
(the shared MLP's) also race :data:`CUBLAS`, the same GEMM in cuBLAS with the epilogue in
PyTorch ops, and the routed experts' activation backward races :data:`SPLIT`, its GEMM and
epilogue as two passes, so each shape runs on whichever this device runs faster.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).with_name("tuned")
CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
]

# compute capability -> the committed table a device of that capability without its own reads:
# parts of one architecture share shared-memory size and tensor cores, so tiles carry over
STAND_INS = {(9, 0): "nvidia-h100-80gb-hbm3"}

CUBLAS = dict(path="cublas")
# the grouped dact as a plain GEMM (the forward's favourite tiles) and a separate epilogue pass
SPLIT = [dict(cfg, split=True) for cfg in CANDIDATES if cfg["BLOCK_M"] == 128
         and cfg["BLOCK_N"] >= 128]


def candidates(key: str) -> list:
    """The configs :func:`tune` times for ``key``: tiles, plus cuBLAS for dense launches and
    the split path for the grouped activation backward."""
    kernel, variant = key.split("|")[:2]
    if variant.startswith("dense-"):
        return CANDIDATES + [CUBLAS]
    return CANDIDATES + SPLIT if kernel == "dact" else CANDIDATES


def tile_configs() -> list:
    """Every Triton config some key races, once each (what ``benchmarks.tune`` precompiles)."""
    return CANDIDATES + SPLIT


@functools.lru_cache(maxsize=None)
def device_key(index: int = 0) -> str:
    """A file-name-safe name of the CUDA device, e.g. ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(index).lower()).strip("-")


@functools.lru_cache(maxsize=None)
def launch_table(index: int = 0) -> str:
    """The table the launchers read on CUDA device ``index``: the device's own where it has
    one, else its capability's stand-in (:data:`STAND_INS`) where that is committed, else its
    own (empty: default tiles)."""
    own = device_key(index)
    stand_in = STAND_INS.get(tuple(torch.cuda.get_device_capability(index)))
    if table(own) or stand_in is None or not table(stand_in):
        return own
    return stand_in


@functools.lru_cache(maxsize=4096)  # built on every launch
def shape_key(kernel: str, variant: str, dtype: torch.dtype, M: int, N: int, K: int) -> str:
    """Rows are bucketed to a power of two (128 at least) so nearby token counts share."""
    bucket = max(128, 1 << max(M - 1, 0).bit_length())
    return f"{kernel}|{variant}|{str(dtype).replace('torch.', '')}|N{N}|K{K}|M{bucket}"


@functools.lru_cache(maxsize=None)
def table(device: str) -> dict:
    path = TUNED_DIR / f"{device}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def lookup(device: str, key: str) -> dict | None:
    """The tuned config for ``key`` on ``device``, or None."""
    return table(device).get(key)


def tune(device: str, key: str, run, timer) -> dict:
    """Time ``run(config)`` for every one of :func:`candidates` with ``timer(fn) -> ms``;
    record and return the fastest. Candidates that fail to compile or launch are skipped."""
    best, best_ms = None, float("inf")
    for cfg in candidates(key):
        try:
            ms = timer(lambda: run(cfg))
        except Exception:  # e.g. out of shared memory for this tile shape
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"tune: no candidate config ran for {key}")
    table(device)[key] = dict(best, ms=round(best_ms, 4))
    return best


def save(device: str) -> Path:
    TUNED_DIR.mkdir(exist_ok=True)
    path = TUNED_DIR / f"{device}.json"
    path.write_text(json.dumps(dict(sorted(table(device).items())), indent=1) + "\n")
    return path
