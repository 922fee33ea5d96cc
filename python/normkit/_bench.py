"""`python -m normkit bench`: time normkit's layers against PyTorch's (and ONNX Runtime's for
inference), with the fraction of the roofline and a pass/fail mark against the performance
issue's targets.

Only the timing harness runs in Python; every tensor-sized operation is one library call.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from types import ModuleType
from typing import Any, Callable, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np
import numpy.typing as npt

import normkit

from . import _bench_onnx, _checks, _core

ml_dtypes: ModuleType | None
try:  # bfloat16 arrays come from ml_dtypes; without it the bfloat16 tables are skipped
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

torch: Any = None  # set by import_torch(): torch is slow to import, and optional

T = TypeVar("T")
Shape = tuple[int, ...]
# A factory's shape: logical (N, C, *spatial) or (rows, features); bench_overhead gives the row
# ops (rows, (C, H, W)), a normalized_shape as the last entry.
LayerShape = tuple[Any, ...]
Call = Callable[[], object]  # a timed zero-argument call
Setup = Callable[[], Call]  # run once before timing, returns the timed call
Row = dict[str, Any]  # a table row, as the JSON holds it
Column = tuple[str, int, Callable[[Row], str]]  # (title, width, row -> text)
# layer name -> ORT graph (None: none loaded) -> the shapes on which it was the fastest
Graphs = dict[str, dict[str | None, list[str]]]

BIG_SHAPE = (64, 128, 56, 56)  # 103 MB in float32: the data comes from memory (roofline targets)
BN_TARGET_SHAPE = (32, 64, 56, 56)  # the 4x BatchNorm2d forward+backward shape
OVERHEAD_SHAPE = (2, 16, 8, 8)  # per-call overhead: a tensor too small to measure anything else
OVERHEAD_TARGET_US = 3.0
# preset -> (shapes of the conv ops (N, C, H, W), shapes of the row ops (rows, features))
SHAPES: dict[str, tuple[list[Shape], list[Shape]]] = {
    "all": ([(32, 64, 56, 56), BIG_SHAPE, (8, 256, 14, 14), (2, 16, 8, 8)], [(8192, 1024)]),
    "standard": ([(32, 64, 56, 56), (8, 256, 14, 14), (2, 16, 8, 8)], [(8192, 1024)]),
    "tiny": ([(2, 16, 8, 8)], [(64, 256)]),  # a smoke test of the bench itself
}


class Timing(NamedTuple):
    repeats: int
    min_sample_s: float
    warmup_s: float


FULL, QUICK = Timing(7, 0.02, 0.2), Timing(3, 0.005, 0.05)
MODES = ("fwd", "bwd", "fwd+bwd", "infer")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Bytes an op must move, in multiples of x.nbytes (x, y, dy, dx all have x's size). O(C) parameter
# and statistics traffic is left out.
BYTE_MODEL = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "infer": 2}
BYTE_MODEL_TEXT = ("bytes = fwd, infer: read x + write y = 2|x|;  bwd: read x, read dy, write dx = 3|x|;  "
                   "fwd+bwd: 5|x|  (parameters and statistics ignored)")


def group_count(channels: int) -> int:
    """32 groups where the channels allow it, else their largest divisor below 32."""
    return max(g for g in range(1, 33) if channels % g == 0)


# op key -> (layer name, "conv" (N, C, *spatial; NHWC too) or "row" (normalizes the last dim),
#            normkit factory (shape, parameter dtype, layout), torch factory (shape, torch dtype)).
# Shapes are logical (N, C, H, W) in both layouts.
OPS: dict[str, tuple[str, str, Callable[[LayerShape, np.dtype[Any], str], normkit.NormLayer],
                     Callable[[LayerShape, Any], Any]]] = {
    "bn": ("BatchNorm2d", "conv",
           lambda s, dt, lo: normkit.BatchNorm2d(s[1], dtype=dt, layout=lo),
           lambda s, dt: torch.nn.BatchNorm2d(s[1], dtype=dt)),
    "gn": ("GroupNorm", "conv",
           lambda s, dt, lo: normkit.GroupNorm(group_count(s[1]), s[1], dtype=dt, layout=lo),
           lambda s, dt: torch.nn.GroupNorm(group_count(s[1]), s[1], dtype=dt)),
    "in": ("InstanceNorm2d", "conv",
           lambda s, dt, lo: normkit.InstanceNorm2d(s[1], affine=True, dtype=dt, layout=lo),
           lambda s, dt: torch.nn.InstanceNorm2d(s[1], affine=True, dtype=dt)),
    "ln": ("LayerNorm", "row",
           lambda s, dt, lo: normkit.LayerNorm(s[-1], dtype=dt),
           lambda s, dt: torch.nn.LayerNorm(s[-1], dtype=dt)),
    "bn1d": ("BatchNorm1d", "row",  # (batch, features): an MLP's BatchNorm, one element per plane
             lambda s, dt, lo: normkit.BatchNorm1d(s[-1], dtype=dt),
             lambda s, dt: torch.nn.BatchNorm1d(s[-1], dtype=dt)),
    "rms": ("RMSNorm", "row",
            lambda s, dt, lo: normkit.RMSNorm(s[-1], dtype=dt),
            lambda s, dt: torch.nn.RMSNorm(s[-1], dtype=dt)),
}


def import_torch() -> None:
    """Import torch if it is installed; the bench runs without its column otherwise."""
    global torch
    module: ModuleType | None
    try:
        import torch as module
    except ImportError:
        module = None
    torch = module


# -- timing harness ------------------------------------------------------------------------------
def seconds_per_call(fn: Call, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def warm_up(fn: Call, seconds: float) -> None:
    """Call fn for `seconds` (at least twice): first-touch page faults and caches settle."""
    end = time.perf_counter() + seconds
    fn()
    fn()
    while time.perf_counter() < end:
        fn()


def calibrate(fn: Call, min_sample_s: float) -> int:
    """The iteration count that makes one timed sample last >= min_sample_s."""
    iters = 1
    while True:
        t = seconds_per_call(fn, iters) * iters
        if t >= min_sample_s:
            return iters
        iters = max(2 * iters, math.ceil(1.2 * iters * min_sample_s / max(t, 1e-9)))


def time_call(fn: Call, timing: Timing) -> float:
    """Median seconds per call over `timing.repeats` samples of a timed loop, after a warm-up."""
    return time_interleaved({"fn": fn}, timing)["fn"]


def time_interleaved(fns: Mapping[str, Call], timing: Timing) -> dict[str, float]:
    """Median seconds per call of each function in `fns` (name -> fn), after a warm-up and a
    calibration each, their samples taken in turn (a, b, c, a, b, c, ...): a drift in the
    machine's speed (other tenants' memory traffic, clocks) then hits every library alike, and
    the ratios between them stay meaningful even when the absolute times move."""
    iters: dict[str, int] = {}
    for name, fn in fns.items():
        warm_up(fn, timing.warmup_s)
        iters[name] = calibrate(fn, timing.min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(timing.repeats):
        for name, fn in fns.items():
            samples[name].append(seconds_per_call(fn, iters[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


# -- the reference: a copy's bandwidth -----------------------------------------------------------
def last_level_cache_bytes(default: int = 32 << 20) -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return default


def copy_call(nbytes: int) -> Call:
    """A zero-argument copy of `nbytes` (read + write), on normkit's threads, whose source has
    been evicted since it was last touched: slots of a pool three times the last-level cache."""
    slots = max(3, math.ceil(3 * last_level_cache_bytes() / nbytes))
    pool = np.ones((slots, nbytes), np.uint8)
    pairs = itertools.cycle([(pool[(i + 1) % slots], pool[i]) for i in range(slots)])
    return lambda: _core.copy(*next(pairs))


def copy_bandwidth(nbytes: int, timing: Timing) -> float:
    """Bytes/s of a copy between arrays of `nbytes` each, counted as read + write, on normkit's
    threads (_core.copy: a parallel memcpy; np.copyto would use one core).

    The copies rotate through slots of a pool three times the last-level cache, so that the
    source of every copy has been evicted since it was last touched (out of cache). A copy moves
    bytes whatever their dtype, so one measurement per size serves every dtype.
    """
    return 2 * nbytes / time_call(copy_call(nbytes), timing)


# -- the same data and layer in each library -----------------------------------------------------
def numpy_dtype(name: str) -> np.dtype[Any] | None:
    """The NumPy dtype of a --dtypes name; None for bfloat16 without ml_dtypes."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16) if ml_dtypes else None
    return np.dtype(name)


