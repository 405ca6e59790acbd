import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the 2-core machine: one intra-op thread each, so the
    # workers' OpenMP pools do not oversubscribe the cores (subprocesses get OMP_NUM_THREADS=1 from helpers.env)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles from scratch: timm models share forward code objects (ResNet.forward), and
    # dynamo's per-code recompile limit would otherwise be reached after a few models in one process.
    torch.compiler.reset()
    yield
