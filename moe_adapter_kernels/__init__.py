"""Fused kernels and drop-in modules for the sparse MoE-Adapter of audio language models."""

from .backends import available_backends
from .config import (MOE_PRESETS, DenseAdapterConfig, FeatureFusionConfig, MoEAdapterConfig)
from .modules import DenseAdapter, FeatureFusion, MoEAdapter, stack_frames

__version__ = "0.1.0"

__all__ = [
    "MoEAdapter", "DenseAdapter", "FeatureFusion", "stack_frames",
    "MoEAdapterConfig", "DenseAdapterConfig", "FeatureFusionConfig", "MOE_PRESETS",
    "available_backends", "__version__",
]
