"""Runs that fail loudly and lose nothing: rank-to-device mapping, no per-step host syncs, divergence,
damaged checkpoints, file permissions, data-loading time."""

from __future__ import annotations

import os
import signal
import stat

import pytest
import torch
from torch import nn

from compconv.io import atomic_write_text
from compconv.train import TrainConfig, create_state, distributed, setup_runtime, train_one_epoch
from compconv.train.classification import build_loaders, build_model, classification_metrics, classification_sums
from compconv.train.config import DataConfig, LoggerConfig, ModelConfig, TrainerConfig
from compconv.train.engine import Task
from compconv.train.signals import StopRequest
from compconv.train.checkpoint import BEST, LAST, PREVIOUS
from helpers import TINY, run_script, summary

R18 = "model=resnet18_compconv128"


def test_rank_3_of_8_trains_on_its_own_gpu(monkeypatch):
    """torchrun's LOCAL_RANK picks the GPU; DDP gets device_ids=[local_rank] (rank 3 of 8, CUDA stubbed)."""
    calls = {}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))

    class FakeDDP(nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.module, self.kwargs = module, kwargs

    monkeypatch.setattr(distributed, "DistributedDataParallel", FakeDDP)
    ctx = distributed.init_distributed("cuda")
    device = distributed.resolve_device("auto", ctx)
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 8, 3)
    assert calls == {"set_device": 3, "backend": "nccl"} and device == torch.device("cuda", 3)
    wrapped = distributed.wrap_ddp(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), device, ctx, sync_bn=True)
    assert wrapped.kwargs == {"device_ids": [3], "output_device": 3}
    assert isinstance(wrapped.module[1], nn.SyncBatchNorm)
    # a CPU rank (gloo) keeps plain BatchNorm and no device_ids
    cpu = distributed.wrap_ddp(nn.Sequential(nn.BatchNorm2d(4)), torch.device("cpu"), ctx, sync_bn=True)
    assert cpu.kwargs == {} and type(cpu.module[0]) is nn.BatchNorm2d


def _one_epoch_setup(tmp_path, steps: int, log_interval: int = 10_000):
    """A resnet18_compconv128 state and task for ``steps`` training steps of 8 images, built as run_classification does."""
    cfg = TrainConfig(
        model=ModelConfig(name="resnet18_compconv128"), run_dir=str(tmp_path / f"run{steps}"),
        data=DataConfig(train_subset=8 * steps, val_subset=8, batch_size=8, eval_batch_size=8),
        trainer=TrainerConfig(epochs=1, progress=False, log_interval=log_interval, resume="never"),
        logger=LoggerConfig(name="none"))
    rt = setup_runtime(cfg)
    loader, _, _, splits = build_loaders(cfg, rt)
    state = create_state(build_model(cfg.model, splits.num_classes, 1), cfg, rt, loader)
    criterion = nn.CrossEntropyLoss()

    def forward(net, batch):
        logits = net(batch[0])
        loss = criterion(logits, batch[1])
        return loss, {**classification_sums(loss, logits, batch[1]), "skipped": batch[2]}

    task = Task(forward=forward, evaluate=dict, train_metrics=classification_metrics, key_metric="top1")
    return state, loader, task, cfg, rt


