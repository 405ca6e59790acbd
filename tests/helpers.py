"""Shared helpers for tests that run the entry points as a user would (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from compconv.shuffle import channel_shuffle

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["data.train_subset=256", "data.val_subset=128", "data.batch_size=32", "data.eval_batch_size=64",
        "trainer.progress=false", "logger.name=none"]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
            "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}


def run_script(script: str, run_dir: Path | None, *overrides: str, check: bool = True,
               timeout: int = 600, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(prefix or [sys.executable]), str(ROOT / script), *overrides]
    if run_dir is not None:
        command.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def summary(run_dir: Path, name: str = "summary.json") -> dict:
    return json.loads((run_dir / name).read_text())


def write_imagefolder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """A small ImageFolder tree of real JPEG files (Fashion-MNIST items, upscaled to RGB 40x40)."""
    from compconv.data import FashionMNIST

    data = FashionMNIST(FMNIST, "val", subset=2000)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            picks = np.flatnonzero(data.targets.numpy() == label)
            offset = 0 if split == "train" else train_per_class
            for i, index in enumerate(picks[offset:offset + per_class]):
                pixels = data.images[index, 0].numpy()
                Image.fromarray(pixels).convert("RGB").resize((40, 40)).save(folder / f"{i}.jpg", quality=90)
    return root


def randomise_norms(model) -> None:
    """Non-trivial BatchNorm statistics and affines, so folds that drop or misplace a norm show in the outputs."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.8, 1.2)
            module.weight.data.uniform_(0.8, 1.2)
            module.bias.data.uniform_(-0.1, 0.1)


def literal(module, x):
    """Figure 2 read literally, recorded by autograd op by op (no fast path: not even ``module.parts``)."""
    b = module.norms[0](module.convs[0](x))
    parts = [b]
    for index in range(1, len(module.convs)):
        a = module.identity(x, module.identity_starts[index - 1], module.identity_stops[index - 1], b)
        b = module.norms[index](module.convs[index](torch.cat([b, a], dim=1)))
        parts += [a, b]
    if module.tail is not None:
        parts.append(module.tail_norm(module.tail(b[:, :module.tail_in])))
    y = channel_shuffle(torch.cat(parts, dim=1), module.shuffle_groups)
    return y if module.bias is None else y + module.bias.view(1, -1, 1, 1)


def break_absorbed_norms(monkeypatch) -> None:
    """Makes deploy's norm absorption forget the norm's shift (a wrong rewrite deploy's check must refuse)."""
    import importlib

    from compconv.inference import forms

    real = forms.absorb_norm

    def forgets_the_shift(conv, norm):
        wrong = real(conv, norm)
        wrong.out_shift = torch.zeros_like(wrong.out_shift)
        return wrong

    monkeypatch.setattr(importlib.import_module("compconv.inference.pipeline"), "absorb_norm", forgets_the_shift)
