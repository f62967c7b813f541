"""nflux: normalizing flows on fused C++/CUDA torch operators."""

from __future__ import annotations

import torch

from nflux import _extension, nets, ops, transforms
from nflux.flow import DistributionBase, Flow, FlowDistribution, StandardNormal
from nflux.models import IAF, MAF, NICE, NSF, Glow, ImageFlow, RealNVP
from nflux.transforms.preprocess import bits_per_dim

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation runs on: versions, and which native kernels were compiled."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "extension_loaded": _extension.loaded,
        "extension_error": _extension.load_error,
        "cpu_kernels": _extension.cpu_kernels,
        "cuda_kernels": _extension.cuda_kernels,
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = [
    "DistributionBase", "Flow", "FlowDistribution", "Glow", "IAF", "ImageFlow", "MAF", "NICE", "NSF", "RealNVP", "StandardNormal",
    "bits_per_dim", "build_info", "nets", "ops", "transforms", "__version__",
]
