#!/usr/bin/env bash
# Creates .venv with the pinned torch, the project and its extras, and installs Debian's
# Fashion-MNIST when it is missing. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's packages: the data, and a one-node SLURM for the sweep tests (scripts/slurm_local.sh starts it)
FMNIST=/usr/share/datasets/fashion-mnist
DEBIAN_PACKAGES=(dataset-fashion-mnist slurmctld slurmd slurm-client munge)
missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || echo "could not install ${missing[*]}: the tests that need them skip and say so" >&2
  else
    echo "missing Debian packages ${missing[*]}: run 'sudo apt-get install ${missing[*]}' (or set data.root)" >&2
  fi
fi
[ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || echo "Fashion-MNIST is missing: set data.root to its idx files" >&2

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
