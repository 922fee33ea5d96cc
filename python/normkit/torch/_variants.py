"""The research variants as torch modules: normkit's constructor arguments (less `layout`:
channels_last tensors take the NHWC path by themselves) plus torch's device and dtype, and
normkit's parameter and buffer names."""
import numpy as np
import torch

import normkit as nk

from . import _bridge
from ._module import NormModule, signature_of


class _Variant(NormModule):
    """A NormModule over the normkit variant `_layer_cls`, with its constructor's arguments."""

    _layer_cls = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sig = signature_of(cls._layer_cls)
        cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # less self
        if cls.__doc__ is None:
            cls.__doc__ = f"normkit.{cls._layer_cls.__name__} as a torch.nn.Module.\n\n{cls._layer_cls.__doc__}"

    def __init__(self, *args, device=None, dtype=None, **kwargs):
        if "layout" in kwargs:
            raise TypeError("layout: not an argument of normkit.torch's modules (a channels_last tensor "
                            "is read in place where the layer can, and copied where it cannot)")
        super().__init__(self._layer_cls(*args, dtype=_bridge.np_dtype(dtype), **kwargs), device)


def _plain(layer_cls, channels_last):
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

    def forward(self, input, modality):
        """modality: an integer tensor (or array, or sequence) of shape (N,): each sample's modality."""
        if isinstance(modality, torch.Tensor):
            modality = _bridge.numpy_view(_bridge.cpu_tensor(modality, "modality"))
        return self._nk_forward(input, (modality,))


class CrossIterationBatchNorm2d(_Variant):
    _layer_cls, _channels_last = nk.CrossIterationBatchNorm2d, True

    def forward(self, input, weight=None, dmean_dweight=None, dsqmean_dweight=None):
        """weight, dmean_dweight, dsqmean_dweight: the preceding layer's weight and the Jacobians
        of this step's per-channel mean and mean square (normkit.conv2d_stat_jacobians), needed
        in training. They are constants here, as in normkit (no gradient flows into them):
        pass weight.detach()."""
        extras = []
        for name, t in (("weight", weight), ("dmean_dweight", dmean_dweight), ("dsqmean_dweight", dsqmean_dweight)):
            if isinstance(t, torch.Tensor):
                _bridge.cpu_tensor(t, name)
                if t.requires_grad and torch.is_grad_enabled():
                    raise ValueError(f"{name}: expected a tensor that does not require grad (normkit's "
                                     f"CrossIterationBatchNorm2d gives no gradient for it; pass {name}.detach()), "
                                     f"got one that requires grad")
                t = _bridge.numpy_view(t)
            extras.append(t)
        return self._nk_forward(input, tuple(extras))


class BatchKalmanNorm2d(_Variant):
    _layer_cls, _channels_last = nk.BatchKalmanNorm2d, True
    posterior = None  # (mean, var) of the last forward

    def forward(self, input, prior=None):
        """prior: None, or the previous layer's posterior (mean, var), tensors of shape
        (prior_features,); gradients flow into it. Sets `self.posterior` = (mean, var), tensors
        in the graph: the next layer's prior, differentiated exactly through the chain."""
        diff = ()
        if prior is not None:
            if not isinstance(prior, (tuple, list)) or len(prior) != 2:
                raise TypeError(f"prior: expected None or a pair (mean, var), got {type(prior).__name__}")
            diff = tuple(_bridge.cpu_tensor(torch.as_tensor(p), f"prior[{i}]") for i, p in enumerate(prior))
        y, mean, var = self._nk_forward(input, (), diff)
        self.posterior = None if mean.numel() == 0 and self.num_features else (mean, var)
        return y

    def _nk_call(self, layer, xv, extras, diff):
        return layer(xv, tuple(diff) if diff else None)

    def _nk_extra_outputs(self, layer):
        dtype = self.weight.dtype if self.weight is not None else self.A.dtype
        if layer.posterior is None:
            return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype)
        return tuple(torch.from_numpy(np.array(p, dtype=_bridge.NP_DTYPES[dtype])) for p in layer.posterior)

    def _nk_backward(self, layer, dy, douts):
        dmean, dvar = douts
        if dmean.numel() == 0:
            return layer.backward(dy)
        return layer.backward(dy, posterior_grad=(dmean.detach().numpy(), dvar.detach().numpy()))

    def _nk_extra_grads(self, layer, n_diff):
        if not n_diff:
            return []
        return [torch.from_numpy(np.asarray(layer.grads[k], np.float64)) for k in ("prior_mean", "prior_var")]



class BatchLayerNorm2d(_Variant):
    """normkit.BatchLayerNorm2d as a torch.nn.Module: running_mean and running_var are None
    until the first forward (or a load_state_dict) gives them their (C, H, W)."""
    _layer_cls, _channels_last = nk.BatchLayerNorm2d, False

    def _nk_call(self, layer, xv, extras, diff):
        y = layer(xv)
        for n in ("running_mean", "running_var"):  # made by the first forward: register them
            if self._buffers.get(n) is None and getattr(layer, n) is not None:
                self._buffers[n] = torch.from_numpy(getattr(layer, n))
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
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
