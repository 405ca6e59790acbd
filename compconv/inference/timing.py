"""Which form a 1x1 CompConv layer takes: timed on its real input in the runtime it will run in, or a rule.
Timings are kept in a :class:`ChoiceCache` the caller owns; nothing is cached at module level.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Optional

import torch
from torch import nn

from ..capture import memory_format_of
from ..layers import CompConv2d
from ..lowrank import build_form
from ..onnxrt import ort_session

RUNTIMES = ("torch", "ort")


class ChoiceCache:
    """Forms chosen by timing, by (runtime, layer geometry, input shape/dtype/layout/device, threads)."""

    def __init__(self) -> None:
        self._choices: dict[tuple, str] = {}

    @staticmethod
    def key(module: CompConv2d, x: torch.Tensor, runtime: str) -> tuple:
        return (runtime, module.in_channels, module.out_channels, module.stride, module.plan.depth,
                module.plan.c_prim, tuple(x.shape), x.dtype, memory_format_of(x),
                str(x.device), torch.get_num_threads())

    def get(self, key: tuple) -> Optional[str]:
        return self._choices.get(key)

    def put(self, key: tuple, form: str) -> None:
        self._choices[key] = form

    def __len__(self) -> int:
        return len(self._choices)


def torch_runner(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A call of ``module(x)`` in PyTorch (inference mode, synchronised on CUDA)."""
    def run() -> None:
        with torch.inference_mode():
            module(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    return run


def ort_runner(module: nn.Module, x: torch.Tensor, path: str) -> Callable[[], None]:
    """A run of ``module`` exported to ``path`` (TorchScript exporter: fast, and exact for every form) in ONNX Runtime."""
    with torch.no_grad():
        torch.onnx.export(module.float().cpu(), (x.float().cpu().contiguous(),), path, dynamo=False,
                          input_names=["x"])
    session = ort_session(path, torch.get_num_threads())
    feed = {"x": x.float().cpu().contiguous().numpy()}
    return lambda: session.run(None, feed)


def interleaved_times(runners: dict[str, Callable[[], None]], repeats: int, calls: Optional[dict[str, int]] = None,
                      idle_s: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each runner, in ``repeats`` rounds that each run every runner (``calls[name]`` times,
    default once), so load on a shared machine slows all alike. Runners synchronise their device and are warmed
    up by the caller; ``idle_s`` is slept before each measurement (ONNX Runtime's spinning threads).
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            count = (calls or {}).get(name, 1)
            if idle_s:
                time.sleep(idle_s)
            start = time.perf_counter()
            for _ in range(count):
                run()
            times[name].append((time.perf_counter() - start) / count)
    return times


def measured_choice(module: CompConv2d, norm: Optional[nn.BatchNorm2d], x: torch.Tensor, runtime: str,
                    cache: ChoiceCache) -> tuple[str, dict]:
    """The fastest of chain / lowrank / dense for ``module`` (+ ``norm``) on its input ``x``, and the times."""
    key = cache.key(module, x, runtime)
    cached = cache.get(key)
    if cached is not None:
        return cached, {}
    fmt = memory_format_of(x)
    # eval() on the wrapper too: an exporter restores the wrapper's mode, recursively, after exporting
    candidates = {"chain": nn.Sequential(module, norm).eval() if norm is not None else module}
    for form in ("lowrank", "dense"):
        candidates[form] = build_form(module, norm, form).to(memory_format=fmt).eval()
    with tempfile.TemporaryDirectory() as folder:
        runners = {form: ort_runner(candidate, x, f"{folder}/{form}.onnx") if runtime == "ort"
                   else torch_runner(candidate, x)
                   for form, candidate in candidates.items()}
        for run in runners.values():  # warm-up
            run()
        times = {form: 1e3 * statistics.median(t) for form, t in interleaved_times(runners, repeats=5).items()}
    choice = min(times, key=times.get)
    cache.put(key, choice)
    return choice, times
