"""What a run is made of: where it runs (:class:`Runtime`) and what it advances and checkpoints (:class:`TrainState`)."""

from __future__ import annotations

import json
import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.distributed as dist
from torch import nn

from ..efficient import check_training_forms
from ..models import model_label
from .checkpoint import CheckpointMismatchError, config_changes, load_newest, model_signature, resume_candidates, \
    save_rotating
from .config import ConfigError
from .distributed import DistContext, barrier, broadcast_object, init_distributed, resolve_device, wrap_ddp
from .optim import create_optimizer, create_scheduler
from .rundir import RunDirInUseError, RunDirLock, lock_run_dir
from .sums import Sums

_logger = logging.getLogger("compconv.train")


@dataclass
class Runtime:
    """Where a run executes: process group, device, precision, memory format and run directory."""

    dist: DistContext
    device: torch.device
    run_dir: Path
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    lock: RunDirLock | None = None  # rank 0's lock of run_dir

    def close(self) -> None:
        """Ends the run's hold on its directory (the lock; the process group stays for the caller)."""
        if self.lock is not None:
            self.lock.release()

    def autocast(self):
        """``torch.autocast`` at the run's AMP dtype, or nothing when AMP is off."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def run_label(cfg) -> str:
    """What the run's model is: its name, plus the CompConv options that differ from the variant's own
    (:func:`compconv.models.model_label`); in checkpoints, the summary and the wandb run name."""
    return model_label(cfg.model.name, getattr(cfg.model, "compconv", None))


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """``trainer.amp`` as a dtype: ``auto`` is bf16 on CUDA and off on the CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def in_runtime(cfg, run: "Callable[[Any, Runtime], dict]") -> dict:
    """``run(cfg, runtime)`` inside :func:`setup_runtime`'s runtime, whose run-directory lock is released after. A
    run that already finished this schedule in its directory is skipped in one line, its files left as they are
    (a rerun sweep continues only what is unfinished)."""
    rt = setup_runtime(cfg)
    try:
        done = None if cfg.trainer.eval_only else finished_summary(rt.run_dir, cfg)
        if done is not None:
            if rt.dist.is_main:
                _logger.info("skipped: %s finished its %d epochs (summary.json kept)", rt.run_dir, done["epochs"])
            return done
        return run(cfg, rt)
    finally:
        rt.close()


