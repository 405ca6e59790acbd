#!/usr/bin/env python
"""The detection study's results, from its sweep directories (results/fmnist_det_study_rule.md has its rules).

    python scripts/fmnist_det_table.py --runs runs/fmnist_det_study      # collect, then write the tables
    python scripts/fmnist_det_table.py                                     # tables from the committed CSV only

``--runs`` reads every finished run's ``summary.json`` (what ``train_det.py -m experiment=fmnist_det_study``
writes) into ``results/fmnist_det_study.csv`` (one row per run: model, how its backbone started and from which
checkpoint and commit, seed, epochs, split sizes, validation and test box AP, the deployed detector's test AP,
MACs, params, measured images/s, CPU kind, commit(s), command) and its per-epoch log into
``results/fmnist_det_study/<run>.csv``; rows of runs whose directories are gone are kept. Then it writes
``fmnist_det_study_plateau.md`` (the plateau rule, validation AP only) and, once E* is decided,
``fmnist_det_study.md`` (the main table at E*: test AP with intervals paired by seed against ResNet-18).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.fmnist_study_table import (TableError, by_seed, collect_runs, describe, log_value,  # noqa: E402
                                       made_by, natural, paired, plateau_rows, read_study_rows)

PREFIX = "fmnist_det_study"
EXPERIMENT = "fmnist_det_study"
BASELINE, COMPACT = "resnet18", "resnet18_compconv128"
PLATEAU_AP = 0.5  # results/fmnist_det_study_rule.md
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FIELDS = ("run", "model", "init", "pretrained_from", "pretrained_code", "seed", "epochs", "train_images",
          "val_images", "test_images", "val_AP", *(f"test_{m}" for m in METRICS),
          *(f"deployed_test_{m}" for m in METRICS[:3]), "deployed_error", "macs", "backbone_macs", "params",
          "backbone_params", "train_images_per_s", "test_images_per_s", "deployed_images_per_s", "threads", "device",
          "segments", "train_seconds", "code", "command", "log")
LOG_KEYS = {"epoch": "epoch", "lr": "lr", "train_loss": "train/loss", "val_AP": "val/AP", "val_AP50": "val/AP50",
            "val_AP75": "val/AP75", "images_per_s": "train/images_per_s"}


def row_of(run_dir: Path, summary: dict, log: str) -> dict:
    """One CSV row of a finished run's summary."""
    segments = summary.get("segments") or []
    codes = [s.get("code") or "?" for s in segments]
    checkpoint = summary.get("backbone_checkpoint")
    row = {
        "run": run_dir.name, "model": summary["model"], "init": "pre" if checkpoint else "scratch",
        "pretrained_from": checkpoint or "", "pretrained_code": summary.get("backbone_code") or "",
        "seed": summary["seed"], "epochs": summary["epochs"], "train_images": summary["train_images"],
        "val_images": summary["val_images"], "test_images": summary.get("test_images"), "val_AP": summary["AP"],
        **{f"test_{m}": summary.get(f"test_{m}") for m in METRICS},
        **{f"deployed_test_{m}": summary.get(f"test_deployed_{m}") for m in METRICS[:3]},
        "deployed_error": summary.get("test_deployed_error") or "",
        **{key: summary[key] for key in ("macs", "backbone_macs", "params", "backbone_params")},
        "train_images_per_s": summary.get("images_per_s"), "test_images_per_s": summary.get("test_images_per_s"),
        "deployed_images_per_s": summary.get("test_deployed_images_per_s"),
        "threads": summary.get("threads"), "device": summary["device"],
        "segments": "; ".join(sorted({f"{s['device']} x{s['threads']}" for s in segments})),
        "train_seconds": round(summary["train_seconds"], 1),
        "code": codes[0] if len(set(codes)) <= 1 else f"{codes[0]}..{codes[-1]}", "command": summary["command"],
        "log": log,
    }
    return {k: log_value(v) if isinstance(v, float) else v for k, v in row.items()}


def collect(run_roots: list[Path], results: Path) -> list[dict]:
    """Merges every finished run under ``run_roots`` into the CSV (by run name) and writes its per-epoch log."""
    return collect_runs(run_roots, results, PREFIX, EXPERIMENT, LOG_KEYS, FIELDS, row_of,
                        lambda r: (r["init"], natural(r["model"]), int(r["epochs"]), int(r["seed"])))


def read_rows(results: Path) -> list[dict]:
    return read_study_rows(results, PREFIX, "test_AP", "--runs runs/fmnist_det_study")


def plateau(rows: list[dict]) -> tuple[str, int | None]:
    """The plateau rule on validation AP of seeds 0 and 1 of the pretrained pair; the report and E* (or None)."""
    lines = ["# The detection plateau rule, applied", "",
             f"A schedule of E epochs is at the plateau when the mean validation box AP of seeds 0 and 1 at 2E exceeds "
             f"the mean at E by less than {PLATEAU_AP} pt (`results/fmnist_det_study_rule.md`). Validation: 1,000 "
             "canvases of training items held out of the training canvases; the test canvases are not read here.", "",
             "| model | E | val AP at E (s0, s1) | val AP at 2E (s0, s1) | gain | at the plateau |",
             "|---|---:|---|---|---:|---|"]
    table, chosen = plateau_rows([r for r in rows if r["init"] == "pre"], (BASELINE, COMPACT), "val_AP", PLATEAU_AP)
    lines += table
    epochs = max(chosen.values()) if len(chosen) == 2 else None
    lines += ["", f"E* = max({chosen.get(BASELINE)}, {chosen.get(COMPACT)}) = {epochs} epochs for every row."
              if epochs else "E* is not decided yet: the rule's runs are not all finished."]
    return "\n".join(lines) + "\n", epochs


