"""`python -m normkit demo`: its options, their checks, and the run (data, jobs, table, files)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing as npt

DEFAULT_BATCH_SIZES = (2, 4, 8, 32)
DEFAULT_EPOCHS = 8
DEFAULT_SEEDS = 3
DEFAULT_OUT = "normkit-study"
PLOT_NAME = "accuracy_vs_batch_size.png"
INSTALL_HINT = 'pip install "normkit[demo]"'


def _positive_int(text: str) -> int:
    value: int | None
    try:
        value = int(text, 10)
    except (TypeError, ValueError):
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_sizes(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes such as 2,4,8,32, got {text!r}")
    sizes: list[int] = []
    for p in parts:
        try:
            bs = int(p, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integer batch sizes, got {p!r}") from None
        if bs < 2:
            raise argparse.ArgumentTypeError(f"expected batch sizes of at least 2 (one sample has no batch "
                                             f"statistics), got {p!r}")
        sizes.append(bs)
    return sorted(set(sizes))


def _variants(text: str) -> list[str]:
    from .norms import VARIANTS

    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated variant names, or all, got {text!r}")
    if parts == ["all"]:
        return list(VARIANTS)
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0]!r}; expected all, or names from: "
                                         f"{', '.join(VARIANTS)}")
    return list(dict.fromkeys(parts))  # in the given order, once each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", type=_variants, default="all", metavar="NAME,...",
                        help="normalizations to compare: normkit class names and none (default: all)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=list(DEFAULT_BATCH_SIZES), metavar="B,...",
                        help="training batch sizes, each at least 2 (default: 2,4,8,32)")
    parser.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS, metavar="N",
                        help=f"epochs per run, the same at every batch size (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--seeds", type=_positive_int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"seeds per (variant, batch size): 0..N-1 (default: {DEFAULT_SEEDS})")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for results.json and the plot (default: {DEFAULT_OUT}/)")
    parser.add_argument("--workers", type=_positive_int, default=min(2, os.cpu_count() or 1), metavar="N",
                        help="worker processes (default: 2, or 1 on a single-core machine); "
                             "the results do not depend on it")
    # Quick checks (the tests): train on only the first N training images.
    parser.add_argument("--limit", type=_positive_int, default=None, help=argparse.SUPPRESS)


def _missing_dependency() -> str | None:
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            return package
    return None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    missing = _missing_dependency()
    if missing:
        parser.exit(2, f"{parser.prog}: error: the demo needs scikit-learn and matplotlib ({missing} is not "
                       f"installed): {INSTALL_HINT}\n")
    from . import report, study, train

    data = train.load_data(args.limit)
    n_train = len(data["y_train"])
    too_big = [bs for bs in args.batch_sizes if bs > n_train]
    if too_big:
        parser.error(f"argument --batch-sizes: batch size {too_big[0]} is larger than the {n_train} training images")
    jobs = len(args.variants) * len(args.batch_sizes) * args.seeds
    print(f"normkit demo: {len(args.variants)} variants x {len(args.batch_sizes)} batch sizes x {args.seeds} seeds "
          f"= {jobs} runs of {args.epochs} epochs on {n_train} digits ({len(data['y_test'])} held out), "
          f"{args.workers} workers", flush=True)
    start = time.perf_counter()
    results = study.run(args.variants, args.batch_sizes, args.epochs, args.seeds, data, args.workers)
    summary = study.summarize(results, args.variants, args.batch_sizes)
    elapsed = time.perf_counter() - start
    print()
    print(report.format_table(summary, args.batch_sizes, args.seeds))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    png_path = os.path.join(args.out, PLOT_NAME)
    report.write_json(json_path, config(args, data), summary)
    report.plot(png_path, summary, args.batch_sizes,
                f"normkit small-batch study: 8x8 digits, {args.epochs} epochs, mean of {args.seeds} "
                f"seed{'s' if args.seeds > 1 else ''}")
    print(f"\nwrote {json_path} and {png_path} ({elapsed:.0f} s of training)")
    sys.stdout.flush()
    return 0


def config(args: argparse.Namespace, data: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
    """What results.json records about the run (everything that decides its numbers)."""
    import normkit

    from . import net, train

    return {"normkit_version": normkit.__version__, "variants": list(args.variants),
            "batch_sizes": list(args.batch_sizes), "epochs": args.epochs, "seeds": list(range(args.seeds)),
            "train_images": int(len(data["y_train"])), "test_images": int(len(data["y_test"])),
            "data": "sklearn.datasets.load_digits, stratified split (random_state=0), last partial batch dropped",
            "model": f"2 x [conv3x3 ({', '.join(map(str, net.WIDTHS))} channels), norm, ReLU, maxpool2], linear",
            "optimizer": f"SGD, momentum {train.MOMENTUM}, lr {train.LR} * batch_size / {train.REFERENCE_BATCH}, "
                         f"linear decay to 0",
            "inference": "eval() mode: running statistics where a layer has them"}
