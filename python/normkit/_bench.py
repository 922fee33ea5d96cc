"""`python -m normkit bench`: time normkit's layers against PyTorch's, with effective bandwidth.

Only the timing harness runs in Python; every tensor-sized operation is one library call.
"""
import argparse
import collections
import itertools
import json
import math
import os
import platform
import statistics
import time

import numpy as np

import normkit

torch = None  # set by import_torch(): torch is slow to import, and optional

CONV_SHAPES = [(32, 64, 56, 56), (8, 256, 14, 14), (2, 16, 8, 8)]
ROW_SHAPES = [(8192, 1024)]
Timing = collections.namedtuple("Timing", "repeats min_sample_s warmup_s")
FULL, QUICK = Timing(7, 0.02, 0.2), Timing(3, 0.005, 0.05)
MODES = ("fwd", "fwd+bwd", "infer")
# Bytes an op must move, in multiples of x.nbytes (x, y, dy, dx all have x's size). O(C) parameter
# and statistics traffic is left out.
BYTE_MODEL = {"fwd": 2, "fwd+bwd": 5, "infer": 2}
BYTE_MODEL_TEXT = ("bytes = fwd, infer: read x + write y = 2|x|;  fwd+bwd: forward's 2|x| + read x, "
                   "read dy, write dx = 5|x|  (parameters and statistics ignored)")


def group_count(channels):
    """32 groups where the channels allow it, else their largest divisor below 32."""
    return max(g for g in range(1, 33) if channels % g == 0)


# op key -> (layer name, shapes, normkit factory, torch factory); factories take (shape, dtype).
OPS = {
    "bn": ("BatchNorm2d", CONV_SHAPES,
           lambda s, dt: normkit.BatchNorm2d(s[1], dtype=dt),
           lambda s, dt: torch.nn.BatchNorm2d(s[1], dtype=dt)),
    "gn": ("GroupNorm", CONV_SHAPES,
           lambda s, dt: normkit.GroupNorm(group_count(s[1]), s[1], dtype=dt),
           lambda s, dt: torch.nn.GroupNorm(group_count(s[1]), s[1], dtype=dt)),
    "in": ("InstanceNorm2d", CONV_SHAPES,
           lambda s, dt: normkit.InstanceNorm2d(s[1], affine=True, dtype=dt),
           lambda s, dt: torch.nn.InstanceNorm2d(s[1], affine=True, dtype=dt)),
    "ln": ("LayerNorm", ROW_SHAPES,
           lambda s, dt: normkit.LayerNorm(s[-1], dtype=dt),
           lambda s, dt: torch.nn.LayerNorm(s[-1], dtype=dt)),
    "rms": ("RMSNorm", ROW_SHAPES,
            lambda s, dt: normkit.RMSNorm(s[-1], dtype=dt),
            lambda s, dt: torch.nn.RMSNorm(s[-1], dtype=dt)),
}


def import_torch():
    """Import torch if it is installed; the bench runs with normkit's columns only otherwise."""
    global torch
    try:
        import torch as module
    except ImportError:
        module = None
    torch = module


# -- timing harness ------------------------------------------------------------------------------
def seconds_per_call(fn, iters):
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def warm_up(fn, seconds):
    """Call fn for `seconds` (at least twice): first-touch page faults and caches settle."""
    end = time.perf_counter() + seconds
    fn()
    fn()
    while time.perf_counter() < end:
        fn()


def calibrate(fn, min_sample_s):
    """The iteration count that makes one timed sample last >= min_sample_s."""
    iters = 1
    while True:
        t = seconds_per_call(fn, iters) * iters
        if t >= min_sample_s:
            return iters
        iters = max(2 * iters, math.ceil(1.2 * iters * min_sample_s / max(t, 1e-9)))


def time_call(fn, timing):
    """Median seconds per call over `timing.repeats` samples of a timed loop, after a warm-up."""
    warm_up(fn, timing.warmup_s)
    iters = calibrate(fn, timing.min_sample_s)
    return statistics.median(seconds_per_call(fn, iters) for _ in range(timing.repeats))


