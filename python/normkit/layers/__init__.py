"""The stateful layers, one family per file."""
from .base import NormLayer
from .batch_channel import BatchChannelNorm2d
from .batch_layer import BatchLayerNorm2d
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .cross_iteration import CrossIterationBatchNorm2d
from .evonorm import EvoNormB0_2d, EvoNormS0_2d
from .extended import ExtendedBatchNorm2d
from .frozen import FrozenBatchNorm2d
from .ghost import GhostBatchNorm2d
from .groupnorm import GroupNorm
from .kalman import BatchKalmanNorm2d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layernorm import LayerNorm, RMSNorm
from .layernorm2d import LayerNorm2d
from .local_response import LocalResponseNorm
from .modality import ModalityBatchNorm2d
from .moving_average import MovingAverageBatchNorm2d
from .proxy import ProxyNorm2d
from .renorm import BatchRenorm2d, renorm_schedule
from .response import FilterResponseNorm2d
from .sync_batchnorm import SyncBatchNorm

__all__ = ["NormLayer", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
           "ExtendedBatchNorm2d", "ModalityBatchNorm2d", "GhostBatchNorm2d", "BatchRenorm2d",
           "FrozenBatchNorm2d", "renorm_schedule", "FilterResponseNorm2d", "EvoNormB0_2d",
           "EvoNormS0_2d", "ProxyNorm2d", "BatchChannelNorm2d", "BatchLayerNorm2d", "LayerNorm2d", "LocalResponseNorm",
           "MovingAverageBatchNorm2d", "CrossIterationBatchNorm2d", "BatchKalmanNorm2d", "SyncBatchNorm"]
