"""The Fashion-MNIST study as a lab runs it: a held-out validation split and a test set read once, independent
seeds, Hydra multiruns that a rerun resumes or skips, runs that stop within one step and sum their segments'
time and code, the tables from sweep directories, the re-check of one epoch, and the GPU study at CPU sizes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compconv.data import stratified_holdout
from compconv.data.sampling import ResumableSampler
from helpers import FMNIST, ROOT, env, run_script, summary
from scripts import fmnist_study_table as table

TINY = ["data.img_size=32", "data.train_subset=256", "data.val_split=1000", "data.val_subset=128",
        "data.test_subset=128", "trainer.check_training_forms=false", "data.batch_size=32"]
needs_data = pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")


def test_held_out_split_is_stratified_disjoint_and_fixed_by_its_seed():
    targets = [i % 10 for i in range(1000)] + [0] * 7
    train, held = stratified_holdout(targets, 101, seed=0)
    assert len(held) == 101 and len(train) == len(targets) - 101 and not set(train) & set(held)
    counts = [sum(targets[i] == c for i in held) for c in range(10)]
    assert sorted(counts)[0] >= 9 and sum(counts) == 101  # each class near its share (class 0 is the largest)
    assert stratified_holdout(targets, 101, seed=0) == (train, held)
    assert stratified_holdout(targets, 101, seed=1)[1] != held
    with pytest.raises(ValueError, match="cannot hold out"):
        stratified_holdout(targets, 0)


def test_seeds_draw_independent_orders():
    """With ``seed + epoch`` seeding, seed 1's epoch e was seed 0's epoch e + 1."""
    def order(seed, epoch):
        sampler = ResumableSampler(1000, seed=seed)
        sampler.set_epoch(epoch)
        return [index for _, index in sampler]

    assert order(1, 0) != order(0, 1) and order(0, 0) == order(0, 0) and order(0, 0) != order(0, 1)


@needs_data
def test_a_run_validates_on_held_out_images_and_reads_the_test_set_once(tmp_path):
    run_script("train_cls.py", tmp_path, "model=resnet18_compconv128", *TINY, "trainer.epochs=1",
               "trainer.progress=false", "logger.name=none")
    result = summary(tmp_path)
    assert result["val_images"] == 128 and result["test_images"] == 128 and result["train_images"] == 256
    assert "held out" in result["splits"]["val"] and "read once" in result["splits"]["test"]
    assert result["val_top1"] == result["top1"] and 0 <= result["test_top1"] <= 100
    assert result["segments"][0]["code"] and result["train_seconds"] > 0
    log = (tmp_path / "train_cls.log").read_text()
    assert log.count("test (read once, after the last epoch)") == 1


@needs_data
def test_stop_signal_is_honoured_within_one_step_and_segments_add_up(tmp_path):
    """A single process that SLURM/torchrun started (RANK and WORLD_SIZE set: a process group of one) stops at the
    next step after SIGTERM, not at the next log interval; the resumed run sums both segments' time and records
    both segments' code, and warns when the code changed."""
    args = ["model=resnet18_compconv128", *[a for a in TINY if "check_training_forms" not in a],
            "data.train_subset=8192", "trainer.epochs=1", "trainer.log_interval=1000", "trainer.progress=false",
            "logger.name=none"]
    group = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cls.py"), *args, f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, env={**env(), **group}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while "signals now checkpoint" not in _log(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # a few steps into the epoch's 256
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 256  # not at the log interval (the epoch's end)
    first = state["train_seconds"]
    state["segments"][0]["code"] = "0123456789ab"  # as if the code had changed since
    torch.save(state, tmp_path / "last.pt")
    run_script("train_cls.py", tmp_path, *args)
    result = summary(tmp_path)
    assert len(result["segments"]) == 2 and result["segments"][1]["from_step"] == state["step_in_epoch"]
    assert result["train_seconds"] > first
    assert "resumed with code" in _log(tmp_path) and "0123456789ab" in _log(tmp_path)


def _log(run_dir: Path) -> str:
    path = run_dir / "train_cls.log"
    return path.read_text() if path.exists() else ""


