import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the 2-core machine: one intra-op thread each, so the
    # workers' OpenMP pools do not oversubscribe the cores (subprocesses get OMP_NUM_THREADS=1 from helpers.env)
    torch.set_num_threads(1)


# Registered models that `make test-fast` checks; CI (`make test`) checks every registered model.
FAST_MODELS = {"resnet18_compconv128", "resnet50_compconv128", "resnet50_ghost"}


def pytest_generate_tests(metafunc):
    """A test that takes ``model_name`` runs once per model this package registers (timm's way of testing its
    registry), the models outside FAST_MODELS marked ``slow``."""
    if "model_name" in metafunc.fixturenames:
        from compconv.models import registered_model_names

        metafunc.parametrize("model_name", [pytest.param(n, marks=() if n in FAST_MODELS else pytest.mark.slow)
                                            for n in registered_model_names()])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles from scratch: timm models share forward code objects (ResNet.forward), and
    # dynamo's per-code recompile limit would otherwise be reached after a few models in one process.
    torch.compiler.reset()
    yield
