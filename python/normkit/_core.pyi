"""
normkit's C++ core: plans, statistics, normalize and its backward
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['FAST_BATCH', 'FAST_GROUP', 'FAST_INSTANCE', 'FAST_LAYER', 'FAST_RMS', 'Plan', 'PlanError', 'Pointwise', 'Saved', 'apply_coefficients', 'apply_coefficients_positions', 'apply_pointwise', 'backward', 'backward_apply_coefficients', 'backward_apply_positions', 'backward_fast', 'backward_sums', 'backward_sums_positions', 'batch_layer_backward', 'batch_layer_forward', 'conv2d_stat_jacobians', 'copy', 'empty_like', 'forward_fast', 'get_num_threads', 'group_moments', 'isa_name', 'local_response_norm', 'local_response_norm_backward', 'normalize', 'normalize_backward', 'normalize_backward_positions', 'normalize_batch_stats', 'normalize_batch_stats_positions', 'plan_per_channel', 'plan_per_channel_in_sets', 'plan_per_row', 'plan_per_sample_group', 'pointwise_backward', 'pointwise_backward_fused', 'pointwise_sums', 'running_update', 'set_cache_bytes', 'set_isa', 'set_num_threads', 'supported_isas']
class PlanError(ValueError):
    pass
class Plan:
    channels_last: bool
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
    @typing.overload
    def __eq__(self, other: Pointwise) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: Pointwise) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
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
    shape: typing.Any
    def __init__(self, plan: Plan, x: typing.Any, mean: typing.Any, rstd: typing.Any, weight: typing.Any, batch_stats: bool, shape: typing.Any) -> None:
        ...
    @property
    def batch_stats(self) -> bool:
        ...
    @property
    def mean(self) -> typing.Any:
        ...
    @property
    def plan(self) -> Plan:
        ...
    @property
    def rstd(self) -> typing.Any:
        ...
    @property
    def weight(self) -> typing.Any:
        ...
    @property
    def x(self) -> typing.Any:
        ...
def apply_coefficients(plan: Plan, x: numpy.ndarray, mean: typing.Any, scale: typing.Any, offset: typing.Any, out: typing.Any, residual: typing.Any = None, relu: bool = False) -> None:
    """
    out = (x - mean[k])*scale[k] + offset[k], k = set*C + channel of each plane; each coefficient is K = sets*C float64 values, or C, or 1, or a number (broadcast).
    """
def apply_coefficients_positions(plan: Plan, x: numpy.ndarray, mean: typing.Any, scale: typing.Any, offset: typing.Any, weight: typing.Any, bias: typing.Any, out: typing.Any) -> None:
    """
    out = ((x - mean[k])*scale[k] + offset[k])*weight[s] + bias[s]; channels-last plans.
    """
def apply_pointwise(plan: Plan, op: typing.SupportsInt | typing.SupportsIndex, x: numpy.ndarray, coef: typing.Any, out: typing.Any) -> None:
    """
    out = f(u)*scale + offset, u = (x - shift)*a + b, per cell; coef: (9, K) float64.
    """
def backward(saved: Saved, dy: typing.Any, dx: typing.Any, dweight: typing.Any, dbias: typing.Any) -> None:
    """
    normalize_backward of the forward that made `saved`.
    """
def backward_apply_coefficients(plan: Plan, x: typing.Any, dy: numpy.ndarray, mean: typing.Any, c1: typing.Any, c2: typing.Any, c3: typing.Any, dx: typing.Any) -> None:
    """
    dx = c1[k]*dy + c2[k]*(x - mean[k]) + c3[k] per (set, channel) k (coefficients as apply_coefficients'); x may be None (no x term).
    """
def backward_apply_positions(plan: Plan, x: numpy.ndarray, dy: typing.Any, mean: typing.Any, c1: typing.Any, c2: typing.Any, c3: typing.Any, weight: typing.Any, dx: typing.Any, sample_term: typing.Any = None) -> None:
    """
    dx = c1[k]*weight[s]*dy + c2[k]*(x - mean[k]) + c3[k] [+ the sample term's]; channels-last plans.
    """
def backward_fast(saved: Saved, dy: typing.Any, want_weight: bool, want_bias: bool) -> typing.Any:
    """
    (dx, dweight, dbias) of the forward that made `saved`, or None when the call is not the common case (then the Python path runs).
    """
def backward_sums(plan: Plan, x: numpy.ndarray, dy: typing.Any, mean: typing.Any) -> tuple:
    """
    (sum dy, sum dy*(x - mean[k])) per (set, channel) k, float64 arrays.
    """
def backward_sums_positions(plan: Plan, x: numpy.ndarray, dy: typing.Any, mean: typing.Any, scale: typing.Any, offset: typing.Any, weight: typing.Any) -> tuple:
    """
    (sum weight*dy, sum weight*dy*(x - mean[k])) per cell and (sum dy*xhat, sum dy) per position.
    """
def batch_layer_backward(feature: Plan, x: numpy.ndarray, dy: typing.Any, mean_f: typing.Any, rstd_f: typing.Any, mean_b: typing.Any, rstd_b: typing.Any, feature_scale: typing.SupportsFloat | typing.SupportsIndex, batch_scale: typing.SupportsFloat | typing.SupportsIndex, batch_stats: bool, weight: typing.Any, dx: typing.Any) -> tuple:
    """
    BatchLayerNorm2d's dx into dx; returns (dweight, dbias) per channel.
    """
def batch_layer_forward(feature: Plan, x: numpy.ndarray, eps: typing.SupportsFloat | typing.SupportsIndex, feature_scale: typing.SupportsFloat | typing.SupportsIndex, batch_scale: typing.SupportsFloat | typing.SupportsIndex, weight: typing.Any, bias: typing.Any, out: typing.Any, running: typing.Any = None) -> tuple:
    """
    BatchLayerNorm2d's output into out, with the batch's own moments per (c, hw) (running None) or the given (mean_b, var_b); returns (mean_f, rstd_f, mean_b, var_b, rstd_b).
    """
def conv2d_stat_jacobians(x: numpy.ndarray, weight: numpy.ndarray, stride_h: typing.SupportsInt | typing.SupportsIndex, stride_w: typing.SupportsInt | typing.SupportsIndex, pad_h: typing.SupportsInt | typing.SupportsIndex, pad_w: typing.SupportsInt | typing.SupportsIndex, dilation_h: typing.SupportsInt | typing.SupportsIndex, dilation_w: typing.SupportsInt | typing.SupportsIndex, groups: typing.SupportsInt | typing.SupportsIndex) -> tuple:
    """
    (dmean_dweight, dsqmean_dweight) of y = conv2d(x, weight), each of the weight's shape (normkit/conv.h).
    """
def copy(dst: numpy.ndarray, src: numpy.ndarray) -> None:
    """
    dst[...] = src bytewise on normkit's threads (the bench's yardstick).
    """
def empty_like(a: numpy.ndarray) -> numpy.ndarray:
    """
    A new uninitialized C-contiguous array of a's shape and dtype, on the C heap.
    """
def forward_fast(kind: typing.SupportsInt | typing.SupportsIndex, x: typing.Any, channels: typing.SupportsInt | typing.SupportsIndex, groups: typing.Any, normalized_shape: typing.Any, ndims_mask: typing.SupportsInt | typing.SupportsIndex, channels_last: bool, weight: typing.Any, bias: typing.Any, running_mean: typing.Any, running_var: typing.Any, batch_stats: bool, momentum: typing.Any, eps: typing.Any, param_bits: typing.SupportsInt | typing.SupportsIndex) -> typing.Any:
    """
    A layer's forward in one call, or None when the input is not the common case (then the Python path runs). Returns (y, Saved).
    """
def get_num_threads() -> int:
    ...
def group_moments(plan: Plan, x: numpy.ndarray) -> tuple:
    """
    Per-group mean and biased variance (float64 arrays).
    """
def isa_name() -> str:
    ...
def local_response_norm(N: typing.SupportsInt | typing.SupportsIndex, C: typing.SupportsInt | typing.SupportsIndex, S: typing.SupportsInt | typing.SupportsIndex, x: numpy.ndarray, out: typing.Any, size: typing.SupportsInt | typing.SupportsIndex, alpha: typing.SupportsFloat | typing.SupportsIndex, beta: typing.SupportsFloat | typing.SupportsIndex, k: typing.SupportsFloat | typing.SupportsIndex) -> None:
    """
    torch's local_response_norm of x viewed as (N, C, S), into out.
    """
def local_response_norm_backward(N: typing.SupportsInt | typing.SupportsIndex, C: typing.SupportsInt | typing.SupportsIndex, S: typing.SupportsInt | typing.SupportsIndex, x: numpy.ndarray, dy: typing.Any, dx: typing.Any, size: typing.SupportsInt | typing.SupportsIndex, alpha: typing.SupportsFloat | typing.SupportsIndex, beta: typing.SupportsFloat | typing.SupportsIndex, k: typing.SupportsFloat | typing.SupportsIndex) -> None:
    """
    dx of local_response_norm.
    """
def normalize(plan: Plan, x: numpy.ndarray, mean: typing.Any, rstd: typing.Any, weight: typing.Any, bias: typing.Any, out: typing.Any, residual: typing.Any = None, relu: bool = False) -> None:
    ...
def normalize_backward(plan: Plan, x: numpy.ndarray, dy: typing.Any, mean: typing.Any, rstd: typing.Any, weight: typing.Any, batch_stats: bool, dx: typing.Any, dweight: typing.Any, dbias: typing.Any) -> None:
    ...
def normalize_backward_positions(plan: Plan, x: numpy.ndarray, dy: typing.Any, mean: typing.Any, rstd: typing.Any, weight: typing.Any, dx: typing.Any) -> tuple:
    """
    LayerNorm's backward over normalize_batch_stats_positions' plan, mean and rstd: dx, and returns (dweight, dbias) per position.
    """
def normalize_batch_stats(plan: Plan, x: numpy.ndarray, eps: typing.SupportsFloat | typing.SupportsIndex, weight: typing.Any, bias: typing.Any, out: typing.Any, residual: typing.Any = None, relu: bool = False) -> tuple:
    """
    Statistics from x and the normalization in one call; returns (mean, var, rstd).
    """
def normalize_batch_stats_positions(plan: Plan, x: numpy.ndarray, eps: typing.SupportsFloat | typing.SupportsIndex, weight: typing.Any, bias: typing.Any, out: typing.Any, sample_term: typing.Any = None) -> tuple:
    """
    Per-column statistics and out = ((x - mean)*rstd [+ the sample term's])*weight[s] + bias[s], sample by sample; (mean, var, rstd).
    """
def plan_per_channel(N: typing.SupportsInt | typing.SupportsIndex, C: typing.SupportsInt | typing.SupportsIndex, S: typing.SupportsInt | typing.SupportsIndex) -> Plan:
    ...
def plan_per_channel_in_sets(N: typing.SupportsInt | typing.SupportsIndex, C: typing.SupportsInt | typing.SupportsIndex, S: typing.SupportsInt | typing.SupportsIndex, set_of_sample: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], channels_per_group: typing.SupportsInt | typing.SupportsIndex = 1) -> Plan:
    ...
def plan_per_row(rows: typing.SupportsInt | typing.SupportsIndex, M: typing.SupportsInt | typing.SupportsIndex, skip_mean: bool) -> Plan:
    ...
def plan_per_sample_group(N: typing.SupportsInt | typing.SupportsIndex, C: typing.SupportsInt | typing.SupportsIndex, S: typing.SupportsInt | typing.SupportsIndex, num_groups: typing.SupportsInt | typing.SupportsIndex) -> Plan:
    ...
def pointwise_backward(plan: Plan, op: typing.SupportsInt | typing.SupportsIndex, x: numpy.ndarray, dy: typing.Any, coef: typing.Any, c1: typing.Any, c2: typing.Any, c3: typing.Any, dx: typing.Any) -> None:
    """
    dx = c1[k]*dy*f'(u) + c2[k]*(x - center[k]) + c3[k] per cell (c1..c3 as apply_coefficients').
    """
def pointwise_backward_fused(plan: Plan, op: typing.SupportsInt | typing.SupportsIndex, x: numpy.ndarray, dy: typing.Any, coef: typing.Any, c1: typing.Any, c2: typing.Any, c3: typing.Any, dx: typing.Any, cluster: typing.SupportsInt | typing.SupportsIndex = 1, k2: typing.Any = None, k3: typing.Any = None) -> numpy.typing.NDArray[numpy.float64]:
    """
    pointwise_sums and pointwise_backward in one pass: dx = c1[k]*g + (c2[k] + q2)*(x - center[k]) + c3[k] + q3 with q2, q3 = sum over the cluster's planes of k2 . sums, k3 . sums (k2, k3: (7, K) or None); returns the (7, K) sums.
    """
def pointwise_sums(plan: Plan, op: typing.SupportsInt | typing.SupportsIndex, x: numpy.ndarray, dy: typing.Any, coef: typing.Any) -> numpy.typing.NDArray[numpy.float64]:
    """
    (7, K) sums per cell: dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr; g = dy*f'(u).
    """
def running_update(running: numpy.ndarray, value: typing.Any, factor: typing.SupportsFloat | typing.SupportsIndex, value_scale: typing.SupportsFloat | typing.SupportsIndex = 1.0) -> None:
    """
    running = (1 - factor)*running + factor*value_scale*value, in place.
    """
def set_cache_bytes(bytes: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    The last-level cache size the traversal assumes (0: detect); speed only, never results.
    """
def set_isa(name: str) -> None:
    ...
def set_num_threads(n: typing.SupportsInt | typing.SupportsIndex) -> None:
    ...
def supported_isas() -> list[str]:
    ...
FAST_BATCH: int = 0
FAST_GROUP: int = 2
FAST_INSTANCE: int = 1
FAST_LAYER: int = 3
FAST_RMS: int = 4
