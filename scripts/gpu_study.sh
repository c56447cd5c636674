#!/usr/bin/env bash
# The size ladder on one GPU, in at most 8 minutes on one H200: does the mLSTM's advantage over the LSTM grow with
# model size? For the LSTM, the paper-form mLSTM and the seed cell with the gated output at about 0.3M, 1.2M, 4.8M and
# 20M parameters (configs/variant/*_300k|_1m|_5m|_20m), on the enwik8 and text8 samples: a factor-2 grid of 3 learning
# rates per cell and size, the rule of mlstm.studies.tuning (one extension when the choice sits at the grid's edge), then 3
# fresh seeds at the chosen rate; every run the recipe of the CPU study (configs/sweep/convergence_cpu: 800 steps of
# 32 x 100 characters, about one epoch of the enwik8 sample) in bf16 with the fast kernels. Before that, 20 timed
# training steps of each paper preset (bf16, its own batch and segment size) -> measured GPU-hours per paper row.
#
#   bash scripts/gpu_study.sh DATA_DIR OUT            # DATA_DIR holds enwik8_head3M.xml and text8_head2M.txt
#   bash scripts/gpu_study.sh --dry-run DATA_DIR OUT  # the same steps on the CPU: tiny models, 4 steps (a test)
#
# Writes OUT/log.txt (everything printed), OUT/env.txt, OUT/plan.json, OUT/jobs.jsonl (every run: seconds, score,
# status), OUT/runs/ and OUT/final/ (<dataset>/<preset>/lr<rate>-seed<seed>/{metrics.jsonl,config.yaml}: tuning runs
# and fresh seeds), OUT/paper/ (the timing runs), OUT/gpu_hours.{md,json}, OUT/groups.json, and the report
# (scripts/scale_report.py): OUT/report.md, OUT/scale_summary.csv, OUT/selection.json, OUT/<dataset>_scale.png.
# Checkpoints stay in WORK. Rerunning with the same OUT trains only what is missing (finished runs are skipped).
# The GPU machine has no network: nothing is downloaded; hydra-core, omegaconf and antlr4 come from ./.gpu_site or
# ./.whl as for scripts/gpu_check.sh (results/bench/README.md).
#
# Environment: DRY_RUN=1 (= --dry-run); PYTHON (default .venv's python, else python3); WORK (scratch, default a fresh
# temporary folder, removed at the end); JOBS (runs at once, default 12); DEADLINE_S (the Python driver's deadline,
# default 400 s: no run starts that would end later, and what still runs then is killed); MPS (default 1 on CUDA:
# start an MPS control daemon of this script's own, in WORK, for the duration of the study, so the small kernels of
# concurrent runs share the GPU's SMs instead of taking turns; 0: plain time-slicing; the GPU's settings are not
# touched); STUDY_ARGS (extra flags of scripts/gpu_study.py, e.g. "--rungs 300k,1m --tune-seeds 0,1
# --grid 20m=0.00025,0.0005,0.001 --skip-paper").
#
# Budget (one H200; from results/bench/gpu.md, bf16, B=128, T=200, one whole training step): mLSTM paper form
# 9.53 ms/step at H=1024 and 17.60 at H=2048, i.e. 47.6 and 88.0 us per time step forward + backward; seed form 19.09
# at H=2048 (95.5 us); nn.LSTM 10.14 and 13.70 (50.7 and 68.5 us). A step here is B=32 x T=100: 100 time steps whose
# products have a quarter of the rows, and at these widths a time step costs what its kernels' latency costs, so take
# those per-time-step costs as the estimate:
#   training, 800 steps:   20M (H = 1900 / 1727 / 2133 ~ the H=2048 rows)  <= 100 x 95.5 us = 9.6 ms/step -> 7.7 s
#                          4.8M and below (H <= 1037 ~ the H=1024 rows)     <= 100 x 50.7 us = 5.1 ms/step -> 4.1 s
#   validation:            50k characters as 4 streams = 12,500 time steps forward (~1/3 of a training time step):
#                          <= 0.40 s (20M) / 0.21 s per validation, 9 of them (every 100 steps) -> 3.6 s / 1.9 s;
#                          the fresh seeds also read the 150k-character test split as 4 streams: 1.2 s / 0.6 s
#   set-up per run (config, model, the first CUDA-graph captures, the end checkpoint): ~2 s
#   -> per run ~13 s at 20M, ~8 s below (the LSTM less)
#   runs: 2 datasets x 3 cells x 4 sizes x (3 rates x 1 tuning seed + 3 fresh seeds) = 144 (36 at 20M, 108 below),
#         plus at most 24 one-rate grid extensions
#   -> one at a time: 36 x 13 s + 108 x 8 s = 1,332 s of GPU work (~22 min), ~1,500 s with every extension
#   paper presets: 4 x (build + 30 steps of at most ~50 ms + a 0.5 GB checkpoint) <= ~60 s, one at a time, first
#   the ladder gets what is left of DEADLINE_S=400 s after that: ~340 s, so it needs ~4x from running 12 at once.
#   Each run leaves the GPU idle while Python works between its steps (the trainer synchronises around every step,
#   validation reads a number back per segment); under plain time-slicing the runs only fill those gaps (~1.3x), with
#   MPS their kernels, each on a few of the 132 SMs at B=32, run side by side. Report: ~15 s. Total <= ~7.5 min;
#   whatever the estimate misses, DEADLINE_S keeps the script within 8 minutes and the report lists what is missing
#   (jobs.jsonl: "skipped"/"killed"), to be finished by running the same command again with the same OUT.
#   The log's per-run seconds (jobs.jsonl) are the measurement to set JOBS, the grids and DEADLINE_S from next time.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
if [ $# -ne 2 ]; then
  echo "usage: bash scripts/gpu_study.sh [--dry-run] DATA_DIR OUT" >&2
  exit 2
fi
DATA_DIR=$1
OUT=$2
if [ ! -d "$DATA_DIR" ]; then echo "error: data directory $DATA_DIR not found" >&2; exit 2; fi
DATA_DIR=$(cd "$DATA_DIR" && pwd)
if [ ! -f "$DATA_DIR/enwik8_head3M.xml" ] && [ ! -f "$DATA_DIR/text8_head2M.txt" ]; then
  echo "error: neither enwik8_head3M.xml nor text8_head2M.txt is in $DATA_DIR" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d); CLEAN_WORK=1; else CLEAN_WORK=0; fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
