"""`python -m normkit <command>` (also the `normkit` console script); the commands are `bench`
(time normkit's layers) and `demo` (the small-batch study, docs/demo.md)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _bench
from .demo import cli as _demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normkit",
                                     description="normkit command-line tools")
    commands = parser.add_subparsers(dest="command", metavar="command")
    bench = commands.add_parser("bench", help="time normkit's layers (against PyTorch and ONNX "
                                              "Runtime if installed)",
                                description="Time BatchNorm2d, GroupNorm, InstanceNorm2d, LayerNorm "
                                            "and RMSNorm (training forward, backward, forward+backward, "
                                            "inference) against PyTorch and, for inference, ONNX "
                                            "Runtime when they are installed; one table per op, "
                                            "layout and dtype, with the speedup against the fastest, "
                                            "the fraction of the roofline (a copy's bandwidth "
                                            "measured in the same run), a pass/fail mark against "
                                            "the performance targets, the per-call overhead on a "
                                            "tiny tensor and a summary of the misses.")
    _bench.add_arguments(bench)
    demo = commands.add_parser("demo", help="the small-batch study: a small CNN on the 8x8 digits with "
                                            "every normalization at batch sizes 2 to 32 (needs "
                                            "normkit[demo])",
                               description="Train a small NumPy CNN on scikit-learn's 8x8 digits with "
                                           "each normalization (none, the standard layers and every "
                                           "research variant) at each batch size, from fixed seeds, "
                                           "then test it in inference mode (running statistics where "
                                           "a layer has them); print a table of test accuracy and "
                                           "write results.json and a plot of accuracy against batch "
                                           "size into --out. See docs/demo.md.")
    _demo.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required: bench or demo")  # prints the usage, exits with status 2
    if args.command == "demo":
        return _demo.run(args, demo)
    return _bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
