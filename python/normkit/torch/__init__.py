"""normkit.torch: every normkit layer as a torch.nn.Module, and convert(model).

    import normkit.torch as nkt
    bn = nkt.BatchNorm2d(64)              # torch.nn.BatchNorm2d's constructor, state and semantics
    model = nkt.convert(model)            # every torch.nn norm layer of a model replaced

Forward and backward run normkit's CPU kernels through one autograd Function, on NumPy views of
the tensors (no copies: contiguous and channels_last input, float32/64, float16 and bfloat16).
Importing normkit does not import torch; importing normkit.torch does. docs/torch.md has the rules.
"""
from ._convert import ConversionWarning, convert
from ._layers import (BatchNorm1d, BatchNorm2d, BatchNorm3d, FrozenBatchNorm2d, GroupNorm, InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d, LayerNorm, LocalResponseNorm, RMSNorm)
from ._module import NormModule
from ._sync import SyncBatchNorm
from ._variants import (BatchChannelNorm2d, BatchKalmanNorm2d, BatchLayerNorm2d, BatchRenorm2d,
                        CrossIterationBatchNorm2d, EvoNormB0_2d, EvoNormS0_2d, ExtendedBatchNorm2d,
                        FilterResponseNorm2d, GhostBatchNorm2d, LayerNorm2d, ModalityBatchNorm2d,
                        MovingAverageBatchNorm2d, ProxyNorm2d)

__all__ = ["convert", "ConversionWarning", "NormModule", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
           "LocalResponseNorm", "FrozenBatchNorm2d", "SyncBatchNorm", "ExtendedBatchNorm2d",
           "ModalityBatchNorm2d", "GhostBatchNorm2d", "BatchRenorm2d", "FilterResponseNorm2d",
           "BatchChannelNorm2d", "BatchLayerNorm2d", "ProxyNorm2d", "MovingAverageBatchNorm2d",
           "CrossIterationBatchNorm2d", "BatchKalmanNorm2d", "LayerNorm2d", "EvoNormB0_2d", "EvoNormS0_2d"]
