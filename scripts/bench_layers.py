#!/usr/bin/env python
"""Per-layer tables and op profiles of a model (research tables behind results/benchmark_cpu_train.md).

    python scripts/bench_layers.py --per-layer resnet50_compconv128:32          # inference, eager channels_last
    python scripts/bench_layers.py --per-layer-train resnet50_compconv128:16    # forward + backward per layer
    python scripts/bench_layers.py --profile resnet50_compconv128 --workload infer:32 --setting eager-cl

Timing interleaves the candidates of each layer (:func:`compconv.inference.timing.interleaved_times`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark import Setting, Workload, _sync, build_step  # noqa: E402

import compconv  # noqa: E402,F401
from compconv import CompConv2d  # noqa: E402
from compconv.inference.timing import interleaved_times  # noqa: E402


def _timed_ms(runners: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of each runner (synchronised), interleaved, after one warm-up call each."""
    synced = {k: (lambda run=run: (run(), _sync(device))) for k, run in runners.items()}
    for run in synced.values():
        run()
    return {k: 1e3 * statistics.median(t) for k, t in interleaved_times(synced, repeats).items()}


def profile_ops(name: str, workload: Workload, setting: Setting, device, img_size, precision, top: int = 12) -> str:
    """Top ops by self time for one step of ``name`` (torch.profiler), as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = build_step(name, workload, setting, device, img_size, precision)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1
    lines = ["| op | calls | self time (ms) | share |", "|---|---:|---:|---:|"]
    lines += [f"| `{e.key}` | {e.count} | {getattr(e, key) / 1e3:.1f} | {100 * getattr(e, key) / total:.1f}% |"
              for e in events]
    return "\n".join(lines)


@torch.inference_mode()
def per_layer_table(name: str, batch: int, img_size: int, device: torch.device, repeats: int = 5) -> str:
    """Each replaced layer of ``name`` (with its BatchNorm): plain conv, CompConv as trained, deployed form.

    Inference, eager channels_last, on the layer's real input; ms are medians of ``repeats``, and the
    three forms of a layer are timed interleaved."""
    from compconv import deploy

    x = torch.randn(batch, 3, img_size, img_size, device=device).to(memory_format=torch.channels_last)
    model = timm.create_model(name).eval().to(device, memory_format=torch.channels_last)
    deployed = copy.deepcopy(model)
    report = deploy(deployed, x)  # forms, MACs and norm names come from the report
    choices = {choice.name: choice for choice in report.layers}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0]))
             for n, m in model.named_modules() if isinstance(m, CompConv2d)]
    model(x)
    for hook in hooks:
        hook.remove()
    rows = ["| layer | C_in->C_out, k, s | d | form | MACs plain / CompConv / deployed (M) | plain (ms) | CompConv (ms) "
            "| deployed (ms) | deployed / plain |", "|---|---|---:|---|---|---:|---:|---:|---:|"]
    totals = [0.0, 0.0, 0.0]
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, CompConv2d):
            continue
        inp = inputs[layer_name]
        norm_name = report.norm_of.get(layer_name)
        norm = model.get_submodule(norm_name) if norm_name else nn.Identity()
        dnorm = deployed.get_submodule(norm_name) if norm_name else nn.Identity()
        plain = nn.Sequential(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                        layer.padding, layer.dilation, bias=False), copy.deepcopy(norm))
        candidates = {"plain": plain.eval().to(device, memory_format=torch.channels_last),
                      "compconv": nn.Sequential(layer, norm).eval(),
                      "deployed": nn.Sequential(deployed.get_submodule(layer_name), dnorm).eval()}
        timed = _timed_ms({k: (lambda m=m: m(inp)) for k, m in candidates.items()}, device, repeats)
        ms = [timed[k] for k in ("plain", "compconv", "deployed")]
        totals = [t + m for t, m in zip(totals, ms)]
        h, w = layer(inp).shape[-2:]
        plan = layer.plan
        choice = choices.get(layer_name)
        form = choice.form if choice else "chain"
        deployed_macs = choice.macs_per_position if choice else plan.macs_per_position
        macs = " / ".join(f"{m * h * w / 1e6:.1f}" for m in (plan.plain_macs_per_position, plan.macs_per_position,
                                                               deployed_macs))
        rows.append(f"| {layer_name} | {layer.in_channels}->{layer.out_channels}, {layer.kernel_size[0]}, "
                    f"{layer.stride[0]} | {plan.depth} | {form} | {macs} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | "
                    f"{ms[2] / ms[0]:.2f} |")
    rows.append(f"| **all replaced layers** | | | | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[2]:.1f} | "
                f"{totals[2] / totals[0]:.2f} |")
    return "\n".join(rows)


def per_layer_train_table(name: str, batch: int, img_size: int, device: torch.device, repeats: int = 5) -> str:
    """Each replaced layer of ``name`` in training: forward + backward (input and parameter gradients) of a plain
    conv of the same geometry, of the CompConv as Figure 2 is written (chain), of its dense training form (1x1
    layers) and of the form the model trains in (``pointwise_form="auto"``). Eager channels_last, on the layer's
    real input (captured in a training-mode forward); ms are medians of ``repeats``, forms timed interleaved."""
    x = torch.randn(batch, 3, img_size, img_size, device=device).to(memory_format=torch.channels_last)
    model = timm.create_model(name).train().to(device, memory_format=torch.channels_last)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, CompConv2d)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()

    def fwd_bwd(module: nn.Module, inp: torch.Tensor, form: str | None):
        leaf = inp.clone().requires_grad_(True)
        # a dense channels_last output gradient, as a norm's backward hands it (not sum()'s expanded ones)
        with torch.no_grad():
            shape = (inp.shape[0], *module(inp[:1]).shape[1:])
        grad = torch.randn(shape, device=inp.device).contiguous(memory_format=torch.channels_last)

        def run() -> None:
            saved = getattr(module, "pointwise_form", None)
            if form is not None:
                module.pointwise_form = form
            try:
                module(leaf).backward(grad)
            finally:
                if form is not None:
                    module.pointwise_form = saved
        return run

    rows = ["| layer | C_in->C_out, k, s | d | HxW out | MACs plain / CompConv (M) | plain (ms) | chain (ms) "
            "| lowrank (ms) | dense (ms) | trained as | as trained (ms) | as trained / plain |",
            "|---|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|"]
    totals = {"plain": 0.0, "chain": 0.0, "trained": 0.0}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, CompConv2d):
            continue
        inp = inputs[layer_name]
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, bias=layer.bias is not None).to(device, memory_format=torch.channels_last)
        candidates = {"plain": fwd_bwd(plain, inp, None), "chain": fwd_bwd(layer, inp, "chain")}
        pointwise = layer.pointwise_form != "chain"
        if pointwise:
            candidates["lowrank"] = fwd_bwd(layer, inp, "lowrank")
            candidates["dense"] = fwd_bwd(layer, inp, "dense")
        trained_as = layer.form_for(inp)
        ms = _timed_ms(candidates, device, repeats)
        trained = ms[trained_as]
        for key, value in (("plain", ms["plain"]), ("chain", ms["chain"]), ("trained", trained)):
            totals[key] += value
        h, w = layer(inp[:1]).shape[-2:]
        plan = layer.plan
        macs = " / ".join(f"{m * h * w * batch / 1e6:.0f}" for m in (plan.plain_macs_per_position, plan.macs_per_position))
        other = " | ".join(f"{ms[k]:.2f}" if k in ms else "-" for k in ("lowrank", "dense"))
        rows.append(f"| {layer_name} | {layer.in_channels}->{layer.out_channels}, {layer.kernel_size[0]}, "
                    f"{layer.stride[0]} | {plan.depth} | {h}x{w} | {macs} | {ms['plain']:.2f} | {ms['chain']:.2f} | "
                    f"{other} | {trained_as} | {trained:.2f} | {trained / ms['plain']:.2f} |")
    rows.append(f"| **all replaced layers** | | | | | {totals['plain']:.1f} | {totals['chain']:.1f} | | | | "
                f"{totals['trained']:.1f} | {totals['trained'] / totals['plain']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-layer", default="", metavar="MODEL:BATCH")
    parser.add_argument("--per-layer-train", default="", metavar="MODEL:BATCH")
    parser.add_argument("--profile", default="", help="comma-separated models to profile (top ops by self time)")
    parser.add_argument("--workload", default="infer:32")
    parser.add_argument("--setting", default="eager-cl")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.per_layer:
        model_name, _, batch = args.per_layer.partition(":")
        print(f"## Per layer: {model_name}, inference batch {batch or 32}, eager-cl\n")
        print(per_layer_table(model_name, int(batch or 32), args.img_size, device))
    if args.per_layer_train:
        model_name, _, batch = args.per_layer_train.partition(":")
        print(f"## Per layer, training: {model_name}, batch {batch or 16}, eager-cl\n")
        print(per_layer_train_table(model_name, int(batch or 16), args.img_size, device))
    for name in [n.strip() for n in args.profile.split(",") if n.strip()]:
        print(f"## Profile: {name}, {args.workload}, {args.setting} (top ops by self time)\n")
        print(profile_ops(name, Workload.parse(args.workload), Setting.parse(args.setting), device, args.img_size,
                          "fp32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
