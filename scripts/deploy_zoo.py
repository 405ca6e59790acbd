"""The deploy/export zoo table: every model of compconv/testing/zoo.py, deployed in both runtimes and exported to ONNX,
compared with the user's model on an input deploy did not see.

Each cell is ``equal E`` (E: max |got - want| / max |want|, accepted at <= 1e-4), ``refused`` (DeployError:
the model was left untouched) or ``WRONG E`` / ``error`` (a bug: neither should ever appear).

    python scripts/deploy_zoo.py --out results/deploy_zoo.md
    python scripts/deploy_zoo.py --set extra --out results/deploy_zoo_extra.md   # 46 more, deploy only

A model that does not run once patched (before deploy is called) is ``not run`` with the error: a limit of the
patcher, not of deploy.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compconv.testing.zoo import EXTRA, SIZES, ZOO, prepared  # noqa: E402  (the zoo the tests use)

from compconv import deploy, export_onnx  # noqa: E402
from benchmark import device_name  # noqa: E402
from compconv.inference import DeployError, tolerance_for  # noqa: E402
from compconv.onnxrt import ort_session  # noqa: E402

SIZE = 64


def _first_clause(error: Exception) -> str:
    """The reason a DeployError gives, up to its first comma: short enough for a table cell, never cut mid-word."""
    return str(error).splitlines()[0].split(", ")[0]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _verdict(error: float) -> str:
    return f"equal {error:.1e}" if error <= tolerance_for(torch.float32) else f"WRONG {error:.2g}"


@torch.no_grad()
def row(name: str, export: bool = True) -> list[str]:
    """``[deploy torch, deploy ort, export_onnx]`` cells for ``name`` (``export=False``: the deploy cells only)."""
    cells = []
    size = SIZES.get(name, SIZE)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    try:
        want = prepared(name, size=size)(x)
    except Exception as error:  # the patched model itself does not run: nothing for deploy to keep
        return [f"not run ({type(error).__name__}: {str(error).splitlines()[0][:80]})"] * (3 if export else 2)
    for runtime in ("torch", "ort"):
        model = prepared(name, size=size)
        try:
            deploy(model, runtime=runtime)
            cells.append(_verdict(_relative(model(x), want)))
        except DeployError as error:
            cells.append(f"refused ({_first_clause(error)})")
        except Exception as error:  # a bug: reported, not hidden
            cells.append(f"error {type(error).__name__}")
    if not export:
        return cells
    model = prepared(name, size=size)
    with tempfile.TemporaryDirectory() as folder:
        try:
            report = export_onnx(model, Path(folder) / "m.onnx", (3, size, size), batch_size=2)
            session = ort_session(report.path)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            cells.append(_verdict(_relative(got, want)))
        except DeployError as error:
            cells.append(f"refused ({_first_clause(error)})")
        except Exception as error:
            cells.append(f"error {type(error).__name__}")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("zoo", "extra"), default="zoo",
                        help="zoo: compconv/testing/zoo.py's ZOO, deployed and exported; extra: its EXTRA, deployed only")
    parser.add_argument("--models", default="", help="comma-separated names from the set (default: all of it)")
    parser.add_argument("--out", default="", help="markdown file to write (default: print)")
    args = parser.parse_args(argv)
    models = ZOO if args.set == "zoo" else EXTRA
    names = [n for n in (args.models or ",".join(models)).split(",") if n]
    unknown = [n for n in names if n not in models]
    if unknown:
        print(f"error: unknown {args.set} models {unknown}; choose from {sorted(models)}", file=sys.stderr)
        return 2
    export = args.set == "zoo"
    warnings.filterwarnings("ignore")
    lines = ["| model | deploy (torch) | deploy (ort rule) |" + (" export_onnx (dynamo, ONNX Runtime) |" if export else ""),
             "|---|---|---|" + ("---|" if export else "")]
    for name in names:
        cells = row(name, export)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    command = "python scripts/deploy_zoo.py" + (f" --set {args.set}" if args.set != "zoo" else "") \
        + (f" --models {args.models}" if args.models else "") + (f" --out {args.out}" if args.out else "")
    sizes = ", ".join(f"{n} {s}x{s}" for n, s in SIZES.items() if n in names)
    header = [
        "# deploy()" + (" and export_onnx()" if export else "") + " over a zoo of patched architectures", "",
        f"Generated by `{command}`",
        f"on {device_name(torch.device('cpu'))}; torch {torch.__version__}, "
        f"timm {timm.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
        f"Each model (compconv/testing/zoo.py, {'ZOO' if export else 'EXTRA'}) is patched with c0=128, its BatchNorm statistics "
        "moved by 3 training-mode forwards, its BatchNorm affines set to U(0.5, 1.5) / U(-0.5, 0.5) and its layer "
        "scales (`gamma`) to U(0.5, 1.5), then put in eval. `deploy()` runs without an example input (forms by rule, "
        "checked on a random batch of the model's default input size); every cell compares with the user's model on "
        f"a fresh batch of 2 at {SIZE}x{SIZE}{' (' + sizes + ')' if sizes else ''}: `equal E` is the max |difference| / "
        "max |output| (accepted at 1e-4); `refused` is a DeployError (the model left untouched); `not run`: the "
        "patched model itself fails on that input (a limit of the patcher; deploy is not called).", "",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    bad = sum("WRONG" in line or "| error" in line for line in lines)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
