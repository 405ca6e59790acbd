#!/usr/bin/env bash
# The detection table of results/fmnist_det_det.md (CPU, ~12 minutes on 2 cores with nothing else running):
# ResNet-50 vs CompConv128-ResNet-50 under train_det.py's defaults (generated Fashion-MNIST set,
# Faster R-CNN + FPN, 3 epochs from scratch) x 3 seeds, then the table and plot.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/det_study}

$PY train_det.py -m model=resnet50,resnet50_compconv128 seed=0,1,2 trainer.progress=false hydra.sweep.dir=$OUT
$PY scripts/make_tables.py $OUT --title "Generated Fashion-MNIST detection set (128x128, 400 train images, 3 epochs, CPU)"
