"""Deterministic, resumable data order and augmentation: randomness is a pure function of (seed, epoch, index),
so a run resumed mid-epoch, with any number of workers, sees the images an uninterrupted run would.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

_logger = logging.getLogger("compconv.data")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order: ``(seed, epoch)`` mixed by ``numpy.random.SeedSequence``, so
    two runs' orders are independent (with ``seed + epoch``, seed 1's epoch e was seed 0's epoch e + 1)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that each item's random transforms are seeded by (seed, epoch, index). Indexed by
    ``(epoch, index)`` pairs, so persistent workers see the current epoch; a plain index uses :meth:`set_epoch`'s.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        item_seed = hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            item = self.dataset[index]
        random.setstate(python_state)
        return item


class ResumableSampler(Sampler[int]):
    """Per-rank indices: a (seed, epoch) permutation for training (tail dropped, equal counts), a strided split for
    evaluation (no padding: each example counted once). ``start`` skips this rank's first indices.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0) -> None:
        self.size, self.rank, self.world_size, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = self.size // self.world_size
        return order[self.rank:per_rank * self.world_size:self.world_size]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self._indices()[self.start:]
        if self.shuffle:  # training: the epoch travels with each index (see EpochSeededDataset)
            return iter([(self.epoch, index) for index in indices])
        return iter(indices)

    def __len__(self) -> int:
        return len(self._indices()) - self.start


def available_cpus() -> int:
    """CPU cores this process may use: its affinity mask (what SLURM's ``cpus_per_task`` and taskset set),
    shared by the processes torchrun starts on this node (``LOCAL_WORLD_SIZE``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def usable_workers(configured: int) -> int:
    """``min(configured, available_cpus())``, logged when it lowers ``data.workers``: loader workers
    beyond the cores a process has only compete with each other and with the training step."""
    cpus = available_cpus()
    if configured <= cpus:
        return configured
    _logger.info("data.workers=%d lowered to %d: this process may use %d CPU cores (os.sched_getaffinity%s)",
                 configured, cpus, cpus, ", shared by LOCAL_WORLD_SIZE processes" if "LOCAL_WORLD_SIZE" in os.environ
                 else "")
    return cpus


def loader_options(workers: int, prefetch_factor: int, device) -> dict:
    """DataLoader settings: pinned memory on GPUs, persistent prefetching workers (:func:`usable_workers`)."""
    workers = usable_workers(workers)
    options = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return options


def rank_loaders(train_set, val_set, data_cfg, seed: int, rank: int, world_size: int, device,
                 collate_fn) -> tuple[DataLoader, DataLoader]:
    """This rank's training loader (seeded order, resumable, full batches) and validation loader (in order, no
    padding), with ``data_cfg``'s workers, prefetch and batch sizes.
    """
    options = loader_options(data_cfg.workers, data_cfg.prefetch_factor, device)
    train = DataLoader(train_set, data_cfg.batch_size, drop_last=True, collate_fn=collate_fn, **options,
                       sampler=ResumableSampler(len(train_set), rank, world_size, shuffle=True, seed=seed))
    val = DataLoader(val_set, data_cfg.eval_batch_size, collate_fn=collate_fn, **options,
                     sampler=ResumableSampler(len(val_set), rank, world_size, shuffle=False))
    return train, val


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collates ``(image, target)`` items, dropping ``None`` (unreadable, skipped) ones and counting them."""
    good = [item for item in batch if item is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(good)
    return images, targets, skipped
