#!/usr/bin/env bash
# The converged study (results/convergence/converged/): every cell trained until validation stops improving, best
# against best. One lane per cell, the lanes side by side (one thread each: two cells use the two cores); in a lane:
#   1. the grid of initial rates given for the cell, on tuning seeds 0 and 1 (sweep converge_tune_cpu);
#   2. while the tuning rule's choice sits at the grid's edge, the next factor-2 rate outward (scripts/converged_plan.py;
#      an extension that a stop left unfinished is resumed first);
#   3. five fresh seeds (100-104) at the chosen rate, with the test split on best.pt (sweep converge_final_cpu);
# then the report over everything done so far (scripts/converged_report.py). Every run is a Hydra job; a rerun skips
# finished runs and resumes stopped ones (last.pt), so the study can be stopped (Ctrl-C) and continued at any point.
#   bash scripts/converged_study.sh enwik8_sample lstm_1m=0.004,0.008,0.016 mlstm_paper_1m=0.002,0.004,0.008
# Environment: VENV (default .venv); OUT (default results/convergence/converged); RUN_ARGS (extra Hydra overrides for
# every run, e.g. a test's tiny models); MAX_EXTEND (default 4).
set -euo pipefail
DATASET=${1:?usage: scripts/converged_study.sh DATASET PRESET=r1,r2,r3 [PRESET=...]}
shift
[ $# -gt 0 ] || { echo "error: give at least one PRESET=r1,r2,r3" >&2; exit 2; }
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
OUT=${OUT:-results/convergence/converged}
RUN_ARGS=${RUN_ARGS:-}
MAX_EXTEND=${MAX_EXTEND:-4}

sweep() { # SWEEP, DIR, overrides...: one sequential multirun (the lanes are the parallelism)
    local name=$1 dir=$2
    shift 2
    echo "+ $name $*" >&2
    "$PY" -m mlstm.cli.train --multirun "+sweep=$name" "dataset=$DATASET" "$@" hydra/launcher=basic \
        "hydra.sweep.dir=$OUT/$dir" $RUN_ARGS
}

lane() { # PRESET GRID
    local preset=$1 grid=$2 plan previous="" extended=0
    sweep converge_tune_cpu runs "+variant=$preset" "optim.lr=$grid"
    while :; do
        plan=$("$PY" scripts/converged_plan.py --runs "$OUT/runs" --dataset "$DATASET" --preset "$preset")
        if [ "$plan" = "$previous" ]; then  # the sweep ran but the plan did not move: never loop on it
            echo "error: $preset on $DATASET: '$plan' again after its sweep; see $OUT/report.md" >&2
            return 1
        fi
        previous=$plan
        case "${plan%% *}" in
            resume) ;;  # an extension a stop left unfinished (or without one of its seeds): run it again
            extend)
                [ "$extended" -lt "$MAX_EXTEND" ] || break
                extended=$((extended + 1)) ;;
            *) break ;;
        esac
        sweep converge_tune_cpu runs "+variant=$preset" "optim.lr=${plan#* }"
    done
    if [ "${plan%% *}" != final ]; then
        echo "error: $preset on $DATASET: '$plan' after $extended extensions; see $OUT/report.md" >&2
        return 1
    fi
    sweep converge_final_cpu final "+variant=$preset" "optim.lr=${plan#final }"
}

pids=()
for spec in "$@"; do
    lane "${spec%%=*}" "${spec#*=}" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
finals=()  # no fresh seeds yet (a stopped or failed lane): the report shows the grids so far
[ -d "$OUT/final" ] && finals=(--final "$OUT/final")
"$PY" scripts/converged_report.py "${finals[@]}" --tuning "$OUT/runs" --out "$OUT" > /dev/null || status=1
echo "report: $OUT/report.md (exit status $status)"
exit "$status"
