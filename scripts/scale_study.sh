#!/usr/bin/env bash
# The size ladder on CPU (results/convergence/scale/) on one dataset sample, from the repository root. One rung at a
# time, so a stopped study has whole rungs to show (0.3M: the LSTM, the paper-form mLSTM and the gated seed cell;
# 4.8M: the LSTM and the paper form, what a 2-core machine affords):
#   1. each cell's grid of 3 factor-2 rates centred on its tuned 1.2M choice, tuning seeds 0 and 1
#      (scripts/scale_plan.py, the rule of mlstm.studies.scale_plan; sweep scale_tune_cpu);
#   2. every extension the rule asks for (a choice at a grid's edge), until each choice is strictly inside;
#   3. four fresh seeds (100-103) of every cell at its chosen rate, with the test split (scale_final_cpu);
#   4. the report over every rung done so far, the 1.2M rung being the tuned study's (scripts/scale_report.py).
# Every run is a Hydra job of the joblib launcher, two at a time; a rerun skips every finished run.
#   bash scripts/scale_study.sh enwik8_sample            # 0.3M then 4.8M: ~45 min + ~6 h of a 2-core machine
#   bash scripts/scale_study.sh enwik8_sample 300k       # one rung
# Environment: VENV; SCALE (default results/convergence/scale: runs/, final/ and the report go there); TUNED (default
# results/convergence/tuned: the 1.2M rung, whose choices centre the grids); RUN_ARGS (extra Hydra overrides for every
# run, e.g. the test's tiny models); CELLS_300k, CELLS_5m (the cells of a rung, comma-separated).
set -euo pipefail
DATASET=${1:?usage: scripts/scale_study.sh enwik8_sample|text8_sample [300k|5m ...]}
shift
RUNGS=("$@")
[ ${#RUNGS[@]} -gt 0 ] || RUNGS=(300k 5m)
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
SCALE=${SCALE:-results/convergence/scale}
TUNED=${TUNED:-results/convergence/tuned}
RUN_ARGS=${RUN_ARGS:-}
declare -A CELLS=([300k]=${CELLS_300k:-lstm,mlstm_paper,mlstm_seed_gated} [5m]=${CELLS_5m:-lstm,mlstm_paper})

run() { echo "+ $*" >&2; make VENV="$VENV" "$@"; }
run_planned() { # a `make sweep SWEEP=... ARGS="..."` line printed by scripts/scale_plan.py, into $SCALE
    local line=$1 dir=runs
    grep -q "SWEEP=scale_final_cpu" <<<"$line" && dir=final
    line="${line%\"} hydra.sweep.dir=$SCALE/$dir $RUN_ARGS\""
    eval "run ${line#make }"
}

for rung in "${RUNGS[@]}"; do
    [ -n "${CELLS[$rung]:-}" ] || { echo "error: unknown rung $rung (known: ${!CELLS[*]})" >&2; exit 2; }
    for _ in 1 2 3 4 5 6 7; do  # round 1 runs the grids; each later round extends every edge choice by one rate
        plan=$("$PY" scripts/scale_plan.py "$DATASET" --rung "$rung=${CELLS[$rung]}" --tuned "$TUNED/runs" \
               --runs "$SCALE/runs")
        grep -q "SWEEP=scale_tune_cpu" <<<"$plan" || break
        while IFS= read -r line; do
            grep -q "SWEEP=scale_tune_cpu" <<<"$line" && run_planned "$line"
        done <<<"$plan"
    done
    if grep -q "SWEEP=scale_tune_cpu" <<<"$plan"; then
        echo "error: a $rung choice is still at its grid's edge after 6 extensions; see scripts/scale_report.py" >&2
        exit 1
    fi
    while IFS= read -r line; do [ -n "$line" ] && run_planned "$line"; done <<<"$plan"
done

"$PY" scripts/scale_report.py --final "$SCALE/final" "$TUNED/final" --tuning "$SCALE/runs" "$TUNED/runs" \
    --variants mlstm-paper,mlstm-seed-gated --out "$SCALE"
