"""The loop shared by classification and detection. A :class:`Task` gives one training forward, an
evaluation and its metrics; the loop does AMP, clipping, EMA, schedule, signals, exact resume, checkpoints
and loggers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..io import atomic_write_text
from .checkpoint import kept_checkpoint
from .distributed import all_reduce_max, broadcast_object, cleanup
from .loggers import NullLogger, WandbLogger
from .provenance import code_version, device_name
from .memory import peak_memory_mb, reset_peak_memory
from .signals import StopRequest
from .state import Runtime, TrainState, run_label, save_state
from .sums import Sums

_logger = logging.getLogger("compconv.train")
DATA_BOUND_FRACTION = 0.3  # warn when waiting for batches takes more than this share of an epoch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run diverged."""


@dataclass
class Task:
    """What the shared loop needs to know about a task.

    Attributes:
        forward: ``(net, batch) -> (loss, sums)`` for one training batch; ``sums`` holds device tensors
            (and host numbers such as ``count``), accumulated without a host sync.
        evaluate: ``model -> metrics`` on the validation set, reduced over ranks.
        test: ``model -> metrics`` on the test set (None: no test set), called once, after the last epoch.
        train_metrics: The epoch's training metrics from its reduced sums.
        key_metric: The validation metric that picks ``best.pt`` (higher is better).
        final_metrics: The summary's headline metrics from the last evaluation.
        summary_fields: Task fields of the summary (dataset, input size, MACs...).
    """

    forward: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    train_metrics: Callable[[Sums], dict[str, float]]
    key_metric: str
    final_metrics: Callable[[dict[str, float]], dict[str, Any]] = dict
    summary_fields: dict[str, Any] = field(default_factory=dict)
    test: Callable[[nn.Module], dict[str, float]] | None = None  # the test set, read once after the last epoch


def compconv_fields(model: nn.Module) -> dict[str, Any]:
    """The summary's ``c0`` and ``compconv`` options of a patched model (None for a baseline)."""
    report = getattr(model, "compconv_report", None)
    options = report.options.as_dict() if report else None
    return {"c0": options.get("c0") if options else None, "compconv": options}


def train_one_epoch(state: TrainState, loader, task: Task, cfg, rt: Runtime, stop: StopRequest) -> dict | None:
    """Trains the current epoch from ``state.step_in_epoch``; None if a stop signal interrupted it. No step waits
    for the device: sums stay on it, and loss, non-finite check and stop agreement are read every
    ``trainer.log_interval`` steps.
    """
    trainer = cfg.trainer
    state.net.train()
    loader.dataset.set_epoch(state.epoch)
    loader.sampler.set_epoch(state.epoch, start=state.step_in_epoch * loader.batch_size)
    total = min(len(loader) + state.step_in_epoch, trainer.max_train_steps or math.inf)
    bar = _progress_bar(state, total, trainer.epochs) if trainer.progress and rt.dist.is_main else None
    sync_debug = trainer.sync_debug and rt.device.type == "cuda"
    start_time, data_time, seen, lr = time.perf_counter(), 0.0, 0, 0.0
    window_loss, window_steps = torch.zeros((), device=rt.device, dtype=torch.float64), 0
    batches = iter(loader)
    try:
        while state.step_in_epoch < total:
            fetch = time.perf_counter()
            batch = next(batches, None)
            data_time += time.perf_counter() - fetch
            if batch is None:
                break
            if sync_debug:
                torch.cuda.set_sync_debug_mode("error")  # any host sync inside a step raises
            with rt.autocast():
                loss, sums = task.forward(state.net, batch)
            lr = _optimizer_step(state, loss, trainer.clip_grad)
            state.sums.add(**sums)
            window_loss += loss.detach()
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
            window_steps += 1
            seen += int(sums.get("count", 0))
            if bar is not None:
                bar.update(1)
            if window_steps >= trainer.log_interval or state.step_in_epoch >= total or \
                    (stop.requested and rt.dist.world_size == 1):  # alone (SLURM's one task too): stop this step
                mean_loss = float(window_loss) / window_steps
                if _stop_or_diverged(state, stop, rt, mean_loss, lr, trainer.log_interval):
                    return None
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.4g}", refresh=False)
                window_loss.zero_()
                window_steps = 0
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start_time
    metrics = task.train_metrics(state.sums.reduced(rt.device))
    if not math.isfinite(metrics.get("loss", 0.0)):
        raise NonFiniteLossError(f"the epoch's mean training loss is {metrics['loss']} at epoch {state.epoch + 1}; "
                                 f"{kept_checkpoint(rt.run_dir)}")
    frac = data_time / max(elapsed, 1e-9)
    if frac > DATA_BOUND_FRACTION and rt.dist.is_main:
        _logger.warning("epoch %d: %.0f%% of the time went to waiting for data: the loader is the bottleneck "
                        "(raise data.workers, now %d)", state.epoch + 1, 100 * frac, cfg.data.workers)
    return {**metrics, "images_per_s": seen * rt.dist.world_size / max(elapsed, 1e-9), "data_time_frac": frac}


