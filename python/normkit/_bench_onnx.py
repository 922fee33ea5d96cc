"""ONNX Runtime twins of normkit's inference layers, for `python -m normkit bench`.

Each twin is a one-op ONNX graph, and for GroupNorm and RMSNorm also the equivalent subgraph
of older opsets (for runtimes without the op, and because the op is not always ORT's fastest
form), built with onnx.helper from the normkit layer's own parameters and statistics, so that
the bench times the same computation in both libraries. NCHW float32 only.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from . import _checks

if TYPE_CHECKING:
    from onnx import ModelProto, NodeProto
    from onnxruntime import InferenceSession, OrtValue  # no type information: Any

    from .layers import NormLayer

onnx: ModuleType | None = None  # set by import_onnx(): both are optional
ort: ModuleType | None = None


def import_onnx() -> bool:
    """True when onnx and onnxruntime both import (the bench's ORT column needs both)."""
    global onnx, ort
    try:
        import onnx as onnx_module
        import onnxruntime as ort_module
    except ImportError:
        onnx = ort = None
        return False
    onnx, ort = onnx_module, ort_module
    return True


def versions() -> dict[str, str | None]:
    return {"onnx": onnx.__version__ if onnx else None, "onnxruntime": ort.__version__ if ort else None}


# -- graphs --------------------------------------------------------------------------------------
# What the builders read of the normkit layer of their op (weight and bias: _affine, by getattr).
class _BatchNormLayer(Protocol):
    eps: float
    running_mean: npt.NDArray[Any]
    running_var: npt.NDArray[Any]


class _InstanceNormLayer(Protocol):
    eps: float


class _GroupNormLayer(Protocol):
    num_groups: int
    eps: float


class _RowNormLayer(Protocol):  # LayerNorm, RMSNorm (eps None: the dtype's machine epsilon)
    normalized_shape: tuple[int, ...]
    eps: float | None


def _f32(a: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(a, np.float32)


def _model(nodes: Sequence[NodeProto], inits: Mapping[str, npt.ArrayLike], opset: int,
           shape: Sequence[int]) -> ModelProto:
    """A float32 model from x to y of `shape`; the IR version is the lowest the opset allows,
    so that an older ONNX Runtime still loads what a newer onnx writes."""
    assert onnx is not None  # import_onnx() succeeded (the bench asks it first)
    h = onnx.helper
    graph = h.make_graph(nodes, "normkit_twin",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(shape))],
                         [onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in inits.items()])
    opsets = [h.make_opsetid("", opset)]
    model: ModelProto = h.make_model(graph, opset_imports=opsets, producer_name="normkit bench")
    model.ir_version = h.find_min_ir_version_for(opsets)
    onnx.checker.check_model(model)
    return model