MPS_STARTED=0
cleanup() {
  if [ "$MPS_STARTED" = 1 ]; then echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true; fi
  if [ "$CLEAN_WORK" = 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "== gpu_study.sh $(date -u +%FT%TZ): DATA_DIR=$DATA_DIR OUT=$OUT WORK=$WORK DRY_RUN=$DRY_RUN"

export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"; fi
if [ -d .whl ] && ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl \
    && export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

{ date -u; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PYTHON" - <<'PY' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "hydra", "omegaconf", "triton", "matplotlib", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "not available:", type(error).__name__)
import torch
print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
} > "$OUT/env.txt" 2>&1 || true
cat "$OUT/env.txt"

ARGS=(--data "$DATA_DIR" --out "$OUT" --work "$WORK")
if [ "$DRY_RUN" = 1 ]; then
  ARGS+=(--dry-run)
  DEADLINE_S=${DEADLINE_S:-1800}  # a test, maybe on a busy machine: here the deadline only guards against a hang
  MPS=0
else
  DEADLINE_S=${DEADLINE_S:-400}
  MPS=${MPS:-1}
fi
ARGS+=(--deadline-s "$DEADLINE_S")
if [ -n "${JOBS:-}" ]; then ARGS+=(--jobs "$JOBS"); fi

if [ "$MPS" = 1 ]; then
  if command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    export CUDA_MPS_PIPE_DIRECTORY="$WORK/mps_pipe" CUDA_MPS_LOG_DIRECTORY="$WORK/mps_log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
      MPS_STARTED=1; echo "MPS control daemon started (pipe $CUDA_MPS_PIPE_DIRECTORY); stopped at exit"
    else
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
      echo "MPS could not start: the runs share the GPU by time-slicing"
    fi
  else
    echo "nvidia-cuda-mps-control not found: the runs share the GPU by time-slicing"
  fi
fi

status=0
echo "== the paper presets' step times and the size ladder (deadline ${DEADLINE_S}s)"
# the driver keeps its own deadline; the timeout only guards against a hang past it
# shellcheck disable=SC2086
timeout -k 10 "$((DEADLINE_S + 120))" "$PYTHON" scripts/gpu_study.py "${ARGS[@]}" ${STUDY_ARGS:-} || status=$?
echo "gpu_study.py exit status: $status (0 all done, 1 a run failed, 3 the deadline, 124 timeout)"

echo "== the report"
REPORT=()
if compgen -G "$OUT/final/*/*/*/metrics.jsonl" >/dev/null; then REPORT+=(--final "$OUT/final"); fi
if compgen -G "$OUT/runs/*/*/*/metrics.jsonl" >/dev/null; then REPORT+=(--tuning "$OUT/runs"); fi
TITLE="The size ladder on one GPU: does the mLSTM advantage grow with model size?"
if [ "$DRY_RUN" = 1 ]; then TITLE="DRY RUN (tiny models, 4 steps, CPU): the size ladder"; fi
if [ ${#REPORT[@]} -gt 0 ]; then
  "$PYTHON" scripts/scale_report.py "${REPORT[@]}" --out "$OUT" --title "$TITLE" > "$OUT/report.log" 2>&1 \
    || { [ "$status" -ne 0 ] || status=1; echo "scale_report.py failed:"; }
  tail -n 20 "$OUT/report.log"
else
  echo "no finished runs: no report" | tee "$OUT/report.md"
  [ "$status" -ne 0 ] || status=1
fi
echo "== done $(date -u +%FT%TZ): exit status $status; OUT=$OUT"
exit "$status"
