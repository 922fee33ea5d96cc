"""`python -m normkit bench --variants`: the variant layers of issues 10 and 12 timed beside BatchNorm2d.

Every variant is timed in training forward+backward and in inference (eval forward), its samples
taken in turn with those of a BatchNorm2d(C) on the same x and dy in the same process, so the
ratio variant / BatchNorm2d is meaningful even when the machine's speed drifts. The targets:
every ratio <= 1.5 in the same mode for issue 10's variants, <= 2 for issue 12's (MABN, CBN, BKN). PyTorch has none of these layers: the table needs
neither torch nor ONNX Runtime.

A second table (after the first one's summary) times the batch-independent layers of issue 11 the
same way beside a GroupNorm(G, C), G = 32 where C allows (the bench's group_count): target ratio
<= 1.5 for FilterResponseNorm2d, EvoNormB0_2d, EvoNormS0_2d and BatchChannelNorm2d, <= 3 for
ProxyNorm2d. Its rows are under their own JSON keys (batch_free_*).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

import normkit

from . import _bench
from ._bench import Call, Column, Row, Shape, Timing

# preset -> shapes (N, C, H, W), float32 NCHW. The two shapes; tiny: a smoke test (N=8:
# ghost batches of 2; C=16: groups of 4 channels).
VARIANT_SHAPES: dict[str, list[Shape]] = {"standard": [(32, 64, 56, 56), (8, 256, 14, 14)],
                                         "tiny": [(8, 16, 8, 8)]}
VARIANT_MODES = ("fwd+bwd", "infer")
TARGET_RATIO = 1.5  # issue 10: each variant within 1.5x of BatchNorm2d's time in the same mode
ITERATION_TARGET_RATIO = 2.0  # issue 12: MABN, CBN and BKN training steps within 2x


def ghost_size(shape: Sequence[int]) -> int:
    return max(1, shape[0] // 4)


def modality(n: int) -> npt.NDArray[np.int64]:
    """Modality 0, 1, 0, 1, ... over the batch."""
    return np.arange(n, dtype=np.int64) % 2


def conv_inputs(shape: Sequence[int]) -> tuple[npt.NDArray[np.float64], ...]:
    """CBN's extra inputs: a 3x3 convolution's weight (C, C, 3, 3) and two Jacobians of its shape."""
    rng = np.random.default_rng(0)
    C = shape[1]
    return tuple(rng.normal(0.0, scale, (C, C, 3, 3)) for scale in (0.1, 0.01, 0.01))


def prior(shape: Sequence[int]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """BKN's prior (mean, var), one value per channel."""
    return (np.zeros(shape[1]), np.ones(shape[1]))


no_extra = lambda s: ()
# key -> (label(shape), factory(shape), extra inputs(shape), target ratio)
VARIANTS: dict[str, tuple[Callable[[Shape], str], Callable[[Shape], normkit.NormLayer],
                          Callable[[Shape], tuple[object, ...]], float]] = {
    "ebn": (lambda s: "ExtendedBatchNorm2d",
            lambda s: normkit.ExtendedBatchNorm2d(s[1]), no_extra, TARGET_RATIO),
    "mbn": (lambda s: "ModalityBatchNorm2d(m=0,1,..)",
            lambda s: normkit.ModalityBatchNorm2d(s[1]), lambda s: (modality(s[0]),), TARGET_RATIO),
    "ghost": (lambda s: f"GhostBatchNorm2d(g={ghost_size(s)})",
              lambda s: normkit.GhostBatchNorm2d(s[1], ghost_batch_size=ghost_size(s)), no_extra, TARGET_RATIO),
    "ghost_gn": (lambda s: f"GhostBatchNorm2d(g={ghost_size(s)},cpg=4) BN+GN",
                 lambda s: normkit.GhostBatchNorm2d(s[1], ghost_batch_size=ghost_size(s),
                                                    channels_per_group=4), no_extra, TARGET_RATIO),
    "ghost_ew": (lambda s: f"GhostBatchNorm2d(g={ghost_size(s)},ew=0.5)",
                 lambda s: normkit.GhostBatchNorm2d(s[1], ghost_batch_size=ghost_size(s),
                                                    example_weight=0.5), no_extra, TARGET_RATIO),
    "renorm": (lambda s: "BatchRenorm2d",
               lambda s: normkit.BatchRenorm2d(s[1]), no_extra, TARGET_RATIO),
    "frozen": (lambda s: "FrozenBatchNorm2d",
               lambda s: normkit.FrozenBatchNorm2d(s[1]), no_extra, TARGET_RATIO),
    "mabn": (lambda s: "MovingAverageBatchNorm2d",
             lambda s: normkit.MovingAverageBatchNorm2d(s[1]), no_extra, ITERATION_TARGET_RATIO),
    "cbn": (lambda s: "CrossIterationBatchNorm2d(window=4)",
            lambda s: normkit.CrossIterationBatchNorm2d(s[1]), conv_inputs, ITERATION_TARGET_RATIO),
    "bkn": (lambda s: "BatchKalmanNorm2d(prior)",
            lambda s: normkit.BatchKalmanNorm2d(s[1]), lambda s: (prior(s),), ITERATION_TARGET_RATIO),
}
# Inference paths that are a per-channel (per (modality, channel) for MBN) affine: one pass over
# x, like BatchNorm2d's eval. Ghost's with example_weight=0 (BN+GN too: group moments of the
# running statistics, still one scale and shift per channel).
ONE_PASS_INFER = ("ebn", "mbn", "ghost", "ghost_gn", "renorm", "frozen", "mabn", "cbn", "bkn")


