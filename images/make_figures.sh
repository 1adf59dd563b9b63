#!/usr/bin/env bash
# Makes the README's figures from a CPU smoke run with RANDOM weights (no downloads).
# Random weights draw noise: these pictures show what the script writes, not what it
# learns. No group images and one prompt template make an epoch 5 steps long, so
# that 3 epochs give the montage a few columns, and 3 snapshots to score (against the
# run's own sample images, as there are no photos). Run from the repository root:
#   bash images/make_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
run=$(mktemp -d)/run
python textual_inversion.py --random-weights --resolution 128 --group-images \
    --prompts "a photo of a {}" \
    --epochs 3 --sample-every 1 --sample-steps 2 --output-dir "$run"
python tools/evaluate.py --run "$run" --images "$run/samples" --random-weights \
    --resolution 128 --num-images 2 --sample-steps 2
cp "$run/loss.png" images/random-weights-loss.png
cp "$run/samples/progress.png" images/random-weights-progress.png
cp "$run/scores.png" images/random-weights-scores.png
echo "Wrote images/random-weights-{loss,progress,scores}.png from $run"