def _mean(runs: dict[int, dict], key: str, scale: float = 1.0, digits: int = 1) -> str:
    values = [float(r[key]) / scale for r in runs.values() if r.get(key) not in ("", None)]
    return f"{statistics.fmean(values):.{digits}f}" if values else "—"


def deploy_kept(runs: dict[int, dict]) -> str:
    """Whether every run's deployed detector has the trained one's test AP, AP50 and AP75 to the reported digit."""
    if any(r["deployed_error"] or r["deployed_test_AP"] in ("", None) for r in runs.values()):
        return "no: " + "; ".join(f"s{seed}: {r['deployed_error'] or 'not deployed'}" for seed, r in runs.items()
                                  if r["deployed_error"] or r["deployed_test_AP"] in ("", None))
    same = all(f"{float(r[f'deployed_test_{m}']):.1f}" == f"{float(r[f'test_{m}']):.1f}"
               for r in runs.values() for m in METRICS[:3])
    return "yes" if same else "NO: " + ", ".join(f"s{seed} {float(r['deployed_test_AP']):.1f} vs "
                                                 f"{float(r['test_AP']):.1f}" for seed, r in runs.items())


def main_table(rows: list[dict], epochs: int, pilot: bool = False) -> str:
    groups = by_seed(rows, epochs, lambda row: (row["init"], row["model"]))
    title = (f"# Detection pilot: Faster R-CNN + FPN at {epochs} epochs (not judged by the study's rule)" if pilot
             else f"# Detection study: Faster R-CNN + FPN at E* = {epochs} epochs")
    lines = [title, "",
             "Test box AP (%): the 1,000 test canvases (Fashion-MNIST test items), read once per run after its last "
             "epoch. Validation AP: the 1,000 validation canvases. Δ: paired by seed against ResNet-18 with the same "
             "start (same canvases, order and augmentation; same CPU kind and threads), mean [95 % t interval]. "
             "Deployed = the deployed detector's test AP, AP50 and AP75 equal the trained one's to one decimal. MACs "
             "at 128x128.", "",
             "| backbone | start | seeds | test AP mean ± std | Δ AP vs ResNet-18 [95 % CI] | AP50 | AP75 | APs / APm / "
             "APl | val AP | deployed keeps AP | MACs (G): backbone / detector | params (M): backbone / detector | "
             "train / test / deployed img/s | CPU kinds |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---|"]
    for key in sorted(groups, key=lambda k: (k[0] != "pre", k[1] != BASELINE, natural(k[1]))):
        runs = groups[key]
        test = [float(r["test_AP"]) for r in runs.values()]
        std = f"{statistics.stdev(test):.2f}" if len(test) > 1 else "—"
        delta = "—" if key[1] == BASELINE else describe(*paired(runs, groups.get((key[0], BASELINE), {}), "test_AP"))
        first = next(iter(runs.values()))
        lines.append(
            f"| {key[1]} | {key[0]} | {len(test)} | {statistics.fmean(test):.2f} ± {std} | {delta} | "
            f"{_mean(runs, 'test_AP50')} | {_mean(runs, 'test_AP75')} | {_mean(runs, 'test_APs')} / "
            f"{_mean(runs, 'test_APm')} / {_mean(runs, 'test_APl')} | {_mean(runs, 'val_AP', digits=2)} | "
            f"{deploy_kept(runs)} | {float(first['backbone_macs']) / 1e9:.2f} / {float(first['macs']) / 1e9:.2f} | "
            f"{float(first['backbone_params']) / 1e6:.2f} / {float(first['params']) / 1e6:.2f} | "
            f"{_mean(runs, 'train_images_per_s')} / {_mean(runs, 'test_images_per_s')} / "
            f"{_mean(runs, 'deployed_images_per_s')} | {'; '.join(sorted({r['segments'] for r in runs.values()}))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    global PREFIX
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, action="append", default=[], help="a sweep directory (repeatable)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--epochs", type=int, default=None, help="E* (default: the plateau rule's, once decided)")
    parser.add_argument("--prefix", default=PREFIX, help="results/<prefix>.csv and the files beside it (a pilot's)")
    args = parser.parse_args(argv)
    PREFIX = args.prefix
    try:
        rows = collect(args.runs, args.results) if args.runs else read_rows(args.results)
        report, decided = plateau(rows)
    except (TableError, OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    footer = made_by("scripts/fmnist_det_table.py", argv, PREFIX)
    if PREFIX == EXPERIMENT:  # a pilot (another prefix) is not judged by the rule
        (args.results / f"{PREFIX}_plateau.md").write_text(report + footer)
    epochs = args.epochs or decided
    if epochs is not None:
        (args.results / f"{PREFIX}.md").write_text(main_table(rows, epochs, pilot=PREFIX != EXPERIMENT) + footer)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
