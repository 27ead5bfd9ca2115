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

    demo = sub.add_parser(
        "demo",
        help="compare every merging method with sequential fine-tuning and joint training",
        description=(
            "Train a continual-learning stream with sequential fine-tuning, compare every merging method "
            "from the same run, print the table and write results.json and accuracy-matrix heatmaps."
        ),
    )
    demo.add_argument("--out", default="cl-plugin-results", help="output folder (default: %(default)s)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds per benchmark (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=3, help="epochs per experience (default: %(default)s)")
    demo.add_argument(
        "--benchmark",
        action="append",
        help="benchmark name, repeatable (default: split_digits and rotated_digits); "
        "embedded: split_digits, permuted_digits, rotated_digits; from --dataset-root with the digits ViT: "
        "split_mnist (Avalanche's SplitMNIST, images brought to 8x8); from --dataset-root with a timm --model: "
        "split_mnist, permuted_mnist, rotated_mnist, split_fmnist, split_cifar100, split_cub200, core50",
    )
    demo.add_argument(
        "--dataset-root",
        help="folder with the dataset files of a non-embedded benchmark (for the MNIST ones: DIR/MNIST/raw/)",
    )
    demo.add_argument("--model", help="timm model name for a non-embedded benchmark, e.g. vit_base_patch16_224")
    demo.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights for --model")
    demo.add_argument("--n-experiences", type=int, help="experiences in the stream (default: 5 for digits)")
    demo.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    demo.add_argument("--lr", type=float, help="SGD learning rate (default: the benchmark's recipe)")
    demo.add_argument("--methods", help="comma-separated merging methods (default: all)")
    demo.add_argument("--no-from-scratch", action="store_true", help="skip the run without pretraining")
    demo.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    demo.add_argument(
        "--workers",
        type=int,
        help="processes for the independent runs, one thread each (default: 2 on a machine with 2 cores or more)",
    )
    demo.add_argument(
        "--no-validate",
        action="store_true",
        help="use each method's default scale instead of choosing it on the digits streams' validation data",
    )
    demo.set_defaults(func=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from cl_plugin.demo import DEMO_BENCHMARKS, METHODS, default_workers, run_demo

    run_demo(
        out=args.out,
        benchmarks=args.benchmark or DEMO_BENCHMARKS,
        seeds=args.seeds,
        epochs=args.epochs,
        methods=tuple(args.methods.split(",")) if args.methods else METHODS,
        from_scratch=not args.no_from_scratch,
        progress=not args.no_progress,
        model_name=args.model,
        pretrained=args.pretrained,
        dataset_root=args.dataset_root,
        n_experiences=args.n_experiences,
        batch_size=args.batch_size,
        lr=args.lr,
        validate=not args.no_validate,
        workers=args.workers if args.workers is not None else default_workers(),
    )
    return 0


def _list_methods(args: argparse.Namespace) -> int:
    from cl_plugin.merging import MERGERS
    from cl_plugin.merging.registry import option_names

    for name, cls in MERGERS.items():
        options = ", ".join(o for o in option_names(cls) if o != "scale") or "-"
        print(f"{name:16s} default scale {cls.default_scale:<5g} options: {options}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from cl_plugin.errors import ClPluginError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ClPluginError as exc:
        print(f"cl-plugin: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
