#!/usr/bin/env bash
# Every ShapesWorld benchmark at the sizes quoted in the README, in two lanes of one CPU thread each
# (this machine has 2 cores). Logs go to benchmarks/results/<name>.log, JSON to benchmarks/results/.
# The classifier (caption task) and D-TIIL runs store their fitted calibrations with the embedded model.
#   bash benchmarks/run_all.sh [PYTHON]
set -u
PY=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=benchmarks/results
run() { local name=$1; shift; echo "[$(date +%T)] start $name"; "$PY" "$@" > "$R/$name.log" 2>&1; echo "[$(date +%T)] done $name (rc $?)"; }
lane_a() {
  run shapesworld benchmarks/shapesworld.py --samples 200
  run shapesworld_g2 benchmarks/shapesworld.py --samples 200 --guidance 2 --biases-only --name shapesworld_g2
  run classifier benchmarks/classifier.py --images 24
  # the shipped temperature is fitted on the caption task (the other tasks hold no errors to fit)
  run classifier_caption benchmarks/classifier.py --tasks caption --images 60 --save-calibration --name classifier_caption
  run heatmaps benchmarks/heatmaps.py --images 100
  run erasure benchmarks/erasure.py --concepts circle,square,triangle,cross,red,purple --methods closed_form,neighbors \
      --token-positions word_to_eos --guide anchor --num-samples 8 --debias-samples 96 --debias-rounds 15
  run erasure_finetune benchmarks/erasure.py --concepts circle,red --methods finetune \
      --token-positions word_to_eos --guide anchor --num-samples 8 --no-sd15 --no-debias --name erasure_finetune
}
lane_b() {
  run inconsistency benchmarks/inconsistency.py --tune 120 --test 40 --save-calibration
  run tweaks benchmarks/tweaks.py --held-out tuned --multi 3 --tune-samples 40 --samples 200
  run audit benchmarks/audit.py --images 200 --diffusion-images 50 --render-images 1000 --render-diffusion-images 200 --speedup
  run pid benchmarks/pid.py --source rendered --images 60 --synonym-images 32 --bias-images 16 --samples 50
  run pid_generated benchmarks/pid.py --source generated --images 50 --synonym-images 16 --bias-images 8 --samples 50 --name pid_generated
  run pid_bands benchmarks/pid.py --bands --source rendered --images 30 --samples 50
}
lane_a & lane_b & wait
