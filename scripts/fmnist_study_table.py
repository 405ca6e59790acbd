#!/usr/bin/env python
"""Tables and plots of the Fashion-MNIST study, from the committed per-run logs only.

    python scripts/fmnist_study_table.py                       # results/fashion_mnist_study.{md,png}, _pilot.md
    python scripts/fmnist_study_table.py --prefix fashion_mnist_gpu_study --title "... (H200)"

Reads ``results/<prefix>.csv`` (one row per finished run, written by ``scripts/fmnist_study.py`` or
``scripts/gpu_study.py``) and each run's per-epoch log it names; a row whose log is missing or disagrees with
it is an error. Per model and variant at the study's epoch budget: top-1 mean ± std over seeds, the paired
difference to the baseline (same seed: same data order and augmentation) with its 95 % t interval, MACs,
params and activations (``compconv.complexity`` at the study's input), and the training and inference
images/s of ``--speed`` (a ``benchmark.py`` CSV measured on the same machine), when given.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# two-sided 95 % quantiles of Student's t, by degrees of freedom (1..30)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class TableError(ValueError):
    """A row or a log of the study is missing, damaged or inconsistent."""


def read_rows(results: Path, prefix: str) -> list[dict]:
    path = results / f"{prefix}.csv"
    if not path.exists():
        raise TableError(f"{path} does not exist: run the study first (scripts/fmnist_study.py)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        log = read_log(results.parent / row["log"])
        if not log or int(log[-1]["epoch"]) != int(row["epochs"]):
            raise TableError(f"{row['log']} does not end at epoch {row['epochs']} as {path.name} says for {row['run']}")
        if abs(float(log[-1]["val_top1"]) - float(row["top1"])) > 1e-3:
            raise TableError(f"{row['run']}: top-1 {row['top1']} in {path.name} but {log[-1]['val_top1']} in its log")
        row["curve"] = [float(r["val_top1"]) for r in log]
    return rows


def read_log(path: Path) -> list[dict]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError as error:
        raise TableError(f"the per-epoch log {path} cannot be read ({error})") from error


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (nan with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    return mean, T975[min(df, len(T975)) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def complexity_of(model: str, variant: str, img_size: int, in_chans: int) -> tuple[int, int, int]:
    import timm

    import compconv

    from scripts.fmnist_study import variant_options

    options = variant_options(variant)
    net = timm.create_model(model, num_classes=10, in_chans=in_chans, **({"compconv": options} if options else {}))
    cost = compconv.complexity(net, (in_chans, img_size, img_size))
    return cost.macs, cost.params, cost.activations


def read_speed(path: Path | None) -> dict[str, dict[str, float]]:
    """``{model: {"train": img/s, "infer": img/s}}`` from a benchmark.py CSV (its ``model`` names, with
    ``+deploy`` stripped for inference)."""
    speed: dict[str, dict[str, float]] = defaultdict(dict)
    if path is None:
        return speed
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            mode = row["workload"].split(":")[0]
            speed[row["model"].split("+")[0]][mode] = float(row["img_per_s"])
    return speed


def natural(name: str) -> list:
    """A sort key that reads the numbers in ``name`` as numbers (compconv64 before compconv128)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def label(model: str, variant: str) -> str:
    return f"{model} ({variant})" if variant else model


def paired_delta(runs: dict[int, dict], reference: dict[int, dict]) -> str:
    """Mean top-1 difference of ``runs`` to ``reference`` over their shared seeds, with its 95 % t interval."""
    pairs = [float(runs[s]["top1"]) - float(reference[s]["top1"]) for s in sorted(runs) if s in reference]
    if not pairs:
        return "no paired seeds"
    d, half = t_interval(pairs)
    return f"{d:+.2f} [{d - half:+.2f}, {d + half:+.2f}] (n={len(pairs)})" if len(pairs) > 1 else f"{d:+.2f} (n=1)"


def ablations(summary: dict) -> list[str]:
    """Each variant against the same model with its defaults, paired by seed: what the one option changes."""
    variants = [key for key in summary if key[1] and (key[0], "") in summary]
    if not variants:
        return []
    lines = ["", "Ablations: each option against the same model with the defaults (paired by seed).", "",
             "| model | option | seeds | Δ top-1 vs defaults, paired [95 % CI] | Δ MACs (M) | Δ params (M) |",
             "|---|---|---:|---:|---:|---:|"]
    for model, variant in variants:
        ablated, defaults = summary[(model, variant)], summary[(model, "")]
        lines.append(f"| {model} | {variant} | {len(ablated['runs'])} | "
                     f"{paired_delta(ablated['runs'], defaults['runs'])} | "
                     f"{(ablated['macs'] - defaults['macs']) / 1e6:+.1f} | "
                     f"{(ablated['params'] - defaults['params']) / 1e6:+.2f} |")
    return lines


