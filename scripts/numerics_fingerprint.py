"""Fingerprints of what the package computes, to show that a refactor changed no numerics: for every registered
model, the training-mode output and the hash of every gradient of one forward/backward, the eval output, and the
deployed output; for every model of the deploy zoo, the deployed output. Two commits are compared bitwise:

    python scripts/numerics_fingerprint.py --out /tmp/new.json
    git worktree add /tmp/old OLD && (cd /tmp/old && python scripts/numerics_fingerprint.py --out /tmp/old.json)
    python scripts/numerics_fingerprint.py --compare /tmp/old.json /tmp/new.json

Run both sides on one machine with the same threads: the hashes are of bytes. Both commits need
``compconv.testing`` (the zoo's home since this script was written; the first comparison, 2d00212 against
993bac0, ran this script with the zoo on the older commit's test path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compconv  # noqa: E402
from compconv.testing.zoo import ZOO, prepared  # noqa: E402


def digest(tensor: torch.Tensor | None) -> str:
    if tensor is None:
        return "none"
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def registered(name: str) -> dict[str, str]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    model = model.to(memory_format=torch.channels_last).train()
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    prints = {"train_out": digest(out), "grad_x": digest(x.grad)}
    prints.update({f"grad:{n}": digest(p.grad) for n, p in model.named_parameters()})
    model.eval()
    with torch.no_grad():
        prints["eval_out"] = digest(model(x))
        compconv.deploy(model)
        prints["deployed_out"] = digest(model(x))
    return prints


def zoo(name: str) -> dict[str, str]:
    model = prepared(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prints = {"eval_out": digest(model(x))}
        try:
            compconv.deploy(model)
            prints["deployed_out"] = digest(model(x))
        except RuntimeError as error:  # a refusal is a result too
            prints["deployed_out"] = f"refused: {type(error).__name__}"
    return prints


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the fingerprints (JSON) here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        differ = [f"{m}:{k}" for m in before for k in before[m] if after.get(m, {}).get(k) != before[m][k]]
        missing = [m for m in before if m not in after]
        print(f"{len(before)} models, {sum(len(v) for v in before.values())} tensors compared bitwise: "
              f"{len(differ)} differ, {len(missing)} missing")
        for item in differ[:20]:
            print("  differs:", item)
        return 1 if differ or missing else 0
    torch.set_num_threads(1)
    names = [("registered", n) for n in compconv.compconv_model_names()] + [("zoo", n) for n in ZOO]
    if args.only:
        wanted = set(args.only.split(","))
        names = [(kind, n) for kind, n in names if n in wanted]
    prints = {}
    for kind, name in names:
        prints[name] = registered(name) if kind == "registered" else zoo(name)
        print(name, prints[name].get("deployed_out"), flush=True)
    Path(args.out).write_text(json.dumps(prints, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
