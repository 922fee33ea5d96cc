"""
normkit's C++ core: plans, statistics, normalize and its backward
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing

_S = typing.TypeVar("_S", bound=numpy.generic)
_Array: typing.TypeAlias = numpy.typing.NDArray[typing.Any]
_F64: typing.TypeAlias = numpy.typing.NDArray[numpy.float64]
# A step's coefficient: a number (broadcast), or float64 values per (set, channel) cell, per
# channel, or one (cpp/bindings/module.cpp: Coefficients).
_Coefficient: typing.TypeAlias = float | numpy.typing.NDArray[numpy.float64]

class PlanError(ValueError):
    pass
class Plan:
    channels_last: bool
    def __getstate__(self) -> tuple[object, ...]:
        ...
    def __setstate__(self, state: tuple[object, ...]) -> None:
        ...
    @property
    def C(self) -> int:
        ...
    @property
    def N(self) -> int:
        ...
    @property
    def S(self) -> int:
        ...
    @property
    def channels_per_group(self) -> int:
        ...
    @property
    def column_affine(self) -> bool:
        ...
    @property
    def group_counts(self) -> list[int]:
        ...
    @property
    def num_groups(self) -> int:
        ...
    @property
    def num_sample_sets(self) -> int:
        ...
    @property
    def skip_mean(self) -> bool:
        ...
class Pointwise:
    """
    Members:
    
      identity
    
      relu
    
      silu
    
      gelu
    
      tlu
    
      swish_gate
    
      evo_b0
    """
    __members__: typing.ClassVar[dict[str, Pointwise]]
    evo_b0: typing.ClassVar[Pointwise]
    gelu: typing.ClassVar[Pointwise]
    identity: typing.ClassVar[Pointwise]
    relu: typing.ClassVar[Pointwise]
    silu: typing.ClassVar[Pointwise]
    swish_gate: typing.ClassVar[Pointwise]
    tlu: typing.ClassVar[Pointwise]
    def __eq__(self, other: object) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    def __ne__(self, other: object) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class Saved:
    """
    What a backward needs from its forward.
    """
    def __init__(self, plan: Plan, x: _Array, mean: numpy.typing.ArrayLike | None,
                 rstd: numpy.typing.ArrayLike | None, weight: _Array | None, batch_stats: bool,
                 shape: tuple[int, ...] | None) -> None:
        ...
    @property
    def shape(self) -> tuple[int, ...]:
        ...
    @shape.setter
    def shape(self, value: tuple[int, ...] | None) -> None:
        ...
    @property
    def batch_stats(self) -> bool:
        ...
    @property
    def mean(self) -> _F64 | None:
        ...
    @property
    def plan(self) -> Plan:
        ...
    @property
    def rstd(self) -> _F64 | None:
        ...
    @property
    def weight(self) -> _Array | None:
        ...
    @property
    def x(self) -> _Array:
        ...
def apply_coefficients(plan: Plan, x: _Array, mean: _Coefficient, scale: _Coefficient,
                       offset: _Coefficient, out: _Array, residual: _Array | None = None,
                       relu: bool = False) -> None:
    """
    out = (x - mean[k])*scale[k] + offset[k], k = set*C + channel of each plane; each coefficient is K = sets*C float64 values, or C, or 1, or a number (broadcast).
    """
def apply_coefficients_positions(plan: Plan, x: _Array, mean: _Coefficient, scale: _Coefficient,
                                 offset: _Coefficient, weight: _Array, bias: _Array,
                                 out: _Array) -> None:
    """
    out = ((x - mean[k])*scale[k] + offset[k])*weight[s] + bias[s]; channels-last plans.
    """
def apply_pointwise(plan: Plan, op: int, x: _Array, coef: _F64, out: _Array) -> None:
    """
    out = f(u)*scale + offset, u = (x - shift)*a + b, per cell; coef: (9, K) float64.
    """
def backward(saved: Saved, dy: _Array, dx: _Array | None, dweight: _Array | None,
             dbias: _Array | None) -> None:
    """
    normalize_backward of the forward that made `saved`.
    """
def backward_apply_coefficients(plan: Plan, x: _Array | None, dy: _Array, mean: _Coefficient,
                                c1: _Coefficient, c2: _Coefficient, c3: _Coefficient,
                                dx: _Array) -> None:
    """
    dx = c1[k]*dy + c2[k]*(x - mean[k]) + c3[k] per (set, channel) k (coefficients as apply_coefficients'); x may be None (no x term).
    """
def backward_apply_positions(plan: Plan, x: _Array, dy: _Array, mean: _Coefficient,
                             c1: _Coefficient, c2: _Coefficient, c3: _Coefficient, weight: _Array,
                             dx: _Array,
                             sample_term: tuple[_F64, _F64, _F64, _F64] | None = None) -> None:
    """
    dx = c1[k]*weight[s]*dy + c2[k]*(x - mean[k]) + c3[k] [+ the sample term's]; channels-last plans.
    """
def backward_fast(saved: Saved, dy: object, want_weight: bool,
                  want_bias: bool) -> tuple[_Array, _Array | None, _Array | None] | None:
    """
    (dx, dweight, dbias) of the forward that made `saved`, or None when the call is not the common case (then the Python path runs).
    """
def backward_sums(plan: Plan, x: _Array, dy: _Array, mean: _Coefficient) -> tuple[_F64, _F64]:
    """
    (sum dy, sum dy*(x - mean[k])) per (set, channel) k, float64 arrays.
    """
def backward_sums_positions(plan: Plan, x: _Array, dy: _Array, mean: _Coefficient,
                            scale: _Coefficient, offset: _Coefficient,
                            weight: _Array) -> tuple[_F64, _F64, _F64, _F64]:
    """
    (sum weight*dy, sum weight*dy*(x - mean[k])) per cell and (sum dy*xhat, sum dy) per position.
    """
def batch_channel_fold(N: int, C: int, G: int, S: int, eps: float, mean: _F64, var: _F64,
                       bn_weight: _F64, bn_bias: _F64, gn_weight: _F64, gn_bias: _F64,
                       mu: _F64 | None = None, batch_var: _F64 | None = None
                       ) -> tuple[_F64, _F64, _F64, _F64, _F64, _F64, _F64]:
    """
    BatchChannelNorm2d's forward fold from its N*C cells' moments (float64): (mu, batch_var, r, scale, offset, mu_g, r_g), the batch part's statistics pooled from the cells where mu and batch_var are None.
    """
def batch_channel_infer(x: _Array, G: int, eps: float, mu: _F64, batch_var: _F64, bn_weight: _F64,
                        bn_bias: _F64, gn_weight: _F64, gn_bias: _F64, out: _Array
                        ) -> tuple[_F64, _F64, _F64, _F64, _F64, _F64, _F64]:
    """
    BatchChannelNorm2d's inference in one pass over x (N, C, *spatial) with the batch part's mu and batch_var (float64): out = the layer's output; returns (mean, var) of the N*C cells and batch_channel_fold's (r, scale, offset, mu_g, r_g).
    """
def batch_channel_fold_backward(N: int, C: int, G: int, S: int, batch: bool, sum_dy: _F64,
                                sum_dy_xmu: _F64, mean: _F64, var: _F64, mu: _F64, r: _F64,
                                mu_g: _F64, r_g: _F64, bn_weight: _F64, bn_bias: _F64,
                                gn_weight: _F64, gn_bias: _F64
                                ) -> tuple[_F64, _F64, _F64, _F64, _F64, _F64, _F64]:
    """
    BatchChannelNorm2d's backward fold from its cells' sums (float64): (c1, c2, c3) per cell and the gradients (d_bn_weight, d_bn_bias, d_gn_weight, d_gn_bias).
    """
def batch_layer_backward(feature: Plan, x: _Array, dy: _Array, mean_f: _F64, rstd_f: _F64,
                         mean_b: _F64, rstd_b: _F64, feature_scale: float, batch_scale: float,
                         batch_stats: bool, weight: _Array, dx: _Array) -> tuple[_F64, _F64]:
    """
    BatchLayerNorm2d's dx into dx; returns (dweight, dbias) per channel.
    """
def batch_layer_forward(feature: Plan, x: _Array, eps: float, feature_scale: float,
                        batch_scale: float, weight: _Array, bias: _Array, out: _Array,
                        running: tuple[_Array, _Array] | None = None
                        ) -> tuple[_F64, _F64, _F64, _F64, _F64]:
    """
    BatchLayerNorm2d's output into out, with the batch's own moments per (c, hw) (running None) or the given (mean_b, var_b), C*H*W values each of any float dtype; returns (mean_f, rstd_f, mean_b, var_b, rstd_b), float64.
    """
def conv2d_stat_jacobians(x: numpy.typing.NDArray[_S], weight: numpy.typing.NDArray[_S],
                          stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                          dilation_w: int, groups: int
                          ) -> tuple[numpy.typing.NDArray[_S], numpy.typing.NDArray[_S]]:
    """
    (dmean_dweight, dsqmean_dweight) of y = conv2d(x, weight), each of the weight's shape (normkit/conv.h).
    """
def copy(dst: _Array, src: _Array) -> None:
    """
    dst[...] = src bytewise on normkit's threads (the bench's yardstick).
    """
def empty_like(a: numpy.typing.NDArray[_S]) -> numpy.typing.NDArray[_S]:
    """
    A new uninitialized C-contiguous array of a's shape and dtype, on the C heap.
    """
def forward_fast(kind: int, x: object, channels: int, groups: object, normalized_shape: object,
                 ndims_mask: int, channels_last: bool, weight: object, bias: object,
                 running_mean: object, running_var: object, batch_stats: bool, momentum: object,
                 eps: object, param_bits: int) -> tuple[_Array, Saved] | None:
    """
    A layer's forward in one call, or None when the input is not the common case (then the Python path runs). Returns (y, Saved).
    """
def get_num_threads() -> int:
    ...
def group_moments(plan: Plan, x: _Array) -> tuple[_F64, _F64]:
    """
    Per-group mean and biased variance (float64 arrays).
    """
def isa_name() -> str:
    ...
def local_response_norm(N: int, C: int, S: int, x: _Array, out: _Array, size: int, alpha: float,
                        beta: float, k: float) -> None:
    """
    torch's local_response_norm of x viewed as (N, C, S), into out.
    """
def local_response_norm_backward(N: int, C: int, S: int, x: _Array, dy: _Array, dx: _Array,
                                 size: int, alpha: float, beta: float, k: float) -> None:
    """
    dx of local_response_norm.
    """
def normalize(plan: Plan, x: _Array, mean: _F64, rstd: _F64, weight: _Array | None,
              bias: _Array | None, out: _Array, residual: _Array | None = None,
              relu: bool = False) -> None:
    ...
def normalize_backward(plan: Plan, x: _Array, dy: _Array, mean: _F64, rstd: _F64,
                       weight: _Array | None, batch_stats: bool, dx: _Array | None,
                       dweight: _Array | None, dbias: _Array | None) -> None:
    ...
def normalize_backward_positions(plan: Plan, x: _Array, dy: _Array, mean: _F64, rstd: _F64,
                                 weight: _Array, dx: _Array) -> tuple[_F64, _F64]:
    """
    LayerNorm's backward over normalize_batch_stats_positions' plan, mean and rstd: dx, and returns (dweight, dbias) per position.
    """
def normalize_batch_stats(plan: Plan, x: _Array, eps: float, weight: _Array | None,
                          bias: _Array | None, out: _Array, residual: _Array | None = None,
                          relu: bool = False) -> tuple[_F64, _F64, _F64]:
    """
    Statistics from x and the normalization in one call; returns (mean, var, rstd).
    """
def normalize_batch_stats_positions(plan: Plan, x: _Array, eps: float, weight: _Array,
                                    bias: _Array, out: _Array,
                                    sample_term: tuple[_F64, _F64, _F64, float] | None = None
                                    ) -> tuple[_F64, _F64, _F64]:
    """
    Per-column statistics and out = ((x - mean)*rstd [+ the sample term's])*weight[s] + bias[s], sample by sample; (mean, var, rstd).
    """
def normalize_pointwise(plan: Plan, op: int, x: _Array, eps: float, skip_mean: bool, center: bool,
                        rstd_into_scale: bool, channel: _F64, out: _Array,
                        cell: _F64, std_into_r: bool = False) -> tuple[_F64, _F64]:
    """
    Statistics per group of a per-sample-group plan, then out = apply_pointwise with cell coefficients folded from them and the (9, C) channel rows (r = 1/sqrt(var + eps) into a, or into scale; with std_into_r, sqrt(var + eps) as the cells' r); writes the (9, N*C) cell coefficients to `cell`; returns (mean, var) per group.
    """
def plan_per_channel(N: int, C: int, S: int) -> Plan:
    ...
def plan_per_channel_in_sets(N: int, C: int, S: int,
                             set_of_sample: collections.abc.Sequence[typing.SupportsIndex],
                             channels_per_group: int = 1) -> Plan:
    ...
def plan_per_row(rows: int, M: int, skip_mean: bool) -> Plan:
    ...
def plan_per_sample_group(N: int, C: int, S: int, num_groups: int) -> Plan:
    ...
def pointwise_backward(plan: Plan, op: int, x: _Array, dy: _Array, coef: _F64, c1: _Coefficient,
                       c2: _Coefficient, c3: _Coefficient, dx: _Array) -> None:
    """
    dx = c1[k]*dy*f'(u) + c2[k]*(x - center[k]) + c3[k] per cell (c1..c3 as apply_coefficients').
    """
def pointwise_backward_fused(plan: Plan, op: int, x: _Array, dy: _Array, coef: _F64,
                             c1: _Coefficient, c2: _Coefficient, c3: _Coefficient, dx: _Array,
                             cluster: int = 1, k2: _F64 | None = None,
                             k3: _F64 | None = None) -> _F64:
    """
    pointwise_sums and pointwise_backward in one pass: dx = c1[k]*g + (c2[k] + q2)*(x - center[k]) + c3[k] + q3 with q2, q3 = sum over the cluster's planes of k2 . sums, k3 . sums (k2, k3: (7, K) or None); returns the (7, K) sums.
    """
def pointwise_sums(plan: Plan, op: int, x: _Array, dy: _Array, coef: _F64) -> _F64:
    """
    (7, K) sums per cell: dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr; g = dy*f'(u); a derivative the function does not have sums to exactly 0.
    """
def running_update(running: _Array, value: _F64, factor: float, value_scale: float = 1.0) -> None:
    """
    running = (1 - factor)*running + factor*value_scale*value, in place.
    """
def set_cache_bytes(bytes: int) -> None:
    """
    The last-level cache size the traversal assumes (0: detect); speed only, never results.
    """
def set_isa(name: str) -> None:
    ...
def set_num_threads(n: int) -> None:
    ...
def supported_isas() -> list[str]:
    ...
FAST_BATCH: int = 0
FAST_GROUP: int = 2
FAST_INSTANCE: int = 1
FAST_LAYER: int = 3
FAST_RMS: int = 4
