"""Metric sums over a pass of a loader: accumulated on the device (no host sync per step), reduced exactly."""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum


class Sums:
    """Named sums (``count`` = examples seen). Tensor values stay on their device until :meth:`reduced`,
    so adding a batch's loss or hit count never waits for the GPU; numbers from the host add as they are."""

    def __init__(self, values: dict[str, float] | None = None) -> None:
        self.values: dict[str, float | torch.Tensor] = dict(values or {})

    def add(self, **values: float | torch.Tensor) -> None:
        for key, value in values.items():
            if torch.is_tensor(value):
                value = value.detach().to(torch.float64)
            self.values[key] = self.values.get(key, 0.0) + value

    def host(self) -> dict[str, float]:
        """The sums as Python floats (one device-to-host copy for all tensor values)."""
        keys = sorted(self.values)
        tensors = [k for k in keys if torch.is_tensor(self.values[k])]
        numbers = torch.stack([self.values[k] for k in tensors]).cpu().tolist() if tensors else []
        host = {k: float(self.values[k]) for k in keys if k not in tensors}
        return {**host, **dict(zip(tensors, numbers))}

    def reduced(self, device: torch.device, keys: list[str] | None = None) -> "Sums":
        values = self.host()
        keys = sorted(keys or values)
        totals = all_reduce_sum([values.get(k, 0.0) for k in keys], device)
        return Sums(dict(zip(keys, totals)))

    def __getitem__(self, key: str) -> float:
        value = self.values.get(key, 0.0)
        return float(value)

    def state(self) -> dict[str, float]:
        return self.host()


def classification_sums(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Loss sum and top-1/top-5 hit counts of one batch, as device tensors (``count`` is a host int)."""
    n = targets.numel()
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(targets.unsqueeze(1))
    return {"loss_sum": loss.detach().double() * n, "correct1": hits[:, 0].sum(), "correct5": hits.any(dim=1).sum(), "count": n}


def classification_metrics(sums: Sums) -> dict[str, float]:
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / n, "top1": 100 * sums["correct1"] / n, "top5": 100 * sums["correct5"] / n,
            "images": int(sums["count"]), "skipped_images": int(sums["skipped"])}
