#!/usr/bin/env python
"""Re-checks one finished run of the Fashion-MNIST study: reruns its recorded command to epoch k only
(``trainer.stop_after_epoch=k``; the schedule still spans all its epochs) and compares epoch k with its
committed per-epoch log.

    python scripts/fmnist_study_recheck.py --run resnet18_compconv128_s1_e8            # epoch 1
    python scripts/fmnist_study_recheck.py --run resnet18_s0_e8 --epoch 2 --record     # and append the result
                                                                                       # to results/..._recheck.md

Every logged value (validation top-1, top-5 and loss, training top-1 and loss, learning rate) must read the
same at the log's 6 significant digits ("bitwise": the rerun gives what was logged) on the CPU kind and thread
count of the run; otherwise validation top-1 must be within ``--tolerance`` points. Exit 0 when it holds, 1
when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.fmnist_study import LOG_KEYS, cpu_name, log_value  # noqa: E402  (one log format)
from scripts.fmnist_study_table import TableError, read_log, read_rows  # noqa: E402  (one reader, checked)


class RecheckError(ValueError):
    """The run, its log or its rerun cannot be compared; the message says why."""


COMPARED = ("val_top1", "val_top5", "val_loss", "train_top1", "train_loss", "lr")


def find_run(results: Path, run: str) -> tuple[dict, list[dict]]:
    """The run's row of the study CSV and its per-epoch log (both checked by the table's reader)."""
    rows = {row["run"]: row for row in read_rows(results, "fashion_mnist_study")}
    if run not in rows:
        raise RecheckError(f"no run {run!r} in {results / 'fashion_mnist_study.csv'}; finished runs: "
                           f"{', '.join(sorted(rows))}")
    return rows[run], read_log(results.parent / rows[run]["log"])


def rerun(command: str, epoch: int, run_dir: Path) -> dict:
    """Runs ``command`` (``python train_cls.py ...``) to ``epoch`` in ``run_dir``; the summary's history entry."""
    words = [w for w in shlex.split(command) if not w.startswith("hydra.run.dir=")]
    if words[:2] != ["python", "train_cls.py"]:
        raise RecheckError(f"the recorded command is not a train_cls.py run: {command}")
    done = subprocess.run([sys.executable, *words[1:], f"hydra.run.dir={run_dir}",
                           f"trainer.stop_after_epoch={epoch}"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RecheckError(f"the rerun exited with {done.returncode}: {last}")
    return json.loads((run_dir / "summary.json").read_text())["history"][epoch - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run of results/fashion_mnist_study.csv")
    parser.add_argument("--epoch", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=0.3, help="points of top-1 when not bitwise")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--record", action="store_true", help="append the result to the study's _recheck.md")
    args = parser.parse_args(argv)
    results = args.results.resolve()
    started = time.time()
    try:
        row, log = find_run(results, args.run)
        logged = next((line for line in log if line.get("epoch") == str(args.epoch)), None)
        if logged is None:
            raise RecheckError(f"--epoch {args.epoch}: {row['log']} has epochs "
                               f"{', '.join(line.get('epoch') or '?' for line in log)}")
        with tempfile.TemporaryDirectory(prefix="recheck-") as folder:
            history = rerun(row["command"], args.epoch, Path(folder))
    except (RecheckError, TableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    again = {column: log_value(history.get(LOG_KEYS[column])) for column in COMPARED}
    for column in COMPARED:
        print(f"{column:11s} logged {logged[column]:>10s}  rerun {again[column]:>10s}"
              f"{'' if logged[column] == again[column] else '  differs'}")
    bitwise = all(logged[c] == again[c] for c in COMPARED)
    gap = abs(float(again["val_top1"]) - float(logged["val_top1"]))
    holds = bitwise or gap <= args.tolerance
    verdict = "bitwise" if bitwise else f"top-1 within {gap:.2f} pt" if holds else f"top-1 off by {gap:.2f} pt"
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"{args.run} epoch {args.epoch}: {verdict} (rerun at {commit}, {time.time() - started:.0f} s)")
    if args.record:
        path = results / "fashion_mnist_study_recheck.md"
        if not path.exists():
            path.write_text("# Re-checks of the Fashion-MNIST study's runs\n\nEach row: `python scripts/"
                            "fmnist_study_recheck.py --run RUN --epoch K --record`, which reruns the run's recorded "
                            "command to epoch K and compares it with the committed log (6 significant digits).\n\n"
                            "| date (UTC) | run | epoch | logged top-1 | rerun top-1 | result | rerun at | CPU |\n"
                            "|---|---|---:|---:|---:|---|---|---|\n")
        cpu = re.sub(r"\s+", " ", cpu_name())
        with path.open("a") as f:
            f.write(f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {args.run} | {args.epoch} | "
                    f"{logged['val_top1']} | {again['val_top1']} | {verdict} | {commit} | {cpu} |\n")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
