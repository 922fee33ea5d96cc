"""`python -m normkit bench --torch`: normkit.torch's modules against torch.nn's, both through
torch autograd (training forward + backward, and eval inference), on the bench's shapes.

Beside them, the plain normkit layer on the same arrays (no torch at all): the difference is
what the torch wrapping costs (the autograd Function, the tensor views, the parameter-gradient
tensors). The timing helpers, shapes, factories and modes are _bench's.
"""
from __future__ import annotations

import argparse
import json
import sys
from types import ModuleType
from typing import Any

import numpy as np

import normkit

from . import _bench

OPS = ("bn", "gn", "ln")  # the ops the issue names: BatchNorm2d, GroupNorm, LayerNorm
MODES = ("fwd+bwd", "infer")
TARGET = ("bn", _bench.BN_TARGET_SHAPE, "NCHW", "fwd+bwd", 2.0)  # >= 2x torch.nn there


def columns() -> list[_bench.Column]:
    n = _bench.number
    return [("shape", 15, lambda r: "x".join(map(str, r["shape"]))),
            ("mode", 7, lambda r: r["mode"]),
            ("nk.torch ms", 11, lambda r: n(r["nkt_s"], ".3f", 1e3)),
            ("torch ms", 9, lambda r: n(r["torch_s"], ".3f", 1e3)),
            ("speedup", 7, lambda r: n(r["speedup"], ".2f", suffix="x")),
            ("normkit ms", 10, lambda r: n(r["normkit_s"], ".3f", 1e3)),
            ("wrap us", 8, lambda r: n(r["wrap_s"], ".1f", 1e6)),
            ("target", 10, lambda r: r["target"]),
            ("met", 4, lambda r: _bench.mark(r["target_met"]) if r["target"] != "-" else "")]


def bench_case(op: str, shape: _bench.Shape, layout: str, dtype: np.dtype[Any],
               timing: _bench.Timing, nkt: ModuleType) -> list[_bench.Row]:
    """One row per mode: normkit.torch, torch.nn and the NumPy layer, timed in turn."""
    pdt = normkit._checks.param_dtype(dtype)
    ref = _bench.torch_module(op, shape, dtype, layout)
    ours = nkt.convert(_bench.torch_module(op, shape, pdt, layout))
    layer = _bench.normkit_layer(op, shape, dtype, layout)
    x, dy = _bench.inputs(shape, dtype, layout)
    tx, tdy = _bench.to_torch(x, layout), _bench.to_torch(dy, layout)
    calls = {"nkt": _bench.torch_calls(ours, tx, tdy), "torch": _bench.torch_calls(ref, tx, tdy),
             "normkit": _bench.normkit_calls(layer, x, dy)}
    rows: list[_bench.Row] = []
    for mode in MODES:
        train = mode != "infer"
        for m in (ours, ref, layer):
            m.train(train)
        fns = {k: c[mode]() for k, c in calls.items()}
        t = _bench.time_interleaved(fns, timing)
        target = TARGET[4] if (op, tuple(shape), layout, mode) == TARGET[:4] and dtype == np.float32 else None
        speedup = t["torch"] / t["nkt"]
        rows.append({"op": op, "layer": _bench.label(op, shape), "shape": list(shape), "layout": layout,
                     "dtype": np.dtype(dtype).name, "mode": mode, "nkt_s": t["nkt"], "torch_s": t["torch"],
                     "normkit_s": t["normkit"], "speedup": speedup, "wrap_s": t["nkt"] - t["normkit"],
                     "target": f"{target:g}x torch" if target else "-",
                     "target_met": None if target is None else speedup >= target})
    return rows


def header_lines(threads: int, timing: _bench.Timing) -> list[str]:
    torch = _bench.torch
    info = normkit.cpu_info()
    return [f"normkit {normkit.__version__} (isa {info.get('isa')})  |  threads {threads}  |  torch "
            f"{torch.__version__}  |  numpy {np.__version__}  |  {_bench.machine_load()}",
            "nk.torch = normkit.torch's module (normkit.torch.convert of the torch.nn one), torch = "
            "torch.nn's, both through autograd in the same process and thread count: fwd+bwd = "
            "autograd.grad(module(x), [x, *parameters], dy), infer = eval forward under inference_mode; "
            "NHWC = channels_last tensors (read in place by normkit.torch)",
            "normkit = the NumPy layer on the same memory (layer(x); layer.backward(dy)); wrap us = "
            "nk.torch - normkit: the torch wrapping's cost per call",
            f"time: median per call of {timing.repeats} samples, the three taken in turn; speedup = torch / nk.torch"]


def run(args: argparse.Namespace) -> int:
    """`python -m normkit bench --torch`; uses --threads, --ops (bn, gn, ln), --layouts,
    --dtypes, --shapes, --quick and --json."""
    _bench.import_torch()
    if _bench.torch is None:
        print("bench --torch: torch is not installed", file=sys.stderr)
        return 2
    import normkit.torch as nkt
    torch = _bench.torch
    if args.threads is not None:
        normkit.set_num_threads(args.threads)
    threads = normkit.get_num_threads()
    torch.set_num_threads(threads)
    layouts, dtypes, preset, skipped = _bench.plan(args)
    ops = [op for op in args.ops if op in OPS]
    tables = _bench.cases(ops, layouts, dtypes, preset)
    for line in skipped:
        print(line)
    if not tables:
        print(f"nothing to run: bench --torch times {', '.join(OPS)} only", file=sys.stderr)
        return 2
    timing = _bench.QUICK if args.quick else _bench.FULL
    for line in header_lines(threads, timing):
        print(line)
    cols = columns()
    title = _bench.format_title(cols)
    rows: list[_bench.Row] = []
    for dtype, op, layout, shapes in tables:
        print(f"\n{_bench.table_title(op, layout, dtype)}\n{title}\n{'-' * len(title)}", flush=True)
        for shape in shapes:
            for row in bench_case(op, shape, layout, dtype, timing, nkt):
                print(_bench.format_row(cols, row), flush=True)
                rows.append(row)
    judged = [r for r in rows if r["target_met"] is not None]
    print(f"\ntargets: {sum(r['target_met'] for r in judged)} of {len(judged)} met"
          + "".join(f"\n  MISS {r['layer']} {'x'.join(map(str, r['shape']))} {r['mode']}: {r['speedup']:.2f}x"
                    for r in judged if not r["target_met"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"normkit_version": normkit.__version__, "torch_version": torch.__version__,
                       "threads": threads, "quick": args.quick, "rows": rows}, f, indent=2)
            f.write("\n")
    return 0