def finished_summary(run_dir: Path, cfg) -> dict[str, Any] | None:
    """The summary of a run that already trained this configuration to its last epoch in ``run_dir`` (its
    ``summary.json`` says every epoch ran, and its ``last.pt`` holds the same configuration), or None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("epochs") != cfg.trainer.epochs or summary.get("schedule_epochs") != cfg.trainer.epochs:
        return None
    try:
        checkpoint = torch.load(Path(run_dir) / "last.pt", map_location="cpu", weights_only=True)
    except Exception:  # missing or damaged: not provably the same run; the usual resume decides
        return None
    if checkpoint.get("epoch") != cfg.trainer.epochs or config_changes(checkpoint.get("config") or {}, cfg.to_dict()):
        return None
    return summary


def setup_runtime(cfg) -> Runtime:
    """Joins the process group (torchrun / SLURM), picks ``cuda:LOCAL_RANK`` or the CPU, seeds each rank and takes
    the run directory's lock on rank 0; raises :class:`RunDirInUseError` on every rank if another run holds it.
    """
    try:
        resolve_device(cfg.trainer.device, DistContext())  # a clear error before any process group exists
    except ValueError as error:
        raise ConfigError(str(error)) from error
    wants_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    ctx = init_distributed("cuda" if wants_cuda else "cpu")
    device = resolve_device(cfg.trainer.device, ctx)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.seed + ctx.rank)
    random.seed(cfg.seed + ctx.rank)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = Path(broadcast_object(cfg.run_dir, ctx))  # ranks may disagree on ${now}
    in_use, lock = None, None
    if ctx.is_main:
        try:
            lock = lock_run_dir(run_dir, cfg.command)
        except RunDirInUseError as error:
            in_use = str(error)
    in_use = broadcast_object(in_use, ctx)
    if in_use is not None:
        raise RunDirInUseError(in_use)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    return Runtime(ctx, device, run_dir, amp_dtype(cfg.trainer.amp, device), memory_format, lock)


@dataclass
class TrainState:
    """Everything the loop advances and a checkpoint holds: ``model`` is the bare model (saved, evaluated), ``net``
    runs the training batches (wrapped in DDP and/or compiled).
    """

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: timm.utils.ModelEmaV3 | None = None
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    sums: Sums = field(default_factory=Sums)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    logger_id: str | None = None
    train_seconds: float = 0.0  # wall-clock seconds of training and evaluation, summed over every segment
    segments: list[dict[str, Any]] = field(default_factory=list)  # code, device and threads of each segment


def create_state(model: nn.Module, cfg, rt: Runtime, train_loader,
                 input_size: tuple[int, int, int] | None = None) -> TrainState:
    """Moves ``model`` to the run's device and builds its optimizer, schedule, scaler, EMA, DDP and compile; with
    ``input_size`` first checks its CompConv training forms (:func:`check_forms`).
    """
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set ({len(train_loader.dataset)} images) is smaller than one batch of "
                          f"data.batch_size={cfg.data.batch_size} per process")
    model.to(rt.device, memory_format=rt.memory_format)
    if input_size is not None and cfg.trainer.check_training_forms:
        check_forms(model, input_size, rt)
    optimizer = create_optimizer(model, cfg.optim, cfg.data.batch_size * rt.dist.world_size)
    scheduler = create_scheduler(optimizer, cfg.sched, steps_per_epoch, cfg.trainer.epochs)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    ema = timm.utils.ModelEmaV3(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None
    net = wrap_ddp(model, rt.device, rt.dist, cfg.trainer.sync_bn)
    if net is not model:
        model = net.module  # SyncBatchNorm conversion may have replaced modules
    if cfg.trainer.compile:
        net = torch.compile(net)
    return TrainState(model, net, optimizer, scheduler, scaler, ema)


def check_forms(model: nn.Module, input_size: tuple[int, int, int], rt: Runtime) -> None:
    """:func:`compconv.efficient.check_training_forms` on a random batch of two at ``input_size``, on the run's
    device and memory format.
    """
    target = getattr(model, "backbone", model)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    error = check_training_forms(target, x.to(rt.device, memory_format=rt.memory_format))
    if error and rt.dist.is_main:
        _logger.info("training forms checked against Figure 2 at %s: max relative difference %.2g",
                     "x".join(map(str, input_size)), error)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any, rt: Runtime) -> list[Any]:
    if not rt.dist.enabled:
        return [obj]
    gathered = [None] * rt.dist.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def save_state(state: TrainState, cfg, rt: Runtime, is_best: bool = False) -> None:
    """Writes ``last.pt`` (and ``best.pt``) on rank 0; collective, so every rank calls it."""
    checkpoint = {
        "model_name": run_label(cfg), "model_signature": model_signature(state.model),
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(), "ema": state.ema.state_dict() if state.ema else None,
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "global_step": state.global_step,
        "sums": state.sums.reduced(rt.device).host(), "history": state.history, "best": state.best,
        "rng": _gather(_rng_state(), rt), "world_size": rt.dist.world_size, "config": cfg.to_dict(),
        "wandb_id": state.logger_id, "train_seconds": state.train_seconds, "segments": state.segments,
    }
    if rt.dist.is_main:
        save_rotating(rt.run_dir, checkpoint, is_best)
    barrier(rt.dist)


def resume(state: TrainState, cfg, rt: Runtime) -> None:
    """Loads ``trainer.resume``: ``auto`` (the newest loadable checkpoint of the run directory, if any),
    ``never``, or a path. With ``trainer.eval_only`` only the weights (and EMA) are loaded."""
    choice = cfg.trainer.resume
    if choice == "never":
        return
    if choice == "auto":
        found = load_newest(resume_candidates(rt.run_dir), run_label(cfg), state.model)
        if found is None:
            return
        changes = config_changes(found[0].get("config") or {}, cfg.to_dict())
        if changes and not cfg.trainer.eval_only:
            raise CheckpointMismatchError(
                f"{found[1]} is a checkpoint of another run ({'; '.join(changes)}): pass another hydra.run.dir, "
                f"trainer.resume=never to start afresh there, or trainer.resume={found[1]} to continue it with "
                "this run's settings")
    else:
        if not Path(choice).is_file():
            raise FileNotFoundError(f"trainer.resume={choice}: no such checkpoint (auto|never|<path to a .pt>)")
        found = load_newest([Path(choice)], run_label(cfg), state.model)
    checkpoint, path = found
    state.model.load_state_dict(checkpoint["model"])
    if state.ema and checkpoint["ema"]:
        state.ema.load_state_dict(checkpoint["ema"])
    if cfg.trainer.eval_only:
        return
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    state.epoch, state.step_in_epoch = checkpoint["epoch"], checkpoint["step_in_epoch"]
    state.global_step = checkpoint["global_step"]
    state.scheduler.step_update(state.global_step)
    state.history, state.best, state.logger_id = checkpoint["history"], checkpoint["best"], checkpoint.get("wandb_id")
    state.train_seconds, state.segments = checkpoint.get("train_seconds", 0.0), list(checkpoint.get("segments", []))
    if rt.dist.is_main:
        state.sums = Sums(checkpoint["sums"])  # reduced sums live on rank 0 only
    rng = checkpoint["rng"]
    _set_rng_state(rng[rt.dist.rank] if len(rng) == rt.dist.world_size else rng[0])
    _logger.info("resumed from %s at epoch %d step %d", path, state.epoch, state.step_in_epoch)
