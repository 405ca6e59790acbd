# `make demo` and `make test` are the README's two commands; both set up their environments first.
PY := .venv/bin/python
MMDET_PY := .venv-mmdet/bin/python
# pytest-xdist workers (tests/conftest.py gives each one torch thread): 2 fills the 2-core CI machine
WORKERS ?= 2

.PHONY: setup setup-mmdet demo test test-main test-mmdet test-fast complexity

setup:
	bash scripts/setup.sh

# .venv-mmdet: mmcv 2.1.0 built from source with compiled ops (~6 min on 2 cores) + mmdet 3.3.0.
setup-mmdet:
	bash scripts/setup_mmdet.sh

demo: setup
	$(PY) train_cls.py model=resnet50_compconv128

# What CI runs: every test (slow ones included) in .venv, then the mmdetection tests in .venv-mmdet.
test: test-main test-mmdet

test-main: setup
	$(PY) -m pytest -n $(WORKERS)

test-mmdet: setup-mmdet
	$(MMDET_PY) -m pytest -v tests/test_mmdet.py

test-fast: setup
	$(PY) -m pytest -n $(WORKERS) -m "not slow"

complexity: setup
	$(PY) scripts/complexity_table.py
