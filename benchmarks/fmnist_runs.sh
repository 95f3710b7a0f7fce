#!/usr/bin/env bash
# The Fashion-MNIST runs behind the README's search-and-distillation table, Pareto plot and checkpoints, with
# bfloat16 autocast (see the README for what each step is and what it is short of).
# Every step resumes where it stopped: run the script again after an interruption.
# Usage: bash benchmarks/fmnist_runs.sh [RUNS_DIR]   (default runs/fmnist)
# Settings from the environment:
#   STEPS      the steps to run, of: teacher search students more plots (default: all five)
#   TEACHER    the teacher's weights when step 1 is not run (default RUNS_DIR/teacher/model.safetensors)
#   KD_EPOCHS  epochs of distillation for every student (default 30)
#   DEVICE     cpu or cuda (default cpu); WORKERS: loader processes per run (default 1)
#   PARALLEL=1 runs the two searches, then the four students, side by side (one GPU holds them all)
#   EXTRA      more arguments for every run (e.g. "--train-subset 512 --test-subset 256" for a smoke test)
# The published checkpoints came from two machines (each run's run.json is in checkpoints/fmnist/):
#   on this project's 2-core CPU, without a GPU: teacher, search and the μ = 0.3/0.5/0.7 students, with KD_EPOCHS
#     2, 6 and 1 (the search with a 7 s budget, priced by an older machine's cost table);
#   on one H200 lent to a later session: the MPCViT+ search and student (8 epochs, the four students side by side),
#     STEPS="search students" TEACHER=checkpoints/timm-mpc/mpcvit_tiny.fmnist_softmax/model.safetensors
#     DEVICE=cuda WORKERS=3 PARALLEL=1 KD_EPOCHS=8 bash benchmarks/fmnist_runs.sh RUNS_DIR
#   and the default's further distillation (10 epochs from the CPU's mu50_kd),
#     STEPS=more MU50_KD=<mu50_kd's weights> TEACHER=<as above> DEVICE=cuda WORKERS=6 bash benchmarks/fmnist_runs.sh RUNS_DIR
set -euo pipefail
R=${1:-runs/fmnist}
STEPS=${STEPS:-teacher search students more plots}
KD_EPOCHS=${KD_EPOCHS:-30}
COMMON="--amp --device ${DEVICE:-cpu} --workers ${WORKERS:-1} --mixup 0 --cutmix 0 --auto-augment none --drop-path 0 --weight-decay 0.05 ${EXTRA:-}"
SEARCH="--epochs 1 --train-subset 30000 --warmup-epochs 0 --lr 5e-4"
# the students start from the searched weights (the teacher's, one search epoch on): a cosine schedule without warmup
TUNE="--warmup-epochs 0 --lr 3e-4 --epochs $KD_EPOCHS"
step() { [[ " $STEPS " == *" $1 "* ]]; }
# run the commands given one per argument one after another, or side by side with PARALLEL=1 (failing if any fails)
runs() {
  if [ "${PARALLEL:-0}" != 1 ]; then for c in "$@"; do eval "$c"; done; return; fi
  local pids=() c p
  for c in "$@"; do eval "$c" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
}

# 1. the all-Softmax teacher
T=${TEACHER:-$R/teacher/model.safetensors}
if step teacher; then
  timm-mpc train --output $R/teacher --epochs 30 --warmup-epochs 2 --lr 1e-3 $COMMON
fi

# 2. MPC-aware search from the teacher's weights (α per head, cost-weighted L1), binarized to μ and a budget;
# 3. MPCViT+: α and β (per token) searched together, half of the GeLU tokens kept
if step search; then
  runs \
  "timm-mpc search --output $R/search --init-from $T --lam 1e-3 --cost-weighted \
    --mu 0.1 0.3 0.5 0.7 --budget-s 10.0 --network lan $SEARCH $COMMON" \
  "timm-mpc search --output $R/search_plus --init-from $T --lam 1e-3 --search-gelu --lam-beta 1e-3 \
    --gelu-keep 0.5 --mu 0.5 $SEARCH $COMMON"
fi

# 4. retrain the binarized patterns with token-level KD from the teacher
if step students; then
  runs \
  "timm-mpc retrain --output $R/mu50_kd --searched $R/search/mu50.safetensors --teacher $T $TUNE $COMMON" \
  "timm-mpc retrain --output $R/mu30_kd --searched $R/search/mu30.safetensors --teacher $T $TUNE $COMMON" \
  "timm-mpc retrain --output $R/mu70_kd --searched $R/search/mu70.safetensors --teacher $T $TUNE $COMMON" \
  "timm-mpc retrain --output $R/plus_mu50_kd --searched $R/search_plus/mu50.safetensors --teacher $T $TUNE $COMMON"
fi

# 4b. the default checkpoint (μ = 0.5) distilled further: a second, lower cosine schedule from its weights
# (MU50_KD: those weights, default RUNS_DIR/mu50_kd/model.safetensors)
if step more; then
  timm-mpc retrain --output $R/mu50_kd_more --searched ${MU50_KD:-$R/mu50_kd/model.safetensors} --teacher $T \
    --warmup-epochs 0 --lr 1e-4 --epochs ${MORE_EPOCHS:-10} $COMMON
fi

if step plots; then
  # 5. the table and the plot, every run priced by this machine's cost table (the runs come from several machines)
  timm-mpc pareto --reprice $R/teacher $R/mu30_kd $R/mu50_kd $R/mu50_kd_more $R/mu70_kd $R/plus_mu50_kd --out benchmarks/results/fmnist_pareto.png \
    --table benchmarks/results/fmnist_pareto.md --title "mpcvit_tiny on Fashion-MNIST: accuracy against estimated secure latency"
  # 6. the learning curves of the teacher and the students (issue 13: a PNG in the README)
  timm-mpc curves $R/teacher $R/mu50_kd $R/mu50_kd_more $R/mu30_kd $R/mu70_kd $R/plus_mu50_kd --out benchmarks/results/fmnist_curves.png \
    --title "mpcvit_tiny on Fashion-MNIST: teacher and students"
fi
