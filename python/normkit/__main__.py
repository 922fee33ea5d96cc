"""`python -m normkit <command>`; the one command is `bench`."""
import argparse
import sys

from . import _bench


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m normkit",
                                     description="normkit command-line tools")
    commands = parser.add_subparsers(dest="command", metavar="command")
    bench = commands.add_parser("bench", help="time normkit's layers (against PyTorch's if installed)",
                                description="Time BatchNorm2d, GroupNorm, InstanceNorm2d, LayerNorm "
                                            "and RMSNorm (training forward, forward+backward, "
                                            "inference) against PyTorch when it is installed.")
    _bench.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required: bench")  # prints the usage, exits with status 2
    return _bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
