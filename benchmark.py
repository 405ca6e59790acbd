"""Throughput, latency and memory benchmark of timm models, CompConv and Ghost variants side by side.

    python benchmark.py --models resnet50,resnet50_compconv128,resnet50_ghost \\
        --workloads infer:1,infer:32,train:16 --settings eager-nchw,eager-cl,compiled-nchw,compiled-cl \\
        --out results/benchmark_cpu.md
    python benchmark.py --models resnet50+deploy,resnet50_compconv128+deploy --workloads infer:32 \\
        --settings eager-cl,compiled-cl,ort --out results/benchmark_cpu_infer.md   # like for like

``NAME+deploy`` is the inference form :func:`compconv.deploy` builds: for a baseline, its BatchNorms folded
into the convs before them, as they are for CompConv models, so inference ratios compare like with like.
Per-layer tables and op profiles: ``scripts/bench_layers.py``.

In the style of timm's benchmark.py: warm-up, synchronised timing, and the models of one cell
measured interleaved (A B C A B C ...) so machine drift affects all alike. Reported per model:
images/s (median over repeats, and the spread (max - min) / median), the speed ratio to the first
model next to the ideal ratio (first model's MACs / this model's MACs), peak memory, MACs and
params. No Hydra or wandb needed.
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing
import queue as queue_module
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import timm
import torch
import yaml
from torch import nn

from compconv.capture import memory_format_of
from compconv.complexity import complexity
from compconv.inference.timing import interleaved_times
from compconv.io import atomic_write_text
from compconv.train.memory import peak_memory_mb as peak_mb
from compconv.train.memory import reset_peak_memory, resident_memory_mb
from compconv.train import provenance

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Idle before each ONNX Runtime measurement: a session's intra-op threads spin after its runs and would take the
# cores from the next model's session (PyTorch's models share one thread pool). Measured up to 1.3x at batch 1
# (scripts/ort_blocked_experiment.py).
ORT_SWITCH_IDLE_S = 0.2


@dataclass(frozen=True)
class Setting:
    compiled: bool
    channels_last: bool
    ort: bool = False

    @classmethod
    def parse(cls, text: str) -> "Setting":
        if text == "ort":
            return cls(False, False, True)
        mode, _, layout = text.partition("-")
        if mode not in ("eager", "compiled") or layout not in ("nchw", "cl"):
            raise ValueError(f"setting {text!r}: expected eager|compiled - nchw|cl (e.g. compiled-cl) or ort")
        return cls(mode == "compiled", layout == "cl")

    def __str__(self) -> str:
        if self.ort:
            return "ort"
        return f"{'compiled' if self.compiled else 'eager'}-{'cl' if self.channels_last else 'nchw'}"


@dataclass(frozen=True)
class Workload:
    mode: str
    batch: int

    @classmethod
    def parse(cls, text: str) -> "Workload":
        mode, _, batch = text.partition(":")
        if mode not in ("infer", "train") or not batch.isdigit():
            raise ValueError(f"workload {text!r}: expected infer:N or train:N")
        return cls(mode, int(batch))

    def __str__(self) -> str:
        return f"{self.mode}:{self.batch}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


INFERENCE_VARIANTS = ("deploy", "deploy_rule", "reparam")  # training runs the model as trained
VARIANTS = (*INFERENCE_VARIANTS, "plain")


def create_variant(name: str, example_input: torch.Tensor | None = None, runtime: str = "torch",
                   num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """A timm model, optionally in inference form: ``NAME+deploy`` (:func:`compconv.deploy` timing each
    layer's forms on ``example_input`` in ``runtime``), ``NAME+deploy_rule`` (deploy's rule, no timing) or
    ``NAME+reparam`` (``timm.utils.reparameterize_model``, what timm's ``benchmark.py --reparam`` runs);
    ``NAME+plain`` builds the plain :class:`compconv.CompConv2d` (Figure 2 as written, no training fast path);
    ``NAME+OPTION=VALUE`` overrides a CompConv option (e.g. ``+c_prim_divisor=16``). Training
    workloads run the model as trained (``+plain`` and options kept)."""
    from compconv import deploy

    base, *variants = name.split("+")
    options = dict(_option(v) for v in variants if "=" in v)
    variants = [v for v in variants if "=" not in v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} in {name!r}; known: {list(VARIANTS)} or OPTION=VALUE")
    if "plain" in variants:
        options["efficient"] = False
    model = timm.create_model(base, num_classes=num_classes, in_chans=in_chans,
                              **({"compconv": options} if options else {}))
    if "reparam" in variants:
        return timm.utils.reparameterize_model(model.eval())
    if any(v in INFERENCE_VARIANTS for v in variants):
        model.eval()
        if example_input is not None:
            model = model.to(example_input.device, memory_format=memory_format_of(example_input))
        deploy(model, example_input if "deploy" in variants else None, runtime)
    return model


def _option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)  # 16 -> int, true -> bool, dense -> str, as on a Hydra command line


def as_trained(name: str) -> str:
    """``name`` without its inference variants: what a training workload runs."""
    return "+".join(part for part in name.split("+") if part not in INFERENCE_VARIANTS)


def _ort_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    import tempfile

    from compconv.export import export_onnx, ort_session

    folder = tempfile.mkdtemp(prefix="compconv-bench-")
    path = export_onnx(model, f"{folder}/model.onnx", tuple(x.shape[1:]), x.shape[0], deploy_model=False).path
    session = ort_session(path, torch.get_num_threads())
    feed = {session.get_inputs()[0].name: x.contiguous().numpy()}
    return lambda: session.run(None, feed)


def build_step(name: str, workload: Workload, setting: Setting, device: torch.device, img_size: int,
               precision: str, in_chans: int = 3, num_classes: int = 1000) -> tuple[Callable[[], None], nn.Module]:
    """A closure running one inference or training step (forward + backward + SGD) of model ``name``."""
    if workload.mode == "train":  # deploy is an inference form: training runs the model as trained
        name = as_trained(name)
    if setting.ort and (workload.mode == "train" or device.type != "cpu" or precision != "fp32"):
        raise ValueError("the ort setting is inference on the CPU in fp32")
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    x = torch.randn(workload.batch, in_chans, img_size, img_size, device=device).to(memory_format=memory_format)
    model = create_variant(name, x if workload.mode == "infer" else None, "ort" if setting.ort else "torch",
                           num_classes, in_chans).to(device)
    model = model.to(memory_format=memory_format)
    if setting.ort:
        return _ort_step(model, x), model
    dtype = PRECISIONS[precision]
    net = torch.compile(model) if setting.compiled else model

    def ctx():
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    if workload.mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), ctx():
                net(x)
            _sync(device)
    else:
        model.train()
        target = torch.randint(0, num_classes, (workload.batch,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        criterion = nn.CrossEntropyLoss()

        def step() -> None:
            with ctx():
                loss = criterion(net(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
    return step, model


def _peak_child(args, queue) -> None:
    import compconv  # noqa: F401  (a spawned process must register the models again)

    torch.set_num_threads(args[-1])
    step, _ = build_step(*args[:-1])
    device = args[3]
    step()  # allocator pools, optimizer state and lazy inits exist from here on, as in a long run
    before = resident_memory_mb(device)
    reset_peak_memory(device)
    step()
    step()
    queue.put(peak_mb(device) - before)


def peak_memory_mb(name, workload, setting, device, img_size, precision, in_chans=3, num_classes=1000) -> float:
    """Peak memory of two steps over what the process holds after one warm-up step (parameters, gradients,
    optimizer state): a step's working set, in a spawned process per model (:mod:`compconv.train.memory`: CUDA
    max allocated, or the peak RSS on the CPU; glibc returns large freed blocks, so a tiny cell may read 0)."""
    ctx = multiprocessing.get_context("spawn")  # a forked child can deadlock in an initialised OpenMP pool
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child,
                       args=((name, workload, setting, device, img_size, precision, in_chans, num_classes,
                              torch.get_num_threads()), queue))
    proc.start()
    while True:
        try:
            value = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the peak-memory process of {name} died (exit {proc.exitcode})") from None
    proc.join()
    return value


def time_cell(names, workload, setting, device, img_size, precision, warmup, repeats, min_seconds, costs=None,
              in_chans=3, num_classes=1000):
    """Interleaved timing of all models for one (workload, setting) cell: rates[name] = [img/s per repeat].

    ``costs`` (a dict) receives each model's :func:`compconv.complexity` as built for this cell (deploy's
    choices can differ between cells)."""
    # timm models share forward code objects: without a fresh cache and a higher limit, dynamo reaches its
    # recompile limit after a few models and silently runs the rest eagerly (a benchmark-only setting)
    torch.compiler.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(names))
    steps, calls = {}, {}
    for name in names:
        step, model = build_step(name, workload, setting, device, img_size, precision, in_chans, num_classes)
        if costs is not None:
            costs[name] = complexity(model, (in_chans, img_size, img_size))
        for _ in range(warmup):  # includes compilation
            step()
        start = time.perf_counter()
        step()
        calls[name] = max(1, round(min_seconds / max(time.perf_counter() - start, 1e-6)))  # ~min_seconds each
        steps[name] = step
    seconds = interleaved_times(steps, repeats, calls, ORT_SWITCH_IDLE_S if setting.ort else 0.0)
    return {name: [workload.batch / s for s in per_call] for name, per_call in seconds.items()}


def paired_ratio(rates: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Median and quartiles over repeats of ``rates[i] / reference[i]`` (the same repeat of both models)."""
    ratios = [r / ref for r, ref in zip(rates, reference)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


# environment variables that change how fast a CPU run is without changing the command: the memory allocator
# (glibc's mmap/trim thresholds, a preloaded jemalloc/tcmalloc, PyTorch's transparent huge pages) and threading
TIMING_ENVIRONMENT = ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "MALLOC_CONF", "OMP_NUM_THREADS", "KMP_AFFINITY",
                      "DNNL_DEFAULT_FPMATH_MODE")


