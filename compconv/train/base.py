"""The task-independent part of a training run: devices, DDP, optimizer and schedule, AMP, EMA,
the step loop, atomic checkpoints with exact resume, signals and loggers.

A task (classification, detection) subclasses :class:`TrainingRun` and provides the data, the
model, one training step, the evaluation and the summary fields.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import platform
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from torch import nn

from ..io import atomic_write_text
from .checkpoint import LAST, load_newest, model_signature, resume_candidates, save_rotating
from .config import ConfigError
from .distributed import (DistContext, all_reduce_max, barrier, broadcast_object, cleanup, init_distributed,
                          resolve_device, wrap_ddp)
from .engine import Sums
from .loggers import NullLogger, WandbLogger
from .memory import peak_memory_mb, reset_peak_memory
from .optim import build_optimizer, build_scheduler
from .signals import StopRequest

_logger = logging.getLogger("compconv.train")
DATA_BOUND_FRACTION = 0.3  # warn when waiting for batches takes more than this share of an epoch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run diverged."""


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


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


class TrainingRun(abc.ABC):
    """Shared machinery; subclasses implement the ``build_*``, ``training_step``, ``evaluate`` hooks."""

    summary_file = "summary.json"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        try:
            resolve_device(cfg.trainer.device, DistContext())  # a clear error before any process group exists
        except ValueError as error:
            raise ConfigError(str(error)) from error
        wants_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
        self.dist: DistContext = init_distributed("cuda" if wants_cuda else "cpu")
        self.device = resolve_device(cfg.trainer.device, self.dist)  # cuda:LOCAL_RANK under torchrun / SLURM
        self.run_dir = Path(broadcast_object(cfg.run_dir, self.dist))  # ranks may disagree on ${now}
        self.checkpoint_path = self.run_dir / LAST
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.build_data()  # sets train_set, train_sampler, train_loader, val_loader
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set ({len(self.train_set)} images) is smaller than one batch of "
                              f"data.batch_size={cfg.data.batch_size} per process")
        self.model = self.build_model()
        self.macs, self.params = self.count_complexity()
        self.memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        self.global_batch = cfg.data.batch_size * self.dist.world_size
        self.optimizer = build_optimizer(self.model, cfg.optim, self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, self.steps_per_epoch, cfg.trainer.epochs)
        self.amp_dtype = amp_dtype(cfg.trainer.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = timm.utils.ModelEmaV3(self.model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None

        self.net: nn.Module = wrap_ddp(self.model, self.device, self.dist, cfg.trainer.sync_bn)
        if self.net is not self.model:
            self.model = self.net.module  # SyncBatchNorm conversion may have replaced modules
        if cfg.trainer.compile:
            self.net = torch.compile(self.net)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.sums, self.history, self.best, self.wandb_id = Sums(), [], None, None
        self._resume()
        self.logger = self._make_logger()

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def build_data(self) -> None:
        """Sets ``train_set`` (with ``set_epoch``), ``train_sampler``, ``train_loader`` and ``val_loader``."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train."""

    @abc.abstractmethod
    def count_complexity(self) -> tuple[int, int]:
        """(MACs, params) of the model for the summary."""

    @abc.abstractmethod
    def training_step(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass of one batch: the loss to back-propagate and the sums to accumulate."""

    @abc.abstractmethod
    def train_metrics(self, sums: Sums) -> dict[str, float]:
        """Epoch metrics from the reduced training sums."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Validation metrics (reduced over ranks)."""

    key_metric = "top1"

    def summary_fields(self) -> dict[str, Any]:
        """Task-specific fields of the summary (dataset, input size, ...)."""
        return {}

    def final_metrics(self, metrics: dict[str, float]) -> dict[str, Any]:
        """The summary's headline metrics from the last evaluation."""
        return dict(metrics)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        rng = _rng_state()
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        return {
            "model_name": self.cfg.model.name, "model_signature": model_signature(self.model),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "sums": self.sums.reduced(self.device, self._sum_keys()).state(), "history": self.history,
            "best": self.best, "rng": rng, "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(), "wandb_id": getattr(self, "logger", NullLogger()).run_id,
        }

    def _sum_keys(self) -> list[str]:
        keys = set(self.sums.values)
        if self.dist.enabled:  # every rank must reduce the same keys
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, sorted(keys))
            keys = set().union(*gathered)
        return sorted(keys)

    def save(self, is_best: bool = False) -> None:
        state = self._state()  # collective: every rank takes part
        if self.dist.is_main:
            save_rotating(self.run_dir, state, is_best)
        barrier(self.dist)

    def _resume(self) -> None:
        choice = self.cfg.trainer.resume
        if choice == "never":
            return
        if choice == "auto":
            found = load_newest(resume_candidates(self.run_dir), self.cfg.model.name, self.model)
            if found is None:
                return
            state, path = found
        else:
            path = Path(choice)
            if not path.is_file():
                raise FileNotFoundError(f"trainer.resume={choice}: no such checkpoint (auto|never|<path to a .pt>)")
            state, path = load_newest([path], self.cfg.model.name, self.model)
        self.model.load_state_dict(state["model"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        if self.cfg.trainer.eval_only:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.history, self.best, self.wandb_id = state["history"], state["best"], state.get("wandb_id")
        if self.dist.is_main:
            self.sums = Sums(state["sums"])  # reduced sums live on rank 0 only
        rng = state["rng"]
        if isinstance(rng, list):
            rng = rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0]
        _set_rng_state(rng)
        _logger.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step_in_epoch)

    def _make_logger(self):
        if not self.dist.is_main or self.cfg.logger.name == "none":
            return NullLogger()
        config = {**self.cfg.to_dict(), "params": self.params, "macs": self.macs}
        name = self.cfg.experiment or f"{self.cfg.model.name}-s{self.cfg.seed}"
        return WandbLogger(self.cfg.logger, str(self.run_dir), config, name, self.wandb_id)

    # ------------------------------------------------------------------ loops
    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_point(self, stop: StopRequest, loss_sum: torch.Tensor, steps: int) -> bool:
        """Every ``trainer.log_interval`` steps: the only host syncs of the loop.

        Reads the running loss (for the progress bar), stops the run if it is not finite, and agrees
        between ranks on a stop signal. Returns True when the run must stop for a signal.
        """
        loss = float(loss_sum) / max(steps, 1)
        flags = all_reduce_max([float(stop.requested), float(not math.isfinite(loss))], self.device) \
            if self.dist.enabled else [float(stop.requested), float(not math.isfinite(loss))]
        if flags[1]:
            raise NonFiniteLossError(
                f"training loss is {loss if not math.isfinite(loss) else 'non-finite on another rank'} at epoch "
                f"{self.epoch + 1}, step {self.step_in_epoch} (global step {self.global_step}; checked every "
                f"trainer.log_interval={self.cfg.trainer.log_interval} steps), lr {self._step_lr:.4g}: the run "
                f"diverged. {self._kept_checkpoint()}; lower optim.lr, add warmup (sched.warmup_epochs) or set "
                "trainer.clip_grad")

    def _kept_checkpoint(self) -> str:
        if self.checkpoint_path.is_file():
            return f"The last good checkpoint {self.checkpoint_path} is untouched"
        return "No checkpoint was written"
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.4g}", refresh=False)
        return bool(flags[0])

    def train_epoch(self, stop: StopRequest) -> dict[str, float] | None:
        """Trains the current epoch from ``step_in_epoch``; returns None if a stop signal interrupted it.

        No step waits for the device: metric sums stay on it, and the loss, the non-finite check and
        the ranks' agreement on a stop signal are read every ``trainer.log_interval`` steps (a single
        process also honours a signal at every step, which needs no sync).
        """
        cfg = self.cfg.trainer
        self.net.train()
        self.train_set.set_epoch(self.epoch)
        self.train_sampler.set_epoch(self.epoch, start=self.step_in_epoch * self.cfg.data.batch_size)
        total = min(self.steps_per_epoch, cfg.max_train_steps or self.steps_per_epoch)
        self._bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                             dynamic_ncols=True)
        sync_debug = cfg.sync_debug and self.device.type == "cuda"
        start_time, data_time, seen = time.perf_counter(), 0.0, 0
        window_loss, window_steps = torch.zeros((), device=self.device, dtype=torch.float64), 0
        batches = iter(self.train_loader)
        try:
            while self.step_in_epoch < total:
                fetch = time.perf_counter()
                batch = next(batches, None)
                data_time += time.perf_counter() - fetch
                if batch is None:
                    break
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("error")  # any host sync inside a step raises
                with self.autocast():
                    loss, sums = self.training_step(batch)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self._step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used (a host float)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model, step=self.global_step)
                self.sums.add(**sums)
                window_loss += loss.detach()
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
                window_steps += 1
                self.step_in_epoch += 1
                self.global_step += 1
                seen += int(sums.get("count", 0))
                if self._bar is not None:
                    self._bar.update(1)
                at_check = window_steps >= cfg.log_interval or self.step_in_epoch >= total
                if at_check or (stop.requested and not self.dist.enabled):
                    if self._check_point(stop, window_loss, window_steps):
                        return None
                    window_loss.zero_()
                    window_steps = 0
        finally:
            if self._bar is not None:
                self._bar.close()
        elapsed = time.perf_counter() - start_time
        metrics = self.train_metrics(self.sums.reduced(self.device, self._sum_keys()))
        if not math.isfinite(metrics.get("loss", 0.0)):
            raise NonFiniteLossError(f"the epoch's mean training loss is {metrics['loss']} at epoch {self.epoch + 1}. "
                                     f"{self._kept_checkpoint()}")
        frac = data_time / max(elapsed, 1e-9)
        if frac > DATA_BOUND_FRACTION and self.dist.is_main:
            _logger.warning("epoch %d: %.0f%% of the time went to waiting for data: the loader is the bottleneck "
                            "(raise data.workers, now %d)", self.epoch + 1, 100 * frac, self.cfg.data.workers)
        return {**metrics, "images_per_s": seen * self.dist.world_size / max(elapsed, 1e-9), "data_time_frac": frac}

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg.trainer
        reset_peak_memory(self.device)
        if cfg.eval_only:
            return self._finish(eval_only=self.evaluate())
        started = time.perf_counter()
        with StopRequest() as stop:
            while self.epoch < cfg.epochs:
                train_metrics = self.train_epoch(stop)
                if train_metrics is None:
                    self.save()
                    _logger.warning("signal %s: checkpoint written to %s at epoch %d step %d",
                                    stop.signum, self.checkpoint_path, self.epoch, self.step_in_epoch)
                    self.logger.finish()
                    cleanup(self.dist)
                    stop.forward()
                val_metrics = self.evaluate()
                record = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                          **{f"train/{k}": v for k, v in train_metrics.items()},
                          **{f"val/{k}": v for k, v in val_metrics.items()}}
                if self.ema is not None:
                    record.update({f"val_ema/{k}": v for k, v in self.evaluate(self.ema.module).items()})
                record["peak_mem_mb"] = peak_memory_mb(self.device)
                value = val_metrics[self.key_metric]
                is_best = self.best is None or value > self.best
                self.best = value if is_best else self.best
                self.history.append(record)
                self.logger.log(record, step=self.global_step)
                if self.dist.is_main:
                    _logger.info("epoch %d: %s", self.epoch + 1, ", ".join(
                        f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
                self.epoch, self.step_in_epoch, self.sums = self.epoch + 1, 0, Sums()
                self.save(is_best)
                if self._stop_at_epoch_end(stop):  # a signal during evaluation or saving: stop here, not later
                    _logger.warning("signal %s: stopping after epoch %d (checkpoint %s)", stop.signum, self.epoch,
                                    self.checkpoint_path)
                    self.logger.finish()
                    cleanup(self.dist)
                    stop.forward()
        return self._finish(train_seconds=time.perf_counter() - started)

    def _stop_at_epoch_end(self, stop: StopRequest) -> bool:
        if not self.dist.enabled:
            return stop.requested
        return bool(all_reduce_max([float(stop.requested)], self.device)[0])

    def _finish(self, eval_only: dict[str, float] | None = None, train_seconds: float | None = None) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        final = eval_only if eval_only is not None else {k[4:]: v for k, v in last.items() if k.startswith("val/")}
        summary = {
            "model": self.cfg.model.name, **self.summary_fields(), **self.final_metrics(final),
            f"best_{self.key_metric}": self.best if self.history else None,
            "seed": self.cfg.seed, "epochs": self.epoch, "global_batch": self.global_batch,
            "world_size": self.dist.world_size, "params": self.params, "macs": self.macs,
            "images_per_s": last.get("train/images_per_s"),
            "peak_mem_mb": peak_memory_mb(self.device), "train_seconds": train_seconds,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__, "experiment": self.cfg.experiment, "command": self.cfg.command,
            "run_dir": str(self.run_dir), "history": self.history,
        }
        if self.dist.is_main:
            name = "eval.json" if eval_only is not None else self.summary_file
            atomic_write_text(self.run_dir / name, json.dumps(summary, indent=2, default=str) + "\n")
            self.logger.summary({k: v for k, v in summary.items() if k != "history" and v is not None})
            self.logger.finish()
        summary = broadcast_object(summary, self.dist)
        cleanup(self.dist)
        return summary
