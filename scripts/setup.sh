#!/usr/bin/env bash
# Creates .venv with the pinned torch, the project and its extras, and installs Debian's
# Fashion-MNIST when it is missing. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && apt-get install -y -q dataset-fashion-mnist
  else
    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or set data.root" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.compconv-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 timm==1.0.31  # the versions results/ were made with
  .venv/bin/pip install -q -e '.[train,det,test,export]'
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import compconv, torch; print('compconv', compconv.__version__, 'torch', torch.__version__)"