def build(rows: list[dict], baseline: str, epochs: int, speed: dict, img_size: int, in_chans: int,
          title: str, header: str) -> tuple[str, dict]:
    groups: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in rows:
        if int(row["epochs"]) == epochs:
            groups[(row["model"], row["variant"])][int(row["seed"])] = row
    base = groups.get((baseline, ""), {})
    order = sorted(groups, key=lambda k: (k != (baseline, ""), k[1] != "", natural(k[0]), k[1]))
    lines = [f"# {title}", "", header, "",
             "| model | seeds | top-1 (%) mean ± std | Δ top-1 vs baseline, paired [95 % CI] | MACs (M) | params (M) "
             "| activations (M) | train img/s | infer img/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for key in order:
        runs = groups[key]
        top1 = [float(r["top1"]) for r in runs.values()]
        mean = statistics.fmean(top1)
        std = statistics.stdev(top1) if len(top1) > 1 else math.nan
        delta = "—" if key == (baseline, "") else paired_delta(runs, base)
        macs, params, acts = complexity_of(*key, img_size, in_chans)
        model_speed = speed.get(key[0], {}) if not key[1] else {}
        train = f"{model_speed['train']:.0f}" if "train" in model_speed else "—"
        infer = f"{model_speed['infer']:.0f}" if "infer" in model_speed else "—"
        std_text = f"{std:.2f}" if not math.isnan(std) else "—"
        lines.append(f"| {label(*key)} | {len(top1)} | {mean:.2f} ± {std_text} | {delta} | {macs / 1e6:.1f} | "
                     f"{params / 1e6:.2f} | {acts / 1e6:.3f} | {train} | {infer} |")
        summary[key] = {"mean": mean, "std": std, "macs": macs, "params": params, "runs": runs}
    lines += ablations(summary)
    first = next(iter(base.values()), None) or next((r for g in groups.values() for r in g.values()), None)
    if first is not None:
        lines += ["", f"Epochs {epochs}; training images {first['train_images']}; validation images "
                  f"{first.get('val_images') or '?'} (Fashion-MNIST's test set). "
                  "Command of each run: its row of the CSV (seed 0's shown here for the baseline):", "",
                  f"    {first['command']}"]
    return "\n".join(lines) + "\n", summary


def pilot(rows: list[dict], baseline: str, epochs: int) -> str:
    runs = {(r["model"], int(r["epochs"])): r for r in rows if int(r["seed"]) == 0 and not r["variant"]}
    short, long = runs.get((baseline, epochs)), runs.get((baseline, 2 * epochs))
    lines = ["# Pilot: where the baseline plateaus", "",
             f"Validation top-1 (%) per epoch, seed 0, from the per-run logs. The budget is {epochs} epochs if its "
             f"final top-1 is within 0.3 pt of a run twice as long (the cosine schedule is stretched, not cut).", "",
             "| epoch | " + " | ".join(f"{m} ({e} ep.)" for (m, e) in sorted(runs)) + " |",
             "|---:|" + "---:|" * len(runs)]
    depth = max(len(r["curve"]) for r in runs.values()) if runs else 0
    for epoch in range(depth):
        cells = [f"{r['curve'][epoch]:.2f}" if epoch < len(r["curve"]) else "" for _, r in sorted(runs.items())]
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    if short and long:
        gap = float(long["top1"]) - float(short["top1"])
        verdict = "within" if abs(gap) <= 0.3 else "NOT within"
        lines += ["", f"{baseline}: {float(short['top1']):.2f} % after {epochs} epochs, {float(long['top1']):.2f} % "
                  f"after {2 * epochs}: {gap:+.2f} pt, {verdict} 0.3 pt."]
    else:
        lines += ["", f"The pilot is not complete: {baseline} at {epochs} and {2 * epochs} epochs are both needed."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: dict, epochs: int, img_size: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(13, 5))
    grouped: dict[str, list[list[float]]] = defaultdict(list)
    for row in rows:
        grouped[f"{label(row['model'], row['variant'])}, {row['epochs']} ep."].append(row["curve"])
    for name, curves_of in sorted(grouped.items()):
        depth = min(len(c) for c in curves_of)
        mean = [statistics.fmean(c[i] for c in curves_of) for i in range(depth)]
        curves.plot(range(1, depth + 1), mean, marker=".", label=f"{name} (n={len(curves_of)})")
    curves.set(xlabel="epoch", ylabel="validation top-1 (%)", title="learning curves (mean over seeds)")
    curves.set_ylim(bottom=max(0, min(min(c) for g in grouped.values() for c in g) - 1) if grouped else 0)
    curves.legend(fontsize=7)
    for (model, variant), s in summary.items():
        scatter.errorbar(s["macs"] / 1e6, s["mean"], yerr=0 if math.isnan(s["std"]) else s["std"], fmt="o",
                         capsize=3, label=label(model, variant))
    scatter.set(xlabel=f"MACs (M, one {img_size}x{img_size} image)", ylabel="final top-1 (%)",
                title=f"accuracy against MACs ({epochs} epochs, mean ± std)")
    scatter.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--prefix", default="fashion_mnist_study")
    parser.add_argument("--baseline", default="resnet18")
    parser.add_argument("--epochs", type=int, default=None, help="the study's budget (default: the baseline's "
                                                                   "most common epoch count)")
    parser.add_argument("--speed", type=Path, default=None, help="benchmark.py CSV with train and infer img/s")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--title", default="Fashion-MNIST study (64x64, full 60k training set, CPU)")
    parser.add_argument("--header", default="", help="a paragraph under the title (machine, date, what runs)")
    args = parser.parse_args(argv)
    try:
        rows = read_rows(args.results, args.prefix)
        if not rows:
            raise TableError(f"{args.prefix}.csv has no finished run yet")
        counts = [int(r["epochs"]) for r in rows if r["model"] == args.baseline and not r["variant"]]
        epochs = args.epochs or (min(statistics.multimode(counts)) if counts else int(rows[0]["epochs"]))
        table, summary = build(rows, args.baseline, epochs, read_speed(args.speed), args.img_size, args.in_chans,
                               args.title, args.header)
    except (TableError, OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "scripts/fmnist_study_table.py", *(argv if argv is not None else sys.argv[1:])])
    table += f"\nTable made by `{command}` from `results/{args.prefix}.csv` and the logs it names.\n"
    (args.results / f"{args.prefix}.md").write_text(table)
    (args.results / f"{args.prefix}_pilot.md").write_text(pilot(rows, args.baseline, epochs))
    plot(rows, summary, epochs, args.img_size, args.results / f"{args.prefix}.png", args.title)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
