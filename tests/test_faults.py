"""What clusters do to long runs: two runs on one directory, a stale lock, full disks, damaged data,
more loader workers than cores. Each fault ends in one line that says what survived."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from entrypoints import error_message
from compconv.data import sampling
from compconv.io import StorageError, as_storage_error, atomic_write_text
from entrypoints import StrictFileHandler
from compconv.train import TrainConfig, run_classification
from compconv.train import checkpoint as ckpt
from compconv.train.config import DataConfig, LoggerConfig, ModelConfig, TrainerConfig
from compconv.train.loggers import _raise_if_storage
from compconv.train.rundir import LOCK_NAME, RunDirInUseError, lock_run_dir
from entrypoints import RunDirLock
from helpers import FMNIST, ROOT, TINY, env, run_script

R18 = "model=resnet18_compconv128"
HOLD = ("import sys, time; from compconv.train.rundir import lock_run_dir; "
        "lock_run_dir(sys.argv[1], 'python train_cls.py (the first run)'); print('held', flush=True); time.sleep(120)")


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


# --- one writer per run directory ---------------------------------------------------------------------------------

def test_second_run_on_a_held_directory_stops_before_touching_it(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        before = _tree(run_dir)
        record = json.loads((run_dir / LOCK_NAME).read_text())
        proc = run_script("train_cls.py", run_dir, R18, *TINY, check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert lines == [f"error: run directory {run_dir} is in use by pid {holder.pid} on host {record['host']} since "
                         f"{record['started']} (python train_cls.py (the first run)); wait for it, or pass another "
                         "hydra.run.dir"], proc.stderr
        assert _tree(run_dir) == before  # no .hydra/, no log, the lock record unchanged
    finally:
        holder.kill()
        holder.wait()


def test_lock_in_library_and_in_the_same_process(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunDirInUseError, match=f"in use by pid {holder.pid}"):
            lock_run_dir(run_dir)
        cfg = TrainConfig(model=ModelConfig(name="resnet18_compconv128"), run_dir=str(run_dir),
                          logger=LoggerConfig(name="none"))
        with pytest.raises(RunDirInUseError):
            run_classification(cfg)  # setup_runtime takes the lock before it loads data
    finally:
        holder.kill()
        holder.wait()
    lock = lock_run_dir(run_dir, "me")
    assert lock_run_dir(run_dir) is lock  # a process holds a directory once
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (run_dir / LOCK_NAME).read_text() == ""  # a clean end leaves nothing to take over


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os, signal, sys; from compconv.train.rundir import "
                           "lock_run_dir; lock_run_dir(sys.argv[1], 'killed run'); os.kill(os.getpid(), signal.SIGKILL)",
                           str(run_dir)], env=env())
    assert dead.returncode == -signal.SIGKILL
    stale = json.loads((run_dir / LOCK_NAME).read_text())
    with caplog.at_level(logging.WARNING):
        lock = lock_run_dir(run_dir, "new run")
    assert f"taking over the lock left by pid {stale['pid']}" in caplog.text and "(killed run)" in caplog.text
    assert lock.record["command"] == "new run"
    lock.release()


def test_lock_is_taken_on_rank_0_only(tmp_path, monkeypatch):
    callback = RunDirLock()
    monkeypatch.setenv("RANK", "1")
    callback._take(tmp_path / "rank1")
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setenv("RANK", "0")
    callback._take(tmp_path / "rank0")
    assert json.loads((tmp_path / "rank0" / LOCK_NAME).read_text())["pid"] == os.getpid()
    callback.on_job_end(config=None, job_return=None)
    assert (tmp_path / "rank0" / LOCK_NAME).read_text() == ""


@pytest.mark.slow
def test_second_run_on_a_live_training_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train_cls.py"), R18, *TINY, "trainer.epochs=50", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "last.pt").is_file():  # the first run is training
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.5)
        second = run_script("train_cls.py", run_dir, R18, *TINY, "trainer.epochs=50", check=False)
        assert second.returncode == 2 and f"is in use by pid {first.pid}" in second.stderr
        assert "train_cls.py" in second.stderr and second.stderr.count("\n") == 1
    finally:
        first.kill()
        first.wait()
    third = run_script("train_cls.py", run_dir, R18, *TINY, "trainer.epochs=1", check=False)  # the lock died with it
    assert "taking over the lock" in third.stdout + third.stderr and "error" not in third.stderr


# --- storage failures -------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the requested size (MiB), unmounted after the test; skips where mounting is not allowed."""
    mounts = []

    def make(mib: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the patched-write tests cover it")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _no_temporaries(run_dir: Path) -> None:
    assert not list(run_dir.glob(".*.tmp")), list(run_dir.iterdir())


@pytest.mark.slow
def test_disk_full_while_writing_epoch_2_checkpoint(small_disk):
    run_dir = small_disk(50) / "run"  # room for .hydra/, last.pt and best.pt of epoch 1 (21 MiB each), not epoch 2
    proc = run_script("train_cls.py", run_dir, R18, *TINY, "trainer.epochs=3", check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: no space left on device writing {run_dir}/last.pt; kept {run_dir}/best.pt (epoch 1, step 0); "
        "free space and rerun the same command to resume"], proc.stderr
    assert "less than 2 checkpoints" in proc.stdout  # warned before the failing save
    _no_temporaries(run_dir)
    assert torch.load(run_dir / "prev.pt", weights_only=True)["epoch"] == 1
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_disk_full_at_the_first_checkpoint(small_disk):
    run_dir = small_disk(12) / "run"
    proc = run_script("train_cls.py", run_dir, R18, *TINY, "trainer.epochs=1", check=False)
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines() == [
        f"error: no space left on device writing {run_dir}/last.pt; no checkpoint was kept; free space and rerun "
        "the same command"], proc.stderr
    _no_temporaries(run_dir)
    assert not list(run_dir.glob("*.pt"))


def _tiny_cfg(run_dir: Path, epochs: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="resnet18_compconv128"), run_dir=str(run_dir),
        data=DataConfig(train_subset=64, val_subset=32, batch_size=32, eval_batch_size=32),
        trainer=TrainerConfig(epochs=epochs, progress=False), logger=LoggerConfig(name="none"))


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                          (errno.EDQUOT, "disk quota exceeded"), (errno.EIO, "I/O error")])
def test_patched_write_failing_at_epoch_2_keeps_epoch_1(tmp_path, monkeypatch, code, reason):
    """Where no tmpfs can be mounted: os.fsync of the second checkpoint raises, as a full disk does."""
    run_dir = tmp_path / "run"
    run_classification(_tiny_cfg(run_dir, 1))
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("compconv.io.os.fsync", failing_fsync)
    with pytest.raises(StorageError) as caught:
        run_classification(_tiny_cfg(run_dir, 2))
    monkeypatch.setattr("compconv.io.os.fsync", real_fsync)
    assert calls["n"] == 1
    error = caught.value
    assert error.path == run_dir / "last.pt" and error.errno == code
    assert str(error).startswith(f"{reason} writing {run_dir}/last.pt; kept {run_dir}/")
    assert "(epoch 1, step 0)" in str(error) and str(error).endswith("rerun the same command to resume")
    _no_temporaries(run_dir)
    assert torch.load(run_dir / "prev.pt", weights_only=True)["epoch"] == 1


