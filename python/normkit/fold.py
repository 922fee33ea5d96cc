"""Folding an inference-mode BatchNorm into the convolution or linear layer before it."""
import numpy as np

from . import _checks


def fold_batchnorm(weight, bias, bn):
    """Weight and bias of conv/linear -> BatchNorm(eval) as one conv/linear.

    BN(W x + b) = s * (W x + b - mean) + beta with s = gamma / sqrt(running_var + eps), so
    W' = s[:, None, ...] * W and b' = s * (b - mean) + beta. `weight` has the output channels
    first, (C_out, ...); `bias` is (C_out,) or None (zero). `bn` is a normkit BatchNorm layer
    (or anything with running_mean, running_var, eps, weight, bias, e.g. a torch module) with
    running statistics. The math is float64; results have weight's dtype (float32 for other
    dtypes).
    """
    w = np.asarray(weight)
    if w.ndim < 1 or not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"weight: expected a floating array of shape (C_out, ...), got {w.dtype} {w.shape}")
    C = w.shape[0]
    out_dtype = w.dtype if w.dtype in _checks.COMPUTE_DTYPES else np.dtype(np.float32)

    def channel_vector(v, name, default):
        if v is None:
            return np.full(C, default, np.float64)
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        v = np.asarray(v)
        if v.shape != (C,):
            raise ValueError(f"{name}: expected shape ({C},) to match weight's output channels, got {v.shape}")
        return v.astype(np.float64)

    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError("bn: expected a BatchNorm with running statistics (track_running_stats=True)")
    mean = channel_vector(bn.running_mean, "bn.running_mean", 0.0)
    var = channel_vector(bn.running_var, "bn.running_var", 1.0)
    gamma = channel_vector(getattr(bn, "weight", None), "bn.weight", 1.0)
    beta = channel_vector(getattr(bn, "bias", None), "bn.bias", 0.0)
    b = channel_vector(bias, "bias", 0.0)
    scale = gamma / np.sqrt(var + float(bn.eps))
    folded_w = w.astype(np.float64) * scale.reshape((C,) + (1,) * (w.ndim - 1))
    folded_b = (b - mean) * scale + beta
    return folded_w.astype(out_dtype), folded_b.astype(out_dtype)