def _progress_bar(state: TrainState, total: float, epochs: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{epochs}", dynamic_ncols=True)


def _optimizer_step(state: TrainState, loss: torch.Tensor, clip_grad: float | None) -> float:
    """Backward, optional clipping, the (scaled) optimizer step, the scheduler and EMA; returns the lr this step
    used (a host float)."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if clip_grad:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    lr = state.optimizer.param_groups[0]["lr"]
    state.global_step += 1
    state.step_in_epoch += 1
    state.scheduler.step_update(state.global_step)
    if state.ema is not None:
        state.ema.update(state.model, step=state.global_step - 1)
    return lr


def _stop_or_diverged(state: TrainState, stop: StopRequest, rt: Runtime, mean_loss: float, lr: float,
                      log_interval: int) -> bool:
    """Whether every rank agrees to stop now; raises :class:`NonFiniteLossError` where the loss diverged on any."""
    stop_now, diverged = _agree(stop, rt, not math.isfinite(mean_loss))
    if diverged:
        value = mean_loss if not math.isfinite(mean_loss) else "non-finite on another rank"
        raise NonFiniteLossError(
            f"training loss is {value} at epoch {state.epoch + 1}, step {state.step_in_epoch} (global "
            f"step {state.global_step}; checked every trainer.log_interval={log_interval} steps), "
            f"lr {lr:.4g}: the run diverged; {kept_checkpoint(rt.run_dir)}; lower optim.lr, add warmup "
            "(sched.warmup_epochs) or set trainer.clip_grad")
    return stop_now


def _agree(stop: StopRequest, rt: Runtime, diverged: bool) -> tuple[bool, bool]:
    """The loop's only host sync: (a stop signal, a non-finite loss) on any rank, in one MAX all-reduce."""
    flags = [float(stop.requested), float(diverged)]
    if rt.dist.enabled:
        flags = all_reduce_max(flags, rt.device)
    return bool(flags[0]), bool(flags[1])


def fit(state: TrainState, task: Task, cfg, rt: Runtime, train_loader) -> dict[str, Any]:
    """Trains to ``trainer.epochs`` (or only evaluates, with ``trainer.eval_only``) and writes the summary. Each
    epoch: train, evaluate (and the EMA weights), log, checkpoint; a stop signal is honoured at the next step. After
    the last epoch the test set, if the task has one, is read once.
    """
    reset_peak_memory(rt.device)
    logger = _make_logger(state, task, cfg, rt)
    if cfg.trainer.eval_only:
        return _finish(state, task, cfg, rt, logger, eval_only=task.evaluate(state.net))
    _record_segment(state, rt)
    clock = _SegmentClock(state)
    last_epoch = cfg.trainer.stop_after_epoch or cfg.trainer.epochs
    with StopRequest() as stop:
        if rt.dist.is_main and state.epoch < last_epoch:
            _logger.info("training from epoch %d step %d to epoch %d, %d steps per epoch (signals now checkpoint)",
                         state.epoch + 1, state.step_in_epoch, last_epoch, len(train_loader))
        while state.epoch < last_epoch:
            train_metrics = train_one_epoch(state, train_loader, task, cfg, rt, stop)
            if train_metrics is None:
                clock.add()
                save_state(state, cfg, rt)
                _stop(stop, logger, rt, f"signal {stop.signum}: checkpoint written to {rt.run_dir / 'last.pt'} at "
                      f"epoch {state.epoch} step {state.step_in_epoch}")
            is_best = _end_epoch(state, task, cfg, rt, logger, train_metrics)
            clock.add()
            save_state(state, cfg, rt, is_best)
            if _agree(stop, rt, diverged=False)[0]:  # a signal during evaluation or saving
                _stop(stop, logger, rt, f"signal {stop.signum}: stopping after epoch {state.epoch} "
                      f"(checkpoint {rt.run_dir / 'last.pt'})")
    test = None
    if task.test is not None and state.epoch >= cfg.trainer.epochs:
        test = task.test(state.net)
        if rt.dist.is_main:
            _logger.info("test (read once, after the last epoch): %s",
                         ", ".join(f"{k} {v:.4g}" for k, v in test.items() if isinstance(v, float)))
    clock.add()
    return _finish(state, task, cfg, rt, logger, train_seconds=state.train_seconds, test=test)


class _SegmentClock:
    """Adds the wall-clock time of this segment of a run (since it started or resumed) to the state."""

    def __init__(self, state: TrainState) -> None:
        self.state, self.since = state, time.perf_counter()

    def add(self) -> None:
        now = time.perf_counter()
        self.state.train_seconds += now - self.since
        self.since = now


def _record_segment(state: TrainState, rt: Runtime) -> None:
    """Appends this segment's code version, device and threads; a resumed run on other code or another device kind
    says so (a study pairs runs of one device kind and thread count)."""
    segment = {"code": code_version(), "device": device_name(rt.device), "threads": torch.get_num_threads(),
               "from_epoch": state.epoch, "from_step": state.step_in_epoch}
    if state.segments and rt.dist.is_main:
        first, last = state.segments[0], state.segments[-1]
        if segment["code"] != last["code"]:
            _logger.warning("resumed with code %s; the run started with %s and last ran %s (summary.json lists "
                            "every segment)", segment["code"], first["code"], last["code"])
        if (segment["device"], segment["threads"]) != (last["device"], last["threads"]):
            _logger.warning("resumed on %s with %d threads; the run last ran on %s with %d threads", segment["device"],
                            segment["threads"], last["device"], last["threads"])
    state.segments.append(segment)


def _end_epoch(state: TrainState, task: Task, cfg, rt: Runtime, logger, train_metrics: dict) -> bool:
    """Evaluates, records and logs the epoch just trained and moves the state to the next; True if it is the best."""
    val_metrics = task.evaluate(state.net)
    record = {"epoch": state.epoch + 1, "lr": state.optimizer.param_groups[0]["lr"],
              **{f"train/{k}": v for k, v in train_metrics.items()},
              **{f"val/{k}": v for k, v in val_metrics.items()}}
    if state.ema is not None:
        record.update({f"val_ema/{k}": v for k, v in task.evaluate(state.ema.module).items()})
    record["peak_mem_mb"] = peak_memory_mb(rt.device)
    value = val_metrics[task.key_metric]
    is_best = state.best is None or value > state.best
    state.best = value if is_best else state.best
    state.history.append(record)
    logger.log(record, step=state.global_step)
    if rt.dist.is_main:
        _logger.info("epoch %d: %s", state.epoch + 1,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
    state.epoch, state.step_in_epoch, state.sums = state.epoch + 1, 0, Sums()
    return is_best


def _stop(stop: StopRequest, logger, rt: Runtime, message: str) -> None:
    _logger.warning(message)
    logger.finish()
    cleanup(rt.dist)
    stop.forward()


def _make_logger(state: TrainState, task: Task, cfg, rt: Runtime):
    if not rt.dist.is_main or cfg.logger.name == "none":
        return NullLogger()
    config = {**cfg.to_dict(), "params": task.summary_fields.get("params"), "macs": task.summary_fields.get("macs")}
    name = cfg.experiment or f"{run_label(cfg)}-s{cfg.seed}"
    logger = WandbLogger(cfg.logger, str(rt.run_dir), config, name, state.logger_id)
    state.logger_id = logger.run_id
    return logger


def _finish(state: TrainState, task: Task, cfg, rt: Runtime, logger, eval_only: dict | None = None,
            train_seconds: float | None = None, test: dict | None = None) -> dict[str, Any]:
    last = state.history[-1] if state.history else {}
    final = eval_only if eval_only is not None else {k[4:]: v for k, v in last.items() if k.startswith("val/")}
    summary = {
        "model": run_label(cfg), "model_name": cfg.model.name, **task.summary_fields, **task.final_metrics(final),
        f"best_{task.key_metric}": state.best if state.history else None,
        "seed": cfg.seed, "epochs": state.epoch, "schedule_epochs": cfg.trainer.epochs, "global_batch": cfg.data.batch_size * rt.dist.world_size,
        "world_size": rt.dist.world_size, "images_per_s": last.get("train/images_per_s"),
        "peak_mem_mb": peak_memory_mb(rt.device), "train_seconds": train_seconds,
        "device": device_name(rt.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "experiment": cfg.experiment, "command": cfg.command,
        "segments": state.segments, "run_dir": str(rt.run_dir), "history": state.history,
        **({f"test_{k}": v for k, v in test.items()} if test is not None else {}),
    }
    if rt.dist.is_main:
        name = "eval.json" if eval_only is not None else "summary.json"
        atomic_write_text(rt.run_dir / name, json.dumps(summary, indent=2, default=str) + "\n")
        logger.summary({k: v for k, v in summary.items() if k != "history" and v is not None})
        logger.finish()
    summary = broadcast_object(summary, rt.dist)
    cleanup(rt.dist)
    return summary