def stored_shape(shape: Sequence[int], layout: str) -> Shape:
    """The array shape of logical (N, C, *spatial) `shape` in `layout` (NHWC: (N, *spatial, C))."""
    return tuple(shape) if layout == "NCHW" else (shape[0],) + tuple(shape[2:]) + (shape[1],)


def inputs(shape: Sequence[int], dtype: npt.DTypeLike, layout: str = "NCHW",
           seed: int = 0) -> tuple[npt.NDArray[Any], ...]:
    """x and dy, standard normal, of logical `shape` stored in `layout`."""
    rng = np.random.default_rng(seed)
    draw = np.float64 if dtype == np.float64 else np.float32
    return tuple(rng.standard_normal(stored_shape(shape, layout), dtype=draw).astype(dtype, copy=False)
                 for _ in range(2))


def normkit_layer(op: str, shape: LayerShape, dtype: npt.DTypeLike,
                  layout: str = "NCHW") -> normkit.NormLayer:
    """The normkit layer for input of `dtype` (half inputs take a float32 layer)."""
    return OPS[op][2](shape, _checks.param_dtype(np.dtype(dtype)), layout)


def torch_module(op: str, shape: LayerShape, dtype: npt.DTypeLike, layout: str = "NCHW") -> Any:
    """The torch twin of the normkit layer in `dtype` (half types: a half module, as after
    module.to(dtype)), or None without torch or without that layer."""
    if torch is None:
        return None
    try:
        module = OPS[op][3](shape, getattr(torch, np.dtype(dtype).name))
    except AttributeError:  # e.g. torch.nn.RMSNorm before torch 2.4
        return None
    return module.to(memory_format=torch.channels_last) if layout == "NHWC" else module


