"""The ``cl-plugin`` command."""

from __future__ import annotations

import argparse
import sys

import cl_plugin


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cl-plugin",
        description="Continual learning for PyTorch Lightning by merging task vectors.",
    )
    parser.add_argument("--version", action="version", version=f"cl-plugin {cl_plugin.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    methods = sub.add_parser("methods", help="list the merging methods and their default scales")
    methods.set_defaults(func=_list_methods)
    return parser


def _list_methods(args: argparse.Namespace) -> int:
    from cl_plugin.merging import MERGERS
    from cl_plugin.merging.registry import option_names

    for name, cls in MERGERS.items():
        options = ", ".join(o for o in option_names(cls) if o != "scale") or "-"
        print(f"{name:16s} default scale {cls.default_scale:<5g} options: {options}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