def _syncs_of_one_epoch(monkeypatch, tmp_path, steps: int) -> int:
    """Device-to-host reads during one training epoch of ``steps`` steps, with one check point per epoch."""
    state, loader, task, cfg, rt = _one_epoch_setup(tmp_path, steps)
    batches = list(loader)  # count the loop's reads, not the data pipeline's (CPU tensors)

    class Replay(list):
        dataset, sampler, batch_size = loader.dataset, loader.sampler, loader.batch_size

    count = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            count["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    with StopRequest() as stop:
        metrics = train_one_epoch(state, Replay(batches), task, cfg, rt, stop)
    monkeypatch.undo()
    assert metrics["images"] == 8 * steps
    return count["n"]


@pytest.mark.parametrize("log_interval", [10_000, 2])
def test_a_stop_signal_ends_the_epoch_at_the_next_step(tmp_path, log_interval):
    """A single process stops after the step during which the signal came, whatever the log interval."""
    state, loader, task, cfg, rt = _one_epoch_setup(tmp_path, 5, log_interval)
    with StopRequest() as stop:
        stop.signum = signal.SIGTERM  # as the handler records it
        assert train_one_epoch(state, loader, task, cfg, rt, stop) is None
    assert (state.step_in_epoch, state.global_step) == (1, 1)


def test_training_steps_do_not_read_device_values(monkeypatch, tmp_path):
    """Host reads per epoch do not grow with the number of steps: none happens inside a step."""
    assert _syncs_of_one_epoch(monkeypatch, tmp_path, 2) == _syncs_of_one_epoch(monkeypatch, tmp_path, 6)


@pytest.mark.slow
def test_diverging_run_stops_with_one_error_line_and_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = run_script("train_cls.py", run, R18, *TINY, "data.train_subset=512", "trainer.epochs=1",
                      "optim.lr=1e12", "trainer.log_interval=4", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "NonFiniteLossError" in errors[0] and "epoch 1, step 4 " in errors[0]
    assert float(errors[0].split(", lr ")[1].split(":")[0]) > 1e10  # names the learning rate it diverged at
    assert "the run diverged; no checkpoint was kept; lower optim.lr" in errors[0]
    assert not list(run.glob("*.pt")) and not (run / "summary.json").exists()


@pytest.mark.slow
def test_divergence_leaves_the_last_good_checkpoint_untouched(tmp_path):
    run = tmp_path / "run"
    # epoch 1 at a sane lr, then the multistep schedule multiplies it by 1e13
    proc = run_script("train_cls.py", run, R18, *TINY, "trainer.epochs=2", "sched=multistep", "sched.milestones=[1]",
                      "sched.gamma=1e13", "trainer.log_interval=2", check=False)
    assert proc.returncode == 3 and "epoch 2, step 2" in proc.stderr, proc.stderr[-3000:]
    assert f"the run diverged; kept {run}/" in proc.stderr and ".pt (epoch 1, step 0); lower optim.lr" in proc.stderr
    state = torch.load(run / LAST, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and not (run / PREVIOUS).exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_newest_that_loads(tmp_path):
    run = tmp_path / "run"
    args = [R18, *TINY, "trainer.max_train_steps=2"]
    run_script("train_cls.py", run, *args, "trainer.epochs=2")
    assert {p.name for p in run.glob("*.pt")} == {LAST, PREVIOUS, BEST}
    for name in (LAST, BEST):  # keep only prev.pt (epoch 1) intact
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:len(data) // 2])
    proc = run_script("train_cls.py", run, *args, "trainer.epochs=3")
    log = proc.stdout + proc.stderr  # warnings go through Hydra's log
    assert f"{run / LAST} does not load" in log and f"resuming from {run / PREVIOUS}" in log
    assert [h["epoch"] for h in summary(run)["history"]] == [1, 2, 3]  # resumed after epoch 1

    for name in (LAST, PREVIOUS, BEST):
        (run / name).write_bytes(b"not a checkpoint")
    proc = run_script("train_cls.py", run, *args, "trainer.epochs=4", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "no checkpoint loads" in errors[0] and all(str(run / n) in errors[0] for n in (LAST, PREVIOUS, BEST))


@pytest.mark.slow
def test_truncated_last_checkpoint_of_a_one_epoch_run(tmp_path):
    """The independent check's case: one epoch, last.pt truncated, resume=auto. best.pt holds the same
    epoch, so the run warns and continues from it; without it, one error line and status 2."""
    run = tmp_path / "run"
    args = [R18, *TINY, "trainer.max_train_steps=2"]
    run_script("train_cls.py", run, *args, "trainer.epochs=1")
    data = (run / LAST).read_bytes()
    (run / LAST).write_bytes(data[:1000])
    proc = run_script("train_cls.py", run, *args, "trainer.epochs=2")
    assert f"{run / LAST} does not load" in proc.stdout + proc.stderr and summary(run)["epochs"] == 2

    (run / LAST).write_bytes(data[:1000])
    (run / BEST).unlink()
    (run / PREVIOUS).unlink()
    proc = run_script("train_cls.py", run, *args, "trainer.epochs=3", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{run / LAST} (RuntimeError" in errors[0]
    assert summary(run)["epochs"] == 2  # the finished run's summary is not touched


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


@pytest.mark.slow
def test_run_files_are_readable_by_others_and_report_data_time(tmp_path):
    run = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        run_script("train_cls.py", run, R18, *TINY, "trainer.epochs=1", "trainer.max_train_steps=2")
    finally:
        os.umask(previous)
    for name in (LAST, BEST, "summary.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    frac = summary(run)["history"][0]["train/data_time_frac"]
    assert 0 < frac < 1