def _affine(layer: object, channels: int | tuple[int, ...]
            ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(weight, bias) as float32, ones/zeros when the layer has none."""
    w = getattr(layer, "weight", None)
    b = getattr(layer, "bias", None)
    return (_f32(w) if w is not None else np.ones(channels, np.float32),
            _f32(b) if b is not None else np.zeros(channels, np.float32))


def _batch_norm(layer: _BatchNormLayer, shape: Sequence[int]) -> ModelProto:
    # Eval BatchNormalization with the layer's running statistics (opset 15: training_mode=0).
    assert onnx is not None  # import_onnx() succeeded
    w, b = _affine(layer, shape[1])
    node = onnx.helper.make_node("BatchNormalization", ["x", "w", "b", "mean", "var"], ["y"],
                                 epsilon=layer.eps, training_mode=0)
    inits = {"w": w, "b": b, "mean": _f32(layer.running_mean), "var": _f32(layer.running_var)}
    return _model([node], inits, 15, shape)


def _instance_norm(layer: _InstanceNormLayer, shape: Sequence[int]) -> ModelProto:
    # Per-sample, per-channel statistics in eval mode too: the bench's InstanceNorm2d has no
    # running statistics (torch's default), so eval normalizes with the input's own.
    assert onnx is not None  # import_onnx() succeeded
    w, b = _affine(layer, shape[1])
    node = onnx.helper.make_node("InstanceNormalization", ["x", "w", "b"], ["y"], epsilon=layer.eps)
    return _model([node], {"w": w, "b": b}, 15, shape)


def _group_norm(layer: _GroupNormLayer, shape: Sequence[int]) -> ModelProto:
    # GroupNormalization-21 (per-channel scale and bias; opset 18's per-group form is deprecated).
    assert onnx is not None  # import_onnx() succeeded
    w, b = _affine(layer, shape[1])
    node = onnx.helper.make_node("GroupNormalization", ["x", "w", "b"], ["y"],
                                 num_groups=layer.num_groups, epsilon=layer.eps)
    return _model([node], {"w": w, "b": b}, 21, shape)


def _group_norm_subgraph(layer: _GroupNormLayer, shape: Sequence[int]) -> ModelProto:
    # Before GroupNormalization-21: Reshape (N, G, C/G*H*W) -> InstanceNormalization (unit scale)
    # -> Reshape back -> Mul weight -> Add bias, per channel.
    assert onnx is not None  # import_onnx() succeeded
    n, c, g = shape[0], shape[1], layer.num_groups
    w, b = _affine(layer, c)
    per_channel = (c,) + (1,) * (len(shape) - 2)
    make = onnx.helper.make_node
    nodes = [make("Reshape", ["x", "grouped"], ["xg"]),
             make("InstanceNormalization", ["xg", "ones", "zeros"], ["yg"], epsilon=layer.eps),
             make("Reshape", ["yg", "shape"], ["yn"]),
             make("Mul", ["yn", "w"], ["yw"]),
             make("Add", ["yw", "b"], ["y"])]
    inits: dict[str, npt.NDArray[Any]]
    inits = {"grouped": np.array([n, g, -1], np.int64), "shape": np.array(shape, np.int64),
             "ones": np.ones(g, np.float32), "zeros": np.zeros(g, np.float32),
             "w": w.reshape(per_channel), "b": b.reshape(per_channel)}
    return _model(nodes, inits, 15, shape)


def _row_axis(layer: _RowNormLayer, shape: Sequence[int]) -> int:
    return len(shape) - len(layer.normalized_shape)


def _layer_norm(layer: _RowNormLayer, shape: Sequence[int]) -> ModelProto:
    assert onnx is not None  # import_onnx() succeeded
    w, b = _affine(layer, layer.normalized_shape)
    node = onnx.helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"],
                                 axis=_row_axis(layer, shape), epsilon=layer.eps)
    return _model([node], {"w": w, "b": b}, 17, shape)


def rms_eps(layer: _RowNormLayer, dtype: npt.DTypeLike = np.float32) -> float:
    """The epsilon normkit's RMSNorm uses: its eps, or the input dtype's machine epsilon (torch)."""
    return layer.eps if layer.eps is not None else _checks.machine_eps(np.dtype(dtype))


def _rms_norm(layer: _RowNormLayer, shape: Sequence[int]) -> ModelProto:
    assert onnx is not None  # import_onnx() succeeded
    w, _ = _affine(layer, layer.normalized_shape)
    node = onnx.helper.make_node("RMSNormalization", ["x", "w"], ["y"],
                                 axis=_row_axis(layer, shape), epsilon=rms_eps(layer))
    return _model([node], {"w": w}, 23, shape)


def _rms_norm_subgraph(layer: _RowNormLayer, shape: Sequence[int]) -> ModelProto:
    # Before RMSNormalization-23: y = x / sqrt(mean(x*x over the normalized dims) + eps) * w.
    assert onnx is not None  # import_onnx() succeeded
    w, _ = _affine(layer, layer.normalized_shape)
    axes = np.arange(_row_axis(layer, shape), len(shape), dtype=np.int64)
    make = onnx.helper.make_node
    nodes = [make("Mul", ["x", "x"], ["x2"]),
             make("ReduceMean", ["x2", "axes"], ["ms"], keepdims=1),
             make("Add", ["ms", "eps"], ["mse"]),
             make("Sqrt", ["mse"], ["rms"]),
             make("Div", ["x", "rms"], ["xn"]),
             make("Mul", ["xn", "w"], ["y"])]
    inits: dict[str, npt.NDArray[Any]]
    inits = {"axes": axes, "eps": np.array(rms_eps(layer), np.float32), "w": w}
    return _model(nodes, inits, 18, shape)


# A builder: (the op's normkit layer, input shape) -> the model. The layer is Any here: each
# builder reads its own op's layer class (the _*Layer protocols above), chosen by the op key.
_Builder = Callable[[Any, Sequence[int]], "ModelProto"]

# op key -> graph builders: the native op, then the equivalent subgraph of older opsets.
GRAPHS: dict[str, tuple[tuple[str, _Builder], ...]] = {
    "bn": (("BatchNormalization-15", _batch_norm),),
    "bn1d": (("BatchNormalization-15", _batch_norm),),
    "in": (("InstanceNormalization-6 (opset 15)", _instance_norm),),
    "gn": (("GroupNormalization-21", _group_norm),
           ("Reshape+InstanceNormalization+Reshape+Mul+Add (opset 15)", _group_norm_subgraph)),
    "ln": (("LayerNormalization-17", _layer_norm),),
    "rms": (("RMSNormalization-23", _rms_norm),
            ("Mul+ReduceMean+Add+Sqrt+Div+Mul (opset 18)", _rms_norm_subgraph)),
}


def graph_names(op: str) -> list[str]:
    return [text for text, _ in GRAPHS[op]]


# -- sessions ------------------------------------------------------------------------------------
def session(model: ModelProto, threads: int) -> InferenceSession:
    """An InferenceSession on the CPU with `threads` intra-op threads, 1 inter-op, all graph
    optimizations (what a deployment would use)."""
    assert ort is not None  # import_onnx() succeeded
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: an unsupported op is reported by the exception
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def twins(op: str, layer: NormLayer, shape: Sequence[int], threads: int
          ) -> Iterator[tuple[InferenceSession, str]]:
    """(session, description) for each graph of `op` that this ONNX Runtime loads, one at a time
    (a generator: only one session, hence one thread pool, is alive while the caller times it).

    The bench times every one and keeps the fastest: a native op is not always ORT's fastest
    form (ORT 1.32 has no CPU kernel for GroupNormalization-21 and runs its ONNX function body,
    about twice slower than the InstanceNormalization subgraph). Raises RuntimeError when none loads.
    """
    errors: list[str] = []
    loaded = 0
    for text, build in GRAPHS[op]:
        try:  # an older onnx fails the checker on a newer op, an older ORT fails to load it
            sess = session(build(layer, shape), threads)
        except Exception as e:  # onnx's ValidationError; ORT's Fail/NotImplemented/InvalidGraph
            errors.append(f"{text}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
            continue
        loaded += 1
        yield sess, text
        del sess
    if not loaded:
        raise RuntimeError("; ".join(errors) or f"no ONNX graph for {op}")


def runner(sess: InferenceSession, x: npt.NDArray[np.float32]
           ) -> tuple[Callable[[], tuple[OrtValue, OrtValue]], npt.NDArray[np.float32]]:
    """(call, y): call() runs `sess` on x into the preallocated y through io_binding, so that
    neither an output allocation nor the copy into a fresh NumPy array is timed (normkit's
    outputs come from a reused buffer; sess.run would add a copy of y to every call)."""
    assert ort is not None  # import_onnx() succeeded
    y = np.empty_like(x)
    values = ort.OrtValue.ortvalue_from_numpy(x), ort.OrtValue.ortvalue_from_numpy(y)  # no copies
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", values[0])
    binding.bind_ortvalue_output("y", values[1])

    def call() -> tuple[OrtValue, OrtValue]:
        sess.run_with_iobinding(binding)
        return values  # the closure keeps the OrtValues (views of x and y) alive with the binding

    return call, y
