#!/usr/bin/env python
"""Collects run summaries into results/<dataset>_cls.md or <dataset>_det.md (+ .csv, + metric-vs-MACs plot).

Usage:
    python scripts/make_tables.py RUN_DIR [RUN_DIR ...] [--out results] [--title TEXT]
    python scripts/make_tables.py --wandb-project ENTITY/PROJECT      # runs synced to wandb

Reads every ``summary.json`` under the given directories (written by train_cls.py / train_det.py at
the end of a run), or the summaries of a wandb project through the wandb API. Runs are grouped by
task, dataset, model and CompConv options; top-1 (box AP) is reported as mean ± std over seeds. wandb offline run folders
cannot be read without syncing them first (``wandb sync``); their JSON summaries sit beside them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compconv.io import atomic_write, atomic_write_text  # noqa: E402
from compconv.options import CompConvOptions  # noqa: E402

# Top-1 of the paper for a (dataset, model) pair; none were retrieved for this project.
PAPER_TOP1: dict[tuple[str, str], float] = {}
DEFAULTS = CompConvOptions().as_dict()


def load_json_summaries(dirs: list[Path]) -> list[dict]:
    runs = []
    for directory in dirs:
        for path in sorted(directory.rglob("summary.json")):
            runs.append(json.loads(path.read_text()))
    return runs


def load_wandb_summaries(project: str) -> list[dict]:
    import wandb

    return [dict(run.summary) for run in wandb.Api().runs(project) if "top1" in run.summary]


def variant(run: dict) -> str:
    """The model name plus the CompConv options that differ from the project defaults."""
    options = run.get("compconv") or {}
    changed = [f"{k}={v}" for k, v in options.items() if k != "c0" and DEFAULTS.get(k) != v]
    return run["model"] + (f" ({', '.join(changed)})" if changed else "")


def baseline_name(model: str) -> str:
    return model.split("_compconv")[0]


def _command_without_seed(command: str | None) -> str:
    return " ".join(part for part in (command or "").split() if not part.startswith("seed=")) or "-"


TASKS = {
    "classification": {"suffix": "cls", "metric": "top1", "label": "top-1 (%)",
                       "extras": (("top5", "top-5 (%)"),), "what": "Top-1/top-5 on the validation split"},
    "detection": {"suffix": "det", "metric": "AP", "label": "box AP (%)",
                  "extras": (("AP50", "AP50"), ("AP75", "AP75"), ("backbone_macs", "backbone MACs (M)")),
                  "what": "COCOeval box AP on the validation split"},
}


def task_of(run: dict) -> str:
    return run.get("task", "classification")


def aggregate(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows per (task, dataset), one per (model, options, epochs, training images); mean ± std over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if run.get(TASKS[task_of(run)]["metric"]) is None:
            continue
        # MACs and params in the key keep runs of different configurations (input size, head) apart.
        key = (task_of(run), run["dataset"], variant(run), run["epochs"], run["train_images"], run["macs"], run["params"])
        groups[key].append(run)
    macs_of = {(task_of(r), r["dataset"], r["model"]): r["macs"] for r in runs if "_compconv" not in r["model"]}
    tables: dict[tuple[str, str], list[dict]] = defaultdict(list)

    def order(item):  # baseline first, then by C_0, then the variants
        (task, dataset, name, epochs, images, macs, params), members = item
        return task, dataset, baseline_name(members[0]["model"]), members[0].get("c0") or 0, name, epochs, images, macs

    for (task, dataset, name, epochs, images, _, _), members in sorted(groups.items(), key=order):
        spec = TASKS[task]
        values = [m[spec["metric"]] for m in members]
        first = members[0]
        base = macs_of.get((task, dataset, baseline_name(first["model"])))
        paper = PAPER_TOP1.get((dataset, first["model"]))
        row = {
            "model": name, "c0": first.get("c0") or "-",
            "metric_mean": statistics.fmean(values), "metric_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values),
            **{key: statistics.fmean(m[key] for m in members) for key, _ in spec["extras"]},
            "params_M": first["params"] / 1e6, "macs_M": first["macs"] / 1e6,
            "macs_ratio": first["macs"] / base if base else None,
            "images_per_s": statistics.median(m["images_per_s"] or 0 for m in members),
            "epochs": epochs, "train_images": images,
            "paper": f"{paper:.2f}" if paper is not None else "not retrieved",
            "command": _command_without_seed(first.get("command")) + f"  # seeds {sorted(m['seed'] for m in members)}",
            "device": first.get("device", "?"),
        }
        if "backbone_macs" in row:
            row["backbone_macs"] /= 1e6
        tables[(task, dataset)].append(row)
    return tables


def markdown(task: str, dataset: str, rows: list[dict], title: str, sources: str) -> str:
    spec = TASKS[task]
    extras = spec["extras"]
    lines = [
        f"# {title or dataset} — {task}",
        "",
        f"Generated by `python scripts/make_tables.py {sources}` from the runs' summary.json files.",
        "MACs: multiply-accumulates of conv and linear layers (FlopCounterMode / 2) for one image at the training "
        f"input size (detection: the whole detector at the evaluation size). {spec['what']} after the last epoch; "
        "mean ± std over seeds.",
        f"Devices: {', '.join(sorted({r['device'] for r in rows}))}. Speed is not reported here (runs may share "
        "the machine; see the benchmark files); the CSV keeps the images/s each run measured.",
        "",
        f"| model | C_0 | {spec['label']} | seeds | " + " | ".join(label for _, label in extras) +
        " | params (M) | MACs (M) | MACs ratio | epochs | train images | paper |",
        "|---|---|---:|---:|" + "---:|" * len(extras) + "---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['macs_ratio']:.3f}" if r["macs_ratio"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['c0']} | {r['metric_mean']:.2f} ± {r['metric_std']:.2f} | {r['seeds']} | "
            + " | ".join(f"{r[key]:.2f}" for key, _ in extras) +
            f" | {r['params_M']:.3f} | {r['macs_M']:.2f} | {ratio} | {r['epochs']} | {r['train_images']} | {r['paper']} |")
    lines += ["", "## Commands", "", "Each row's runs, as recorded in their summaries (a multirun launches one per seed):", ""]
    lines += [f"- {r['model']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def _place_labels(ax, points: list[tuple[str, float, float, str]], fontsize: int = 7) -> None:
    """Labels each point (in its colour) to its right, moving a label down until it overlaps no earlier
    label and no marker; a moved label gets a thin leader line to its point."""
    ax.autoscale_view()
    to_pixels, dpi = ax.transData.transform, ax.figure.dpi
    line = fontsize * 1.4 * dpi / 72
    marker = 4 * dpi / 72
    pixels = [to_pixels((x, y)) for _, x, y, _ in points]
    taken = [(px - marker, py - marker, px + marker, py + marker) for px, py in pixels]
    for (text, x, y, colour), (px, py) in sorted(zip(points, pixels), key=lambda item: -item[0][2]):
        left, width = px + 6 * dpi / 72, len(text) * fontsize * 0.55 * dpi / 72
        dy = line / 2
        while any(left < b[2] and left + width > b[0] and py + dy - line < b[3] and py + dy > b[1] for b in taken):
            dy -= line / 2
        taken.append((left, py + dy - line, left + width, py + dy))
        moved = abs(dy - line / 2) > line
        ax.annotate(text, (x, y), xytext=(6, (dy - line / 2) * 72 / dpi), textcoords="offset points",
                    fontsize=fontsize, va="center", color=colour,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color=colour, shrinkA=0, shrinkB=3, relpos=(0, 0.5)) if moved else None)


def plot(path: Path, task: str, dataset: str, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = []
    for r in rows:
        marker = "s" if "_compconv" not in r["model"] else "o"
        drawn = ax.errorbar(r["macs_M"], r["metric_mean"], yerr=r["metric_std"], fmt=marker, capsize=3)
        points.append((r["model"], r["macs_M"], r["metric_mean"], drawn.lines[0].get_color()))
    _place_labels(ax, points)
    ax.set_xlabel("MACs per image (millions)")
    label = TASKS[task]["label"]
    ax.set_ylabel(label)
    devices = ", ".join(sorted({r["device"] for r in rows}))
    ax.set_title(f"{title or dataset}\n{label} vs MACs ({devices})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", type=Path, help="folders searched recursively for summary.json")
    parser.add_argument("--wandb-project", help="ENTITY/PROJECT to read through the wandb API")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if not args.dirs and not args.wandb_project:
        parser.error("give run folders or --wandb-project")
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    runs = load_json_summaries(args.dirs) + (load_wandb_summaries(args.wandb_project) if args.wandb_project else [])
    tables = aggregate(runs)
    if not tables:
        print(f"error: no finished run (summary.json with top1 or AP) under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    sources = " ".join(str(d) for d in args.dirs) + (f" --wandb-project {args.wandb_project}" if args.wandb_project else "")
    if args.title:
        sources += f" --title '{args.title}'"
    for (task, dataset), rows in tables.items():
        stem = args.out / f"{dataset}_{TASKS[task]['suffix']}"
        atomic_write_text(stem.with_suffix(".md"), markdown(task, dataset, rows, args.title, sources))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(stem.with_suffix(".csv"), out.getvalue())
        plot(stem.with_suffix(".png"), task, dataset, rows, args.title)
        print(f"wrote {stem}.md/.csv/.png ({len(rows)} rows from {sum(r['seeds'] for r in rows)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
