"""`python -m normkit <command>`; the one command is `bench`."""
import argparse
import sys

from . import _bench


def main(argv=None):
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
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required: bench")  # prints the usage, exits with status 2
    return _bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
