"""train_cls.py end to end: real data, summaries, wandb offline, resume, DDP, bad input, launchers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY, env, run_script, summary, write_imagefolder

pytestmark = pytest.mark.slow  # every test here launches train_cls.py

R18 = "model=resnet18_compconv128"


def test_fashion_mnist_few_steps_writes_summary_checkpoint_and_wandb(tmp_path):
    run = tmp_path / "run"
    run_script("train_cls.py", run, "model=resnet50_compconv128", *TINY[:-1], "trainer.epochs=1")
    s = summary(run)
    assert s["model"] == "resnet50_compconv128" and s["c0"] == 128 and s["dataset"] == "fashion_mnist"
    assert s["train_images"] == 256 and s["val_images"] == 128 and s["history"][0]["val/images"] == 128
    assert 0 <= s["top1"] <= 100 and s["top5"] >= s["top1"] and s["macs"] > 0 and s["params"] > 0
    assert s["command"].startswith("python train_cls.py") and "model=resnet50_compconv128" in s["command"]
    assert (run / "last.pt").is_file()
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_imagefolder_of_real_jpegs(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    run = tmp_path / "run"
    run_script("train_cls.py", run, R18, "data=imagefolder", f"data.root={root}", "data.img_size=32",
               "data.batch_size=8", "data.eval_batch_size=8", "data.workers=0", "trainer.epochs=1",
               "trainer.progress=false", "logger.name=none")
    s = summary(run)
    assert s["dataset"] == "imagefolder" and s["train_images"] == 24 and s["val_images"] == 12
    assert s["history"][0]["val/images"] == 12 and s["history"][0]["train/images"] == 24


def _weights(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


def _same_run(a: dict, b: dict) -> None:
    for key in ("top1", "top5", "val_loss", "best_top1"):
        assert a[key] == b[key], key
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for key in ("train/loss", "train/top1", "val/loss", "val/top1", "lr"):
            assert ha[key] == hb[key], key


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_interrupted_run_resumes_to_identical_metrics(tmp_path, how):
    args = [R18, *TINY, "data.train_subset=512", "trainer.epochs=2"]
    reference = tmp_path / "reference"
    run_script("train_cls.py", reference, *args)

    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cls.py"), *args, f"hydra.run.dir={run}"],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == (128 + signal.SIGTERM if how == "sigterm" else -signal.SIGKILL), proc.stderr.read()[-2000:]
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    if how == "sigterm":  # mid-epoch 2, or at the end of epoch 1 or 2 if it came while evaluating or saving
        assert (state["epoch"], state["step_in_epoch"] > 0) in ((1, True), (1, False), (2, False))
    else:
        assert state["epoch"] in (1, 2)
    assert not (run / "summary.json").exists()

    run_script("train_cls.py", run, *args)  # trainer.resume=auto picks up last.pt
    _same_run(summary(run), summary(reference))
    for key, value in _weights(reference).items():
        assert torch.equal(value, _weights(run)[key]), key


def test_two_process_ddp_reduces_to_single_process_metrics(tmp_path):
    base = [R18, *TINY, "trainer.epochs=1", "data.train_subset=128"]
    single = tmp_path / "single"
    run_script("train_cls.py", single, *base)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    double = tmp_path / "ddp"
    run_script("train_cls.py", double, *base, prefix=torchrun)
    s2 = summary(double)
    assert s2["world_size"] == 2 and s2["global_batch"] == 64
    assert s2["history"][0]["train/images"] == 128 and s2["history"][0]["val/images"] == 128

    # The same weights evaluated by 1 and 2 processes: reduced metrics agree.
    checkpoint = f"trainer.resume={single / 'last.pt'}"
    run_script("train_cls.py", tmp_path / "eval1", *base, "trainer.eval_only=true", checkpoint)
    run_script("train_cls.py", tmp_path / "eval2", *base, "trainer.eval_only=true", checkpoint, prefix=torchrun)
    e1, e2 = summary(tmp_path / "eval1", "eval.json"), summary(tmp_path / "eval2", "eval.json")
    assert e1["top1"] == pytest.approx(e2["top1"], abs=1e-9) and e1["top5"] == pytest.approx(e2["top5"], abs=1e-9)
    assert e1["val_loss"] == pytest.approx(e2["val_loss"], rel=1e-5)
    assert e1["top1"] == summary(single)["top1"]


@pytest.mark.parametrize("overrides, message", [
    (["data.root=/nonexistent/fmnist"], "Fashion-MNIST root /nonexistent/fmnist does not exist"),
    (["model=resnet50", "model.name=resnet51"], "unknown model 'resnet51'"),
    (["trainer.amp=fp8"], "trainer.amp='fp8' is invalid"),
    (["model.compconv.tail=conv"], "tail must be one of"),
    (["+trainer.speed=11"], "unknown config key trainer.speed"),
    (["model=resnet5"], "model=resnet5 is not an option; choose one of ['resnet101',"),
    (["data=coco"], "data=coco is a detection dataset: use train_det.py"),
    (["data=imagenet"], "missing required value data.root"),
    (["model=resnet50", "model.compconv={c0: 64}"], "not a CompConv model"),
])
def test_bad_input_fails_cleanly(tmp_path, overrides, message):
    run = tmp_path / "run"
    proc = run_script("train_cls.py", run, *TINY, *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert not list(run.glob("*.pt"))


def test_corrupt_image_is_an_error_or_skipped_and_counted(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    (root / "train" / "class_1" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    args = [R18, "data=imagefolder", f"data.root={root}", "data.img_size=32", "data.batch_size=8",
            "data.workers=0", "trainer.epochs=1", "trainer.progress=false", "logger.name=none"]
    run = tmp_path / "strict"
    proc = run_script("train_cls.py", run, *args, check=False)
    assert proc.returncode == 2 and "cannot read image" in proc.stderr and "class_1/3.jpg" in proc.stderr
    assert not list(run.glob("*.pt"))

    run = tmp_path / "skip"
    run_script("train_cls.py", run, *args, "data.skip_bad=true")
    history = summary(run)["history"][0]
    assert history["train/skipped_images"] == 1 and history["train/images"] == 23


def test_checkpoint_from_another_model_is_refused(tmp_path):
    first = tmp_path / "r18"
    run_script("train_cls.py", first, "model=resnet18", *TINY, "trainer.epochs=1", "trainer.max_train_steps=1")
    run = tmp_path / "other"
    proc = run_script("train_cls.py", run, R18, *TINY, f"trainer.resume={first / 'last.pt'}", check=False)
    assert proc.returncode == 2 and "was saved from model 'resnet18'" in proc.stderr
    assert not list(run.glob("*.pt"))


def test_auto_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    run = tmp_path / "run"
    args = [R18, *TINY, "trainer.epochs=2"]
    run_script("train_cls.py", run, *args, "trainer.stop_after_epoch=1")
    saved = (run / "last.pt").read_bytes()
    proc = run_script("train_cls.py", run, *args, "data.img_size=40", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is a checkpoint of another run (data.img_size: 32 -> 40)" in proc.stderr
    assert "trainer.resume=never" in proc.stderr and (run / "last.pt").read_bytes() == saved
    # an explicit path continues it with the new settings, as the message says
    run_script("train_cls.py", run, *args, "data.img_size=40", f"trainer.resume={run / 'last.pt'}")
    assert summary(run)["epochs"] == 2


def test_submitit_local_multirun_runs_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script("train_cls.py", None, "-m", "launcher=submitit_local", "model=resnet18,resnet18_compconv128",
                      *TINY, "trainer.epochs=1", "trainer.max_train_steps=2", f"hydra.sweep.dir={sweep}")
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [json.loads(p.read_text())["model"] for p in summaries] == ["resnet18", "resnet18_compconv128"], proc.stdout

    # The table script turns these runs into a markdown table, CSV and plot.
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), str(sweep), "--out", str(out)],
                         cwd=ROOT, env=env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    table = (out / "fashion_mnist_cls.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 2 and "not retrieved" in rows[0]
    ratio = float(rows[1].split("|")[8])  # columns: model, C_0, top-1, seeds, top-5, params, MACs, MACs ratio
    assert 0 < ratio < 1  # CompConv row: MACs ratio to the resnet18 baseline
    assert (out / "fashion_mnist_cls.png").stat().st_size > 1000 and (out / "fashion_mnist_cls.csv").is_file()


def test_make_tables_without_runs_fails_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), str(tmp_path)],
                          cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "no finished run" in proc.stderr
