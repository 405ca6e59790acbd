#!/usr/bin/env python
"""The Fashion-MNIST study on one GPU: the same ``train_cls.py`` sweeps and recipe as the CPU study
(``experiment=fmnist_study``) with ``trainer=gpu`` (bf16 autocast, channels_last, torch.compile), one run at a
time so each run's images/s is measured alone on the GPU.

    python scripts/gpu_study.py --data-root /data/fashion-mnist --minutes 12          # on an H100/H200
    python scripts/gpu_study.py --data-root /data/fashion-mnist --plan main,det       # + the detection study
    python scripts/gpu_study.py --device cpu --tiny --data-root /usr/share/datasets/fashion-mnist   # the test suite

Plan (``--plan``, comma-separated groups): ``main`` (ResNet-50 and its CompConv64/128/256 and Ghost variants),
``vgg`` (VGG-16 with BatchNorm, as the paper trains VGG, beside its CompConv128 form: the pair is compared only
with each other), ``ablation`` (CompConv128-ResNet-50 with each of our choices changed); seeds ``--seeds``. Each
group is one Hydra multirun into ``--runs`` (default runs/fmnist_gpu_study), so a rerun of the same command
resumes unfinished runs and skips finished ones. ``det`` (after ``main``) is the detection study on the GPU:
``train_det.py -m experiment=fmnist_det_study`` for ResNet-50 and CompConv128-ResNet-50, each seed's backbone from
the same seed's ``main`` checkpoint, into ``<runs>_det``; ``python scripts/fmnist_det_table.py --runs <runs>_det``
tabulates it. ``--minutes`` is a hard cap: when it is reached the running job
gets SIGTERM, checkpoints within one step and stops, and no further run starts. Then
``python scripts/fmnist_study_table.py --runs <runs> --prefix fashion_mnist_gpu_study`` makes the tables.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = {
    "main": ["resnet50", "resnet50_compconv64", "resnet50_compconv128", "resnet50_compconv256", "resnet50_ghost"],
    # VGG's own recipe (Simonyan & Zisserman: SGD lr 0.01), with a warm-up: at the ResNets' lr 0.1 it diverges
    "vgg": [f"{model} optim.lr=0.01 sched.warmup_epochs=1" for model in ("vgg16_bn", "vgg16_bn_compconv128")],
    "ablation": [f"resnet50_compconv128 model.compconv.{option}" for option in
                 ("tail=dense", "tail_kernel=3", "shuffle=false", "inner_norm=true")],
    "det": ["resnet50", "resnet50_compconv128"],  # detectors on the main group's checkpoints
}
TINY = ["data.img_size=32", "data.train_subset=1024", "data.val_split=500", "data.test_subset=500",
        "trainer.compile=false", "trainer.check_training_forms=false", "data.batch_size=64"]
DET_TINY = ["data.generate.train_images=32", "data.generate.val_images=16", "data.generate.test_images=16",
            "data.generate.val_items=1000", "trainer.epochs=1", "trainer.check_training_forms=false"]
GRACE_S = 60  # after SIGTERM at the cap: time to checkpoint before SIGKILL


def commands(args) -> list[list[str]]:
    """One ``train_cls.py -m`` sweep per (group, model) of the plan, and one ``train_det.py -m`` sweep for ``det``."""
    sweeps = []
    device = ["trainer=gpu", "trainer.threads=null"] if args.device == "cuda" else ["trainer.device=cpu"]
    for group in args.plan.split(","):
        if group not in PLANS:
            raise SystemExit(f"error: --plan {group} is not a plan group; choose from {', '.join(PLANS)}")
        if group == "det":
            sweeps.append(det_command(args, device))
            continue
        for entry in PLANS[group]:
            model, *options = entry.split()
            sweep = [sys.executable, "train_cls.py", "-m", "experiment=fmnist_study", f"model={model}", *options,
                     f"seed={args.seeds}", f"trainer.epochs={args.cls_epochs}", f"data.root={args.data_root}",
                     f"hydra.sweep.dir={args.runs}"]
            sweeps.append(sweep + device + (TINY if args.tiny else []) + args.extra)
    return sweeps


def det_command(args, device: list[str]) -> list[str]:
    """The detection sweep: each seed's backbone from that seed's classification checkpoint (``main``), the set
    written from ``--data-root``, compile off (the detector's varying box counts recompile)."""
    checkpoint = f"{args.runs}/${{model.name}}_s${{seed}}_e{args.cls_epochs}/last.pt"
    return [sys.executable, "train_det.py", "-m", "experiment=fmnist_det_study", f"model={','.join(PLANS['det'])}",
            f"seed={args.seeds}", f"model.backbone_checkpoint={checkpoint}", f"data.root={args.runs}_det/set",
            f"+data.generate.fmnist_root={args.data_root}", f"hydra.sweep.dir={args.runs}_det", *device,
            "trainer.compile=false", *(DET_TINY if args.tiny else []), *args.extra]


def run_capped(command: list[str], deadline: float) -> int:
    """Runs one sweep until it ends or ``deadline`` (time.monotonic); at the deadline SIGTERM, then SIGKILL after
    :data:`GRACE_S` seconds."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        return process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return 124


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="a folder with Fashion-MNIST's four idx files")
    parser.add_argument("--plan", default="main,vgg,ablation")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cls-epochs", type=int, default=None,
                        help="classification epochs (default: experiment=fmnist_study's 8; 2 with --tiny)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "fmnist_gpu_study")
    parser.add_argument("--minutes", type=float, default=None, help="hard cap on the whole study")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a few hundred images at 32x32, 2 epochs (tests)")
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps, run nothing")
    parser.add_argument("extra", nargs="*", help="more overrides for every run")
    args = parser.parse_args(argv)
    args.cls_epochs = args.cls_epochs or (2 if args.tiny else 8)
    if args.device == "cuda" and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here: run it on an H100/H200, or --device cpu --tiny to try it at CPU size",
                  file=sys.stderr)
            return 2
    if not (Path(args.data_root) / "train-images-idx3-ubyte.gz").exists() and \
            not (Path(args.data_root) / "train-images-idx3-ubyte").exists():
        print(f"error: --data-root {args.data_root} has no Fashion-MNIST idx files: copy the four files there",
              file=sys.stderr)
        return 2
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else float("inf")
    for command in commands(args):
        print(" ".join(command[1:]), flush=True)
        if args.dry_run:
            continue
        if time.monotonic() >= deadline:
            print("gpu_study: the time cap is reached; rerun the same command to continue", flush=True)
            return 124
        status = run_capped(command, deadline)
        if status == 124:
            print("gpu_study: the time cap is reached; the running job checkpointed; rerun to continue", flush=True)
            return 124
        if status != 0:
            print(f"error: a sweep exited with {status}: {' '.join(command[1:])}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
