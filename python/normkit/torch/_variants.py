"""The research variants as torch modules: normkit's constructor arguments (less `layout`:
channels_last tensors take the NHWC path by themselves) plus torch's device and dtype, and
normkit's parameter and buffer names."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import numpy.typing as npt
import torch
from torch.types import Device

import normkit as nk

from . import _bridge
from ._module import NormModule, signature_of

if TYPE_CHECKING:
    from normkit.layers.base import NormLayer


class _Variant(NormModule):
    """A NormModule over the normkit variant `_layer_cls`, with its constructor's arguments."""

    _layer_cls: ClassVar[type[NormLayer]]  # set by each subclass
    __signature__: ClassVar[inspect.Signature]  # the constructor's, set by __init_subclass__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        sig = signature_of(cls._layer_cls)
        cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # less self
        if cls.__doc__ is None:
            cls.__doc__ = f"normkit.{cls._layer_cls.__name__} as a torch.nn.Module.\n\n{cls._layer_cls.__doc__}"

    def __init__(self, *args: Any, device: Device = None, dtype: _bridge.DTypeArg = None,
                 **kwargs: Any) -> None:
        if "layout" in kwargs:
            raise TypeError("layout: not an argument of normkit.torch's modules (a channels_last tensor "
                            "is read in place where the layer can, and copied where it cannot)")
        make: Callable[..., NormLayer] = self._layer_cls  # each variant's own constructor arguments
        super().__init__(make(*args, dtype=_bridge.np_dtype(dtype), **kwargs), device)


def _plain(layer_cls: type[NormLayer], channels_last: bool) -> type[_Variant]:
    return type(layer_cls.__name__, (_Variant,), {"_layer_cls": layer_cls, "_channels_last": channels_last,
                                                  "__module__": __name__, "__qualname__": layer_cls.__name__})


ExtendedBatchNorm2d = _plain(nk.ExtendedBatchNorm2d, True)
GhostBatchNorm2d = _plain(nk.GhostBatchNorm2d, True)
BatchRenorm2d = _plain(nk.BatchRenorm2d, True)
FilterResponseNorm2d = _plain(nk.FilterResponseNorm2d, False)
BatchChannelNorm2d = _plain(nk.BatchChannelNorm2d, False)
ProxyNorm2d = _plain(nk.ProxyNorm2d, False)
MovingAverageBatchNorm2d = _plain(nk.MovingAverageBatchNorm2d, True)
LayerNorm2d = _plain(nk.LayerNorm2d, False)
EvoNormB0_2d = _plain(nk.EvoNormB0_2d, False)
EvoNormS0_2d = _plain(nk.EvoNormS0_2d, False)


class ModalityBatchNorm2d(_Variant):
    _layer_cls, _channels_last = nk.ModalityBatchNorm2d, True

    # modality: a required extra input, which NormModule.forward (torch's norm layers') has not
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                modality: torch.Tensor | npt.ArrayLike) -> torch.Tensor:
        """modality: an integer tensor (or array, or sequence) of shape (N,): each sample's modality."""
        if isinstance(modality, torch.Tensor):
            modality = _bridge.numpy_view(_bridge.cpu_tensor(modality, "modality"))
        return cast(torch.Tensor, self._nk_forward(input, (modality,)))  # no extra outputs


class CrossIterationBatchNorm2d(_Variant):
    _layer_cls, _channels_last = nk.CrossIterationBatchNorm2d, True

    def forward(self, input: torch.Tensor, weight: torch.Tensor | npt.NDArray[Any] | None = None,
                dmean_dweight: torch.Tensor | npt.NDArray[Any] | None = None,
                dsqmean_dweight: torch.Tensor | npt.NDArray[Any] | None = None) -> torch.Tensor:
        """weight, dmean_dweight, dsqmean_dweight: the preceding layer's weight and the Jacobians
        of this step's per-channel mean and mean square (normkit.conv2d_stat_jacobians), needed
        in training. They are constants here, as in normkit (no gradient flows into them):
        pass weight.detach()."""
        extras: list[npt.NDArray[Any] | None] = []
        for name, t in (("weight", weight), ("dmean_dweight", dmean_dweight), ("dsqmean_dweight", dsqmean_dweight)):
            if isinstance(t, torch.Tensor):
                _bridge.cpu_tensor(t, name)
                if t.requires_grad and torch.is_grad_enabled():
                    raise ValueError(f"{name}: expected a tensor that does not require grad (normkit's "
                                     f"CrossIterationBatchNorm2d gives no gradient for it; pass {name}.detach()), "
                                     f"got one that requires grad")
                t = _bridge.numpy_view(t)
            extras.append(t)
        return cast(torch.Tensor, self._nk_forward(input, tuple(extras)))  # no extra outputs