@needs_data
@pytest.mark.slow
def test_a_study_sweep_rerun_skips_finished_runs_and_keeps_their_summaries(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "launcher=submitit_local", "experiment=fmnist_study", "model=resnet18_compconv128", "seed=0,1",
            *TINY, "trainer.epochs=1", f"hydra.sweep.dir={sweep}"]
    run_script("train_cls.py", None, *args)
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert [r.name for r in runs] == ["resnet18_compconv128_s0_e1", "resnet18_compconv128_s1_e1"]
    before = {r: (r / "summary.json").read_bytes() for r in runs}
    run_script("train_cls.py", None, *args)
    assert {r: (r / "summary.json").read_bytes() for r in runs} == before
    assert all(_log(r).count("skipped:") == 1 for r in runs)

    results = tmp_path / "results"
    results.mkdir()
    assert table.main(["--runs", str(sweep), "--results", str(results), "--epochs", "1"]) == 0
    rows = table.read_rows(results)
    assert {r["run"] for r in rows} == {r.name for r in runs}
    assert all(r["test_top1"] and r["val_top1"] and "held out" in r["split"] for r in rows)
    log = results / table.PREFIX / "resnet18_compconv128_s0_e1.csv"
    assert list(csv.DictReader(log.open()))[0]["val_top1"] == f"{summary(runs[0])['history'][0]['val/top1']:.6g}"

    # the recorded command of a finished run reruns its first epoch bitwise here (same CPU kind and threads)
    done = subprocess.run([sys.executable, "scripts/fmnist_study_recheck.py", "--run", "resnet18_compconv128_s1_e1",
                           "--results", str(results)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "bitwise" in done.stdout, done.stdout + done.stderr


def _row(run, model, seed, epochs, val, test, kind="AMD EPYC x1", variant=""):
    return {"run": run, "model": model, "variant": variant, "seed": str(seed), "epochs": str(epochs), "val_top1": val,
            "test_top1": test, "macs": "5e7", "executed_macs": "6e7", "params": "2e6", "segments": kind,
            "threads": "1", "train_seconds": "100", "log": f"results/{table.PREFIX}/{run}.csv"}


def test_plateau_rule_and_e_star_from_validation_only():
    rows = [_row(f"r{m}{s}{e}", m, s, e, val, "1") for m, base in (("resnet18", 93.0), ("resnet18_compconv64", 92.0))
            for s in (0, 1) for e, val in ((8, base), (16, base + (0.3 if m == "resnet18" else 0.05)),
                                           (32, base + 0.35))]
    report = table.plateau(rows)
    assert "| resnet18 | 8 |" in report and "+0.30 | no |" in report
    assert "| resnet18_compconv64 | 8 | 92.00, 92.00 | 92.05, 92.05 | +0.05 | yes |" in report
    assert "E* = max(16, 8) = 16 epochs" in report
    assert "| resnet18_compconv64 | 16 |" not in report  # its 16-epoch runs ended the rule: nothing left to decide


def test_main_table_pairs_within_a_cpu_kind_and_claims_only_what_the_rule_allows():
    rows = [_row(f"b{s}", "resnet18", s, 8, "93", f"{93 + 0.1 * s:.2f}") for s in range(5)]
    rows += [_row(f"c{s}", "resnet18_compconv128", s, 8, "93", f"{93 + 0.1 * s + d:.2f}")
             for s, d in enumerate((0.01, -0.02, 0.0, 0.02, -0.01))]
    rows += [_row(f"g{s}", "resnet18_ghost", s, 8, "93", f"{92 + 0.1 * s:.2f}") for s in range(3)]
    rows += [_row(f"x{s}", "resnet18_compconv64", s, 8, "93", "92.5", kind="Intel Xeon x1") for s in range(3)]
    text = table.main_table(rows, 8)
    line = {l.split("|")[1].strip(): l for l in text.splitlines() if l.startswith("| resnet18")}
    assert "no difference (within ±0.25 pt)" in line["resnet18_compconv128"]
    assert "differs" in line["resnet18_ghost"] and "-1.00" in line["resnet18_ghost"]
    assert "no paired seeds" in line["resnet18_compconv64"] and "Intel Xeon" in line["resnet18_compconv64"]


def test_table_refuses_an_unfinished_row(tmp_path):
    path = tmp_path / f"{table.PREFIX}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, table.FIELDS)
        writer.writeheader()
        writer.writerow({**{k: "" for k in table.FIELDS}, "run": "x", "test_top1": ""})
    with pytest.raises(table.TableError, match="has no test_top1"):
        table.read_rows(tmp_path)
    assert table.main(["--results", str(tmp_path / "none")]) == 2


@needs_data
@pytest.mark.slow
def test_gpu_study_runs_every_row_of_its_plan_at_cpu_size_above_chance(tmp_path):
    runs = tmp_path / "runs"
    from scripts.gpu_study import PLANS

    done = subprocess.run([sys.executable, "scripts/gpu_study.py", "--device", "cpu", "--tiny", "--seeds", "0",
                           "--data-root", str(FMNIST), "--runs", str(runs), "--plan", ",".join(PLANS)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in runs.glob("*/summary.json")]
    classifiers = {k: v for k, v in PLANS.items() if k != "det"}
    assert len(summaries) == sum(len(models) for models in classifiers.values())
    assert {s["model_name"] for s in summaries} == {entry.split()[0] for m in classifiers.values() for entry in m}
    # the detectors start from the same seed's classification checkpoint and report trained and deployed test AP
    detectors = [json.loads(p.read_text()) for p in Path(f"{runs}_det").glob("*/summary.json")]
    assert sorted(d["model"] for d in detectors) == sorted(PLANS["det"])
    assert all(d["backbone_checkpoint"] == f"{runs}/{d['model']}_s0_e2/last.pt" for d in detectors)
    assert all(d["test_deployed_AP"] == d["test_AP"] for d in detectors)
    # every model learns: its last epoch's training top-1 is far above chance (10 %); after 32 steps the BatchNorm
    # statistics of the deeper models are not settled, so their evaluation numbers are reported, not judged
    learned = [(s["model"], s["history"][-1]["train/top1"]) for s in summaries]
    assert all(top1 > 30 for _, top1 in learned), learned
    assert all(0 <= s["test_top1"] <= 100 and s["splits"]["test"] for s in summaries)


def test_gpu_study_without_a_gpu_says_so():
    done = subprocess.run([sys.executable, "scripts/gpu_study.py", "--data-root", str(FMNIST)], cwd=ROOT,
                          env={**env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: no CUDA device here")
    assert not (ROOT / "runs" / "fmnist_gpu_study").exists() or not any((ROOT / "runs" / "fmnist_gpu_study").iterdir())


def test_gpu_study_plans_one_sweep_per_model_with_the_data_root():
    from scripts import gpu_study

    parsed = type("A", (), {"plan": "vgg", "seeds": "0,1", "data_root": "/d", "runs": Path("/r"), "device": "cuda",
                            "tiny": False, "extra": [], "cls_epochs": 8})()
    sweeps = gpu_study.commands(parsed)
    assert [s[4] for s in sweeps] == ["model=vgg16_bn", "model=vgg16_bn_compconv128"]
    assert all("optim.lr=0.01" in s and "sched.warmup_epochs=1" in s for s in sweeps)
    assert all("data.root=/d" in s and "trainer=gpu" in s and "seed=0,1" in s for s in sweeps)
    parsed.plan, parsed.cls_epochs = "main,det", 8
    detection = gpu_study.commands(parsed)[-1]
    assert detection[1] == "train_det.py" and "model=resnet50,resnet50_compconv128" in detection
    assert "model.backbone_checkpoint=/r/${model.name}_s${seed}_e8/last.pt" in detection
    assert "+data.generate.fmnist_root=/d" in detection and "trainer=gpu" in detection


def _slurm_ready() -> str | None:
    """None when a one-node SLURM can be started here, else why not."""
    if os.geteuid() != 0:
        return "needs root to install and start SLURM"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "start"], capture_output=True, text=True,
                          timeout=600)
    return None if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


@needs_data
@pytest.mark.slow
def test_slurm_sweep_with_a_preemption_and_a_rerun(tmp_path):
    """A 2-job sweep on a one-node SLURM; one job is sent SIGUSR2 (as SLURM does before a time limit or
    preemption): it checkpoints and is requeued by submitit, or, rerun, resumes; the rerun skips the other."""
    why = _slurm_ready()
    if why:
        pytest.skip(f"no SLURM here: {why}")
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(ROOT / "train_cls.py"), "-m", "launcher=slurm_cpu", "experiment=fmnist_study",
            "model=resnet18_compconv128", "seed=0,1", *TINY, "data.train_subset=2048", "trainer.epochs=2",
            f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"]
    try:
        driver = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        target = sweep / "resnet18_compconv128_s1_e2"
        deadline = time.time() + 300
        while not (target / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (target / "last.pt").exists(), "the job did not reach its first checkpoint"
        jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout.split()
        subprocess.run(["scancel", "--signal=USR2", *jobs[::2]], check=False)
        try:
            driver.wait(timeout=600)
        except subprocess.TimeoutExpired:  # without accounting, submitit may wait on a cancelled job
            driver.kill()
        subprocess.run(["scancel", "--user=root"], check=False)
        time.sleep(2)
        rerun = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        for seed in (0, 1):
            result = summary(sweep / f"resnet18_compconv128_s{seed}_e2")
            assert result["epochs"] == 2 and result["test_top1"] is not None
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "stop"], capture_output=True, timeout=120)


def test_time_table_shows_each_runs_spread_of_epoch_speeds(tmp_path):
    results = tmp_path / "results"
    log = results / table.PREFIX / "b0.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,images_per_s\n1,100.4\n2,61.2\n3,99.0\n")
    rows = [_row("b0", "resnet18", 0, 8, "93", "93.5"), _row("c0", "resnet18_compconv128", 0, 8, "93", "93.1")]
    text = table.time_table(rows, results / f"{table.PREFIX}_time.png")
    line = {l.split("|")[1].strip(): l for l in text.splitlines() if l.startswith("| resnet18")}
    assert line["resnet18"].endswith("| 61-100 |")
    assert line["resnet18_compconv128"].endswith("| — |")  # no log, no spread claimed
    assert (results / f"{table.PREFIX}_time.png").stat().st_size > 0
