#!/usr/bin/env python
"""The Fashion-MNIST study's results, from its sweep directories (results/fashion_mnist_study_rule.md has its rules).

    python scripts/fmnist_study_table.py --runs runs/fmnist_study        # collect, then write every table
    python scripts/fmnist_study_table.py                                  # tables from the committed CSV only

``--runs`` reads every run directory's ``summary.json`` (what ``train_cls.py -m experiment=fmnist_study`` writes)
into ``results/fashion_mnist_study_v2.csv`` (one row per finished run: validation and test top-1, the split, the
commit(s), device and threads of every segment, the command) and its per-epoch log into
``results/fashion_mnist_study_v2/<run>.csv``; rows of runs whose directories are gone (earlier sessions) are kept.
Then it writes, from the CSV and the logs it names:

- ``fashion_mnist_study_v2_plateau.md``: the plateau rule applied (validation top-1 only);
- ``fashion_mnist_study_v2.md``: the main table at E* and the ablations, test top-1 with paired intervals and the
  pre-registered equivalence margin; pairs must share a CPU kind and thread count;
- ``fashion_mnist_study_v2_time.md`` and ``.png``: test top-1 against measured training seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "fashion_mnist_study_v2"
BASELINE, COMPACT = "resnet18", "resnet18_compconv64"
TIME_MODELS = ("resnet18", "resnet18_compconv128", "resnet18_ghost")
PLATEAU_PT, EQUIVALENCE_PT = 0.10, 0.25  # results/fashion_mnist_study_rule.md
FIELDS = ("run", "model", "variant", "seed", "epochs", "train_images", "val_images", "test_images", "split",
          "val_top1", "test_top1", "test_top5", "macs", "executed_macs", "params", "threads", "device", "segments",
          "train_seconds", "code", "command", "log")
LOG_KEYS = {"epoch": "epoch", "lr": "lr", "train_loss": "train/loss", "train_top1": "train/top1", "val_loss": "val/loss",
            "val_top1": "val/top1", "val_top5": "val/top5", "images_per_s": "train/images_per_s"}
LOG_FIELDS = tuple(LOG_KEYS)
# two-sided quantiles of Student's t by degrees of freedom (1..10): 0.975 (95 % intervals), 0.95 (90 %, TOST)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)


def configure(prefix: str, baseline: str, compact: str) -> None:
    """Which study the module's functions read and write (the CPU study by default)."""
    global PREFIX, BASELINE, COMPACT
    PREFIX, BASELINE, COMPACT = prefix, baseline, compact


class TableError(ValueError):
    """A run, a row or a log of the study is missing, damaged or inconsistent."""


def variant_of(summary: dict) -> str:
    """The CompConv options a run sets beyond its registered model's defaults, as ``key=value`` (``""``: none)."""
    from compconv.models import variant_options

    defaults = variant_options(summary["model_name"]) or {}
    chosen = summary.get("compconv") or {}
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(chosen.items())
                    if defaults.get(k) != v)


def row_of(run_dir: Path, summary: dict, log: str) -> dict:
    segments = summary.get("segments") or []
    codes = [s.get("code") or "?" for s in segments]
    kinds = sorted({f"{s['device']} x{s['threads']}" for s in segments})
    return {
        "run": run_dir.name, "model": summary["model_name"], "variant": variant_of(summary), "seed": summary["seed"],
        "epochs": summary["epochs"], "train_images": summary["train_images"], "val_images": summary["val_images"],
        "test_images": summary.get("test_images"), "split": (summary.get("splits") or {}).get("val", ""),
        "val_top1": summary["val_top1"], "test_top1": summary.get("test_top1"), "test_top5": summary.get("test_top5"),
        "macs": summary["macs"], "executed_macs": summary.get("executed_macs"), "params": summary["params"],
        "threads": summary.get("threads"), "device": summary["device"], "segments": "; ".join(kinds),
        "train_seconds": round(summary["train_seconds"], 1),
        "code": codes[0] if len(set(codes)) <= 1 else f"{codes[0]}..{codes[-1]}", "command": summary["command"],
        "log": log,
    }


def collect(run_roots: list[Path], results: Path) -> list[dict]:
    """Merges every finished run under ``run_roots`` into the CSV (by run name) and writes its per-epoch log."""
    return collect_runs(run_roots, results, PREFIX, "fmnist_study", LOG_KEYS, FIELDS, row_of,
                        lambda r: (natural(r["model"]), r["variant"], int(r["epochs"]), int(r["seed"])))


