"""The Fashion-MNIST study: its runner (skips, resumes, stops on time), the re-check of one epoch, its tables,
and the GPU study at CPU sizes. Tiny real runs: 256 training images, one or two epochs."""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys

import pytest

from helpers import ROOT
from scripts import fmnist_study, fmnist_study_recheck, fmnist_study_table

TINY = ["data.img_size=32", "data.train_subset=256", "data.val_subset=256", "trainer.check_training_forms=false"]


def _study(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/fmnist_study.py", "--runs", str(tmp_path / "runs"), "--results",
               str(tmp_path / "results"), "--epochs", "1", *args, "--extra", *TINY]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _rows(tmp_path, prefix: str = "fashion_mnist_study") -> list[dict]:
    with (tmp_path / "results" / f"{prefix}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_plans_pair_every_model_with_the_baseline_and_run_each_once():
    runs = fmnist_study.plan_runs(["pilot", "cpu"], 10)
    assert len(runs) == len(set(runs)) == 1 + 5 * 3 + 4 * 2  # the pilot's budget runs are study runs
    assert runs[:2] == [fmnist_study.Run("resnet18", 0, 10), fmnist_study.Run("resnet18_compconv128", 0, 10)]
    assert fmnist_study.Run("resnet18", 0, 20) in runs  # the pilot's run at twice the budget
    assert {r.seed for r in runs if r.model == "resnet18_ghost"} == {0, 1, 2}
    assert {r.variant for r in runs if r.variant} == set(fmnist_study.ABLATIONS)
    command = fmnist_study.Run("resnet18_compconv128", 1, 10, "tail=dense").command(ROOT / "runs", 1)
    assert "model.compconv.tail=dense" in command and "trainer.threads=1" in command and "seed=1" in command


@pytest.mark.slow
def test_runner_records_skips_and_a_rerun_of_epoch_one_reproduces_the_log(tmp_path, capsys):
    done = _study(tmp_path, "--plan", "pilot")
    assert done.returncode == 0, done.stderr
    rows = _rows(tmp_path)
    assert {r["run"] for r in rows} == {"resnet18_s0_e2", "resnet18_s0_e1", "resnet18_compconv128_s0_e1"}
    for row in rows:
        log = (tmp_path / row["log"]).read_text().splitlines()
        assert log[0].startswith("epoch,val_top1") and len(log) == 1 + int(row["epochs"])
        assert row["commit"] and row["command"].startswith("python train_cls.py experiment=fmnist_study")
    again = _study(tmp_path, "--plan", "pilot")
    assert again.returncode == 0 and "start" not in again.stdout  # finished runs are skipped
    # The independent check: a run's command with trainer.stop_after_epoch=1 gives its logged epoch 1, bitwise.
    long = next(r for r in rows if r["run"] == "resnet18_s0_e2")
    command = long["command"].replace("hydra.run.dir=", f"hydra.run.dir={tmp_path}/recheck").split()
    check = subprocess.run([sys.executable, *command[1:], "trainer.stop_after_epoch=1"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr
    summary = json.loads(next((tmp_path / "recheck").rglob("summary.json")).read_text())
    logged = (tmp_path / long["log"]).read_text().splitlines()[1].split(",")[1]
    assert summary["epochs"] == 1 and summary["schedule_epochs"] == 2
    assert f"{summary['top1']:.6g}" == logged
    # The same check as a script, which also records it; and what it says when a log does not match its run.
    recheck = ["--run", "resnet18_s0_e2", "--results", str(tmp_path / "results")]
    assert fmnist_study_recheck.main([*recheck, "--record"]) == 0
    assert "resnet18_s0_e2 epoch 1: bitwise" in capsys.readouterr().out
    assert "| resnet18_s0_e2 | 1 |" in (tmp_path / "results" / "fashion_mnist_study_recheck.md").read_text()
    log = tmp_path / long["log"]
    lines = log.read_text().splitlines()
    fields = lines[1].split(",")
    fields[1] = f"{float(fields[1]) + 1:.6g}"
    log.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    assert fmnist_study_recheck.main(recheck) == 1
    assert "resnet18_s0_e2 epoch 1: top-1 off by 1.00 pt" in capsys.readouterr().out
    assert fmnist_study_recheck.main(["--run", "resnet18_s9_e2", "--results", str(tmp_path / "results")]) == 2
    assert "error: no run 'resnet18_s9_e2'" in capsys.readouterr().err
    assert fmnist_study_recheck.main([*recheck, "--epoch", "5"]) == 2
    assert "error: --epoch 5: results/fashion_mnist_study/resnet18_s0_e2.csv has epochs 1, 2" in capsys.readouterr().err


@pytest.mark.slow
def test_runner_stops_on_time_with_a_checkpoint_and_resumes(tmp_path):
    stopped = _study(tmp_path, "--plan", "pilot", "--only", "_e2", "--hours", "0.003", "--lanes", "1",
                     "--epochs", "1")
    assert stopped.returncode == 0, stopped.stderr
    run_dir = tmp_path / "runs" / "resnet18_s0_e2"
    checkpointed = (run_dir / "last.pt").exists()  # not if the stop came before the first training step
    if "paused" in stopped.stdout:  # (a fast machine may finish inside 11 s)
        assert not (tmp_path / "results" / "fashion_mnist_study.csv").exists()
    resumed = _study(tmp_path, "--plan", "pilot", "--only", "_e2", "--lanes", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["run"] for r in _rows(tmp_path)] == ["resnet18_s0_e2"]
    if "paused" in stopped.stdout and checkpointed:
        assert "resumed from" in (run_dir / "train_cls.log").read_text()


def test_runner_records_a_run_whose_stop_signal_came_after_its_summary(tmp_path, monkeypatch):
    """The race a timed stop can hit: the trainer wrote its summary, then SIGTERM ended it (exit 143)."""
    run = fmnist_study.Run("resnet18", 0, 1)
    args = argparse.Namespace(runs=tmp_path / "runs", results=tmp_path / "results", threads=1, extra=[],
                              commit="abc", code_dir=ROOT, hours=None)
    history = [{"epoch": 1, "val/top1": 80.0, "val/top5": 99.0, "val/loss": 0.5, "train/top1": 81.0,
                "train/loss": 0.4, "lr": 0.1, "train/images_per_s": 100.0}]
    summary = {"epochs": 1, "schedule_epochs": 1, "history": history, "train_images": 256, "val_images": 256,
               "top1": 80.0, "top5": 99.0, "params": 1, "macs": 1, "device": "cpu", "torch": "2"}

    class KilledAfterItsSummary:
        def __init__(self, *_, **__):
            (args.runs / run.name / "summary.json").write_text(json.dumps(summary))

        def wait(self):
            return 143

    monkeypatch.setattr(fmnist_study.subprocess, "Popen", KilledAfterItsSummary)
    study = fmnist_study.Study(args)
    study.stopping.set()  # the runner had asked it to stop
    study.train(run)
    assert not study.failed
    assert [r["run"] for r in _rows(tmp_path)] == [run.name] and _rows(tmp_path)[0]["top1"] == "80.0"


def test_runner_refuses_a_directory_started_with_another_command(tmp_path):
    run_dir = tmp_path / "runs" / "resnet18_s0_e1"
    run_dir.mkdir(parents=True)
    (run_dir / "study.json").write_text('{"commit": "abc", "command": "python other.py", "threads": 1, '
                                        '"train_seconds": 0}')
    done = _study(tmp_path, "--plan", "pilot", "--only", "resnet18_s0_e1")
    assert done.returncode == 1 and "was started as `python other.py`; remove it to start again" in done.stderr


def _write_study(tmp_path, tops: dict[tuple, float]) -> None:
    """Rows and logs of a 2-epoch study: ``tops[(model, seed)]`` or ``tops[(model, variant, seed)]`` = top-1."""
    results = tmp_path / "results"
    (results / "fashion_mnist_study").mkdir(parents=True)
    rows = []
    for key, top1 in tops.items():
        model, variant, seed = key if len(key) == 3 else (key[0], "", key[1])
        run = fmnist_study.Run(model, seed, 2, variant).name
        log = f"results/fashion_mnist_study/{run}.csv"
        (tmp_path / log).write_text(f"epoch,val_top1\n1,{top1 - 5}\n2,{top1}\n")
        rows.append({"run": run, "model": model, "variant": variant, "seed": seed, "epochs": 2,
                     "train_images": 60000, "val_images": 10000, "top1": top1, "command": "python train_cls.py",
                     "log": log})
    with (results / "fashion_mnist_study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_table_gives_paired_differences_with_t_intervals(tmp_path):
    _write_study(tmp_path, {("resnet18", 0): 90.0, ("resnet18", 1): 91.0, ("resnet18", 2): 92.0,
                            ("resnet18_compconv128", 0): 89.0, ("resnet18_compconv128", 1): 90.5,
                            ("resnet18_compconv128", 2): 91.5})
    assert fmnist_study_table.main(["--results", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "fashion_mnist_study.md").read_text()
    # paired differences -1.0, -0.5, -0.5: mean -0.667, sd 0.289, t(2) 4.303 -> half-width 0.717
    assert "| resnet18_compconv128 | 3 | 90.33 ± 1.26 | -0.67 [-1.38, +0.05] (n=3) |" in text
    assert "| resnet18 | 3 | 91.00 ± 1.00 | — |" in text
    assert (tmp_path / "results" / "fashion_mnist_study.png").stat().st_size > 10_000
    mean, half = fmnist_study_table.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(half, 4.303 / math.sqrt(3))


def test_table_lists_the_baseline_first_then_models_by_their_numbers(tmp_path):
    _write_study(tmp_path, {("resnet18_compconv256", 0): 90.0, ("resnet18_ghost", 0): 90.0,
                            ("resnet18_compconv64", 0): 90.0, ("resnet18", 0): 90.0})
    assert fmnist_study_table.main(["--results", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "fashion_mnist_study.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| resnet18")]
    assert rows == ["resnet18", "resnet18_compconv64", "resnet18_compconv256", "resnet18_ghost"]


def test_table_pairs_each_ablation_with_the_same_model_at_its_defaults(tmp_path):
    _write_study(tmp_path, {("resnet18", 0): 92.0, ("resnet18", 1): 92.0,
                            ("resnet18_compconv128", 0): 91.0, ("resnet18_compconv128", 1): 91.5,
                            ("resnet18_compconv128", "tail=dense", 0): 91.5,
                            ("resnet18_compconv128", "tail=dense", 1): 91.5})
    assert fmnist_study_table.main(["--results", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "fashion_mnist_study.md").read_text()
    # against the baseline: -0.5, -0.5; against the defaults: +0.5, 0.0 -> mean +0.25, half-width 12.706 * 0.25
    assert "| resnet18_compconv128 (tail=dense) | 2 | 91.50 ± 0.00 | -0.50 [-0.50, -0.50] (n=2) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| resnet18_compconv128 | tail=dense |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2:4] == ["2", "+0.25 [-2.93, +3.43] (n=2)"]
    assert float(cells[4]) > 0 and float(cells[5]) > 0  # a dense tail costs MACs and params


def test_table_refuses_a_row_whose_log_disagrees(tmp_path, capsys):
    _write_study(tmp_path, {("resnet18", 0): 90.0})
    (tmp_path / "results/fashion_mnist_study/resnet18_s0_e2.csv").write_text("epoch,val_top1\n1,80\n2,85\n")
    assert fmnist_study_table.main(["--results", str(tmp_path / "results")]) == 2
    assert "error: resnet18_s0_e2: top-1 90.0 in fashion_mnist_study.csv but 85 in its log" in capsys.readouterr().err
    assert not (tmp_path / "results" / "fashion_mnist_study.md").exists()


@pytest.mark.slow
def test_gpu_study_runs_end_to_end_at_cpu_sizes(tmp_path):
    (tmp_path / "results").mkdir()
    done = subprocess.run([sys.executable, "scripts/gpu_study.py", "--device", "cpu", "--tiny", "--concurrent", "2",
                           "--results", str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    rows = _rows(tmp_path, "fashion_mnist_gpu_study")
    assert {r["model"] for r in rows} == {"resnet18", "resnet18_compconv128"}
    text = (tmp_path / "results" / "fashion_mnist_gpu_study.md").read_text()
    assert "2 of 2 runs" in text and "| resnet18_compconv128 | 1 |" in text


def test_gpu_study_without_a_gpu_says_so():
    done = subprocess.run([sys.executable, "scripts/gpu_study.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: no CUDA device here")