def timing_environment() -> str:
    """The variables of :data:`TIMING_ENVIRONMENT` (and ``MALLOC_*_``, glibc's tunables) set in this process, as a
    shell prefix (``"THP_MEM_ALLOC_ENABLE=1 "``); empty when none is set. Written before the command in a results
    file's header, so the command there reproduces the run."""
    names = sorted(n for n in os.environ if n in TIMING_ENVIRONMENT or (n.startswith("MALLOC_") and n.endswith("_")))
    return "".join(f"{name}={os.environ[name]} " for name in names)


def device_name(device: torch.device) -> str:
    """The device and, on the CPU, the threads the timings ran with (for a results header)."""
    return f"{provenance.device_name(device)}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,resnet50_compconv64,resnet50_compconv128,resnet50_compconv256,resnet50_ghost",
                        help="comma-separated timm names; the first is the baseline of the ratios")
    parser.add_argument("--workloads", default="infer:1,infer:32,train:16")
    parser.add_argument("--settings", default="eager-nchw,eager-cl,compiled-nchw,compiled-cl")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="target duration of one measurement")
    parser.add_argument("--memory-settings", default="all",
                        help="settings whose peak memory is measured (comma-separated, 'all' or 'none')")
    parser.add_argument("--skip-cells", default="", help="comma-separated WORKLOAD/SETTING cells to leave out, "
                        "e.g. train:16/compiled-cl")
    parser.add_argument("--out", default="", help="markdown file to write (a .csv is written beside it)")
    args = parser.parse_args(argv)

    import compconv  # noqa: F401  (registers the CompConv models)
    import compconv.models

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if not timm.is_model(n.split("+")[0])]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; CompConv models: {compconv.models.registered_model_names()}")
    try:
        workloads = [Workload.parse(w) for w in args.workloads.split(",")]
        settings = [Setting.parse(s) for s in args.settings.split(",")]
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(args.device)
    if device.type == "cpu" and args.precision != "fp32":
        parser.error("autocast precisions are for GPUs here; use --precision fp32 on the CPU")

    costs: dict = {}
    command = timing_environment() + "python benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"# Benchmark: {', '.join(names)}",
        "",
        f"Generated by `{command}`",
        f"on {device_name(device)}; torch {torch.__version__}, timm {timm.__version__}; input {args.img_size}x{args.img_size}, "
        f"{args.in_chans} channel(s), {args.num_classes} classes, {args.precision}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "img/s: median of the repeats (each >= the target duration), models interleaved within a cell (ONNX "
        f"Runtime: {ORT_SWITCH_IDLE_S} s idle before each, so no session's spinning threads slow the next); spread = "
        "(max - min) / median. speed ratio = img/s / first model's img/s; paired = median over repeats of the ratio "
        "within each repeat (the models of a repeat run back to back, so drift between repeats cancels), with its "
        "quartiles; ideal = first model's MACs / this "
        "model's MACs; efficiency = speed ratio / ideal. Variants (+deploy) apply to inference; training runs the "
        "model as trained (+plain: the plain CompConv2d, no training fast path). Peak memory: CUDA max allocated "
        "during two steps, or on CPU the growth of the peak RSS (VmHWM, reset through /proc/self/clear_refs) over "
        "the resident size after one warm-up step, in a spawned process per model. "
        "MACs per image (FlopCounterMode / 2).",
    ]
    rows, sections = [], []

    def write() -> None:
        if not args.out:
            return
        atomic_write_text(args.out, "\n".join(header + sections) + "\n")
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_text(os.path.splitext(args.out)[0] + ".csv", buffer.getvalue())

    skip = {cell.strip() for cell in args.skip_cells.split(",") if cell.strip()}
    for workload in workloads:
        for setting in settings:
            if f"{workload}/{setting}" in skip:
                continue
            started = time.perf_counter()
            rates = time_cell(names, workload, setting, device, args.img_size, args.precision,
                              args.warmup, args.repeats, args.min_seconds, costs, args.in_chans, args.num_classes)
            base = statistics.median(rates[names[0]])
            table = [f"\n## {workload.mode}, batch {workload.batch}, {setting}\n",
                     "| model | MACs (G) | params (M) | img/s | spread | speed ratio | paired [q1, q3] | ideal | efficiency "
                     "| peak mem (MiB) |",
                     "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for name in names:
                median = statistics.median(rates[name])
                spread = (max(rates[name]) - min(rates[name])) / median
                paired, q1, q3 = paired_ratio(rates[name], rates[names[0]])
                ideal = costs[names[0]].macs / costs[name].macs
                measure = args.memory_settings == "all" or str(setting) in args.memory_settings.split(",")
                memory = None if not measure else peak_memory_mb(
                    name, workload, setting, device, args.img_size, args.precision, args.in_chans, args.num_classes)
                shown = name  # training runs the model as trained: the deploy variants are not shown there
                if workload.mode == "train":
                    shown = as_trained(name)
                row = {"workload": str(workload), "setting": str(setting), "model": shown,
                       "macs_G": costs[name].macs / 1e9, "params_M": costs[name].params / 1e6,
                       "img_per_s": median, "spread": spread, "speed_ratio": median / base,
                       "paired_ratio": paired, "paired_q1": q1, "paired_q3": q3, "ideal_ratio": ideal,
                       "efficiency": median / base / ideal, "peak_mem_mb": memory,
                       "latency_ms": 1e3 * workload.batch / median}
                rows.append(row)
                mem = f"{memory:.0f}" if memory is not None else "-"
                table.append(f"| {shown} | {row['macs_G']:.3f} | {row['params_M']:.2f} | {median:.1f} | {spread:.1%} | "
                             f"{row['speed_ratio']:.3f} | {paired:.3f} [{q1:.3f}, {q3:.3f}] | {ideal:.3f} | "
                             f"{row['efficiency']:.3f} | {mem} |")
            sections.extend(table)
            print("\n".join(table), flush=True)
            print(f"(cell took {time.perf_counter() - started:.0f} s)", flush=True)
            write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
