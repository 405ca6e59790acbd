#!/usr/bin/env bash
# The prepared GPU run of issue "Performance" (H100/H200 class; needs only torch, torchvision, timm):
# AMP bf16, channels_last, eager and compiled, batch 256 inference and 128 training.
# Writes results/benchmark_gpu.md/.csv (device named in the header). Usage: bash scripts/benchmark_gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -m compconv.bench \
  --models resnet50,resnet50_compconv64,resnet50_compconv128,resnet50_compconv256,resnet50_ghost \
  --workloads infer:1,infer:256,train:128 --settings eager-cl,compiled-cl,eager-nchw \
  --precision bf16 --device cuda --repeats 5 --min-seconds 2 --warmup 3 \
  --profile resnet50_compconv128 --out "$OUT/benchmark_gpu.md"
