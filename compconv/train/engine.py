"""Metric sums for one pass over a loader, reduced over ranks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .distributed import all_reduce_sum


@dataclass
class Meters:
    """Sums over the examples seen so far (float64 on the host, so they checkpoint and reduce exactly)."""

    loss_sum: float = 0.0
    correct1: float = 0.0
    correct5: float = 0.0
    count: float = 0.0
    skipped: float = 0.0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, skipped: int = 0) -> None:
        n = targets.numel()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        self.loss_sum += float(loss.detach()) * n
        self.correct1 += float(hits[:, 0].sum())
        self.correct5 += float(hits.any(dim=1).sum())
        self.count += n
        self.skipped += skipped

    def reduced(self, device: torch.device) -> "Meters":
        return Meters(*all_reduce_sum(list(asdict(self).values()), device))

    def metrics(self) -> dict[str, float]:
        n = max(self.count, 1.0)
        return {"loss": self.loss_sum / n, "top1": 100 * self.correct1 / n, "top5": 100 * self.correct5 / n,
                "images": int(self.count), "skipped_images": int(self.skipped)}

    def state(self) -> dict[str, float]:
        return asdict(self)
