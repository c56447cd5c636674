#!/usr/bin/env bash
# The tuned study (results/convergence/tuned/) on one dataset sample, from the repository root:
#   1. the grid: Adam 1e-3 .. 3.2e-2 in factor-2 steps for the LSTM, the paper-form mLSTM and the gated seed cell on
#      tuning seeds 0 and 1, and for the posted seed cell on seed 0 (tune_lr_cpu; 42 runs);
#   2. every grid extension the rule asks for (a choice at a grid's edge), until each choice is strictly inside;
#   3. five fresh seeds (100-104) of every cell at its chosen rate, with the test split (tuned_final_cpu; 20 runs);
#   4. the report over every dataset done so far.
# Every run is a Hydra job of the joblib launcher, two at a time; a rerun skips every finished run, so the study can
# be stopped and continued at any point.
#   bash scripts/tuned_study.sh enwik8_sample        # about 2.5 hours of a 2-core machine
#   bash scripts/tuned_study.sh text8_sample
set -euo pipefail
DATASET=${1:?usage: scripts/tuned_study.sh enwik8_sample|text8_sample}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
RUNS=results/convergence/tuned/runs

run() { echo "+ $*" >&2; make VENV="$VENV" "$@"; }
run_planned() { # a `make sweep ...` line printed by scripts/tune.py plan
    local line=$1
    eval "run ${line#make }"
}

run sweep SWEEP=tune_lr_cpu ARGS="dataset=$DATASET"
run sweep SWEEP=tune_lr_cpu ARGS="dataset=$DATASET +variant=mlstm_seed_1m seed=0"
for _ in 1 2 3 4 5 6; do  # each round extends every edge choice by one factor-2 rate
    plan=$("$PY" scripts/tune.py plan "$RUNS/$DATASET")
    grep -q "SWEEP=tune_lr_cpu" <<<"$plan" || break
    while IFS= read -r line; do run_planned "$line"; done <<<"$plan"
done
plan=$("$PY" scripts/tune.py plan "$RUNS/$DATASET")
if grep -q "SWEEP=tune_lr_cpu" <<<"$plan"; then
    echo "error: a chosen rate is still at its grid's edge after 6 extensions; see scripts/tune.py select $RUNS/$DATASET" >&2
    exit 1
fi
while IFS= read -r line; do [ -n "$line" ] && run_planned "$line"; done <<<"$plan"
bash scripts/tuned_report.sh
