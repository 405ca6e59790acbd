"""Metric sums over a pass of a loader, checkpointed and reduced over ranks exactly."""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum


class Sums:
    """Named float64 sums on the host (``count`` = examples seen), so they checkpoint and reduce exactly."""

    def __init__(self, values: dict[str, float] | None = None) -> None:
        self.values: dict[str, float] = dict(values or {})

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.values[key] = self.values.get(key, 0.0) + float(value)

    def reduced(self, device: torch.device, keys: list[str] | None = None) -> "Sums":
        keys = sorted(keys or self.values)
        totals = all_reduce_sum([self.values.get(k, 0.0) for k in keys], device)
        return Sums(dict(zip(keys, totals)))

    def __getitem__(self, key: str) -> float:
        return self.values.get(key, 0.0)

    def state(self) -> dict[str, float]:
        return dict(self.values)


def classification_sums(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Loss sum and top-1/top-5 hit counts of one batch."""
    n = targets.numel()
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(targets.unsqueeze(1))
    return {"loss_sum": float(loss.detach()) * n, "correct1": float(hits[:, 0].sum()),
            "correct5": float(hits.any(dim=1).sum()), "count": n}


def classification_metrics(sums: Sums) -> dict[str, float]:
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / n, "top1": 100 * sums["correct1"] / n, "top5": 100 * sums["correct5"] / n,
            "images": int(sums["count"]), "skipped_images": int(sums["skipped"])}
