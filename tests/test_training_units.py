"""Units of the training stack: schedules, weight-decay groups, sampling, seeded augmentation, imports."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
from torch import nn

from compconv.data import EpochSeededDataset, FashionMNIST, ResumableSampler
from compconv.data.fashion_mnist import read_idx
from compconv.data.imagefolder import DataError
from compconv.data.transforms import small_image_transform
from compconv.train.config import OptimConfig, SchedConfig
from compconv.train.optim import create_optimizer, create_scheduler, effective_lr
from helpers import FMNIST, ROOT


def lr_factor(cfg: SchedConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The lr of optimizer step ``step`` (what the loop sets after ``step`` steps), as a fraction of the base lr."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch, epochs)
    if step:
        scheduler.step_update(step)
    return optimizer.param_groups[0]["lr"] / 2.0


def test_cosine_with_warmup():
    cfg = SchedConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.1)
    assert lr_factor(cfg, 0, 10, 5) == pytest.approx(0.1)
    assert lr_factor(cfg, 5, 10, 5) == pytest.approx(0.55)
    assert lr_factor(cfg, 10, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cfg, 30, 10, 5) == pytest.approx(0.5)
    assert lr_factor(cfg, 50, 10, 5) == pytest.approx(0.0)


def test_multistep():
    cfg = SchedConfig(name="multistep", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(cfg, e * 10, 10, 6) for e in (0, 1, 2, 3, 4, 5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # the decay starts with the milestone epoch's first step, not one step before (timm's index convention)
    assert [lr_factor(cfg, s, 10, 6) for s in (19, 20, 39, 40)] == pytest.approx([1, 0.1, 0.1, 0.01])
    warm = SchedConfig(name="multistep", milestones=[1], warmup_epochs=0.5, warmup_start_factor=0.2)
    assert [lr_factor(warm, s, 10, 2) for s in (0, 5, 9, 10)] == pytest.approx([0.2, 1, 1, 0.1])
    assert lr_factor(SchedConfig(name="constant"), 37, 10, 5) == pytest.approx(1.0)


def test_linear_lr_scaling():
    assert effective_lr(OptimConfig(lr=0.1, lr_base_batch=256), 1024) == pytest.approx(0.4)
    assert effective_lr(OptimConfig(lr=0.1, lr_base_batch=None), 1024) == pytest.approx(0.1)


def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2))
    groups = create_optimizer(model, OptimConfig(weight_decay=1e-4), 256).param_groups
    no_decay, decay = sorted(groups, key=lambda g: g["weight_decay"])
    assert {p.ndim for p in decay["params"]} == {4, 2} and {p.ndim for p in no_decay["params"]} == {1}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 1e-4
    assert len(decay["params"]) + len(no_decay["params"]) == 6
    everywhere = create_optimizer(model, OptimConfig(wd_on_norm_and_bias=True), 256).param_groups
    assert [g["weight_decay"] for g in everywhere] == [1e-4] and len(everywhere[0]["params"]) == 6


def test_optimizer_is_timms_by_name_with_its_arguments():
    model = nn.Linear(4, 2)
    sgd = create_optimizer(model, OptimConfig(), 512)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and not sgd.defaults["nesterov"]
    assert sgd.defaults["lr"] == pytest.approx(0.2)  # 0.1 per 256 images
    adamw = create_optimizer(model, OptimConfig(name="adamw", lr=1e-3, lr_base_batch=None,
                                                kwargs={"betas": [0.9, 0.95]}), 512)
    assert type(adamw) is torch.optim.AdamW and tuple(adamw.defaults["betas"]) == (0.9, 0.95)
    assert adamw.defaults["lr"] == pytest.approx(1e-3)


def test_sampler_is_deterministic_split_and_resumable():
    a = ResumableSampler(103, rank=0, world_size=2, seed=3)
    b = ResumableSampler(103, rank=1, world_size=2, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 51 and not set(ia) & set(ib)
    a.set_epoch(1, start=10)
    assert list(a) == ia[10:] and len(a) == 41
    a.set_epoch(2)
    assert list(a) != ia
    evaluation = [ResumableSampler(7, r, 2, shuffle=False) for r in (0, 1)]
    assert sorted(list(evaluation[0]) + list(evaluation[1])) == list(range(7))


def test_augmentation_is_a_function_of_seed_epoch_index():
    data = FashionMNIST(FMNIST, "train", small_image_transform(32, 1, [0.5], [0.5], True, 4, 0.5), subset=8)
    seeded = EpochSeededDataset(data, seed=1)
    first = seeded[3][0]
    torch.rand(5)  # global RNG use in between must not matter
    assert torch.equal(seeded[3][0], first)
    seeded.set_epoch(1)
    assert not torch.equal(seeded[3][0], first)


def test_fashion_mnist_reads_the_real_files():
    train, val = FashionMNIST(FMNIST, "train"), FashionMNIST(FMNIST, "val")
    assert len(train) == 60000 and len(val) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and set(train.targets.unique().tolist()) == set(range(10))


def test_malformed_idx_is_a_clear_error():
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(b"\x00\x00\x09\x01" + b"\x00" * 8, "bad")
    with pytest.raises(DataError, match="truncated"):
        read_idx(b"\x00\x00\x08\x01\x00\x00\x00\x10" + b"\x00" * 3, "short")


@pytest.mark.slow
def test_library_imports_without_hydra_wandb_omegaconf_mmdet():
    blocked = "('hydra', 'wandb', 'omegaconf', 'mmdet', 'mmengine', 'mmcv')"
    code = (f"import sys\nfor m in {blocked}: sys.modules[m] = None\n"
            "import compconv, compconv.train, compconv.data, compconv.detection\n"
            "import compconv.integrations\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow
def test_peak_memory_is_reset_per_run_on_the_cpu():
    """A multirun's jobs share one process: each run must start a new peak, not inherit the last one's."""
    code = ("import torch\nfrom compconv.train.memory import peak_memory_mb, reset_peak_memory\n"
            "cpu = torch.device('cpu')\nbig = torch.ones(100 * 2**20)\nhigh = peak_memory_mb(cpu)\ndel big\n"
            "reset_peak_memory(cpu)\nprint(high, peak_memory_mb(cpu))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    high, after_reset = map(float, proc.stdout.split())
    assert high - after_reset > 300, (high, after_reset)  # the 400 MiB tensor no longer counts


def test_no_module_imports_private_names():
    """Packages talk through public APIs: no ``from x import _name`` anywhere in the library or entry points."""
    paths = [*(ROOT / "compconv").rglob("*.py"), ROOT / "train_cls.py", ROOT / "train_det.py"]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"
