"""The layers torch has, with torch's constructors, buffers and state_dict keys.

Each is also an instance of torch's class (isinstance(m, torch.nn.BatchNorm2d) holds, so code that
finds norm layers by type — weight-decay filters, initializers, conv-BN fusion — finds these),
with torch's methods (reset_parameters, state_dict loading with its version handling) acting on
the shared tensors; only the forward is normkit's.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.types import Device

import normkit as nk

from ._bridge import DTypeArg, np_dtype
from ._module import NormModule


class _BatchNorm(NormModule):
    _channels_last = True
    _nk_class: type[nk.BatchNorm1d | nk.BatchNorm2d | nk.BatchNorm3d]  # set by each subclass

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Device = None,
                 dtype: DTypeArg = None) -> None:
        super().__init__(self._nk_class(num_features, eps, momentum, affine, track_running_stats,
                                        dtype=np_dtype(dtype)), device)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on normkit's kernels."""
    _nk_class = nk.BatchNorm1d


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on normkit's kernels (channels_last input read in place)."""
    _nk_class = nk.BatchNorm2d


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on normkit's kernels (channels_last_3d input read in place)."""
    _nk_class = nk.BatchNorm3d


class _InstanceNorm(NormModule):
    _channels_last = True
    # Set by each subclass:
    _nk_class: type[nk.InstanceNorm1d | nk.InstanceNorm2d | nk.InstanceNorm3d]

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device: Device = None,
                 dtype: DTypeArg = None) -> None:
        super().__init__(self._nk_class(num_features, eps, momentum, affine, track_running_stats,
                                        dtype=np_dtype(dtype)), device)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d on normkit's kernels."""
    _nk_class = nk.InstanceNorm1d


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d on normkit's kernels (channels_last input read in place)."""
    _nk_class = nk.InstanceNorm2d


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d on normkit's kernels (channels_last_3d input read in place)."""
    _nk_class = nk.InstanceNorm3d


class GroupNorm(NormModule, nn.GroupNorm):
    """torch.nn.GroupNorm on normkit's kernels (channels_last input read in place)."""
    _channels_last = True

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: Device = None, dtype: DTypeArg = None) -> None:
        super().__init__(nk.GroupNorm(num_groups, num_channels, eps, affine, dtype=np_dtype(dtype)), device)


class LayerNorm(NormModule, nn.LayerNorm):
    """torch.nn.LayerNorm on normkit's kernels."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device: Device = None,
                 dtype: DTypeArg = None) -> None:
        super().__init__(nk.LayerNorm(normalized_shape, eps, elementwise_affine, bias, dtype=np_dtype(dtype)), device)


class RMSNorm(NormModule, nn.RMSNorm):
    """torch.nn.RMSNorm on normkit's kernels (eps=None: the input dtype's machine epsilon)."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, device: Device = None,
                 dtype: DTypeArg = None) -> None:
        super().__init__(nk.RMSNorm(normalized_shape, eps, elementwise_affine, dtype=np_dtype(dtype)), device)


class LocalResponseNorm(NormModule, nn.LocalResponseNorm):
    """torch.nn.LocalResponseNorm on normkit's kernels (any float input dtype)."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__(nk.LocalResponseNorm(size, alpha, beta, k))


class FrozenBatchNorm2d(NormModule):
    """torchvision.ops.FrozenBatchNorm2d on normkit's kernels: weight, bias, running_mean and
    running_var are buffers; a BatchNorm2d state_dict loads (its num_batches_tracked dropped)."""
    _channels_last = True

    def __init__(self, num_features: int, eps: float = 1e-5, device: Device = None,
                 dtype: DTypeArg = None) -> None:
        super().__init__(nk.FrozenBatchNorm2d(num_features, eps, dtype=np_dtype(dtype)), device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # as torchvision
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
