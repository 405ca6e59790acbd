"""A held-out validation split of a training set: class-stratified, fixed by its own seed (not the run's), so
every run of a study validates on the same images and none of them is trained on."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["stratified_holdout"]


def stratified_holdout(targets: Sequence[int], size: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices: ``size`` items held out with each class in its share of ``targets``
    (largest remainders get the leftover items), drawn by ``numpy.random.SeedSequence(seed)``.

    Raises:
        ValueError: ``size`` is not between 1 and ``len(targets) - 1``.
    """
    targets = np.asarray(targets)
    if not 0 < size < len(targets):
        raise ValueError(f"cannot hold out {size} of {len(targets)} items")
    classes, counts = np.unique(targets, return_counts=True)
    exact = counts * size / len(targets)
    quota = np.floor(exact).astype(int)
    leftover = size - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    held = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:q] for c, q in zip(classes, quota)])
    mask = np.zeros(len(targets), dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask).tolist(), np.sort(held).tolist()
