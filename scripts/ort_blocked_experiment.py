"""Experiment (issue 16, item 6): does zero-padding the low-rank layers' rank to ONNX Runtime's NCHWc block pay?

ONNX Runtime's CPU convs run in a blocked layout (NCHWc, 16 channels per block with AVX-512) when their
input channels are a multiple of the block; a slice, gather or concatenation between them costs a reorder
of the whole tensor to plain NCHW and back. Deploy's ``lowrank`` form reads its identity channels with a
gather of the input, so the residual stream a bottleneck's first conv reads is reordered. The variant
tried here, ``blocked``, writes the same exact map as two plain 1x1 convs: ``[U; S; 0] x`` (the identity
channels as one-hot rows, zero rows up to a multiple of 16) and ``V z + bias`` (zero columns to match):
no slice, gather or concatenation, at the price of ``rank_padded * (C_in + C_out)`` MACs per position.

Both variants of resnet50_compconv128 are exported with ``export_onnx`` (deploy's ONNX Runtime rule), checked
against the model, and run interleaved in one process (each round alternates the order); the ratio is the
median over rounds of (current time / blocked time), so drifts of this shared machine cancel. A kernel-time
profile by op type (ONNX Runtime's profiler) shows where the time moves.

    python scripts/ort_blocked_experiment.py --out results/ort_blocked_experiment.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import statistics
import tempfile
import time
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compconv  # noqa: E402
from benchmark import device_name  # noqa: E402
from compconv.deploy import forms
from compconv.onnxrt import ort_session

BLOCK = 16


@torch.no_grad()
def blocked_form(module, norm, form):
    """deploy's ``build_form``, with every ``lowrank`` layer built as the padded two-conv ``blocked`` variant."""
    if form != "lowrank":
        return forms.build_form(module, norm, form)
    lowrank = forms.build_form(module, norm, "lowrank")
    u = lowrank.first.weight.detach().cpu().double()[:, :, 0, 0]
    index = lowrank.identity_index
    selection = torch.zeros(0 if index is None else len(index), u.shape[1], dtype=torch.float64)
    if index is not None:
        selection[torch.arange(len(index)), index.cpu()] = 1.0
    w1 = torch.cat([u, selection])
    padding = -(-w1.shape[0] // BLOCK) * BLOCK - w1.shape[0]
    w1 = torch.cat([w1, w1.new_zeros(padding, w1.shape[1])])
    v = lowrank.second.weight.detach().cpu().double()[:, :, 0, 0]
    v = torch.cat([v, v.new_zeros(v.shape[0], padding)], dim=1)
    first = nn.Conv2d(w1.shape[1], w1.shape[0], 1, stride=lowrank.stride, bias=False)
    first.weight.data.copy_(w1[:, :, None, None])
    second = nn.Conv2d(v.shape[1], v.shape[0], 1)
    second.weight.data.copy_(v[:, :, None, None])
    second.bias.data.copy_(lowrank.second.bias.detach())
    return forms.LowRankConv2d(first, None, second)


def export(folder: Path, variant: str) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet50" if variant == "resnet50" else "resnet50_compconv128").eval()
    path = folder / f"{variant}.onnx"
    if variant == "blocked":
        with mock.patch.object(importlib.import_module("compconv.deploy"), "build_form", blocked_form):
            compconv.export_onnx(model, path, batch_size=8)  # checked against the model, as every export is
    else:
        compconv.export_onnx(model, path, batch_size=8)
    return path


def paired(sessions: dict, batch: int, rounds: int, gap: float) -> dict[str, list[float]]:
    """Per-run seconds of each session, ``rounds`` times in alternating order, ``gap`` seconds of idle before
    each run: a session's intra-op threads keep spinning after its run, and without the gap they take the cores
    from whichever session runs next (measured: up to 1.3x at batch 1, against the model in the middle)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    times = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, {"input": x})
    for r in range(rounds):
        names = list(sessions) if r % 2 == 0 else list(reversed(sessions))
        for name in names:
            time.sleep(gap)
            start = time.perf_counter()
            sessions[name].run(None, {"input": x})
            times[name].append(time.perf_counter() - start)
    return times


def op_profile(path: Path, runs: int = 5) -> dict[str, float]:
    """ms per run of kernel time, by op type (batch 8)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = torch.get_num_threads()
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224), dtype=np.float32)
    session.run(None, {"input": x})
    for _ in range(runs):
        session.run(None, {"input": x})
    trace = session.end_profiling()
    totals = collections.Counter()
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    os.remove(trace)
    return {op: us / (runs + 1) / 1e3 for op, us in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--gap", type=float, default=0.2, help="idle seconds before each run (see paired)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        paths = {v: export(Path(folder), v) for v in ("resnet50", "current", "blocked")}
        sessions = {v: ort_session(p, torch.get_num_threads()) for v, p in paths.items()}
        lines += ["| batch | rounds | resnet50 (ms) | current lowrank (ms) | blocked (ms) | current / resnet50 speed | "
                  "blocked / current speed (paired) | blocked / current (fastest runs) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for batch, rounds in ((8, args.rounds), (1, 3 * args.rounds)):
            t = paired(sessions, batch, rounds, args.gap)
            med = {k: 1e3 * statistics.median(v) for k, v in t.items()}
            speed = statistics.median([r / c for r, c in zip(t["resnet50"], t["current"])])
            gain = statistics.median([c / b for c, b in zip(t["current"], t["blocked"])])
            fastest = min(t["current"]) / min(t["blocked"])
            lines.append(f"| {batch} | {rounds} | {med['resnet50']:.1f} | {med['current']:.1f} | {med['blocked']:.1f} | "
                         f"{speed:.3f} | {gain:.3f} | {fastest:.3f} |")
            print(lines[-1], flush=True)
        profiles = {v: op_profile(paths[v]) for v in ("current", "blocked")}
    ops = sorted(set(profiles["current"]) | set(profiles["blocked"]), key=lambda o: -profiles["current"].get(o, 0))
    lines += ["", "Kernel time by op type, batch 8 (ms per run, ONNX Runtime's profiler, the two runs one after the other):",
              "", "| op | current lowrank | blocked |", "|---|---:|---:|"]
    lines += [f"| {op} | {profiles['current'].get(op, 0):.2f} | {profiles['blocked'].get(op, 0):.2f} |" for op in ops
              if max(profiles["current"].get(op, 0), profiles["blocked"].get(op, 0)) >= 0.5]
    lines += [f"| all | {sum(profiles['current'].values()):.2f} | {sum(profiles['blocked'].values()):.2f} |"]
    header = ["# Experiment: the low-rank layers padded to ONNX Runtime's NCHWc block", "",
              f"Generated by `python scripts/ort_blocked_experiment.py --rounds {args.rounds} --gap {args.gap}"
              + (f" --out {args.out}`" if args.out else "`"),
              f"on {device_name(torch.device('cpu'))}; onnxruntime "
              f"{importlib.import_module('onnxruntime').__version__}; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
              "resnet50_compconv128 exported with deploy's ONNX Runtime rule (`current`: the `lowrank` form gathers "
              "the identity channels) and with every `lowrank` layer as two convs padded to 16 channels (`blocked`, "
              "no gather or concatenation); fp32, models interleaved, ratio = median over rounds of the paired "
              "time ratio (> 1: blocked is faster); the last column compares each variant's fastest run (the least "
              "disturbed by the machine's other load).", ""]
    text = "\n".join(header + lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