class BatchKalmanNorm2d(_Variant):
    _layer_cls, _channels_last = nk.BatchKalmanNorm2d, True
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var) of the last forward

    def forward(self, input: torch.Tensor,
                prior: Sequence[torch.Tensor | npt.ArrayLike] | None = None) -> torch.Tensor:
        """prior: None, or the previous layer's posterior (mean, var), tensors of shape
        (prior_features,); gradients flow into it. Sets `self.posterior` = (mean, var), tensors
        in the graph: the next layer's prior, differentiated exactly through the chain."""
        diff: tuple[torch.Tensor, ...] = ()
        if prior is not None:
            if not isinstance(prior, (tuple, list)) or len(prior) != 2:
                raise TypeError(f"prior: expected None or a pair (mean, var), got {type(prior).__name__}")
            diff = tuple(_bridge.cpu_tensor(torch.as_tensor(p), f"prior[{i}]") for i, p in enumerate(prior))
        y, mean, var = self._nk_forward(input, (), diff)
        self.posterior = None if mean.numel() == 0 and self.num_features else (mean, var)
        return y

    def _nk_call(self, layer: NormLayer, xv: npt.NDArray[Any], extras: tuple[Any, ...],
                 diff: Sequence[npt.NDArray[Any]]) -> npt.NDArray[Any]:
        return layer(xv, tuple(diff) if diff else None)

    def _nk_extra_outputs(self, layer: NormLayer) -> tuple[torch.Tensor, ...] | None:
        layer = cast(nk.BatchKalmanNorm2d, layer)  # self._nk
        dtype = self.weight.dtype if self.weight is not None else self.A.dtype
        if layer.posterior is None:
            return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype)
        return tuple(torch.from_numpy(np.array(p, dtype=_bridge.NP_DTYPES[dtype])) for p in layer.posterior)

    def _nk_backward(self, layer: NormLayer, dy: npt.NDArray[Any], douts: tuple[torch.Tensor, ...]
                     ) -> npt.NDArray[Any]:
        layer = cast(nk.BatchKalmanNorm2d, layer)  # self._nk
        dmean, dvar = douts
        if dmean.numel() == 0:
            return layer.backward(dy)
        return layer.backward(dy, posterior_grad=(dmean.detach().numpy(), dvar.detach().numpy()))

    def _nk_extra_grads(self, layer: NormLayer, n_diff: int) -> list[torch.Tensor]:
        if not n_diff:
            return []
        return [torch.from_numpy(np.asarray(layer.grads[k], np.float64)) for k in ("prior_mean", "prior_var")]



class BatchLayerNorm2d(_Variant):
    """normkit.BatchLayerNorm2d as a torch.nn.Module: running_mean and running_var are None
    until the first forward (or a load_state_dict) gives them their (C, H, W)."""
    _layer_cls, _channels_last = nk.BatchLayerNorm2d, False

    def _nk_call(self, layer: NormLayer, xv: npt.NDArray[Any], extras: tuple[Any, ...],
                 diff: Sequence[npt.NDArray[Any]]) -> npt.NDArray[Any]:
        y = layer(xv)
        for n in ("running_mean", "running_var"):  # made by the first forward: register them
            if self._buffers.get(n) is None and getattr(layer, n) is not None:
                self._buffers[n] = torch.from_numpy(getattr(layer, n))
        return y

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        for n in ("running_mean", "running_var"):  # a loaded (C, H, W) sets the shape
            v = state_dict.get(prefix + n)
            cur = self._buffers.get(n)
            if isinstance(v, torch.Tensor) and (cur is None or cur.shape != v.shape):
                if v.dim() != 3 or v.shape[0] != self.num_features:
                    error_msgs.append(f"{prefix}{n}: expected shape (C, H, W) with C = {self.num_features}, "
                                      f"got {tuple(v.shape)}")
                    continue
                dtype = self.weight.dtype
                self._buffers[n] = torch.zeros(v.shape, dtype=dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