def to_torch(a: npt.NDArray[Any], layout: str = "NCHW") -> Any:
    """A torch tensor over a's memory (no copy); an NHWC array becomes the NCHW-shaped tensor
    in channels_last memory format, i.e. exactly what torch's channels_last path reads."""
    if ml_dtypes and a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t.permute(0, a.ndim - 1, *range(1, a.ndim - 1)) if layout == "NHWC" else t


# -- each library's calls ------------------------------------------------------------------------
# mode -> setup(): run once before timing (after the caller set train/eval), returns the timed call.
def normkit_calls(layer: normkit.NormLayer, x: npt.NDArray[Any],
                  dy: npt.NDArray[Any]) -> dict[str, Setup]:
    def bwd() -> Call:
        layer(x)  # backward only reads what this forward saved, so it may be called repeatedly
        return lambda: layer.backward(dy)

    def fwd_bwd() -> None:
        layer(x)
        layer.backward(dy)

    return {"fwd": lambda: lambda: layer(x), "bwd": bwd, "fwd+bwd": lambda: fwd_bwd,
            "infer": lambda: lambda: layer(x)}


def torch_calls(module: Any, tx: Any, tdy: Any) -> dict[str, Setup]:
    """The same modes on a torch.nn.Module (autograd.grad: fresh gradients every call)."""
    gx = tx.detach().clone().requires_grad_(True)  # clone keeps channels_last strides
    wrt = [gx] + list(module.parameters())

    def bwd() -> Call:
        y = module(gx)  # one graph, kept by retain_graph
        return lambda: torch.autograd.grad(y, wrt, tdy, retain_graph=True)

    def infer() -> None:
        with torch.inference_mode():
            module(tx)

    return {"fwd": lambda: lambda: module(tx), "bwd": bwd,
            "fwd+bwd": lambda: lambda: torch.autograd.grad(module(gx), wrt, tdy),
            "infer": lambda: infer}


def ort_time(op: str, layer: normkit.NormLayer, x: npt.NDArray[Any], threads: int,
             timing: Timing) -> tuple[float, str] | None:
    """(seconds per call, graph) of the fastest of the layer's ONNX Runtime eval twins."""
    best: tuple[float, str] | None = None
    for sess, text in _bench_onnx.twins(op, layer, x.shape, threads):
        call, _ = _bench_onnx.runner(sess, x)
        t = time_call(call, timing)
        best = min(best or (t, text), (t, text))
        del sess, call  # one session (and its spinning thread pool) at a time
    return best


def attempt(fn: Callable[[], T], who: str, mode: str, notes: list[str]) -> T | None:
    """fn(), or None with a note when another library cannot run a case (e.g. no kernel)."""
    try:
        return fn()
    except Exception as e:  # torch: RuntimeError/NotImplementedError; ORT: its own types
        first = (str(e).splitlines() or [""])[0][:120]
        notes.append(f"{who} {mode}: n/a ({type(e).__name__}: {first})")
        return None


