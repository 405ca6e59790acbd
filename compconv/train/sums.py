"""Metric sums over a pass of a loader: accumulated on the device (no host sync per step), reduced exactly."""

from __future__ import annotations

import torch
import torch.distributed as dist

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

    def reduced(self, device: torch.device) -> "Sums":
        """The sums over all ranks, over the union of the ranks' keys (a rank may have none yet after a resume)."""
        values = self.host()
        keys = sorted(values)
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, keys)
            keys = sorted(set().union(*gathered))
        totals = all_reduce_sum([values.get(k, 0.0) for k in keys], device)
        return Sums(dict(zip(keys, totals)))

    def __getitem__(self, key: str) -> float:
        return float(self.values.get(key, 0.0))
