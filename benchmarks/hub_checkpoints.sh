#!/usr/bin/env bash
# The published Fashion-MNIST checkpoints: write each Hub repository folder from its training run, re-measure it
# from the stored weights loaded the Hub way (timm.create_model("mpcvit_tiny.TAG", pretrained=True) from a Hub
# cache seeded with the folder, offline): top-1 on the 10,000 test images in plain text, on the first 1,000 under
# two-party MPC (the owner calibrating on 64 training images), and one image's secure cost against the all-Softmax
# model. Then render each card from those
# figures into the folder (README.md, results.json) and hub_cards/.
# Usage: bash benchmarks/hub_checkpoints.sh [RUNS_DIR [RUN]]   (RUNS_DIR default runs/fmnist, as written by
# fmnist_runs.sh; RUN, e.g. mu50_kd, does that one only; SECURE_IMAGES=N measures N images under MPC, default 1000)
set -euo pipefail
RUNS=${1:-runs/fmnist}
ONLY=${2:-}
OUT=checkpoints/timm-mpc
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export HF_HUB_CACHE=$TMP/hub HF_HUB_OFFLINE=1
for PAIR in mu70_kd:fmnist_mu70_kd mu50_kd:fmnist_mu50_kd mu30_kd:fmnist_mu30_kd plus_mu50_kd:fmnist_plus_mu50_kd \
            teacher:fmnist_softmax; do
  RUN=${PAIR%%:*} NAME=mpcvit_tiny.${PAIR##*:}
  [ -z "$ONLY" ] || [ "$ONLY" = "$RUN" ] || continue
  DIR=$OUT/$NAME
  if [ -f "$RUNS/$RUN/model.safetensors" ]; then
    timm-mpc publish "$RUNS/$RUN/model.safetensors" --repo "timm-mpc/$NAME" --dry-run "$DIR"
  fi
  timm-mpc seed-cache "$DIR"
  timm-mpc eval --model "$NAME" --secure-images "${SECURE_IMAGES:-1000}" --secure-batch 16 --json "$TMP/$NAME.json"
  # without the training run here, the folder's own training record is kept
  RUN_ARGS=() && [ -f "$RUNS/$RUN/run.json" ] && RUN_ARGS=(--run "$RUNS/$RUN/run.json")
  timm-mpc publish "$DIR" --repo "timm-mpc/$NAME" --dry-run "$DIR" --results "$TMP/$NAME.json" "${RUN_ARGS[@]}"
  cp "$DIR/README.md" "hub_cards/$NAME.md"
done
