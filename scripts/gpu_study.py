#!/usr/bin/env python
"""The Fashion-MNIST study on one GPU in minutes: ResNet-50 family, VGG-16 pair and the ablations, 3 seeds.

    python scripts/gpu_study.py                       # on an H100/H200: every run, 6 at a time, then the table
    python scripts/gpu_study.py --device cpu --tiny   # the same code end to end in seconds (the test suite)

Fashion-MNIST is held on the GPU (uint8, 47 MB; resized once), so no loader runs. Each run is a process
training one model with bf16 autocast and channels_last (``--compile`` adds torch.compile); ``--concurrent``
runs share the GPU at once. The recipe is the CPU study's, read from configs/experiment/fmnist_study.yaml
(input size, crop padding, epochs, every optimiser setting it names; SGD momentum 0.9, weight decay off norms
and biases, per-step cosine), at batch 256. Augmentation (horizontal flip; a random crop where the recipe pads) and
the data order are drawn from a generator seeded by (seed, epoch) on the CPU: for one seed every model sees
the same images in the same order.
Each finished run writes its per-epoch log to ``results/fashion_mnist_gpu_study/`` and its row to
``results/fashion_mnist_gpu_study.csv``; then ``scripts/fmnist_study_table.py`` makes the table and plots, whose
header gives the GPU's name and the measured wall time.

How long: not yet measured, as no GPU has been lent to this project. The default plan is 29 runs of 8 epochs
(5 ResNet-50 models and the VGG-16 pair, 3 seeds each; 4 ablations, 2 seeds each): 1.4e16 MACs of training and
evaluation at 64x64 (each model's MACs from ``compconv.complexity``, a training step taken as 3 forwards), which
is 28 s at an H100's bf16 dense peak (989 TFLOPS). Ten minutes therefore asks for about 5 % of that peak across
the six concurrent runs. ``--minutes 10`` starts no run after ten minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.fmnist_study import upsert_row, variant_options, write_log  # noqa: E402  (one format for both studies)
PREFIX = "fashion_mnist_gpu_study"
PLANS = {
    "main": [(m, "") for m in ("resnet50", "resnet50_compconv64", "resnet50_compconv128", "resnet50_compconv256",
                                "resnet50_ghost")],
    "vgg": [("vgg16", ""), ("vgg16_compconv128", "")],
    "ablation": [("resnet50_compconv128", v) for v in ("tail=dense", "tail_kernel=3", "shuffle=false",
                                                        "inner_norm=true")],
}
TINY = [("resnet18", ""), ("resnet18_compconv128", "")]


def study_recipe() -> dict:
    """The CPU study's experiment config (its ``data``, ``optim`` and ``trainer`` entries), so both studies train
    one recipe."""
    import yaml

    return yaml.safe_load((ROOT / "configs" / "experiment" / "fmnist_study.yaml").read_text())


def run_name(model: str, variant: str, seed: int, epochs: int) -> str:
    return f"{model}{'-' + variant.replace('=', '_') if variant else ''}_s{seed}_e{epochs}"


def load_fashion_mnist(device, img_size: int, train_subset: int | None, val_subset: int | None):
    """(train images, train labels, val images, val labels) on ``device``: float 1 x size x size, normalised."""
    import torch.nn.functional as F

    from compconv.data import FashionMNIST
    from compconv.train.config import DataConfig

    cfg = DataConfig()
    out = []
    for split, subset in (("train", train_subset), ("val", val_subset)):
        data = FashionMNIST(cfg.root, split, subset=subset)
        images = data.images.to(device).float().div_(255)
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", antialias=True,
                               align_corners=False)
        out += [(images - cfg.mean[0]) / cfg.std[0], data.targets.to(device)]
    return out


def augment(images, generator, padding: int):
    """Random crop with zero padding and a horizontal flip, per image, drawn from ``generator`` (CPU)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device)[None])  # n x h
    cols = (dx[:, None] + torch.arange(w, device=images.device)[None])  # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = torch.arange(n, device=images.device)[:, None, None]
    return padded[index, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_one(spec: dict) -> dict:
    """One run (a worker process): train, evaluate each epoch, return the summary and the per-epoch history."""
    import timm
    import torch

    import compconv
    from compconv.train.config import OptimConfig, SchedConfig
    from compconv.train.optim import create_optimizer, create_scheduler

    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    x_train, y_train, x_val, y_val = load_fashion_mnist(device, spec["img_size"], spec["train_subset"],
                                                        spec["val_subset"])
    options = variant_options(spec["variant"])
    model = timm.create_model(spec["model"], num_classes=10, in_chans=1, **({"compconv": options} if options else {}))
    cost = compconv.complexity(model, (1, spec["img_size"], spec["img_size"]))
    model = model.to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if spec["compile"] else model
    batch = spec["batch"]
    steps = len(x_train) // batch
    optimizer = create_optimizer(model, OptimConfig(**spec["optim"]), batch)
    scheduler = create_scheduler(optimizer, SchedConfig(), steps, spec["epochs"])
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
    criterion = torch.nn.CrossEntropyLoss()
    history, step, started = [], 0, time.perf_counter()
    for epoch in range(spec["epochs"]):
        generator = torch.Generator().manual_seed(spec["seed"] * 10_000 + epoch)  # the same for every model
        order = torch.randperm(len(x_train), generator=generator).to(device)
        model.train()
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, correct, count
        epoch_start = time.perf_counter()
        for i in range(steps):
            index = order[i * batch:(i + 1) * batch]
            images = augment(x_train[index], generator, spec["crop_padding"])
            images = images.contiguous(memory_format=torch.channels_last)
            with amp:
                logits = net(images)
                loss = criterion(logits.float(), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            sums += torch.stack([loss.detach().double() * len(index), (logits.argmax(1) == y_train[index]).sum(),
                                 torch.tensor(len(index), device=device)]).double()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - epoch_start
        loss_sum, correct, count = sums.tolist()
        if not loss_sum == loss_sum or loss_sum == float("inf"):
            raise RuntimeError(f"{spec['name']}: training loss is {loss_sum / count} at epoch {epoch + 1}: diverged")
        val = evaluate(model, x_val, y_val, amp)
        history.append({"epoch": epoch + 1, "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
                        "train_top1": 100 * correct / count, "train_loss": loss_sum / count,
                        "lr": optimizer.param_groups[0]["lr"], "images_per_s": count / seconds})
    return {"history": history, "params": cost.params, "macs": cost.macs, "train_images": len(x_train),
            "val_images": len(x_val), "train_seconds": round(time.perf_counter() - started, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}


def evaluate(model, images, labels, amp, batch: int = 1000) -> dict:
    import torch

    model.eval()
    loss, top1, top5 = 0.0, 0, 0
    with torch.no_grad(), amp:
        for i in range(0, len(images), batch):
            logits = model(images[i:i + batch].contiguous(memory_format=torch.channels_last)).float()
            target = labels[i:i + batch]
            loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            best = logits.topk(min(5, logits.shape[1]), 1).indices
            top1 += int((best[:, 0] == target).sum())
            top5 += int((best == target[:, None]).any(1).sum())
    return {"loss": loss / len(images), "top1": 100 * top1 / len(images), "top5": 100 * top5 / len(images)}


def write_results(results: Path, spec: dict, summary: dict, commit: str, command: str) -> None:
    """The run's per-epoch log and its row of ``results/fashion_mnist_gpu_study.csv`` (the CPU study's format)."""
    log = results / PREFIX / f"{spec['name']}.csv"
    write_log(log, summary["history"])
    last = summary["history"][-1]
    row = {"run": spec["name"], "model": spec["model"], "variant": spec["variant"], "seed": spec["seed"],
           "epochs": spec["epochs"], "train_images": summary["train_images"], "val_images": summary["val_images"],
           "top1": last["val_top1"], "top5": last["val_top5"], "params": summary["params"], "macs": summary["macs"],
           "threads": "", "images_per_s": last["images_per_s"], "train_seconds": summary["train_seconds"],
           "device": summary["device"], "torch": summary["torch"],
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "command": command,
           "log": f"{results.name}/{PREFIX}/{log.name}"}
    upsert_row(results / f"{PREFIX}.csv", row, threading.Lock())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="main,vgg,ablation", help=f"comma-separated: {', '.join(PLANS)}")
    parser.add_argument("--epochs", type=int, default=None, help="default: the CPU study's budget")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of main and vgg; the ablations take 2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=6, help="runs sharing the device at once")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--minutes", type=float, default=None, help="start no run after this many minutes")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized: ResNet-18 pair, 512 images, 1 epoch")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one run, in its own process
        spec = json.loads(args.worker)
        print(json.dumps(train_one(spec)))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here; run on a GPU, or pass --device cpu --tiny to check the code",
                  file=sys.stderr)
            return 2
    recipe = study_recipe()
    img_size, crop_padding = recipe["data"]["img_size"], recipe["data"]["crop_padding"]
    pairs = TINY if args.tiny else [p for plan in args.plan.split(",") for p in PLANS[plan]]
    specs = []
    for model, variant in pairs:
        for seed in range(1 if args.tiny else (2 if variant else args.seeds)):
            epochs = 1 if args.tiny else args.epochs or recipe["trainer"]["epochs"]
            specs.append({"name": run_name(model, variant, seed, epochs), "model": model, "variant": variant,
                          "seed": seed, "epochs": epochs, "device": args.device, "batch": 64 if args.tiny else args.batch,
                          "bf16": args.device.startswith("cuda"), "compile": args.compile, "img_size": img_size,
                          "crop_padding": crop_padding, "optim": recipe["optim"],
                          "train_subset": 512 if args.tiny else None, "val_subset": 256 if args.tiny else None})
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    command = "python scripts/gpu_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started, pending, running, failed, devices = time.time(), list(specs), {}, [], set()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < args.concurrent and not (
                args.minutes and time.time() - started > 60 * args.minutes):
            spec = pending.pop(0)
            running[spec["name"]] = (spec, subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
        if args.minutes and time.time() - started > 60 * args.minutes and pending:
            print(f"--minutes {args.minutes} reached: {len(pending)} runs not started", file=sys.stderr)
            pending = []
        for name, (spec, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[name]
            if proc.returncode != 0:
                failed.append(name)
                print(f"error: {name} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}",
                      file=sys.stderr)
                continue
            summary = json.loads(out.strip().splitlines()[-1])
            devices.add(summary["device"])
            write_results(args.results, spec, summary, commit, command)
            print(f"[{time.time() - started:6.0f} s] {name} done", flush=True)
        time.sleep(0.2)
    wall = time.time() - started
    from scripts.fmnist_study_table import main as table

    device = "CPU (--tiny)" if args.tiny else ", ".join(sorted(devices)) or args.device  # as the runs report it
    header = (f"Runs: `{command.strip()}` on {device}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
              f"{len(specs) - len(failed)} of {len(specs)} runs in {wall / 60:.1f} min wall, {args.concurrent} at a "
              f"time; bf16 autocast and channels_last on CUDA, batch {specs[0]['batch']}.")
    table(["--results", str(args.results), "--prefix", PREFIX, "--baseline", "resnet18" if args.tiny else "resnet50",
           "--img-size", str(img_size), "--title",
           f"Fashion-MNIST study on one GPU ({img_size}x{img_size}, full 60k training set)", "--header", header])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
