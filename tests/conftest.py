import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles from scratch: timm models share forward code objects (ResNet.forward), and
    # dynamo's per-code recompile limit would otherwise be reached after a few models in one process.
    torch._dynamo.reset()
    yield
