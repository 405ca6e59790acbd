"""scripts/gpu_check.sh runs end to end (tiny sizes on the CPU) and writes its report."""

import subprocess
import sys

import pytest

from helpers import ROOT, env


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    sizes = {"DEVICE": "cpu", "PRECISION": "fp32", "INFER_BATCH": "2", "TRAIN_BATCH": "2", "IMG": "64", "STEPS": "2",
             "VAL_SUBSET": "256", "COMPILE": "false",
             "WARMUP": "1", "REPEATS": "1", "MIN_SECONDS": "0.05", "MEMORY": "none", "RESULTS": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env={**env(), **sizes}, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Benchmark", "## train_cls.py", "## SIGTERM + resume", "## torchrun, one process"):
        assert heading in report
    assert "world size 1" in report and "resnet50_compconv128+deploy" in report
    assert "the resumed run finished 2 epochs" in report
