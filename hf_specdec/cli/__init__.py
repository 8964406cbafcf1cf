"""`hf-specdec` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module (imported lazily so `hf-specdec --help` stays fast)
SUBCOMMANDS = {
    "generate": "hf_specdec.cli.generate",
    "bench": "hf_specdec.cli.bench",
    "simulate": "hf_specdec.cli.simulate",
    "distill": "hf_specdec.cli.distill",
    "export": "hf_specdec.cli.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-specdec",
        description="Exact tree speculative decoding for Hugging Face models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command])
    return module.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