def mode_text(key: str, mode: str) -> str:
    """The mode as the table prints it: the example-weighed inference is the per-sample path."""
    return "infer (per-sample)" if (key, mode) == ("ghost_ew", "infer") else mode


def calls(layer: normkit.NormLayer, x: npt.NDArray[Any], dy: npt.NDArray[Any],
          extra: tuple[object, ...]) -> dict[str, Call]:
    """mode -> the timed zero-argument call (the caller sets train/eval)."""
    def fwd_bwd() -> None:
        layer(x, *extra)
        layer.backward(dy)

    return {"fwd+bwd": fwd_bwd, "infer": lambda: layer(x, *extra)}


def time_interleaved_min(fns: Mapping[str, Call], timing: Timing) -> dict[str, float]:
    """The fastest seconds per call of each function in `fns` (name -> fn) over
    `timing.repeats` samples, after a warm-up and a calibration each (the bench's helpers), their
    samples taken in turn (a, b, a, b, ...)."""
    iters: dict[str, int] = {}
    for name, fn in fns.items():
        _bench.warm_up(fn, timing.warmup_s)
        iters[name] = _bench.calibrate(fn, timing.min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(timing.repeats):
        for name, fn in fns.items():
            samples[name].append(_bench.seconds_per_call(fn, iters[name]))
    return {name: min(v) for name, v in samples.items()}


def make_row(key: str, shape: Shape, mode: str, t_variant: float, t_bn: float, x_nbytes: int,
             copy_bw: float) -> Row:
    nbytes = _bench.BYTE_MODEL[mode] * x_nbytes
    ratio, target = t_variant / t_bn, VARIANTS[key][3]
    return {"variant": key, "layer": VARIANTS[key][0](shape), "shape": list(shape), "layout": "NCHW",
            "dtype": "float32", "mode": mode, "path": mode_text(key, mode), "bytes": nbytes,
            "normkit_s": t_variant, "batchnorm_s": t_bn, "ratio": ratio,
            "normkit_gbps": nbytes / t_variant / 1e9, "roof_fraction": nbytes / t_variant / copy_bw,
            "batchnorm_roof_fraction": nbytes / t_bn / copy_bw,
            "one_pass_expected": (mode == "infer" and key in ONE_PASS_INFER) or key == "frozen",
            "target_ratio": target, "target_met": ratio <= target}


def bench_shape(shape: Shape, copy_bw: float, timing: Timing,
                on_row: Callable[[Row], object]) -> list[Row]:
    """The rows of one shape: per mode, per variant, timed in turn with a BatchNorm2d."""
    x, dy = _bench.inputs(shape, np.float32)
    bn = normkit.BatchNorm2d(shape[1])
    bn_calls = calls(bn, x, dy, ())
    layers: dict[str, tuple[normkit.NormLayer, dict[str, Call]]] = {}
    for key, (_, factory, extra, _) in VARIANTS.items():
        layer = factory(shape)
        layers[key] = (layer, calls(layer, x, dy, extra(shape)))
    rows: list[Row] = []
    for mode in VARIANT_MODES:  # training first: inference then uses trained running statistics
        training = mode != "infer"
        bn.train(training)
        for key, (layer, fns) in layers.items():
            layer.train(training)
            times = time_interleaved_min({"variant": fns[mode], "bn": bn_calls[mode]}, timing)
            rows.append(make_row(key, shape, mode, times["variant"], times["bn"], x.nbytes, copy_bw))
            on_row(rows[-1])
    return rows


# -- output --------------------------------------------------------------------------------------
def columns() -> list[Column]:
    """(title, width, row -> text); the first three are left-aligned, the last one too."""
    num = _bench.number
    return [("variant", 38, lambda r: r["layer"]),
            ("shape", 13, lambda r: "x".join(map(str, r["shape"]))),
            ("mode", 18, lambda r: r["path"]),
            ("normkit ms", 10, lambda r: num(r["normkit_s"], ".3f", 1e3)),
            ("BN ms", 8, lambda r: num(r["batchnorm_s"], ".3f", 1e3)),
            ("ratio", 6, lambda r: num(r["ratio"], ".2f", suffix="x")),
            ("% roof", 6, lambda r: num(r["roof_fraction"], ".0f", 100, "%")),
            ("target", 6, lambda r: f"<={r['target_ratio']:g}x"),
            ("met", 4, lambda r: _bench.mark(r["target_met"]))]


def format_line(cols: Sequence[Column], texts: Sequence[str]) -> str:
    return "  ".join(t.ljust(w) if i < 3 or i == len(cols) - 1 else t.rjust(w)
                     for i, ((_, w, _), t) in enumerate(zip(cols, texts))).rstrip()


def header_lines(copy_bw: Mapping[int, float], threads: int, timing: Timing) -> list[str]:
    info = normkit.cpu_info()
    copies = ",  ".join(f"{_bench.format_bytes(n)}: {bw / 1e9:.1f} GB/s" for n, bw in sorted(copy_bw.items()))
    return [f"normkit {normkit.__version__} (isa {info.get('isa')})  |  threads {threads}  |  "
            f"numpy {np.__version__}  |  python {platform.python_version()}  |  {_bench.machine_load()}",
            f"copy bandwidth (parallel memcpy on the same threads, same size as x, out of cache, "
            f"read + write): {copies}",
            "bytes = fwd+bwd: 5|x| (read x, write y; read x, read dy, write dx);  infer: read x + write y "
            "= 2|x|  (parameters and statistics ignored);  % roof = bytes / variant time / copy bandwidth",
            "modes: fwd+bwd = training forward then backward; infer = eval forward; float32 NCHW",
            f"time: min per call over {timing.repeats} samples, each variant's samples taken in turn with "
            "those of a BatchNorm2d(C) on the same x and dy (BN ms: that BatchNorm2d, re-timed for "
            "every row); ratio = variant / BatchNorm2d in the same mode",
            "variants: ModalityBatchNorm2d(C) with modality 0,1,0,1,.. over the batch; "
            "GhostBatchNorm2d(C, ghost_batch_size=g=N//4) (cpg=4: channels_per_group=4, the BN+GN "
            "combination; ew=0.5: example_weight=0.5); CrossIterationBatchNorm2d(C) with a 3x3 "
            "conv's weight and Jacobians; BatchKalmanNorm2d(C) with a prior (0, 1); the others (C) "
            "with defaults",
            f"targets: ratio <= {TARGET_RATIO:g} (issue 10's variants), <= {ITERATION_TARGET_RATIO:g} "
            f"(issue 12's: MovingAverageBatchNorm2d, CrossIterationBatchNorm2d, BatchKalmanNorm2d), "
            f"in the same mode: ok / MISS"]


def note_lines(rows: Sequence[Row]) -> list[str]:
    def ratios(key: str, mode: str) -> str:
        return ", ".join(f"{r['ratio']:.2f}x on {'x'.join(map(str, r['shape']))}"
                         for r in rows if (r["variant"], r["mode"]) == (key, mode))

    shape = [r["shape"] for r in rows][0]
    label = {key: VARIANTS[key][0](shape) for key in VARIANTS}
    lines = []
    for key in ONE_PASS_INFER:
        if key == "frozen":
            lines.append(f"{label[key]}: a per-channel affine in train and eval, one pass like "
                         f"BatchNorm2d's eval; infer: {ratios(key, 'infer')};  fwd+bwd = one fused "
                         f"forward pass and an input-only backward (dx = scale * dy: no reduction, "
                         f"4|x| moved, % roof counts 5|x|): {ratios(key, 'fwd+bwd')}")
        else:
            lines.append(f"{label[key]} infer: a per-channel affine, must be one pass like "
                         f"BatchNorm2d's eval (ratio ~1): {ratios(key, 'infer')}")
    lines.append(f"{label['ghost_ew']} infer (per-sample): each sample's moments E1_i, E2_i are "
                 f"reduced first, then its own scale and shift: not a per-channel affine, not "
                 f"expected to be one pass: {ratios('ghost_ew', 'infer')}")
    return lines


def summary_lines(rows: Sequence[Row]) -> list[str]:
    misses = [r for r in rows if not r["target_met"]]
    lines = [f"targets: {len(rows) - len(misses)} of {len(rows)} met"]
    if misses:
        lines.append("misses:")
        lines += [f"  {r['layer']} {'x'.join(map(str, r['shape']))} {r['path']}: {r['ratio']:.2f}x "
                  f"BatchNorm2d ({r['normkit_s'] * 1e3:.3f} ms vs {r['batchnorm_s'] * 1e3:.3f} ms; "
                  f"target <= {r['target_ratio']:g}x)"
                  for r in misses]
    return lines


# -- entry point ---------------------------------------------------------------------------------
def shapes_for(preset: str | None) -> list[Shape]:
    """--shapes tiny: the smoke-test shape; any other preset (or none): the issue's two shapes."""
    return VARIANT_SHAPES["tiny" if preset == "tiny" else "standard"]


def run(args: argparse.Namespace) -> int:
    """`python -m normkit bench --variants`; returns the exit status. Uses --threads, --quick,
    --shapes (tiny or not) and --json; --ops, --layouts and --dtypes do not apply."""
    if args.threads is not None:
        normkit.set_num_threads(args.threads)
    threads = normkit.get_num_threads()
    timing = _bench.QUICK if args.quick else _bench.FULL
    shapes = shapes_for(args.shapes)
    sizes = sorted({math.prod(s) * 4 for s in shapes})
    copy_bw = {n: _bench.copy_bandwidth(n, timing) for n in sizes}
    for line in header_lines(copy_bw, threads, timing):
        print(line)
    cols = columns()
    title = format_line(cols, [t for t, _, _ in cols])
    print(f"\n== variants beside BatchNorm2d  NCHW  float32\n{title}\n{'-' * len(title)}", flush=True)
    rows: list[Row] = []
    for shape in shapes:
        rows += bench_shape(shape, copy_bw[math.prod(shape) * 4], timing,
                            lambda r: print(format_line(cols, [f(r) for _, _, f in cols]), flush=True))
    notes = note_lines(rows)
    for line in notes:
        print(f"note: {line}")
    print()
    for line in summary_lines(rows):
        print(line)
    free_rows, free_notes = run_free(shapes, copy_bw, timing)
    conv_rows = run_conv_jacobians(shapes, timing)
    if args.json:
        write_json(args.json, threads, copy_bw, rows, notes, timing, args.quick,
                   (free_rows, free_notes, copy_bw, timing), conv_rows)
    return 0


def run_free(shapes: Sequence[Shape], copy_bw: Mapping[int, float],
             timing: Timing) -> tuple[list[Row], list[str]]:
    """Print the second table (issue 11's layers beside GroupNorm), its notes and summary; returns
    (rows, notes)."""
    cols = free_columns()
    title = format_line(cols, [t for t, _, _ in cols])
    print("\n== batch-independent layers (issue 11) beside GroupNorm  NCHW  float32")
    for line in free_header_lines(timing):
        print(line)
    print(f"{title}\n{'-' * len(title)}", flush=True)
    rows: list[Row] = []
    for shape in shapes:
        rows += bench_free_shape(shape, copy_bw[math.prod(shape) * 4], timing,
                                 lambda r: print(format_line(cols, [f(r) for _, _, f in cols]), flush=True))
    notes = free_note_lines(rows)
    for line in notes:
        print(f"{FREE_NOTE_PREFIX}{line}")
    print()
    for line in free_summary_lines(rows):
        print(line)
    return rows, notes


def write_json(path: str, threads: int, copy_bw: Mapping[int, float], rows: Sequence[Row],
               notes: Sequence[str], timing: Timing, quick: bool,
               free: tuple[list[Row], list[str], Mapping[int, float], Timing] | None = None,
               conv_rows: list[Row] | None = None) -> None:
    doc = {"normkit_version": normkit.__version__, "cpu_info": normkit.cpu_info(), "threads": threads,
           "numpy_version": np.__version__, "python_version": platform.python_version(),
           "quick": quick, "machine": _bench.machine_load(),
           "legend": header_lines(copy_bw, threads, timing)[2:],
           "byte_model": {m: _bench.BYTE_MODEL[m] for m in VARIANT_MODES},
           "copy_bandwidth_bytes_per_s": {str(n): bw for n, bw in sorted(copy_bw.items())},
           "target_ratios": {k: spec[3] for k, spec in VARIANTS.items()}, "variant_rows": rows, "notes": notes,
           "summary": summary_lines(rows)}
    if free is not None:
        free_rows, free_notes = free[0], free[1]
        doc.update({"batch_free_legend": free_header_lines(timing),
                    "batch_free_target_ratios": {k: spec[2] for k, spec in FREE_LAYERS.items()},
                    "batch_free_rows": free_rows, "batch_free_notes": free_notes,
                    "batch_free_summary": free_summary_lines(free_rows)})
    if conv_rows is not None:
        doc["conv_jacobian_rows"] = conv_rows
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


# -- the second table: issue 11's batch-independent layers beside GroupNorm ----------------------
FREE_TARGET_RATIO = 1.5  # issue 11: FRN, EvoNorm-B0/S0, BCN, BLN, LayerNorm2d within 1.5x of GroupNorm
PROXY_TARGET_RATIO = 3.0  # issue 11: Proxy Norm and LocalResponseNorm within 3x
FREE_NOTE_PREFIX = "note (beside GroupNorm): "  # the first table's notes are "note: "
FREE_TARGET_TEXT = (f"ratio <= {FREE_TARGET_RATIO:g} for FilterResponseNorm2d, EvoNormB0_2d, "
                    f"EvoNormS0_2d, BatchChannelNorm2d, BatchLayerNorm2d, LayerNorm2d; <= {PROXY_TARGET_RATIO:g} for "
                    f"ProxyNorm2d, "
                    f"LocalResponseNorm")


def groups(shape: Sequence[int]) -> int:
    """The groups of the GroupNorm reference, EvoNormS0_2d and BatchChannelNorm2d: 32 where C
    allows, else C's largest divisor below 32 (the bench's group_count)."""
    return _bench.group_count(shape[1])


# key -> (label(shape), factory(shape), target ratio)
FREE_LAYERS: dict[str, tuple[Callable[[Shape], str], Callable[[Shape], normkit.NormLayer],
                             float]] = {
    "frn": (lambda s: "FilterResponseNorm2d(tlu)",
            lambda s: normkit.FilterResponseNorm2d(s[1], tlu=True), FREE_TARGET_RATIO),
    "evonorm_b0": (lambda s: "EvoNormB0_2d",
                   lambda s: normkit.EvoNormB0_2d(s[1]), FREE_TARGET_RATIO),
    "evonorm_s0": (lambda s: f"EvoNormS0_2d(groups={groups(s)})",
                   lambda s: normkit.EvoNormS0_2d(s[1], groups=groups(s)), FREE_TARGET_RATIO),
    "bcn": (lambda s: f"BatchChannelNorm2d(groups={groups(s)})",
            lambda s: normkit.BatchChannelNorm2d(s[1], num_groups=groups(s)), FREE_TARGET_RATIO),
    "bln": (lambda s: f"BatchLayerNorm2d(batch_size={s[0]})",
            lambda s: normkit.BatchLayerNorm2d(s[1], batch_size=s[0]), FREE_TARGET_RATIO),
    "ln2d": (lambda s: "LayerNorm2d",
             lambda s: normkit.LayerNorm2d(s[1]), FREE_TARGET_RATIO),
    "lrn": (lambda s: "LocalResponseNorm(5)",
            lambda s: normkit.LocalResponseNorm(5), PROXY_TARGET_RATIO),
    "proxy_relu": (lambda s: "ProxyNorm2d(relu)",
                   lambda s: normkit.ProxyNorm2d(s[1], activation="relu"), PROXY_TARGET_RATIO),
    "proxy_gelu": (lambda s: "ProxyNorm2d(gelu)",
                   lambda s: normkit.ProxyNorm2d(s[1], activation="gelu"), PROXY_TARGET_RATIO),
}


def make_free_row(key: str, shape: Shape, mode: str, t_layer: float, t_gn: float, x_nbytes: int,
                  copy_bw: float) -> Row:
    nbytes = _bench.BYTE_MODEL[mode] * x_nbytes
    ratio, target = t_layer / t_gn, FREE_LAYERS[key][2]
    return {"variant": key, "layer": FREE_LAYERS[key][0](shape), "reference": f"GroupNorm({groups(shape)})",
            "shape": list(shape), "layout": "NCHW", "dtype": "float32", "mode": mode, "path": mode,
            "bytes": nbytes, "normkit_s": t_layer, "groupnorm_s": t_gn, "ratio": ratio,
            "normkit_gbps": nbytes / t_layer / 1e9, "roof_fraction": nbytes / t_layer / copy_bw,
            "groupnorm_roof_fraction": nbytes / t_gn / copy_bw,
            "target_ratio": target, "target_met": ratio <= target}


def bench_free_shape(shape: Shape, copy_bw: float, timing: Timing,
                     on_row: Callable[[Row], object]) -> list[Row]:
    """The rows of one shape: per mode, per layer, timed in turn with a GroupNorm(G, C)."""
    x, dy = _bench.inputs(shape, np.float32)
    gn = normkit.GroupNorm(groups(shape), shape[1])
    gn_calls = calls(gn, x, dy, ())
    layers: dict[str, tuple[normkit.NormLayer, dict[str, Call]]] = {}
    for key, (_, factory, _) in FREE_LAYERS.items():
        layer = factory(shape)
        layers[key] = (layer, calls(layer, x, dy, ()))
    rows: list[Row] = []
    for mode in VARIANT_MODES:  # training first: inference then uses trained running statistics
        training = mode != "infer"
        gn.train(training)
        for key, (layer, fns) in layers.items():
            layer.train(training)
            times = time_interleaved_min({"layer": fns[mode], "gn": gn_calls[mode]}, timing)
            rows.append(make_free_row(key, shape, mode, times["layer"], times["gn"], x.nbytes, copy_bw))
            on_row(rows[-1])
    return rows


def free_columns() -> list[Column]:
    """The first table's columns with GroupNorm's time, and each row's target before its mark."""
    num = _bench.number
    return [("layer", 38, lambda r: r["layer"]),
            ("shape", 13, lambda r: "x".join(map(str, r["shape"]))),
            ("mode", 18, lambda r: r["path"]),
            ("normkit ms", 10, lambda r: num(r["normkit_s"], ".3f", 1e3)),
            ("GN ms", 8, lambda r: num(r["groupnorm_s"], ".3f", 1e3)),
            ("ratio", 6, lambda r: num(r["ratio"], ".2f", suffix="x")),
            ("% roof", 6, lambda r: num(r["roof_fraction"], ".0f", 100, "%")),
            ("target", 6, lambda r: f"<={r['target_ratio']:g}x"),
            ("met", 4, lambda r: _bench.mark(r["target_met"]))]


def free_header_lines(timing: Timing) -> list[str]:
    return [f"time: min per call over {timing.repeats} samples, each layer's samples taken in turn with "
            "those of a GroupNorm(G, C) on the same x and dy (GN ms: that GroupNorm, re-timed for every "
            "row); ratio = layer / GroupNorm in the same mode; bytes and % roof as above",
            "G = 32 where C allows, else C's largest divisor below 32; layers: FilterResponseNorm2d(C, "
            "tlu=True); EvoNormB0_2d(C); EvoNormS0_2d(C, groups=G); BatchChannelNorm2d(C, num_groups=G); "
            "ProxyNorm2d(C, activation=relu | gelu); other arguments their defaults",
            f"target (issue 11): {FREE_TARGET_TEXT}, in the same mode: ok / MISS"]


def free_note_lines(rows: Sequence[Row]) -> list[str]:
    def ratios(key: str, mode: str) -> str:
        return ", ".join(f"{r['ratio']:.2f}x on {'x'.join(map(str, r['shape']))}"
                         for r in rows if (r["variant"], r["mode"]) == (key, mode))

    return [f"EvoNormB0_2d and BatchChannelNorm2d use batch statistics in training (the batch "
            f"variance; BatchNorm's) and running statistics in inference; the other layers are the "
            f"same in both modes. fwd+bwd: EvoNormB0_2d {ratios('evonorm_b0', 'fwd+bwd')}; "
            f"BatchChannelNorm2d {ratios('bcn', 'fwd+bwd')}",
            f"ProxyNorm2d infer is one pointwise pass over x (per-channel affine, activation, "
            f"per-channel affine; the proxy statistics are C x num_points values), where GroupNorm's "
            f"reads x twice (ratio < 1 expected): relu {ratios('proxy_relu', 'infer')}; gelu (erf per "
            f"element in that pass) {ratios('proxy_gelu', 'infer')}"]


def free_summary_lines(rows: Sequence[Row]) -> list[str]:
    misses = [r for r in rows if not r["target_met"]]
    lines = [f"beside GroupNorm (issue 11), target {FREE_TARGET_TEXT}: "
             f"{len(rows) - len(misses)} of {len(rows)} met"]
    if misses:
        lines.append("misses:")
        lines += [f"  {r['layer']} {'x'.join(map(str, r['shape']))} {r['path']}: {r['ratio']:.2f}x "
                  f"{r['reference']} ({r['normkit_s'] * 1e3:.3f} ms vs {r['groupnorm_s'] * 1e3:.3f} ms; "
                  f"target <= {r['target_ratio']:g}x)" for r in misses]
    return lines


# -- conv2d_stat_jacobians beside torch's convolution weight gradient ------------------------------
CONV_TARGET_RATIO = 2.0  # the issue: normkit within 2x of torch's weight gradient


def bench_conv_jacobians(shape: Shape = (32, 64, 56, 56), kernel: int = 3,
                         timing: Timing = _bench.FULL, out_channels: int | None = None,
                         dtype: npt.DTypeLike = np.float32) -> Row:
    """One row: normkit.conv2d_stat_jacobians on a conv input of `shape` (N, C, H, W) and a weight
    (out_channels or C, C, kernel, kernel), padding kernel // 2, timed in turn with torch's weight
    gradient of the same convolution (torch.nn.grad.conv2d_weight with dy = y, y computed
    beforehand) and, for context, torch's forward plus that gradient (normkit's call computes y
    too). torch runs on normkit's thread count. Without torch the torch fields are None."""
    N, C, H, W = shape
    C_out = C if out_channels is None else out_channels
    padding = kernel // 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    w = (rng.standard_normal((C_out, C, kernel, kernel), dtype=np.float32)
         / math.sqrt(C * kernel * kernel)).astype(dtype, copy=False)
    threads = normkit.get_num_threads()
    fns: dict[str, Call] = {"normkit": lambda: normkit.conv2d_stat_jacobians(x, w, padding=padding)}
    if _bench.torch is None:
        _bench.import_torch()
    torch = _bench.torch
    if torch is not None:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        with torch.no_grad():
            ty = torch.nn.functional.conv2d(tx, tw, padding=padding)

        def weight_grad() -> None:
            with torch.no_grad():
                torch.nn.grad.conv2d_weight(tx, tw.shape, ty, padding=padding)

        def forward_and_weight_grad() -> None:
            with torch.no_grad():
                y = torch.nn.functional.conv2d(tx, tw, padding=padding)
                torch.nn.grad.conv2d_weight(tx, tw.shape, y, padding=padding)

        fns["torch_weight_grad"] = weight_grad
        fns["torch_forward_weight_grad"] = forward_and_weight_grad
    try:
        times = time_interleaved_min(fns, timing)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    Ho, Wo = H + 2 * padding - kernel + 1, W + 2 * padding - kernel + 1
    flops = 2 * 2 * N * Ho * Wo * C_out * C * kernel * kernel  # two GEMMs: y, then y x patches
    t_torch = times.get("torch_weight_grad")
    ratio = None if t_torch is None else times["normkit"] / t_torch
    return {"bench": "conv2d_stat_jacobians", "shape": list(shape),
            "weight_shape": [C_out, C, kernel, kernel], "padding": padding,
            "dtype": np.dtype(dtype).name, "threads": threads, "normkit_s": times["normkit"],
            "normkit_gflops": flops / times["normkit"] / 1e9, "torch_weight_grad_s": t_torch,
            "torch_forward_weight_grad_s": times.get("torch_forward_weight_grad"),
            "torch_op": None if torch is None else "torch.nn.grad.conv2d_weight",
            "ratio": ratio, "target_ratio": CONV_TARGET_RATIO,
            "target_met": None if ratio is None else ratio <= CONV_TARGET_RATIO}


