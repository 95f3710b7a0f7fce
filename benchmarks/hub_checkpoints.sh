#!/usr/bin/env bash
# The published Fashion-MNIST checkpoints: write each Hub repository folder from its training run, re-measure it
# from the stored weights loaded the Hub way (timm.create_model("mpcvit_tiny.TAG", pretrained=True) from a Hub
# cache seeded with the folder, offline): top-1 on the 10,000 test images in plain text, on the first 1,000 under
# two-party MPC (the owner calibrating on 64 training images), and one image's secure cost against the all-Softmax
# model. Then render each card from those figures into the folder (README.md, results.json) and hub_cards/, record
# the default checkpoint's logits on the shipped examples (the tests' reference) and score every folder through the
# cards' own usage snippet (benchmarks/card_check.py).
# Usage: bash benchmarks/hub_checkpoints.sh [RUNS_DIR [RUN]]   (RUNS_DIR default runs/fmnist, as written by
# fmnist_runs.sh; RUN, e.g. mu50_kd_more, does that one only; SECURE_IMAGES=N measures N images under MPC for every
# checkpoint, default 1000 for the default tag and SECURE_OTHERS=100 for the others: the default's 1,000 took
# about 40 minutes on a 2-core machine with AVX512, about 100 on a slower AVX2 one with other work beside it)
set -euo pipefail
RUNS=${1:-runs/fmnist}
ONLY=${2:-}
OUT=checkpoints/timm-mpc
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export HF_HUB_CACHE=$TMP/hub HF_HUB_OFFLINE=1
DEFAULT_RUN=mu50_kd_more DEFAULT=mpcvit_tiny.fmnist_mu50_kd  # the default tag and the run it comes from
for PAIR in mu50_kd_more:fmnist_mu50_kd mu70_kd:fmnist_mu70_kd mu30_kd:fmnist_mu30_kd plus_mu50_kd:fmnist_plus_mu50_kd \
            teacher:fmnist_softmax; do
  RUN=${PAIR%%:*} NAME=mpcvit_tiny.${PAIR##*:}
  IMAGES=${SECURE_IMAGES:-$([ "$NAME" = "$DEFAULT" ] && echo 1000 || echo "${SECURE_OTHERS:-100}")}
  [ -z "$ONLY" ] || [ "$ONLY" = "$RUN" ] || continue
  DIR=$OUT/$NAME
  WEIGHTS=$RUNS/$RUN/model.safetensors RECORD=$RUNS/$RUN/run.json
  if [ -f "$WEIGHTS" ]; then
    timm-mpc publish "$WEIGHTS" --repo "timm-mpc/$NAME" --dry-run "$DIR"
  fi
  timm-mpc seed-cache "$DIR"
  timm-mpc eval --model "$NAME" --secure-images "$IMAGES" --secure-batch 16 --json "$TMP/$NAME.json"
  # without the training run here, the folder's own training record is kept
  RUN_ARGS=() && [ -f "$RECORD" ] && RUN_ARGS=(--run "$RECORD")
  timm-mpc publish "$DIR" --repo "timm-mpc/$NAME" --dry-run "$DIR" --results "$TMP/$NAME.json" "${RUN_ARGS[@]}"
  cp "$DIR/README.md" "hub_cards/$NAME.md"
done
[ -z "$ONLY" ] || [ "$ONLY" = "$DEFAULT_RUN" ] && python - "$DEFAULT" <<'EOF'
import json, sys, timm, torch, timm_mpc
from timm_mpc.data import example_images
images, labels = example_images()
with torch.no_grad():
    logits = timm.create_model(sys.argv[1], pretrained=True).eval()(images)
about = (f'Logits of the published {sys.argv[1]} (the default tag) on timm_mpc.data.example_images() (timm\'s eval '
         f'transform), recorded when it was published (timm {timm.__version__}, torch {torch.__version__}, CPU, '
         'float32); a regression reference.')
record = dict(about=about, labels=labels.tolist(), logits=[[round(v, 6) for v in row] for row in logits.tolist()])
open(f'tests/reference/{sys.argv[1]}_logits.json', 'w').write(json.dumps(record, indent=1) + '\n')
EOF
[ -n "$ONLY" ] || python benchmarks/card_check.py "$OUT"
