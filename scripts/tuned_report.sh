#!/usr/bin/env bash
# The tuned study's report (results/convergence/tuned/report.md, summary.csv, figures) from its committed runs, with
# the shared-rate study beside it: every cell at Adam 1e-3, seeds 0-2 (the LSTM and the paper form from the rerun
# on a quiet machine, the gated seed cell from seed_output, the posted seed cell from cpu_samples), and the labelled
# post-hoc check (tuned_posthoc_cpu) where it has runs.
set -euo pipefail
VENV=${VENV:-.venv}
"$VENV/bin/python" scripts/tune.py report --tuning results/convergence/tuned/runs \
    --final results/convergence/tuned/final --posthoc results/convergence/tuned/posthoc \
    --shared results/convergence/rerun/runs results/convergence/seed_output/runs \
             'results/convergence/cpu_samples/runs/*/mlstm-seed-h406-seed*' \
    --targets enwik8_head3M=4.5,4.0,3.6,3.4 --targets text8_head2M=3.6,3.2,3.0,2.8 \
    --out results/convergence/tuned