def conv_shapes(shapes: list[Shape]) -> list[Shape]:
    """The conv inputs timed: the first variant shape (the issue's (32, 64, 56, 56); the tiny
    shape under --shapes tiny), with a 3x3 kernel of as many filters as input channels."""
    return shapes[:1]


def conv_line(r: Row) -> str:
    w = "x".join(map(str, r["weight_shape"]))
    shape = "x".join(map(str, r["shape"]))
    torch_ms = "-" if r["torch_weight_grad_s"] is None else f"{r['torch_weight_grad_s'] * 1e3:.3f}"
    both_ms = "-" if r["torch_forward_weight_grad_s"] is None else f"{r['torch_forward_weight_grad_s'] * 1e3:.3f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    met = "-" if r["target_met"] is None else ("ok" if r["target_met"] else "MISS")
    return (f"{shape:<14} {w:<12} {r['normkit_s'] * 1e3:>10.3f} {r['normkit_gflops']:>8.1f} {torch_ms:>12} "
            f"{both_ms:>14} {ratio:>7} {'<=' + format(r['target_ratio'], 'g') + 'x':>7} {met:>5}")


def run_conv_jacobians(shapes: list[Shape], timing: Timing) -> list[Row]:
    """Print the third table: conv2d_stat_jacobians beside torch's convolution weight gradient
    (issue 12); returns its rows. Without torch the torch columns read '-'."""
    print("\n== conv2d_stat_jacobians (issue 12) beside torch's convolution weight gradient  NCHW  float32")
    print("normkit: conv2d_stat_jacobians(x, w, padding=1), which computes y = conv2d(x, w) and both Jacobians "
          "(GFLOP/s counts its two GEMMs); torch grad: torch.nn.grad.conv2d_weight(x, w.shape, y) with y "
          "given; torch fwd+grad: the forward too; ratio = normkit / torch grad; target (issue 12): <= "
          f"{CONV_TARGET_RATIO:g}x")
    title = (f"{'input':<14} {'weight':<12} {'normkit ms':>10} {'GFLOP/s':>8} {'torch grad':>12} "
             f"{'torch fwd+grad':>14} {'ratio':>7} {'target':>7} {'met':>5}")
    print(f"{title}\n{'-' * len(title)}", flush=True)
    _bench.import_torch()  # each run looks again: the bench runs without torch too
    rows: list[Row] = []
    for shape in conv_shapes(shapes):
        rows.append(bench_conv_jacobians(shape, 3, timing))
        print(conv_line(rows[-1]), flush=True)
    if rows and rows[0]["ratio"] is None:
        print("torch is not installed: normkit's time only")
    return rows