def test_torch_save_failure_of_a_full_disk_is_named(tmp_path, monkeypatch):
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")
    monkeypatch.setattr("compconv.io.free_bytes", lambda directory: 0)
    assert as_storage_error(failure, tmp_path / "last.pt").errno == errno.ENOSPC
    monkeypatch.setattr("compconv.io.free_bytes", lambda directory: 10 << 30)
    unknown = as_storage_error(failure, tmp_path / "last.pt")
    assert unknown.errno is None and "write failed ([enforce fail" in str(unknown)
    assert as_storage_error(ValueError("not storage"), tmp_path / "x") is None


def test_summary_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "summary.json", "old")
    monkeypatch.setattr("compconv.io.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(StorageError, match="read-only file system writing .*summary.json; make the run directory"):
        atomic_write_text(tmp_path / "summary.json", "new")
    assert (tmp_path / "summary.json").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_log_file_on_a_full_disk_raises_one_storage_error():
    logger = logging.getLogger("compconv.test_full_log")
    handler = StrictFileHandler("/dev/full")  # every write: ENOSPC
    logger.addHandler(handler)
    try:
        with pytest.raises(StorageError, match="no space left on device writing /dev/full"):
            logger.warning("x" * 10_000)
        assert handler not in logger.handlers
        logger.warning("no second error")
    finally:
        logger.removeHandler(handler)


def test_wandb_storage_failure_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="no space left on device writing"):
        _raise_if_storage(RuntimeError("wandb: [Errno 28] No space left on device"), tmp_path / "wandb")
    _raise_if_storage(RuntimeError("wandb: network is down"), tmp_path / "wandb")  # not storage: wandb is disabled


