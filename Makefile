# `make demo` and `make test` are the README's two commands; both set up .venv first.
PY := .venv/bin/python

.PHONY: setup demo test test-fast complexity

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) train_cls.py model=resnet50_compconv128

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

complexity: setup
	$(PY) scripts/complexity_table.py
