#!/usr/bin/env python
"""Re-checks one finished run of the Fashion-MNIST study (or, with ``--study det``, of the detection study):
reruns its recorded command to epoch k only (``trainer.stop_after_epoch=k``; the schedule still spans all its
epochs) and compares epoch k with its committed per-epoch log.

    python scripts/fmnist_study_recheck.py --run resnet18_compconv128_s1_e8            # epoch 1
    python scripts/fmnist_study_recheck.py --run resnet18_s0_e8 --epoch 2 --record     # and append the result
                                                                                       # to results/..._recheck.md
    python scripts/fmnist_study_recheck.py --study det --run resnet18_pre_s0_e8

On the run's CPU kind and thread count, every logged value (validation top-1 and loss, or box AP; training loss
and top-1; learning rate) must read the same at the log's 6 significant digits ("bitwise"). On another CPU kind,
floating-point sums are ordered differently, the run drifts, and a mid-training validation snapshot can move by
points; so the re-check compares the epoch's training statistics, the mean over every step: training loss within
2 % (relative) and, for classification, training top-1 within 0.5 pt, and says that this is the comparison it
made. Exit 0 when it holds, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compconv.train.provenance import code_version, device_name  # noqa: E402
from scripts import fmnist_det_table, fmnist_study_table  # noqa: E402
from scripts.fmnist_study_table import TableError, log_value, run_log  # noqa: E402

LOSS_RELATIVE, TOP1_POINTS = 0.02, 0.5  # another CPU kind: the epoch's training statistics within these


@dataclass(frozen=True)
class Study:
    """What a study's re-check reads: its table module (CSV, logs), entry point and compared log columns."""

    table: ModuleType
    script: str
    compared: tuple[str, ...]
    title: str


STUDIES = {
    "cls": Study(fmnist_study_table, "train_cls.py", ("val_top1", "val_top5", "val_loss", "train_top1", "train_loss",
                                                      "lr"), "the Fashion-MNIST study"),
    "det": Study(fmnist_det_table, "train_det.py", ("val_AP", "val_AP50", "val_AP75", "train_loss", "lr"),
                 "the detection study"),
}


class RecheckError(ValueError):
    """The run, its log or its rerun cannot be compared; the message says why."""


def find_run(study: Study, results: Path, run: str) -> tuple[dict, dict[str, str]]:
    """The run's row of the study CSV and its per-epoch log, by epoch."""
    rows = {row["run"]: row for row in study.table.read_rows(results)}
    if run not in rows:
        raise RecheckError(f"no run {run!r} in {results / (study.table.PREFIX + '.csv')}; finished runs: "
                           f"{', '.join(sorted(rows))}")
    path = run_log(results, rows[run])
    try:
        with path.open(newline="") as f:
            log = {line["epoch"]: line for line in csv.DictReader(f)}
    except (OSError, KeyError) as error:
        raise RecheckError(f"the per-epoch log {path} cannot be read ({error})") from error
    return rows[run], log


def rerun(study: Study, command: str, epoch: int, run_dir: Path) -> dict:
    """Runs ``command`` (``python train_cls.py ...``) to ``epoch`` in ``run_dir``; the summary's history entry."""
    words = [w for w in shlex.split(command) if not w.startswith(("hydra.run.dir=", "hydra.sweep"))]
    if words[:2] != ["python", study.script]:
        raise RecheckError(f"the recorded command is not a {study.script} run: {command}")
    done = subprocess.run([sys.executable, *words[1:], f"hydra.run.dir={run_dir}",
                           f"trainer.stop_after_epoch={epoch}"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RecheckError(f"the rerun exited with {done.returncode}: {last}")
    return json.loads((run_dir / "summary.json").read_text())["history"][epoch - 1]


def judge(logged: dict[str, str], again: dict[str, str], same_kind: bool,
          compared: tuple[str, ...] = STUDIES["cls"].compared) -> tuple[bool, str]:
    """Whether the rerun reproduces the log, and which comparison was made."""
    if same_kind:
        bitwise = all(logged[c] == again[c] for c in compared)
        return bitwise, "bitwise" if bitwise else "NOT bitwise on the run's CPU kind and threads"
    loss = abs(float(again["train_loss"]) / float(logged["train_loss"]) - 1)
    holds, text = loss <= LOSS_RELATIVE, f"training loss {100 * loss:.1f} % (<= {100 * LOSS_RELATIVE:.0f} %)"
    if "train_top1" in compared:
        top1 = abs(float(again["train_top1"]) - float(logged["train_top1"]))
        holds, text = holds and top1 <= TOP1_POINTS, f"{text} and training top-1 {top1:.2f} pt (<= {TOP1_POINTS})"
    return holds, f"another CPU kind: {text} from the log" + ("" if holds else ": NOT within")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=tuple(STUDIES), default="cls")
    parser.add_argument("--run", required=True, help="a run of the study's CSV in results/")
    parser.add_argument("--epoch", type=int, default=1)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--record", action="store_true", help="append the result to the study's _recheck.md")
    args = parser.parse_args(argv)
    results, study = args.results.resolve(), STUDIES[args.study]
    started = time.time()
    try:
        row, log = find_run(study, results, args.run)
        logged = log.get(str(args.epoch))
        if logged is None:
            raise RecheckError(f"--epoch {args.epoch}: {row['log']} has epochs {', '.join(log) or 'none'}")
        with tempfile.TemporaryDirectory(prefix="recheck-") as folder:
            history = rerun(study, row["command"], args.epoch, Path(folder))
    except (RecheckError, TableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    here = f"{device_name(torch.device('cpu'))} x{row['threads']}"  # the recorded command fixes trainer.threads
    same_kind = row["segments"] == here
    again = {column: log_value(history.get(study.table.LOG_KEYS[column])) for column in study.compared}
    for column in study.compared:
        print(f"{column:11s} logged {logged[column]:>10s}  rerun {again[column]:>10s}"
              f"{'' if logged[column] == again[column] else '  differs'}")
    holds, verdict = judge(logged, again, same_kind, study.compared)
    commit = code_version() or "?"
    print(f"{args.run} epoch {args.epoch}: {verdict} (rerun at {commit} on {here}, {time.time() - started:.0f} s)")
    if args.record:
        path = results / f"{study.table.PREFIX}_recheck.md"
        if not path.exists():
            path.write_text(f"# Re-checks of {study.title}'s runs\n\nEach row: `python scripts/"
                            f"fmnist_study_recheck.py --study {args.study} --run RUN --epoch K --record`: the run's "
                            "recorded command rerun to "
                            "epoch K and compared with its committed log (the script's docstring gives the rule).\n\n"
                            "| date (UTC) | run | epoch | run's CPU | rerun's CPU | result | rerun at |\n"
                            "|---|---|---:|---|---|---|---|\n")
        with path.open("a") as f:
            f.write(f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {args.run} | {args.epoch} | "
                    f"{row['segments']} | {here} | {verdict} | {commit} |\n")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
