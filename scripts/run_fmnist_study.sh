#!/usr/bin/env bash
# The Fashion-MNIST study of results/fashion_mnist_cls.md (CPU, ~1.5 hours on 2 cores):
# ResNet-50 vs CompConv{64,128,256}-ResNet-50 x 3 seeds, then the ablation of our choices at C_0=128
# (3 seeds each). STAGES=ablation runs only the ablation (then the table); default: both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/fmnist_study}
TITLE="Fashion-MNIST (32x32, 20k-image subset, 2 epochs, CPU)"

STAGES=${STAGES:-main,ablation}
if [[ $STAGES == *main* ]]; then
  $PY train_cls.py -m experiment=fmnist_study logger=none \
    model=resnet50,resnet50_compconv64,resnet50_compconv128,resnet50_compconv256 seed=0,1,2 \
    hydra.sweep.dir=$OUT/main
fi
[[ $STAGES == *ablation* ]] || { $PY scripts/make_tables.py $OUT --title "$TITLE"; exit 0; }
for option in tail=dense tail_kernel=3 shuffle=false inner_norm=true; do
  $PY train_cls.py -m experiment=fmnist_study logger=none model=resnet50_compconv128 "model.compconv.$option" seed=0,1,2 \
    hydra.sweep.dir=$OUT/ablation_${option/=/_}
done
$PY scripts/make_tables.py $OUT --title "$TITLE"