def collect_runs(run_roots: list[Path], results: Path, prefix: str, experiment: str, log_keys: dict, fields: tuple,
                 make_row, sort_key) -> list[dict]:
    """A study's collection: every finished run of ``experiment`` under ``run_roots`` becomes a row
    (``make_row(run_dir, summary, log)``) of ``results/<prefix>.csv``, merged by run name with the rows already
    there, and its history the per-epoch log ``results/<prefix>/<run>.csv`` (``log_keys``: column -> history key)."""
    rows = {row["run"]: row for row in _read_csv(results / f"{prefix}.csv")}
    (results / prefix).mkdir(parents=True, exist_ok=True)
    for root in run_roots:
        for path in sorted(root.glob("*/summary.json")):
            summary = json.loads(path.read_text())
            if summary.get("experiment") != experiment or summary.get("epochs") != summary.get("schedule_epochs"):
                continue
            with (results / prefix / f"{path.parent.name}.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, tuple(log_keys))
                writer.writeheader()
                for record in summary["history"]:
                    writer.writerow({field: log_value(record.get(key)) for field, key in log_keys.items()})
            rows[path.parent.name] = make_row(path.parent, summary, f"results/{prefix}/{path.parent.name}.csv")
    ordered = sorted(rows.values(), key=sort_key)
    with (results / f"{prefix}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(ordered)
    return ordered


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_study_rows(results: Path, prefix: str, result: str, collect_hint: str) -> list[dict]:
    """The rows of ``results/<prefix>.csv``; a row without its ``result`` column (a run that read no test set) is
    an error, as is a missing file."""
    path = results / f"{prefix}.csv"
    if not path.exists():
        raise TableError(f"{path} does not exist: collect the runs first ({collect_hint})")
    rows = _read_csv(path)
    for row in rows:
        if row[result] in ("", None):
            raise TableError(f"{row['run']} has no {result}: it did not finish its schedule or read no test set")
    return rows


def read_rows(results: Path) -> list[dict]:
    return read_study_rows(results, PREFIX, "test_top1", "--runs runs/fmnist_study")


def run_log(results: Path, row: dict) -> Path:
    """The per-epoch log a row of a study CSV names (its ``log`` column is relative to the directory above
    ``results``, the repository root)."""
    return results.parent / row["log"]


def log_value(value) -> str:
    """How a per-epoch log writes one value: 6 significant digits (the epoch column as an integer)."""
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{float(value):.6g}"


def natural(name: str) -> list:
    """A sort key that reads the numbers in ``name`` as numbers (compconv64 before compconv128)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def interval(values: list[float], quantiles: tuple[float, ...] = T975) -> tuple[float, float]:
    """Mean and the half-width of its t interval (``quantiles``: 95 % by default; nan below two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, quantiles[min(len(values) - 1, len(quantiles)) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def family(model: str) -> str:
    """The baseline ``model`` is paired with: the timm model a registered CompConv or Ghost model patches
    (``vgg16_bn_compconv128`` -> ``vgg16_bn``); a baseline is its own."""
    from compconv.models import variant_base

    return variant_base(model) or re.sub(r"_(compconv\d+\w*|ghost)$", "", model)


def paired(runs: dict[int, dict], reference: dict[int, dict], key: str = "test_top1") -> tuple[list[float], list[str]]:
    """Per-seed differences over the seeds both have, and the seeds that cannot be paired (other CPU kind or threads)."""
    diffs, unpaired = [], []
    for seed in sorted(set(runs) & set(reference)):
        a, b = runs[seed], reference[seed]
        if (a["segments"], a["threads"]) != (b["segments"], b["threads"]) or ";" in a["segments"] + b["segments"]:
            unpaired.append(f"s{seed}")
            continue
        diffs.append(float(a[key]) - float(b[key]))
    return diffs, unpaired


def verdict(diffs: list[float]) -> str:
    """What the pre-registered rules let one say of paired differences."""
    if len(diffs) < 2:
        return "one seed: no claim"
    mean, half95 = interval(diffs)
    _, half90 = interval(diffs, T95)
    if abs(mean) > half95:
        return "differs"
    if abs(mean) + half90 < EQUIVALENCE_PT:
        return f"no difference (within ±{EQUIVALENCE_PT} pt)"
    return "too wide to tell"


def describe(diffs: list[float], unpaired: list[str]) -> str:
    if not diffs:
        return "no paired seeds" + (f" ({', '.join(unpaired)} on other CPU kinds)" if unpaired else "")
    mean, half = interval(diffs)
    text = f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" if len(diffs) > 1 else f"{mean:+.2f}"
    return text + (f"; unpaired {', '.join(unpaired)}" if unpaired else "")


def plateau(rows: list[dict]) -> str:
    """The plateau rule applied to the baseline and the most compact model, on validation top-1 of seeds 0 and 1."""
    lines = ["# The plateau rule, applied", "",
             f"A schedule of E epochs is at the plateau when the mean validation top-1 of seeds 0 and 1 at 2E exceeds "
             f"the mean at E by less than {PLATEAU_PT} pt (`results/fashion_mnist_study_rule.md`). Validation: 5,000 "
             "images held out of the training set; the test set is not read here.", "",
             "| model | E | val top-1 at E (s0, s1) | val top-1 at 2E (s0, s1) | gain | at the plateau |",
             "|---|---:|---|---|---:|---|"]
    rows = [r for r in rows if not r["variant"]]
    table, chosen = plateau_rows(rows, (BASELINE, COMPACT), "val_top1", PLATEAU_PT)
    lines += table
    if len(chosen) == 2:
        lines += ["", f"E* = max({chosen[BASELINE]}, {chosen[COMPACT]}) = {max(chosen.values())} epochs for every model."]
    else:
        lines += ["", "E* is not decided yet: the rule's runs are not all finished."]
    return "\n".join(lines) + "\n"


def plateau_rows(rows: list[dict], models: tuple[str, ...], metric: str, margin: float) -> tuple[list[str], dict]:
    """The plateau rule's table rows for ``models`` (E against 2E, mean ``metric`` of seeds 0 and 1) and, per model,
    the first E at the plateau (the gain to 2E below ``margin``), after which a model has no further rows."""
    lines, chosen = [], {}
    for model in models:
        runs = {(int(r["epochs"]), int(r["seed"])): float(r[metric]) for r in rows
                if r["model"] == model and int(r["seed"]) in (0, 1)}
        for epochs in sorted({e for e, _ in runs}):
            short = [runs.get((epochs, s)) for s in (0, 1)]
            long = [runs.get((2 * epochs, s)) for s in (0, 1)]
            if None in short or None in long:
                lines.append(f"| {model} | {epochs} | {_pair(short)} | {_pair(long)} | — | not yet decided |")
                continue
            gain = statistics.fmean(long) - statistics.fmean(short)
            ok = gain < margin
            lines.append(f"| {model} | {epochs} | {_pair(short)} | {_pair(long)} | {gain:+.2f} | {'yes' if ok else 'no'} |")
            if ok:  # the rule stops here: the 2E runs are the rule's last, not a schedule still to be judged
                chosen[model] = epochs
                break
    return lines, chosen


def by_seed(rows: list[dict], epochs: int, key) -> dict:
    """The rows of an ``epochs`` schedule, grouped by ``key(row)`` and then by seed."""
    groups: dict = defaultdict(dict)
    for row in rows:
        if int(row["epochs"]) == epochs:
            groups[key(row)][int(row["seed"])] = row
    return groups


def _pair(values: list) -> str:
    return ", ".join("—" if v is None else f"{v:.2f}" for v in values)


def main_table(rows: list[dict], epochs: int) -> str:
    groups = by_seed(rows, epochs, lambda row: (row["model"], row["variant"]))
    lines = [f"# Fashion-MNIST study: every model at E* = {epochs} epochs", "",
             "Test top-1: the 10k test images, read once per run after its last epoch. Validation top-1: the 5,000 "
             "held-out training images. Δ: paired by seed against the model's baseline (same data order and augmentation, "
             "same CPU kind and threads), mean [95 % t interval]; the claim follows `results/fashion_mnist_study_rule.md`.",
             "", "| model | seeds | test top-1 (%) mean ± std | Δ test top-1 [95 % CI] | claim | "
             "val top-1 (%) | MACs (M): Figure 2 / executed | params (M) | CPU kinds |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for key in sorted(groups, key=lambda k: (k != (BASELINE, ""), k[1] != "", natural(k[0]), k[1])):
        runs = groups[key]
        test = [float(r["test_top1"]) for r in runs.values()]
        val = statistics.fmean(float(r["val_top1"]) for r in runs.values())
        std = f"{statistics.stdev(test):.2f}" if len(test) > 1 else "—"
        against = key[0] if key[1] else family(key[0])
        diffs, unpaired = paired(runs, groups.get((against, ""), {})) if against != key[0] or key[1] else ([], [])
        delta = "—" if against == key[0] and not key[1] else f"vs {against}: {describe(diffs, unpaired)}"
        claim = "—" if against == key[0] and not key[1] else verdict(diffs)
        first = next(iter(runs.values()))
        executed = float(first["executed_macs"] or first["macs"])
        kinds = "; ".join(sorted({r["segments"] for r in runs.values()}))
        name = f"{key[0]} ({key[1]})" if key[1] else key[0]
        lines.append(f"| {name} | {len(test)} | {statistics.fmean(test):.2f} ± {std} | {delta} | {claim} | {val:.2f} | "
                     f"{float(first['macs']) / 1e6:.1f} / {executed / 1e6:.1f} | {float(first['params']) / 1e6:.2f} | "
                     f"{kinds} |")
    lines += ["", "Ablations (a variant in parentheses) are paired with the same model at its defaults."]
    return "\n".join(lines) + "\n"


def time_table(rows: list[dict], path: Path) -> str:
    """Test top-1 against training seconds for seed 0 of ``TIME_MODELS``, with the spread of each run's per-epoch
    training speed (read from its log beside ``path``): a run resumed on a faster or slower day shows it there."""
    runs = [r for r in rows if r["model"] in TIME_MODELS and not r["variant"] and int(r["seed"]) == 0]
    lines = ["# Accuracy against training time", "",
             "Seed 0 of ResNet-18, CompConv128-ResNet-18 and Ghost-ResNet-18 at each schedule length the plateau rule "
             "ran: test top-1 against the run's measured training seconds (training and per-epoch validation, every "
             "segment summed; one CPU thread).", "",
             "A run stopped and resumed spans sessions, and machines of this kind vary in speed from one day to the "
             "next: the last column gives the slowest and fastest epoch's training images/s of each run, so a run "
             "whose seconds mix days of different speed (or hours when the machine was busy) shows it.", "",
             "| model | epochs | train seconds | test top-1 (%) | CPU kind | epoch train img/s (min-max) |",
             "|---|---:|---:|---:|---|---:|"]
    for r in sorted(runs, key=lambda r: (natural(r["model"]), int(r["epochs"]))):
        spread = _speed_spread(run_log(path.parent, r))
        lines.append(f"| {r['model']} | {r['epochs']} | {float(r['train_seconds']):.0f} | {float(r['test_top1']):.2f} "
                     f"| {r['segments']} | {spread} |")
    _time_plot(runs, path)
    return "\n".join(lines) + "\n"


def _speed_spread(log: Path) -> str:
    speeds = [float(e["images_per_s"]) for e in _read_csv(log) if e.get("images_per_s")]
    return f"{min(speeds):.0f}-{max(speeds):.0f}" if speeds else "—"


def _time_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in TIME_MODELS:
        points = sorted((float(r["train_seconds"]) / 3600, float(r["test_top1"]), r["epochs"])
                        for r in runs if r["model"] == model)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
            for x, y, epochs in points:
                ax.annotate(f"{epochs} ep.", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="training time (hours, one CPU thread)", ylabel="test top-1 (%)",
           title="Fashion-MNIST: accuracy against training time (seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def made_by(script: str, argv: list[str] | None, prefix: str) -> str:
    """The footer of a study's tables: the command that made them and what it read."""
    command = shlex.join(["python", script, *(argv if argv is not None else sys.argv[1:])])
    return f"\nMade by `{command}` from `results/{prefix}.csv` and the per-run logs it names.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, action="append", default=[], help="a sweep directory (repeatable)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--epochs", type=int, default=None, help="E* (default: the plateau rule's, once decided)")
    parser.add_argument("--prefix", default=PREFIX, help="results/<prefix>.csv and the files beside it (the GPU "
                                                         "study: fashion_mnist_gpu_study)")
    parser.add_argument("--baseline", default=BASELINE, help="the model every row is paired with")
    parser.add_argument("--compact", default=COMPACT, help="the most compact model (the plateau rule's second)")
    args = parser.parse_args(argv)
    configure(args.prefix, args.baseline, args.compact)
    sys.path.insert(0, str(ROOT))
    try:
        rows = collect(args.runs, args.results) if args.runs else read_rows(args.results)
        rows = [r for r in rows if r["test_top1"] not in ("", None)]
        report = plateau(rows)
        decided = re.search(r"E\* = max\(\d+, \d+\) = (\d+)", report)
        epochs = args.epochs or (int(decided.group(1)) if decided else None)
    except (TableError, OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    footer = made_by("scripts/fmnist_study_table.py", argv, PREFIX)
    (args.results / f"{PREFIX}_plateau.md").write_text(report + footer)
    if any(r["model"] in TIME_MODELS and not r["variant"] for r in rows):  # nothing to plot before those runs end
        (args.results / f"{PREFIX}_time.md").write_text(
            time_table(rows, args.results / f"{PREFIX}_time.png") + footer)
    if epochs is not None:
        (args.results / f"{PREFIX}.md").write_text(main_table(rows, epochs) + footer)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