# -- targets -------------------------------------------------------------------------------------
def row_targets(op: str, shape: Sequence[int], layout: str, dtype: npt.DTypeLike, mode: str,
                threads: int) -> list[tuple[str, float]]:
    """[(metric, threshold)] the issue sets for a row (all must hold); [] where it sets none.

    float32 only. At 1 thread: never slower than torch. Otherwise: forward+backward >= 2x torch
    (BatchNorm2d (32,64,56,56) NCHW: 4x), inference >= 1.2x the faster of torch and ORT, and on
    the out-of-cache shape every forward (fwd, infer) >= 80% of the roofline, bwd >= 70%.
    """
    if np.dtype(dtype) != np.float32:
        return []
    if threads == 1:
        return [("torch_speedup", 1.0)]
    out: list[tuple[str, float]] = []
    if mode == "fwd+bwd":
        big_bn = op == "bn" and tuple(shape) == BN_TARGET_SHAPE and layout == "NCHW"
        out.append(("torch_speedup", 4.0 if big_bn else 2.0))
    if mode == "infer":
        out.append(("speedup", 1.2))
    if tuple(shape) == BIG_SHAPE and mode in ("fwd", "infer", "bwd"):
        out.append(("roof_fraction", 0.7 if mode == "bwd" else 0.8))
    return out


def target_text(targets: Sequence[tuple[str, float]]) -> str:
    words = {"torch_speedup": "{:g}x torch", "speedup": "{:g}x best", "roof_fraction": "{:.0%} roof"}
    return ", ".join(words[m].format(t) for m, t in targets) or "-"


def target_met(row: Mapping[str, Any], targets: Sequence[tuple[str, float]]) -> bool | None:
    """True/False against the targets; None when there are none or a value is missing."""
    values: list[Any] = [row.get(m) for m, _ in targets]
    if not targets or any(v is None for v in values):
        return None
    return all(v >= t for v, (_, t) in zip(values, targets))


def mark(met: bool | None) -> str:
    return {True: "ok", False: "MISS", None: "n/a"}[met]


# -- the benchmark -------------------------------------------------------------------------------
def label(op: str, shape: Sequence[int]) -> str:
    """The layer's name; GroupNorm's with its group count."""
    return f"GroupNorm({group_count(shape[1])})" if op == "gn" else OPS[op][0]


def make_row(op: str, shape: Sequence[int], layout: str, dtype: npt.DTypeLike, mode: str,
             times: Mapping[str, float | None], x_nbytes: int, copy_bw: float,
             threads: int) -> Row:
    """A table row: every library's time, the speedup against the fastest, the roofline, targets."""
    t_nk = times["normkit"]
    assert t_nk is not None  # normkit's time is always measured
    others = {k: t for k, t in times.items() if k != "normkit" and t is not None}
    best = min(others, key=others.__getitem__) if others else None
    nbytes = BYTE_MODEL[mode] * x_nbytes
    t_th = times.get("torch")
    row = {"op": op, "layer": label(op, shape), "shape": list(shape), "layout": layout,
           "dtype": np.dtype(dtype).name, "mode": mode, "bytes": nbytes, "normkit_s": t_nk,
           "torch_s": times.get("torch"), "ort_s": times.get("ort"), "best": best,
           "speedup": others[best] / t_nk if best else None,
           "torch_speedup": t_th / t_nk if t_th else None,
           "normkit_gbps": nbytes / t_nk / 1e9, "roof_fraction": nbytes / t_nk / copy_bw}
    targets = row_targets(op, shape, layout, dtype, mode, threads)
    row["targets"] = [{"metric": m, "threshold": t} for m, t in targets]
    row["target"] = target_text(targets)
    row["target_met"] = target_met(row, targets)
    return row


