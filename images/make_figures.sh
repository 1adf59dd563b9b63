#!/usr/bin/env bash
# Makes the README's figures from a CPU smoke run with RANDOM weights (no downloads).
# Random weights draw noise: these pictures show what the script writes, not what it
# learns. Run from the repository root: bash images/make_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
run=$(mktemp -d)/run
python textual_inversion.py --random-weights --resolution 128 --max-train-steps 8 \
    --sample-every 1 --sample-steps 2 --output-dir "$run"
cp "$run/loss.png" images/random-weights-loss.png
cp "$run/samples/epoch-001_an-oil-painting-of-my-funny-cat-token.png" \
    images/random-weights-sample-epoch-001.png
echo "Wrote images/random-weights-loss.png and images/random-weights-sample-epoch-001.png from $run"
