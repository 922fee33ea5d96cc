"""normkit: fast CPU normalization layers, forward and backward, on NumPy arrays."""
from __future__ import annotations

from typing import Any

from . import _core, data, functional
from ._checks import StateError
from .conv import conv2d_stat_jacobians
from .fold import fold_batchnorm, inference_affine
from .layers import (BatchChannelNorm2d, BatchKalmanNorm2d, BatchLayerNorm2d, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                     BatchRenorm2d, CrossIterationBatchNorm2d, EvoNormB0_2d, EvoNormS0_2d, ExtendedBatchNorm2d, FilterResponseNorm2d,
                     FrozenBatchNorm2d, GhostBatchNorm2d, GroupNorm, InstanceNorm1d, InstanceNorm2d,
                     InstanceNorm3d, LayerNorm, LayerNorm2d, LocalResponseNorm, ModalityBatchNorm2d,
                     MovingAverageBatchNorm2d, NormLayer, ProxyNorm2d, RMSNorm, SyncBatchNorm, renorm_schedule)

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads every normkit kernel uses (default: OpenMP's, which honours OMP_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


def cpu_info() -> dict[str, Any]:
    """The SIMD level the kernels run at, and the levels this CPU supports."""
    return {"isa": _core.isa_name(), "supported": list(_core.supported_isas()),
            "num_threads": _core.get_num_threads()}


__all__ = ["functional", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm", "NormLayer",
           "ExtendedBatchNorm2d", "ModalityBatchNorm2d", "GhostBatchNorm2d", "BatchRenorm2d",
           "FrozenBatchNorm2d", "renorm_schedule", "data", "FilterResponseNorm2d", "EvoNormB0_2d",
           "EvoNormS0_2d", "ProxyNorm2d", "BatchChannelNorm2d", "BatchLayerNorm2d", "LayerNorm2d",
           "LocalResponseNorm", "MovingAverageBatchNorm2d",
           "CrossIterationBatchNorm2d", "BatchKalmanNorm2d", "SyncBatchNorm", "set_num_threads", "get_num_threads",
           "cpu_info", "fold_batchnorm", "inference_affine", "conv2d_stat_jacobians", "StateError", "__version__"]