def bench_case(op: str, shape: Shape, layout: str, dtype: np.dtype[Any], copy_bw: float,
               timing: Timing, threads: int, graphs: Graphs) -> tuple[list[Row], list[str]]:
    """One table row per mode for one (op, shape, layout, dtype); returns (rows, notes).
    graphs[layer name][ORT graph] collects the shapes on which that graph was ORT's fastest."""
    x, dy = inputs(shape, dtype, layout)
    layer, module = normkit_layer(op, shape, dtype, layout), torch_module(op, shape, dtype, layout)
    nk = normkit_calls(layer, x, dy)
    th = torch_calls(module, to_torch(x, layout), to_torch(dy, layout)) if module is not None else None
    with_ort = _bench_onnx.ort is not None and layout == "NCHW" and dtype == np.float32
    rows: list[Row] = []
    notes: list[str] = []
    # Out of cache, the roofline's copy is timed in turn with the ops (below), not once up front.
    copy = copy_call(x.nbytes) if x.nbytes > last_level_cache_bytes() else None
    for mode in MODES:
        training = mode != "infer"
        layer.train(training)
        fns = {"normkit": nk[mode]()}
        if th:
            module.train(training)
            call = attempt(lambda: th[mode](), "torch", mode, notes)  # set up, then one trial call
            fn = call and attempt(lambda: (call(), call)[1], "torch", mode, notes)
            if fn is not None:
                fns["torch"] = fn
        if copy is not None:
            fns["copy"] = copy
        timed = time_interleaved(fns, timing)
        row_copy_bw = 2 * x.nbytes / timed.pop("copy") if copy is not None else copy_bw
        times: dict[str, float | None] = {"torch": None, "ort": None, **timed}
        ort_graph: str | None = None
        if mode == "infer" and with_ort:  # after training: the twin takes the running statistics
            times["ort"], ort_graph = attempt(lambda: ort_time(op, layer, x, threads, timing),
                                              "ort", mode, notes) or (None, None)
            graphs.setdefault(OPS[op][0], {}).setdefault(ort_graph, []).append("x".join(map(str, shape)))
        rows.append(make_row(op, shape, layout, dtype, mode, times, x.nbytes, row_copy_bw, threads))
        rows[-1]["ort_graph"] = ort_graph
    return rows, notes


def bench_overhead(ops: Sequence[str], timing: Timing) -> list[Row]:
    """Per-call cost of eval-mode layer(x) from Python on a tiny float32 tensor, per op. The row
    ops normalize each sample's (C, H, W), as torch's LayerNorm docs do for images: 2 rows of
    1024 (256 rows of 8 would time per-row work, not the call's overhead)."""
    x, _ = inputs(OVERHEAD_SHAPE, np.float32)
    out: list[Row] = []
    for op in ops:
        row = OPS[op][1] == "row"
        # the row factories normalize shape[-1]: here, the whole (C, H, W); BatchNorm1d takes
        # it as 2 rows of C*H*W features
        shape: LayerShape = ((OVERHEAD_SHAPE[0], tuple(OVERHEAD_SHAPE[1:])) if row
                             else OVERHEAD_SHAPE)
        xin = x
        if op == "bn1d":
            xin = x.reshape(OVERHEAD_SHAPE[0], -1)
            shape = xin.shape
        layer = normkit_layer(op, shape, np.float32).eval()
        t_nk = time_call(lambda: layer(xin), timing)
        t_th: float | None = None
        module = torch_module(op, shape, np.float32)
        if module is not None:
            t_th = time_call(torch_calls(module.eval(), to_torch(xin), None)["infer"](), timing)
        name = label(op, OVERHEAD_SHAPE) + ("(" + "x".join(map(str, OVERHEAD_SHAPE[1:])) + ")" if row else "")
        out.append({"op": op, "layer": name, "shape": list(OVERHEAD_SHAPE),
                    "dtype": "float32", "normkit_us": t_nk * 1e6,
                    "torch_us": None if t_th is None else t_th * 1e6,
                    "target_us": OVERHEAD_TARGET_US, "target_met": t_nk * 1e6 <= OVERHEAD_TARGET_US})
    return out


