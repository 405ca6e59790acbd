#!/usr/bin/env bash
# Builds a separate environment, .venv-mmdet, with mmcv 2.1.0 (compiled ops), mmengine 0.10.7,
# mmdet 3.3.0, the pinned torch and this project, for compconv.integrations.mmdet.
#
# Why a separate environment and a source build: mmdet 3.3.0 needs mmcv < 2.2 with compiled ops;
# no mmcv wheel exists for torch 2.14, and mmcv 2.1.0's setup.py forces -std=c++17 while torch
# 2.14's headers need C++20. The sdist is patched to -std=c++20 and built with setuptools < 81
# (setup.py imports pkg_resources) without build isolation (setup.py imports torch).
# The build took 6 minutes on this project's 2-core machine; the wheel is cached in $MMCV_WHEEL_CACHE so a
# second environment installs it in seconds. Idempotent: a second run only checks.
#
# Environment: PYTHON (default python3), MMDET_VENV (default .venv-mmdet),
#              MMCV_WHEEL_CACHE (default ~/.cache/compconv/wheels), MAX_JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${MMDET_VENV:-.venv-mmdet}
CACHE=${MMCV_WHEEL_CACHE:-$HOME/.cache/compconv/wheels}
MMCV_VERSION=2.1.0
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
pip="$VENV/bin/pip"
stamp=$VENV/.compconv-mmdet-installed
want=$(cat pyproject.toml scripts/setup_mmdet.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  "$VENV/bin/python" -c "import mmcv, mmdet, mmcv.ops; print('mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
  exit 0
fi

"$pip" install -q --upgrade pip
"$pip" install -q torch==2.14.1 torchvision==0.29.1
# Build requirements of mmcv's setup.py, and mmcv's own runtime requirements (mmengine first:
# mmcv's setup.py does not need it, but its package imports it).
"$pip" install -q 'setuptools<81' wheel ninja 'mmengine==0.10.7' opencv-python-headless

mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$pip" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
  tar -xzf "$work"/mmcv-$MMCV_VERSION.tar.gz -C "$work"
  src=$work/mmcv-$MMCV_VERSION
  grep -q -- '-std=c++17' "$src/setup.py" || { echo "error: mmcv's setup.py no longer sets -std=c++17; check the patch" >&2; exit 1; }
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  echo "building mmcv $MMCV_VERSION with compiled ops (CPU, $MAX_JOBS jobs; about 6 minutes on 2 cores)"
  # FORCE_CUDA=0: torch here is a CUDA build and nvcc may exist, but the ops are built for the CPU.
  if ! (cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=0 "$pip" wheel --no-build-isolation --no-deps -w "$work/dist" .) \
      > "$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log" >&2
    echo "error: building mmcv $MMCV_VERSION failed (log above)" >&2
    exit 1
  fi
  tmp_wheel=$(ls "$work"/dist/mmcv-$MMCV_VERSION-*.whl)
  cp "$tmp_wheel" "$CACHE/.partial.whl" && mv "$CACHE/.partial.whl" "$CACHE/$(basename "$tmp_wheel")"
  wheel=$CACHE/$(basename "$tmp_wheel")
fi
"$pip" install -q "$wheel"
"$pip" install -q 'mmdet==3.3.0'
"$pip" install -q -e '.[det,test]'
"$VENV/bin/python" -c "import mmcv, mmdet, mmcv.ops; print('mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
echo "$want" > "$stamp"
