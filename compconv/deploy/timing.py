"""Which form a 1x1 CompConv layer takes: timed on its real input in the runtime it will run in, or a rule.

Timings are kept in a :class:`ChoiceCache` the caller owns (pass the same one to several ``deploy``
calls to time each geometry once); nothing is cached at module level.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Optional

import torch
from torch import nn

from ..layers import CompConv2d
from ..onnxrt import ort_session
from .forms import build_form, form_macs

RUNTIMES = ("torch", "ort")
LOWRANK_MAX_SHARE = 0.6  # rule_choice: the low-rank pair where it costs at most this share of the plain conv's MACs


class ChoiceCache:
    """Forms chosen by timing, by (runtime, layer geometry, input shape/dtype/layout/device, threads)."""

    def __init__(self) -> None:
        self._choices: dict[tuple, str] = {}

    @staticmethod
    def key(module: CompConv2d, x: torch.Tensor, runtime: str) -> tuple:
        return (runtime, module.in_channels, module.out_channels, module.stride, module.plan.depth,
                module.plan.c_prim, tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last),
                str(x.device), torch.get_num_threads())

    def get(self, key: tuple) -> Optional[str]:
        return self._choices.get(key)

    def put(self, key: tuple, form: str) -> None:
        self._choices[key] = form

    def __len__(self) -> int:
        return len(self._choices)


def rule_choice(module: CompConv2d, runtime: str = "torch") -> str:
    """The form used without ``example_input``, from measurements on a 2-core AVX-512 CPU (README, Performance).

    Both runtimes take the low-rank pair where it saves MACs (at most 0.6x the plain conv's).
    PyTorch: for depth >= 2 only; depth-1 1x1 layers save at most half the MACs but add a memory-bound pass
    over the output, so dense wins, and the other deeper ones stay the chain as trained (batch 32,
    channels_last). Against the chain for the reduce layers, the low-rank rule ran CompConv128-ResNet-50
    1.09x faster at batch 32 and 1.14x at batch 1 (paired A/B, 2026-12-03, after identity slices became views).
    ONNX Runtime: every concatenation and slice costs layout reorders around its blocked convs, so dense
    wherever low-rank does not pay; this beat per-layer timing (1.49x vs 1.41x ResNet-50 at batch 8), which
    cannot see the reorders between layers.
    """
    lowrank_pays = form_macs(module, "lowrank") <= LOWRANK_MAX_SHARE * module.plan.plain_macs_per_position
    if runtime == "ort":
        return "lowrank" if lowrank_pays else "dense"
    if module.plan.depth == 1 or module.plan.macs_ratio > 0.5:
        return "dense"
    return "lowrank" if lowrank_pays else "chain"


@torch.inference_mode()
def time_ms(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median ms of ``module(x)`` in PyTorch (synchronised on CUDA)."""
    module(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def time_ort_ms(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median ms of ``module`` exported (TorchScript exporter: fast, and exact for every form) and run in ONNX Runtime."""
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/layer.onnx"
        torch.onnx.export(module.float().cpu(), (x.float().cpu().contiguous(),), path, dynamo=False,
                          input_names=["x"])
        session = ort_session(path, torch.get_num_threads())
    feed = {"x": x.float().cpu().contiguous().numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measured_choice(module: CompConv2d, norm: Optional[nn.BatchNorm2d], x: torch.Tensor, runtime: str,
                    cache: ChoiceCache) -> tuple[str, dict]:
    """The fastest of chain / lowrank / dense for ``module`` (+ ``norm``) on its input ``x``, and the times."""
    key = cache.key(module, x, runtime)
    cached = cache.get(key)
    if cached is not None:
        return cached, {}
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    # eval() on the wrapper too: an exporter restores the wrapper's mode, recursively, after exporting
    candidates = {"chain": nn.Sequential(module, norm).eval() if norm is not None else module}
    for form in ("lowrank", "dense"):
        candidates[form] = build_form(module, norm, form).to(memory_format=fmt).eval()
    timer = time_ort_ms if runtime == "ort" else time_ms
    times = {form: timer(candidate, x) for form, candidate in candidates.items()}
    choice = min(times, key=times.get)
    cache.put(key, choice)
    return choice, times
