#!/usr/bin/env bash
# One GPU session's checks and measurements, each step under a timeout, about 9 minutes at most (usually far less):
#   1. scripts/gpu_selfcheck.py: the Triton kernels and CUDA graphs against the reference layer  ->  $OUT/selfcheck.log
#   2. scripts/bench.py --preset gpu  ->  $OUT/bench_gpu.json, $OUT/bench_gpu.md, $OUT/bench.log
#   3. ablation: mlstm-paper:fast at H=1024 without CUDA graphs, and without graphs and Triton  ->  $OUT/ablation.md
#   4. scripts/gpu_profile.py: the per-step products alone, and a step's kernels  ->  $OUT/profile.log
#   5. a short bf16 training of the fast mLSTM on the enwik8 sample  ->  $OUT/train/{metrics.jsonl,config.yaml,train.log}
# plus $OUT/env.txt (nvidia-smi, versions). Only a few small files go to $OUT (checkpoints stay in $WORK).
#
#   OUT=gpu_out bash scripts/gpu_check.sh            # run from the repository root
# Environment: OUT (default ./gpu_out); WORK (scratch, default a fresh temporary folder); PYTHON (default .venv's
# python, else python3); SAMPLE (a text file to train on when the enwik8 sample is not found); CHECK_TIMEOUT (s, 90),
# BENCH_TIMEOUT (s, 200), ABLATION_TIMEOUT (s, 60 each), PROFILE_TIMEOUT (s, 90), TRAIN_TIMEOUT (s, 110);
# SKIP (words: selfcheck bench ablation profile train); BENCH_ARGS / TRAIN_ARGS / CHECK_ARGS / PROFILE_ARGS (extra
# flags / Hydra overrides, appended, so they win: a CPU dry run is BENCH_ARGS="--device cpu --hidden 32 --batch 4
# --seq-len 10 --iters 1 --warmup 0" TRAIN_ARGS="trainer.device=cpu trainer.precision=fp32 cell.hidden_size=32 trainer.max_steps=3 trainer.batch_size=4 trainer.eval_batch_size=4 ...").
# No internet: hydra-core, omegaconf and antlr4 (pure Python) are taken from ./.gpu_site when present (copied there
# from .venv's site-packages; see results/bench/README.md), or installed from wheels in ./.whl when present.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK"
CHECK_TIMEOUT=${CHECK_TIMEOUT:-90}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
ABLATION_TIMEOUT=${ABLATION_TIMEOUT:-60}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-110}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-90}
SKIP=" ${SKIP:-} "
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"; fi
if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null && [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
status=0

{ date -u; nvidia-smi 2>&1 || echo "nvidia-smi: not available";
  "$PYTHON" -c "import sys, torch; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$PYTHON" -c "import hydra, omegaconf; print('hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)" 2>&1
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ "$SKIP" != *" selfcheck "* ]]; then
  echo "== 1/5 the Triton kernels and CUDA graphs against the reference (timeout ${CHECK_TIMEOUT}s)"
  timeout -k 10 "$CHECK_TIMEOUT" "$PYTHON" scripts/gpu_selfcheck.py ${CHECK_ARGS:-} > "$OUT/selfcheck.log" 2>&1
  rc=$?; cat "$OUT/selfcheck.log"; echo "selfcheck exit status: $rc"; [ $rc -eq 0 ] || status=1
fi

