#!/usr/bin/env python
"""Runs the Fashion-MNIST study (CPU): the pilot, the study's runs, safe to stop and run again.

Each run is ``train_cls.py experiment=fmnist_study`` with one model, variant, seed and epoch count in its own
directory under ``--runs`` (checkpoints stay there, git-ignored). A run whose summary says it finished is
skipped; an unfinished one resumes from its last checkpoint (``trainer.resume=auto``). When a run finishes,
its per-epoch log goes to ``results/fashion_mnist_study/<run>.csv`` and its row to
``results/fashion_mnist_study.csv`` (both can be committed as they come in); then
``scripts/fmnist_study_table.py`` makes the tables and plots.

Runs train from a git worktree of one commit (``--code``, default HEAD when the runner starts) under
``runs/code/``, never from the working tree being edited, so each row's ``commit`` is the code that trained
it (``A..B`` for a run resumed at another commit). A run another process is training is waited for.

Usage:
    python scripts/fmnist_study.py --plan pilot,cpu --hours 2     # stops starting runs after 2 h, and
                                                                   # checkpoints the running ones at 2 h
    python scripts/fmnist_study.py --plan cpu --dry-run            # prints the runs and their state

``--lanes 2`` (the default) trains two runs at once with one thread each: on 2 cores that beats one run
with two threads, since each run's data pipeline is single-threaded Python.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "resnet18"
FAMILY = ("resnet18", "resnet18_compconv64", "resnet18_compconv128", "resnet18_compconv256", "resnet18_ghost")
ABLATIONS = ("tail=dense", "tail_kernel=3", "shuffle=false", "inner_norm=true")  # at C0=128
ROW_FIELDS = ("run", "model", "variant", "seed", "epochs", "train_images", "val_images", "top1", "top5", "params", "macs",
              "threads", "images_per_s", "train_seconds", "device", "torch", "finished", "commit", "command", "log")


@dataclass(frozen=True)
class Run:
    model: str
    seed: int
    epochs: int
    variant: str = ""  # one CompConv option that differs from the model's own, e.g. "tail=dense"

    @property
    def name(self) -> str:
        variant = f"-{self.variant.replace('=', '_')}" if self.variant else ""
        return f"{self.model}{variant}_s{self.seed}_e{self.epochs}"

    def command(self, runs: Path, threads: int, extra: list[str] = ()) -> list[str]:
        overrides = [f"model.compconv.{self.variant}"] if self.variant else []
        return ["python", "train_cls.py", "experiment=fmnist_study", "logger=none", f"model={self.model}",
                *overrides, f"seed={self.seed}", f"trainer.epochs={self.epochs}", f"trainer.threads={threads}",
                *extra, f"hydra.run.dir={runs / self.name}"]


def variant_options(variant: str) -> dict:
    """``"tail=dense"`` as ``{"tail": "dense"}``: the CompConv option a variant sets, its value read as YAML (as
    Hydra reads ``model.compconv.tail=dense`` on the command line); ``{}`` for the defaults."""
    import yaml

    if not variant:
        return {}
    key, _, value = variant.partition("=")
    return {key: yaml.safe_load(value)}


def plan_runs(plans: list[str], epochs: int) -> list[Run]:
    """The runs of the named plans, in order, without repeats."""
    runs: list[Run] = []
    for plan in plans:
        if plan == "pilot":  # the budget pair first (it answers soonest), then the baseline at twice the budget
            runs += [Run(BASELINE, 0, epochs), Run("resnet18_compconv128", 0, epochs), Run(BASELINE, 0, 2 * epochs)]
        elif plan == "cpu":
            runs += [Run(model, seed, epochs) for seed in range(3) for model in FAMILY]
            runs += [Run("resnet18_compconv128", seed, epochs, option) for seed in range(2) for option in ABLATIONS]
        elif plan == "r50":
            runs += [Run(model, seed, epochs) for seed in range(3) for model in ("resnet50", "resnet50_compconv128")]
        else:
            raise SystemExit(f"error: unknown plan {plan!r}; choose from pilot, cpu, r50")
    return list(dict.fromkeys(runs))


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def finished(summary: dict | None) -> bool:
    return bool(summary) and summary.get("epochs") == summary.get("schedule_epochs") and bool(summary.get("history"))


def code_checkout(revision: str) -> tuple[str, Path]:
    """``(commit, folder)``: a git worktree of ``revision`` under ``runs/code/`` whose ``runs`` is this checkout's."""
    done = subprocess.run(["git", "rev-parse", "--short=12", f"{revision}^{{commit}}"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: --code {revision} is not a commit of this repository")
    commit = done.stdout.strip()
    folder = ROOT / "runs" / "code" / commit
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / ".lock").open("a") as lock:  # runners started together make one checkout
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (folder / "train_cls.py").exists():
            subprocess.run(["git", "worktree", "add", "--detach", "--force", str(folder), commit], cwd=ROOT,
                           check=True, capture_output=True)
        if not (folder / "runs").exists():
            (folder / "runs").symlink_to(ROOT / "runs")
    return commit, folder


def held_by_another_process(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock (``compconv.train.rundir``)."""
    lock = run_dir / ".run.lock"
    if not lock.exists():
        return False
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# a per-epoch log's columns and the trainer's history keys they hold
LOG_KEYS = {"epoch": "epoch", "val_top1": "val/top1", "val_top5": "val/top5", "val_loss": "val/loss",
            "train_top1": "train/top1", "train_loss": "train/loss", "lr": "lr", "images_per_s": "train/images_per_s"}
LOG_FIELDS = tuple(LOG_KEYS)


def log_value(value) -> str:
    """How a log writes one value (6 significant digits)."""
    return f"{value:.6g}" if isinstance(value, float) else "" if value is None else str(value)


def write_log(path: Path, history: list[dict]) -> None:
    """A run's per-epoch log: one row per epoch, :data:`LOG_FIELDS` (missing values empty)."""
    lines = [",".join(LOG_FIELDS)]
    for h in history:
        lines.append(",".join(log_value(h.get(k)) for k in LOG_FIELDS))
    write_atomic(path, "\n".join(lines) + "\n")


def upsert_row(table: Path, row: dict, lock: threading.Lock) -> None:
    """Writes ``row`` into the study CSV ``table`` (one row per run, sorted), replacing a row of the same run."""
    with lock:
        rows = []
        if table.exists():
            with table.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r["run"] != row["run"]]
        rows.append({k: row[k] for k in ROW_FIELDS})
        rows.sort(key=lambda r: r["run"])
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=ROW_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(table, out.getvalue())


def record(run: Run, run_dir: Path, summary: dict, results: Path, lock: threading.Lock) -> None:
    """Writes the run's per-epoch log and its row of the study CSV (replacing an older row of the same run)."""
    log = results / "fashion_mnist_study" / f"{run.name}.csv"
    history = [{column: h.get(key) for column, key in LOG_KEYS.items()} for h in summary["history"]]
    write_log(log, history)
    meta = json.loads((run_dir / "study.json").read_text())
    row = {
        "run": run.name, "model": run.model, "variant": run.variant, "seed": run.seed, "epochs": summary["epochs"],
        "train_images": summary["train_images"], "val_images": summary["val_images"], "top1": summary["top1"],
        "top5": summary["top5"], "params": summary["params"], "macs": summary["macs"], "threads": meta["threads"],
        "images_per_s": summary.get("images_per_s"),
        "train_seconds": meta.get("train_seconds") or round(summary.get("train_seconds") or 0, 1),
        "device": meta.get("device") if summary["device"] in ("cpu", "") else summary["device"],
        "torch": summary["torch"], "finished": meta["finished"], "commit": meta["commit"], "command": meta["command"],
        "log": f"{results.name}/fashion_mnist_study/{log.name}",
    }
    upsert_row(results / "fashion_mnist_study.csv", row, lock)


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.time() + args.hours * 3600 if args.hours else None
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.children: set[subprocess.Popen] = set()
        self.failed: list[str] = []

    def stop(self, *_: object) -> None:
        self.stopping.set()
        for child in list(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits

    def train(self, run: Run) -> None:
        args = self.args
        run_dir = args.runs / run.name
        while held_by_another_process(run_dir):  # trained elsewhere (an earlier runner's orphan): wait for it
            if self.stopping.wait(30) or (self.deadline and time.time() >= self.deadline):
                return
        summary = read_summary(run_dir)
        if finished(summary):  # recorded again: idempotent, and heals a record that an interruption cut short
            meta_path = run_dir / "study.json"
            meta = json.loads(meta_path.read_text())
            if "finished" not in meta:  # finished while no runner watched it: the summary's time
                meta["finished"] = time.strftime("%Y-%m-%d %H:%M UTC",
                                                 time.gmtime((run_dir / "summary.json").stat().st_mtime))
                write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
            record(run, run_dir, summary, args.results, self.lock)
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        meta_path = run_dir / "study.json"
        command = run.command(args.runs.relative_to(ROOT) if args.runs.is_relative_to(ROOT) else args.runs,
                              args.threads, args.extra)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {
            "commit": args.commit, "command": shlex.join(command), "threads": args.threads, "train_seconds": 0.0,
            "device": cpu_name()}
        if meta["command"] != shlex.join(command):
            print(f"error: {run_dir} was started as `{meta['command']}`; remove it to start again", file=sys.stderr)
            self.failed.append(run.name)
            return
        if args.commit != meta["commit"].split("..")[-1]:
            meta["commit"] = f"{meta['commit']}..{args.commit}"  # resumed at another commit: say so
        write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] start {run.name}", flush=True)
        started = time.time()
        with (run_dir / "train.log").open("a") as log:
            child = subprocess.Popen([sys.executable, *command[1:]], cwd=args.code_dir, stdout=log,
                                     stderr=subprocess.STDOUT)
            self.children.add(child)
            code = child.wait()
            self.children.discard(child)
        meta["train_seconds"] = round(meta["train_seconds"] + time.time() - started, 1)
        summary = read_summary(run_dir)
        if finished(summary):  # also when a stop signal came after the summary was written: the run is complete
            meta["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
            record(run, run_dir, summary, args.results, self.lock)
            print(f"[{time.strftime('%H:%M:%S')}] done  {run.name}: top-1 {summary['top1']:.2f}", flush=True)
        elif self.stopping.is_set():
            write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
            print(f"[{time.strftime('%H:%M:%S')}] paused {run.name} (checkpointed; run again to resume)", flush=True)
        else:
            write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
            print(f"error: {run.name} exited with {code}; see {run_dir / 'train.log'}", file=sys.stderr, flush=True)
            self.failed.append(run.name)

    def lane(self, queue: list[Run]) -> None:
        while not self.stopping.is_set():
            if self.deadline and time.time() >= self.deadline:
                return
            with self.lock:
                if not queue:
                    return
                run = queue.pop(0)
            try:
                self.train(run)
            except Exception as error:  # one broken run must not stop the others
                print(f"error: {run.name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                self.failed.append(run.name)

    def run(self, runs: list[Run]) -> int:
        queue = list(runs)
        lanes = [threading.Thread(target=self.lane, args=(queue,)) for _ in range(self.args.lanes)]
        for lane in lanes:
            lane.start()
        while any(lane.is_alive() for lane in lanes):
            if self.deadline and time.time() >= self.deadline and not self.stopping.is_set():
                print(f"[{time.strftime('%H:%M:%S')}] --hours {self.args.hours} reached: checkpointing", flush=True)
                self.stop()
            time.sleep(1)
        if self.failed:
            print(f"error: {len(self.failed)} run(s) failed: {', '.join(self.failed)}", file=sys.stderr)
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="pilot,cpu", help="comma-separated: pilot, cpu, r50")
    parser.add_argument("--epochs", type=int, default=8, help="the epoch budget (the pilot also runs twice it)")
    parser.add_argument("--hours", type=float, default=None, help="stop (checkpointed) after this many hours")
    parser.add_argument("--lanes", type=int, default=2, help="runs trained at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / lanes)")
    parser.add_argument("--only", default=None, help="only runs whose name contains this")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "fmnist_study")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--code", default="HEAD", help="the commit whose code trains the runs")
    parser.add_argument("--extra", nargs="*", default=[], help="further train_cls.py overrides (small test runs)")
    parser.add_argument("--dry-run", action="store_true", help="print each run and its state, run nothing")
    args = parser.parse_args(argv)
    if args.lanes < 1 or args.epochs < 1 or (args.hours is not None and args.hours <= 0):
        parser.error("--lanes, --epochs and --hours must be positive")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.lanes)
    args.runs, args.results = args.runs.resolve(), args.results.resolve()
    runs = [r for r in plan_runs(args.plan.split(","), args.epochs) if not args.only or args.only in r.name]
    if args.dry_run:
        for run in runs:
            summary = read_summary(args.runs / run.name)
            state = "finished" if finished(summary) else \
                "started" if (args.runs / run.name / "last.pt").exists() else "to run"
            print(f"{run.name:48s} {state}")
        return 0
    args.commit, args.code_dir = code_checkout(args.code)
    print(f"training with the code of commit {args.commit} ({args.code_dir})", flush=True)
    study = Study(args)
    signal.signal(signal.SIGTERM, study.stop)
    signal.signal(signal.SIGINT, study.stop)
    return study.run(runs)


if __name__ == "__main__":
    sys.exit(main())
