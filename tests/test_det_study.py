"""The detection study as a lab runs it: classification checkpoints of the study's recipe, then one detection sweep
whose only extra override is the checkpoint (resolved per run), the trained and deployed detectors' test AP read
once, and the tables from the sweep directories."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from helpers import FMNIST, ROOT, env, run_script, summary
from scripts import fmnist_det_table as table

CLS_TINY = ["data.img_size=32", "data.train_subset=256", "data.val_split=1000", "data.val_subset=64",
            "data.test_subset=64", "trainer.check_training_forms=false", "data.batch_size=32", "trainer.epochs=1"]
DET_TINY = ["data.generate.train_images=16", "data.generate.val_images=8", "data.generate.test_images=8",
            "data.generate.canvas=96", "data.generate.val_items=1000", "data.min_size=96", "data.max_size=96",
            "data.batch_size=4", "head.fpn_channels=64", "trainer.epochs=1", "trainer.check_training_forms=false"]
needs_data = pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")


@needs_data
@pytest.mark.slow
def test_pretrain_then_detect_with_one_override_and_tabulate(tmp_path):
    pretrained = tmp_path / "cls"
    run_script("train_cls.py", None, "-m", "experiment=fmnist_study", "model=resnet18,resnet18_compconv128", "seed=0",
               *CLS_TINY, f"hydra.sweep.dir={pretrained}")
    sweep = tmp_path / "det"
    args = ["-m", "experiment=fmnist_det_study", "model=resnet18,resnet18_compconv128", "seed=0",
            f"model.backbone_checkpoint={pretrained}/${{model.name}}_s${{seed}}_e1/last.pt",
            f"data.root={tmp_path / 'set'}", *DET_TINY, f"hydra.sweep.dir={sweep}"]
    run_script("train_det.py", None, *args)
    runs = {p.parent.name: summary(p.parent) for p in sweep.glob("*/summary.json")}
    assert set(runs) == {"resnet18_pre_s0_e1", "resnet18_compconv128_pre_s0_e1"}
    for name, result in runs.items():
        model = name.split("_pre")[0]
        assert result["backbone_checkpoint"] == f"{pretrained}/{model}_s0_e1/last.pt"
        assert result["backbone_code"] and result["test_images"] == 8
        assert all(result[f"test_deployed_{m}"] == result[f"test_{m}"] for m in table.METRICS)
    before = (sweep / "resnet18_pre_s0_e1" / "summary.json").read_bytes()
    run_script("train_det.py", None, *args)  # a rerun skips the finished runs
    assert (sweep / "resnet18_pre_s0_e1" / "summary.json").read_bytes() == before

    results = tmp_path / "results"
    results.mkdir()
    assert table.main(["--runs", str(sweep), "--results", str(results), "--epochs", "1"]) == 0
    rows = {r["run"]: r for r in table.read_rows(results)}
    row = rows["resnet18_compconv128_pre_s0_e1"]
    assert row["init"] == "pre" and row["pretrained_code"] and row["pretrained_from"].endswith("s0_e1/last.pt")
    assert row["deployed_test_AP"] == row["test_AP"] and not row["deployed_error"]
    log = list(csv.DictReader((results / table.PREFIX / "resnet18_pre_s0_e1.csv").open()))
    assert len(log) == 1 and log[0]["val_AP"]
    text = (results / f"{table.PREFIX}.md").read_text()
    assert "| resnet18_compconv128 | pre | 1 |" in text and "| yes |" in text

    # the recorded command of a finished run reruns its first epoch bitwise here (same CPU kind and threads)
    done = subprocess.run([sys.executable, "scripts/fmnist_study_recheck.py", "--study", "det", "--run",
                           "resnet18_compconv128_pre_s0_e1", "--results", str(results)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "bitwise" in done.stdout, done.stdout + done.stderr


def test_a_recheck_on_another_cpu_kind_compares_the_detectors_training_loss():
    from scripts.fmnist_study_recheck import STUDIES, judge

    logged = {"val_AP": "50.1", "val_AP50": "80", "val_AP75": "55", "train_loss": "0.500", "lr": "0.01"}
    holds, verdict = judge(logged, {**logged, "val_AP": "47.0", "train_loss": "0.505"}, False,
                           STUDIES["det"].compared)
    assert holds and verdict.startswith("another CPU kind: training loss 1.0 %") and "top-1" not in verdict
    assert not judge(logged, {**logged, "train_loss": "0.52"}, False, STUDIES["det"].compared)[0]
    assert not judge(logged, {**logged, "val_AP": "50.2"}, True, STUDIES["det"].compared)[0]


def _row(model, seed, epochs, val, test, init="pre", kind="AMD EPYC x1", deployed=None, error=""):
    deployed = test if deployed is None else deployed
    return {"run": f"{model}_{init}_s{seed}_e{epochs}", "model": model, "init": init, "seed": str(seed),
            "epochs": str(epochs), "val_AP": str(val), "test_AP": str(test), "test_AP50": "80", "test_AP75": "60",
            "test_APs": "", "test_APm": "50", "test_APl": "55", "deployed_test_AP": str(deployed),
            "deployed_test_AP50": "80", "deployed_test_AP75": "60", "deployed_error": error, "macs": "1.2e9",
            "backbone_macs": "6e8", "params": "1.4e7", "backbone_params": "1.1e7", "train_images_per_s": "9",
            "test_images_per_s": "30", "deployed_images_per_s": "33", "segments": kind, "threads": "1"}


def test_the_plateau_rule_reads_validation_ap_of_the_pretrained_pair_only():
    rows = [_row(m, s, e, val, 1.0) for m, base in (("resnet18", 50.0), ("resnet18_compconv128", 48.0))
            for s in (0, 1) for e, val in ((6, base), (12, base + (1.0 if m == "resnet18" else 0.2)), (24, base + 1.2))]
    rows += [_row("resnet18", s, 6, 10.0, 1.0, init="scratch") for s in (0, 1)]  # not the rule's
    report, epochs = table.plateau(rows)
    assert "| resnet18 | 6 | 50.00, 50.00 | 51.00, 51.00 | +1.00 | no |" in report
    assert "| resnet18_compconv128 | 6 | 48.00, 48.00 | 48.20, 48.20 | +0.20 | yes |" in report
    assert epochs == 12 and "E* = max(12, 6) = 12" in report
    assert "| resnet18_compconv128 | 12 |" not in report
    assert table.plateau(rows[:3])[1] is None


def test_the_main_table_pairs_by_start_and_seed_and_flags_a_deploy_that_moved_ap():
    rows = [_row("resnet18", s, 12, 60, 60 + s) for s in range(3)]
    rows += [_row("resnet18_compconv128", s, 12, 59, 59 + s + d, deployed=59 + s + d + (0.2 if s == 2 else 0))
             for s, d in enumerate((0.1, -0.1, 0.0))]
    rows += [_row("resnet18", s, 12, 30, 30, init="scratch") for s in range(3)]
    rows += [_row("resnet18_compconv128", s, 12, 30, 29, init="scratch", error="outputs differ" if s == 1 else "")
             for s in range(3)]
    text = table.main_table(rows, 12)
    lines = [line for line in text.splitlines() if line.startswith("| resnet18")]
    assert [line.split("|")[1:3] for line in lines] == [[" resnet18 ", " pre "], [" resnet18_compconv128 ", " pre "],
                                                        [" resnet18 ", " scratch "],
                                                        [" resnet18_compconv128 ", " scratch "]]
    assert "-1.00 [-1.25, -0.75]" in lines[1] and "NO: " in lines[1] and "s2 61.2 vs 61.0" in lines[1]
    assert "-1.00 [-1.00, -1.00]" in lines[3] and "no: s1: outputs differ" in lines[3]
    assert "| yes |" in lines[0]