# -- output --------------------------------------------------------------------------------------
def number(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def columns(with_torch: bool, with_ort: bool) -> list[Column]:
    """(title, width, row -> text) for each table column; the first two are left-aligned."""
    cols: list[Column] = [("shape", 15, lambda r: "x".join(map(str, r["shape"]))),
                          ("mode", 7, lambda r: r["mode"]),
                          ("normkit ms", 10, lambda r: number(r["normkit_s"], ".3f", 1e3))]
    if with_torch:
        cols.append(("torch ms", 9, lambda r: number(r["torch_s"], ".3f", 1e3)))
    if with_ort:
        cols.append(("ort ms", 8, lambda r: number(r["ort_s"], ".3f", 1e3)))
    if with_torch or with_ort:
        cols += [("speedup", 7, lambda r: number(r["speedup"], ".2f", suffix="x")),
                 ("best", 5, lambda r: r["best"] or "-")]
    cols += [("GB/s", 6, lambda r: number(r["normkit_gbps"], ".1f")),
             ("% roof", 6, lambda r: number(r["roof_fraction"], ".0f", 100, "%")),
             ("target", 19, lambda r: r["target"]),
             ("met", 4, lambda r: mark(r["target_met"]) if r["targets"] else "")]
    return cols


def format_line(cols: Sequence[Column], texts: Sequence[str]) -> str:
    return "  ".join(t.ljust(w) if i < 2 or i >= len(cols) - 2 else t.rjust(w)
                     for i, ((_, w, _), t) in enumerate(zip(cols, texts))).rstrip()


def format_row(cols: Sequence[Column], row: Row) -> str:
    return format_line(cols, [f(row) for _, _, f in cols])


def format_title(cols: Sequence[Column]) -> str:
    return format_line(cols, [t for t, _, _ in cols])


def table_title(op: str, layout: str, dtype: npt.DTypeLike) -> str:
    groups = "  (groups: the largest divisor of C up to 32)" if op == "gn" else ""
    return f"== {OPS[op][0]}  {layout}  {np.dtype(dtype).name}{groups}"


def header_lines(copy_bw: Mapping[int, float], threads: int) -> list[str]:
    info = normkit.cpu_info()
    ort_v = _bench_onnx.versions()["onnxruntime"]
    libs = [f"torch {torch.__version__}" if torch else "torch not installed",
            f"onnxruntime {ort_v}" if ort_v else "onnx/onnxruntime not installed"]
    copies = ",  ".join(f"{format_bytes(n)}: {bw / 1e9:.1f} GB/s" for n, bw in sorted(copy_bw.items()))
    return [f"normkit {normkit.__version__} (isa {info.get('isa')})  |  threads {threads}  |  "
            f"{'  |  '.join(libs)}  |  numpy {np.__version__}  |  python {platform.python_version()}"
            f"  |  {machine_load()}",
            f"copy bandwidth (parallel memcpy on the same threads, same size as x, out of cache, read + write): {copies}",
            BYTE_MODEL_TEXT,
            "modes: fwd = training forward; bwd = backward alone, repeated after one forward; "
            "fwd+bwd = both; infer = eval forward (torch under inference_mode)",
            "time: median per call, normkit's and torch's samples taken in turn; speedup = fastest "
            "other library's time / normkit's (best = which); GB/s = bytes / normkit time; % roof = "
            "that / copy bandwidth of x's size (above the last-level cache: a copy timed in turn "
            "with the row's ops, since a shared machine's memory bandwidth drifts)",
            "torch: same process and thread count; NCHW modules on NCHW tensors, NHWC = the same data "
            "as channels_last tensors; bwd = autograd.grad(retain_graph=True) on one graph; "
            "half dtypes: half modules",
            "ort: infer rows, NCHW float32 only; eval twin graphs of the layer (the fastest that "
            "loads, listed below), intra-op threads = threads, inter-op 1, all graph optimizations; "
            "io_binding into a preallocated y (no output allocation or copy timed)",
            "targets (float32): fwd+bwd >= 2x torch (BatchNorm2d 32x64x56x56 NCHW: 4x); infer >= 1.2x "
            "best; on 64x128x56x56 fwd and infer >= 80% roof, bwd >= 70%; at 1 thread every row >= 1x "
            "torch instead; met: ok / MISS / n/a (a time is missing)"]


def machine_load() -> str:
    """CPU count and 1-minute load average (with a warning when other work skews the timings)."""
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return f"{cpus} cpus"
    busy = "  (WARNING: busy machine, timings unreliable)" if load > 0.5 * cpus else ""
    return f"{cpus} cpus, load {load:.2f}{busy}"


def format_bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def overhead_lines(rows: Sequence[Row]) -> list[str]:
    lines = [f"per-call overhead: eval-mode layer(x) from Python on {'x'.join(map(str, OVERHEAD_SHAPE))} "
             f"float32 (target: <= {OVERHEAD_TARGET_US:g} us per call)",
             f"{'layer':<16}{'normkit us':>11}{'torch us':>10}  met"]
    for r in rows:
        lines.append(f"{r['layer']:<16}{r['normkit_us']:>11.2f}{number(r['torch_us'], '.2f'):>10}  "
                     f"{mark(r['target_met'])}")
    return lines


def summarize(rows: list[Row], overhead: list[Row]) -> dict[str, Any]:
    """Counts of rows meeting their targets, and a line per miss."""
    judged = [r for r in rows if r["targets"]]
    misses = [f"{r['layer']} {r['layout']} {r['dtype']} {'x'.join(map(str, r['shape']))} {r['mode']}: "
              f"{miss_text(r)}" for r in judged if r["target_met"] is False]
    misses += [f"{r['layer']} per-call overhead: {r['normkit_us']:.2f} us > {r['target_us']:g} us"
               for r in overhead if not r["target_met"]]
    return {"rows_with_targets": len(judged) + len(overhead),
            "met": sum(r["target_met"] is True for r in judged + overhead),
            "not_evaluated": sum(r["target_met"] is None for r in judged), "misses": misses}


def miss_text(row: Row) -> str:
    got = {"torch_speedup": lambda v: f"{v:.2f}x torch", "speedup": lambda v: f"{v:.2f}x {row['best']}",
           "roof_fraction": lambda v: f"{v:.0%} roof"}
    below = [(t["metric"], t["threshold"]) for t in row["targets"] if row[t["metric"]] < t["threshold"]]
    return ", ".join(f"{got[m](row[m])} (target {target_text([(m, t)])})" for m, t in below)


def summary_lines(s: Mapping[str, Any]) -> list[str]:
    lines = [f"targets: {s['met']} of {s['rows_with_targets']} met"
             + (f" ({s['not_evaluated']} not evaluated: a time is missing)" if s["not_evaluated"] else "")]
    if s["misses"]:
        lines.append("misses:")
        lines += [f"  {m}" for m in s["misses"]]
    return lines


# -- command line --------------------------------------------------------------------------------
def comma_list(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma list of `allowed` words, in the given order."""
    def parse(text: str) -> list[str]:
        words = [w.strip() for w in text.split(",") if w.strip()]
        bad = [w for w in words if w not in allowed]
        if bad or not words:
            raise argparse.ArgumentTypeError(f"expected a comma list of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(words))
    parse.__name__ = what  # argparse names the type in its message
    return parse


ops_list = comma_list(tuple(OPS), "ops")


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for normkit, torch and ONNX Runtime (default: normkit's, "
                             "i.e. OpenMP's)")
    parser.add_argument("--ops", type=ops_list, default=list(OPS),
                        help=f"comma list of {','.join(OPS)} (default: all)")
    parser.add_argument("--layouts", type=comma_list(LAYOUTS, "layouts"), default=None,
                        help="comma list of NCHW,NHWC (default: both; NCHW under --quick); NHWC "
                             "tables are for bn, gn, in only")
    parser.add_argument("--dtypes", "--dtype", type=comma_list(DTYPES, "dtypes"), default=None,
                        help=f"comma list of {','.join(DTYPES)} (default: float32; bfloat16 needs "
                             "ml_dtypes)")
    parser.add_argument("--shapes", choices=tuple(SHAPES), default=None,
                        help="all: every shape, the out-of-cache 64x128x56x56 included (default); "
                             "standard: all but that one (default under --quick); tiny: one small "
                             "shape per op (a smoke test of the bench)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and shorter samples, and unless given explicitly NCHW "
                             "only and --shapes standard: a smoke test, e.g. for CI")
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON to PATH")
    parser.add_argument("--variants", action="store_true",
                        help="instead: time the research variants, the batch-statistics ones beside "
                             "BatchNorm2d and the batch-independent ones beside GroupNorm (training "
                             "fwd+bwd and inference, float32 NCHW, no torch needed), then "
                             "conv2d_stat_jacobians beside torch's convolution weight gradient (when "
                             "torch is installed); uses --threads, --quick, --json and --shapes tiny "
                             "(a smoke test; any other: the issue's two shapes)")
    parser.add_argument("--torch", action="store_true",
                        help="instead: time normkit.torch's BatchNorm2d, GroupNorm and LayerNorm "
                             "modules against torch.nn's, both through torch autograd (fwd+bwd, "
                             "infer), beside the NumPy layer; uses --threads, --ops, --layouts, "
                             "--dtypes, --shapes, --quick and --json")


def plan(args: argparse.Namespace) -> tuple[list[str], list[np.dtype[Any]], str, list[str]]:
    """(layouts, dtypes, shape preset, skipped-dtype messages) from the arguments and --quick."""
    layouts = args.layouts or (["NCHW"] if args.quick else list(LAYOUTS))
    preset = args.shapes or ("standard" if args.quick else "all")
    dtypes: list[np.dtype[Any]] = []
    skipped: list[str] = []
    for name in args.dtypes or ["float32"]:
        dt = numpy_dtype(name)
        if dt is None:
            skipped.append(f"{name}: skipped (ml_dtypes is not installed)")
        else:
            dtypes.append(dt)
    return layouts, dtypes, preset, skipped


def cases(ops: Sequence[str], layouts: Sequence[str], dtypes: Sequence[np.dtype[Any]],
          preset: str) -> list[tuple[np.dtype[Any], str, str, list[Shape]]]:
    """(dtype, op, layout, shapes) per table, in print order (no NHWC table for the row ops)."""
    return [(dt, op, layout, SHAPES[preset][0 if OPS[op][1] == "conv" else 1])
            for dt in dtypes for op in ops for layout in layouts
            if layout == "NCHW" or OPS[op][1] == "conv"]


def run(args: argparse.Namespace) -> int:
    """Entry point of `python -m normkit bench`; returns the exit status."""
    if args.variants:
        from . import _bench_variants
        return _bench_variants.run(args)
    if args.torch:
        from . import _bench_torch
        return _bench_torch.run(args)
    import_torch()
    _bench_onnx.import_onnx()
    if args.threads is not None:
        normkit.set_num_threads(args.threads)
    threads = normkit.get_num_threads()
    if torch:
        torch.set_num_threads(threads)
    layouts, dtypes, preset, skipped = plan(args)
    for line in skipped:
        print(line)
    tables = cases(args.ops, layouts, dtypes, preset)
    if not tables:
        print("nothing to run: no table for these --ops, --layouts and --dtypes", file=sys.stderr)
        return 2
    timing = QUICK if args.quick else FULL
    sizes = sorted({math.prod(s) * dt.itemsize for dt, _, _, shapes in tables for s in shapes})
    copy_bw = {n: copy_bandwidth(n, timing) for n in sizes}
    for line in header_lines(copy_bw, threads):
        print(line)
    cols = columns(torch is not None, _bench_onnx.ort is not None)
    rows: list[Row] = []
    notes: list[str] = []
    graphs: Graphs = {}
    for dtype, op, layout, shapes in tables:
        print(f"\n{table_title(op, layout, dtype)}\n{format_title(cols)}\n{'-' * len(format_title(cols))}",
              flush=True)
        for shape in shapes:
            case_rows, case_notes = bench_case(op, shape, layout, dtype,
                                               copy_bw[math.prod(shape) * dtype.itemsize],
                                               timing, threads, graphs)
            for row in case_rows:
                print(format_row(cols, row), flush=True)
            notes += [f"{label(op, shape)} {layout} {dtype.name} {'x'.join(map(str, shape))} {n}"
                      for n in case_notes]
            rows += case_rows
    if graphs:
        print("\nort graphs (an infer row times each graph of its op that loads, and keeps the "
              "fastest): graphs -> the fastest, on which shapes")
        for op in (op for op in args.ops if OPS[op][0] in graphs):
            won = ";  ".join(f"{text or 'none loaded'} on {', '.join(shapes)}"
                             for text, shapes in graphs[OPS[op][0]].items())
            print(f"  {OPS[op][0]}: {' | '.join(_bench_onnx.graph_names(op))}  ->  {won}")
    for line in notes:
        print(f"note: {line}")
    overhead = bench_overhead(args.ops, timing)
    print()
    for line in overhead_lines(overhead):
        print(line)
    summary = summarize(rows, overhead)
    print()
    for line in summary_lines(summary):
        print(line)
    if args.json:
        write_json(args.json, threads, copy_bw, rows, overhead, summary, graphs, notes, args.quick)
    return 0


def write_json(path: str, threads: int, copy_bw: Mapping[int, float], rows: Sequence[Row],
               overhead: Sequence[Row], summary: Mapping[str, Any], graphs: Graphs,
               notes: Sequence[str], quick: bool) -> None:
    doc = {"normkit_version": normkit.__version__, "cpu_info": normkit.cpu_info(), "threads": threads,
           "torch_version": torch.__version__ if torch else None,
           **{f"{k}_version": v for k, v in _bench_onnx.versions().items()},
           "numpy_version": np.__version__, "python_version": platform.python_version(),
           "quick": quick, "machine": machine_load(), "legend": header_lines(copy_bw, threads)[2:],
           "byte_model": BYTE_MODEL,
           "copy_bandwidth_bytes_per_s": {str(n): bw for n, bw in sorted(copy_bw.items())},
           "ort_graphs": graphs, "rows": rows, "overhead": overhead, "summary": summary, "notes": notes}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