def test_low_space_is_warned_once_before_a_save(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ckpt, "free_bytes", lambda directory: 100)
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):
            ckpt.save_rotating(tmp_path, {"model": {}, "epoch": epoch, "step_in_epoch": 0})
    assert caplog.text.count("MiB free in") == 1


# --- damaged data ----------------------------------------------------------------------------------------------

def _fmnist_copy(tmp_path: Path) -> Path:
    root = tmp_path / "fmnist"
    shutil.copytree(FMNIST, root)
    return root


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100_000]), "is damaged (Compressed file ended before the end-of-stream"),
    (lambda p: p.write_bytes(b"not a gzip file at all"), "is damaged (Not a gzipped file"),
])
def test_damaged_fashion_mnist_archive_is_one_line(tmp_path, damage, message):
    root = _fmnist_copy(tmp_path)
    damage(root / "train-images-idx3-ubyte.gz")
    proc = run_script("train_cls.py", tmp_path / "run", R18, *TINY, f"data.root={root}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: DataError: Fashion-MNIST file {root}/train-images-idx3-"
                                                   "ubyte.gz") and message in lines[0], proc.stderr
    assert "apt-get install --reinstall dataset-fashion-mnist" in lines[0]


def _coco_tree(root: Path, bad_image: bool) -> Path:
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        for i in (1, 2):
            Image.new("RGB", (64, 48), (80 * i, 20, 0)).save(root / split / f"{i}.jpg")
        data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2)],
                "categories": [{"id": 1, "name": "a"}],
                "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400,
                                 "iscrowd": 0} for i in (1, 2)]}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    if bad_image:
        (root / "train2017" / "2.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


@pytest.mark.slow
def test_unreadable_coco_image_is_one_line(tmp_path):
    root = _coco_tree(tmp_path / "coco", bad_image=True)
    proc = run_script("train_det.py", tmp_path / "run", "data=coco", f"data.root={root}", "data.workers=1",
                      "data.min_size=48", "data.max_size=64", "data.batch_size=2", "trainer.progress=false",
                      "logger=none", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot read image {root}/train2017/2.jpg" in lines[0], proc.stderr
    assert "data.skip_bad=true" in lines[0]


def test_worker_traceback_is_reduced_to_the_original_message():
    from compconv.data import UnreadableImageError

    text = ("Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise X\ncompconv.data.imagefolder.UnreadableImageError: cannot read '
            "image /a.jpg: bad. Remove or replace the file\n")
    assert error_message(UnreadableImageError(text)) == "cannot read image /a.jpg: bad. Remove or replace the file"
    assert error_message(UnreadableImageError("plain")) == "plain"


# --- defaults that fit the machine ------------------------------------------------------------------------------

def test_workers_are_capped_by_the_cores_this_process_may_use(monkeypatch, caplog):
    monkeypatch.setattr(sampling.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with caplog.at_level(logging.INFO, logger="compconv.data"):
        assert sampling.loader_options(8, 4, torch.device("cpu"))["num_workers"] == 2
    assert "data.workers=8 lowered to 2: this process may use 2 CPU cores (os.sched_getaffinity)" in caplog.text
    assert sampling.usable_workers(1) == 1 and sampling.usable_workers(0) == 0
    monkeypatch.setattr(sampling.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes share the node's 16 cores
    assert sampling.usable_workers(8) == 2
