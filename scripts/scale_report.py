"""The size-ladder report: does the mLSTM's advantage over the LSTM grow with model size?

    python scripts/scale_report.py --final results/convergence/scale/final results/convergence/tuned/final \
        --tuning results/convergence/scale/runs results/convergence/tuned/runs --out results/convergence/scale

Reads every run directory (metrics.jsonl + config.yaml) under the given paths. A run's rung (model size) is the
variant preset in its path (`<dataset>/<preset>/lr<rate>-seed<seed>`, e.g. lstm_300k), else its parameter count.
Writes to --out: report.md, scale_summary.csv, selection.json (the tuning rule per cell and rung: the rate to run the
fresh seeds at, or the rate to extend a grid to) and <dataset>_scale.png (characters to the LSTM's best level as a
ratio to the LSTM against parameters; final validation and training bpc against parameters). With --tuning alone,
only the selection is reported. The analysis: `mlstm.studies.scaling`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlstm.cli import exit_on_user_error
from mlstm.studies import scaling_report


def parse_target(text: str) -> tuple[str, float]:
    name, _, level = text.rpartition("=")
    try:
        return name, float(level)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DATASET=LEVEL (e.g. enwik8_head3M=3.4), got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--final", nargs="*", default=[], help="run directories (or roots) of the fresh-seed runs")
    p.add_argument("--tuning", nargs="*", default=[], help="run directories (or roots) of the learning-rate grids")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, the figures and the tables")
    p.add_argument(
        "--target",
        type=parse_target,
        action="append",
        default=[],
        help="also a fixed level for one dataset, DATASET=LEVEL (repeatable), e.g. enwik8_head3M=3.4",
    )
    p.add_argument(
        "--variants",
        help="comma-separated cell labels to keep (default: all), e.g. "
        "mlstm-paper,mlstm-seed-gated; the LSTM is always kept",
    )
    p.add_argument("--title", help="the report's title")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(
        scaling_report.report_from_runs(
            args.final, args.tuning, args.out, args.target, args.variants, args.title, figures=not args.no_figures
        ),
        end="",
    )


if __name__ == "__main__":
    main()