if [[ "$SKIP" != *" bench "* ]]; then
  echo "== 2/5 bench --preset gpu (timeout ${BENCH_TIMEOUT}s)"
  # rows are rewritten after each one: a timeout still leaves the rows measured so far
  timeout -k 10 "$BENCH_TIMEOUT" "$PYTHON" scripts/bench.py --preset gpu --json "$OUT/bench_gpu.json" \
    --markdown "$OUT/bench_gpu.md" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  rc=$?; cat "$OUT/bench.log"; echo "bench exit status: $rc"; [ $rc -eq 0 ] || status=1
  rm -f "$OUT"/*.tmp
fi

if [[ "$SKIP" != *" ablation "* ]]; then
  echo "== 3/5 ablation: without CUDA graphs; without graphs and Triton (timeout ${ABLATION_TIMEOUT}s each)"
  : > "$OUT/ablation.md"
  for switches in "MLSTM_CUDA_GRAPH=0" "MLSTM_CUDA_GRAPH=0 MLSTM_TRITON=0"; do
    echo "### $switches" >> "$OUT/ablation.md"
    env $switches timeout -k 10 "$ABLATION_TIMEOUT" "$PYTHON" scripts/bench.py --device cuda --dtype bf16 \
      --init torch --cells mlstm-paper:fast --hidden 1024 --batch 128 --seq-len 200 --embedding 128 --vocab 205 --no-baselines --markdown "$WORK/ablation_part.md" ${BENCH_ARGS:-} > "$WORK/ablation.log" 2>&1
    rc=$?; cat "$WORK/ablation.log"; [ $rc -eq 0 ] || status=1
    cat "$WORK/ablation_part.md" >> "$OUT/ablation.md" 2>/dev/null || echo "(no rows: exit status $rc)" >> "$OUT/ablation.md"
  done
fi

if [[ "$SKIP" != *" profile "* ]]; then
  echo "== 4/5 per-step products, and one training step's kernels (timeout ${PROFILE_TIMEOUT}s)"
  timeout -k 10 "$PROFILE_TIMEOUT" "$PYTHON" scripts/gpu_profile.py ${PROFILE_ARGS:-} > "$OUT/profile.log" 2>&1
  rc=$?; cat "$OUT/profile.log"; echo "profile exit status: $rc"; [ $rc -eq 0 ] || status=1
fi

echo "== 5/5 short bf16 training of the fast mLSTM (timeout ${TRAIN_TIMEOUT}s)"
SHARED=${MLSTM_SHARED_DATA:-../shared/data}
DATA=()
if [ -f "$SHARED/enwik8_head3M.xml" ]; then
  export MLSTM_SHARED_DATA=$(cd "$SHARED" && pwd); DATA=(dataset=enwik8_sample)
elif [ -f shared/data/enwik8_head3M.xml ]; then
  export MLSTM_SHARED_DATA=$PWD/shared/data; DATA=(dataset=enwik8_sample)
elif [ -n "${SAMPLE:-}" ] && [ -f "$SAMPLE" ]; then
  DATA=(dataset=file "dataset.path='$(cd "$(dirname "$SAMPLE")" && pwd)/$(basename "$SAMPLE")'")
fi
if [[ "$SKIP" == *" train "* ]]; then
  echo "training skipped (SKIP)"
elif [ ${#DATA[@]} -eq 0 ]; then
  echo "training SKIPPED: no enwik8 sample ($SHARED/enwik8_head3M.xml or shared/data/enwik8_head3M.xml) and no" \
       "SAMPLE=<text file> given; nothing can be downloaded here" | tee "$OUT/train_skipped.txt"
else
  mkdir -p "$OUT/train"
  MLSTM_DATA_DIR="$WORK/data_cache" timeout -k 10 "$TRAIN_TIMEOUT" "$PYTHON" -m mlstm.cli.train \
    trainer=gpu trainer.precision=bf16 "${DATA[@]}" logger=none optim=adam \
    cell=mlstm cell.form=paper cell.impl=fast cell.hidden_size=1024 model.embedding_size=128 \
    trainer.batch_size=128 trainer.seq_len=200 trainer.max_steps=300 trainer.log_every=10 \
    trainer.eval_every=100 trainer.eval_chars=100000 trainer.eval_batch_size=100 trainer.test_at_end=false \
    trainer.checkpoint_every=300 trainer.max_time_s=75 trainer.progress=false \
    "hydra.run.dir=$WORK/train" ${TRAIN_ARGS:-} > "$OUT/train/train.log" 2>&1
  rc=$?; tail -n 40 "$OUT/train/train.log"; echo "train exit status: $rc"; [ $rc -eq 0 ] || status=1
  cp "$WORK/train/metrics.jsonl" "$OUT/train/metrics.jsonl" 2>/dev/null || { echo "no metrics.jsonl written"; status=1; }
  cp "$WORK/train/.hydra/config.yaml" "$OUT/train/config.yaml" 2>/dev/null || true
fi
exit $status
