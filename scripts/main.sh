#!/usr/bin/env bash
# Set up, then train the default model (ResNet-20 with Batch Renorm on Fashion-MNIST, configs/main.yaml), test
# it, and print the test accuracy, the checkpoint and the TensorBoard command. Extra arguments go to `bnzoo fit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
start=$(date +%s)
mkdir -p runs
.venv/bin/bnzoo fit --config configs/main.yaml --trainer.enable_progress_bar "${PROGRESS:-true}" "$@" \
    | tee runs/main-fit.txt
checkpoint=$(sed -n 's/^last checkpoint: //p' runs/main-fit.txt)
.venv/bin/bnzoo test --config configs/main.yaml "$@" --ckpt_path "$checkpoint" --trainer.enable_progress_bar false \
    | tee runs/main-test.txt
echo
echo "main job done in $(( $(date +%s) - start )) s"
grep "^test/acc:" runs/main-test.txt
echo "checkpoint: $checkpoint"
echo "TensorBoard: .venv/bin/tensorboard --logdir runs"