# -- the reference: a copy's bandwidth -----------------------------------------------------------
def last_level_cache_bytes(default=32 << 20):
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return default


def copy_bandwidth(nbytes, dtype, timing):
    """Bytes/s of np.copyto between arrays of `nbytes` each, counted as read + write.

    The copies rotate through slots of a pool three times the last-level cache, so that the
    source of every copy has been evicted since it was last touched (out of cache).
    """
    n = max(1, nbytes // np.dtype(dtype).itemsize)
    slots = max(3, math.ceil(3 * last_level_cache_bytes() / nbytes))
    pool = np.ones((slots, n), dtype)
    pairs = itertools.cycle([(pool[(i + 1) % slots], pool[i]) for i in range(slots)])
    return 2 * nbytes / time_call(lambda: np.copyto(*next(pairs)), timing)


# -- the two libraries' calls --------------------------------------------------------------------
def normkit_calls(layer, x, dy):
    """mode -> zero-argument call, as the issue defines each mode (the caller sets train/eval)."""
    def fwd_bwd():
        layer(x)
        layer.backward(dy)

    return {"fwd": lambda: layer(x), "fwd+bwd": fwd_bwd, "infer": lambda: layer(x)}


def torch_calls(module, x, dy):
    """The same three modes on a torch.nn.Module (autograd.grad: fresh gradients every call)."""
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    gx = tx.clone().requires_grad_(True)
    wrt = [gx] + list(module.parameters())

    def fwd_bwd():
        torch.autograd.grad(module(gx), wrt, tdy)

    def infer():
        with torch.inference_mode():
            module(tx)

    return {"fwd": lambda: module(tx), "fwd+bwd": fwd_bwd, "infer": infer}


# -- the benchmark -------------------------------------------------------------------------------
def cases(ops):
    """(op key, shape) in the order the table lists them."""
    return [(op, shape) for op in ops for shape in OPS[op][1]]


def label(op, shape):
    """The layer's name in the table; GroupNorm's with its group count."""
    return f"GroupNorm({group_count(shape[1])})" if op == "gn" else OPS[op][0]


def torch_module(op, shape, dtype):
    """The torch twin of the normkit layer, or None without torch (or without that layer)."""
    try:
        return OPS[op][3](shape, getattr(torch, dtype.name)) if torch else None
    except AttributeError:  # e.g. torch.nn.RMSNorm before torch 2.4
        return None


def bench_case(op, shape, dtype, copy_bw, timing):
    """One table row per mode for one (op, shape)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=dtype)
    dy = rng.standard_normal(shape, dtype=dtype)
    layer, module = OPS[op][2](shape, dtype), torch_module(op, shape, dtype)
    nk = normkit_calls(layer, x, dy)
    th = torch_calls(module, x, dy) if module is not None else None
    rows = []
    for mode in MODES:
        layer.train(mode != "infer")
        t_nk = time_call(nk[mode], timing)
        t_th = None
        if th:
            module.train(mode != "infer")
            t_th = time_call(th[mode], timing)
        nbytes = BYTE_MODEL[mode] * x.nbytes
        rows.append({"op": op, "layer": label(op, shape), "shape": list(shape), "mode": mode,
                     "normkit_s": t_nk, "torch_s": t_th,
                     "speedup": t_th / t_nk if t_th else None, "bytes": nbytes,
                     "normkit_gbps": nbytes / t_nk / 1e9,
                     "copy_fraction": nbytes / t_nk / copy_bw})
    return rows


# -- output --------------------------------------------------------------------------------------
def number(value, spec, scale=1.0, suffix=""):
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def columns(with_torch):
    """(title, width, row -> text) for each table column."""
    cols = [("layer", 14, lambda r: r["layer"]),
            ("shape", 17, lambda r: "x".join(map(str, r["shape"]))),
            ("mode", 7, lambda r: r["mode"]),
            ("normkit ms", 10, lambda r: number(r["normkit_s"], ".3f", 1e3))]
    if with_torch:
        cols += [("torch ms", 10, lambda r: number(r["torch_s"], ".3f", 1e3)),
                 ("speedup", 7, lambda r: number(r["speedup"], ".2f", suffix="x"))]
    cols += [("GB/s", 7, lambda r: number(r["normkit_gbps"], ".1f")),
             ("% copy", 6, lambda r: number(r["copy_fraction"], ".0f", 100, "%"))]
    return cols


def format_row(cols, row):
    return "  ".join(f(row).ljust(w) if i < 3 else f(row).rjust(w)
                     for i, (_, w, f) in enumerate(cols))


def format_title(cols):
    return "  ".join(t.ljust(w) if i < 3 else t.rjust(w) for i, (t, w, _) in enumerate(cols))


def header_lines(dtype, copy_bw):
    info = normkit.cpu_info()
    torch_text = f"torch {torch.__version__}" if torch else "torch not installed"
    copies = ",  ".join(f"{format_bytes(n)}: {bw / 1e9:.1f} GB/s" for n, bw in sorted(copy_bw.items()))
    return [f"normkit {normkit.__version__}  |  cpu_info {info}  |  threads {normkit.get_num_threads()}"
            f"  |  {torch_text}  |  {np.dtype(dtype).name}  |  python {platform.python_version()}"
            f"  |  {machine_load()}",
            f"copy bandwidth (np.copyto, same size as x, out of cache, read + write): {copies}",
            BYTE_MODEL_TEXT,
            "time: median per call; speedup = torch time / normkit time; "
            "GB/s = bytes / normkit time; % copy = that / copy bandwidth of x's size"]


def machine_load():
    """CPU count and 1-minute load average (with a warning when other work skews the timings)."""
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return f"{cpus} cpus"
    busy = "  (WARNING: busy machine, timings unreliable)" if load > 0.5 * cpus else ""
    return f"{cpus} cpus, load {load:.2f}{busy}"


def format_bytes(n):
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# -- command line --------------------------------------------------------------------------------
def ops_list(text):
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise argparse.ArgumentTypeError(f"expected a comma list of {','.join(OPS)}, got {text!r}")
    return ops


def positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_arguments(parser):
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for normkit and torch (default: normkit's, i.e. OpenMP's)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--ops", type=ops_list, default=list(OPS),
                        help=f"comma list of {','.join(OPS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and shorter samples (a smoke test, e.g. for CI)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")


def run(args):
    """Entry point of `python -m normkit bench`; returns the exit status."""
    import_torch()
    if args.threads is not None:
        normkit.set_num_threads(args.threads)
    if torch:
        torch.set_num_threads(normkit.get_num_threads())
    dtype = np.dtype(args.dtype)
    timing = QUICK if args.quick else FULL
    todo = cases(args.ops)
    sizes = sorted({math.prod(shape) * dtype.itemsize for _, shape in todo})
    copy_bw = {n: copy_bandwidth(n, dtype, timing) for n in sizes}
    for line in header_lines(dtype, copy_bw):
        print(line)
    cols = columns(torch is not None)
    print(format_title(cols))
    print("-" * len(format_title(cols)), flush=True)
    rows = []
    for op, shape in todo:
        bw = copy_bw[math.prod(shape) * dtype.itemsize]
        for row in bench_case(op, shape, dtype, bw, timing):
            print(format_row(cols, row), flush=True)
            rows.append(row)
    if args.json:
        write_json(args.json, dtype, copy_bw, rows)
    return 0


def write_json(path, dtype, copy_bw, rows):
    doc = {"normkit_version": normkit.__version__, "cpu_info": normkit.cpu_info(),
           "threads": normkit.get_num_threads(),
           "torch_version": torch.__version__ if torch else None, "dtype": dtype.name,
           "byte_model": BYTE_MODEL_TEXT,
           "copy_bandwidth_bytes_per_s": {str(n): bw for n, bw in sorted(copy_bw.items())},
           "rows": rows}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
