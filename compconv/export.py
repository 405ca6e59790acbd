"""ONNX export the way timm users export: deploy, export, run the file in ONNX Runtime, compare outputs
with the model the user gave (not with the deployed copy).

Needs the ``export`` extra (``pip install 'compconv[export]'``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .deploy import DeployReport, deploy
from .onnxrt import ort_session, require

__all__ = ["ExportReport", "export_onnx", "ort_session"]


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and checked."""

    path: Path
    exporter: str
    nodes: int
    max_abs_error: float
    deploy: DeployReport | None


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, input_size: tuple[int, ...] = (3, 224, 224), batch_size: int = 1,
                *, dynamo: bool = True, deploy_model: bool = True, example_input: torch.Tensor | None = None,
                opset: int = 18, atol: float = 1e-4) -> ExportReport:
    """Deploys a copy of ``model``, exports it to ONNX, runs the file in ONNX Runtime and checks its outputs.

    Args:
        model: Any model (CompConv or not); it is not changed.
        path: The ``.onnx`` file to write (atomically: nothing is left behind on failure).
        input_size: ``(C, H, W)`` of one input.
        batch_size: Batch of the traced example; the batch dimension is dynamic in the file.
        dynamo: ``True``: the ``torch.export``-based exporter; ``False``: the TorchScript-based one.
        deploy_model: Apply :func:`compconv.deploy` first (the inference form).
        example_input: Passed to :func:`compconv.deploy`, which then times each layer's forms on it in ONNX
            Runtime; by default deploy's ONNX Runtime rule decides (faster end to end, see ``rule_choice``).
        opset: ONNX opset.
        atol: Largest accepted difference between ONNX Runtime and ``model`` (the user's, in eval mode), relative
            to the largest output (at least 1).

    Raises:
        DeployError: the deployed copy differs from ``model`` (nothing is written).
        RuntimeError: ONNX Runtime's outputs differ from ``model``'s (the file is removed).
    """
    onnx = require("onnx")
    require("onnxscript") if dynamo else None
    model = copy.deepcopy(model).eval().float().cpu()
    x = torch.randn(batch_size, *input_size)
    expected = model(x)  # the user's model, before deploy touches the copy
    report = deploy(model, example_input, runtime="ort") if deploy_model else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                        dynamic_shapes=({0: batch},),
                                        input_names=["input"], output_names=["output"], verbose=False)
            program.save(str(tmp))
        else:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        graph = onnx.load(str(tmp))
        if len(graph.graph.input) != 1:
            raise RuntimeError(f"the exported graph has {len(graph.graph.input)} inputs, expected 1")
        got = ort_session(tmp).run(None, {graph.graph.input[0].name: x.numpy()})[0]
        error = float((torch.from_numpy(got) - expected).abs().max())
        scale = float(expected.abs().max()) or 1.0
        if not error <= atol * max(1.0, scale):
            raise RuntimeError(f"ONNX Runtime's output differs from the model's by {error:.3g} (max |y| {scale:.3g}); "
                               f"the {'dynamo' if dynamo else 'TorchScript'} exporter wrote a wrong model")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(path, "dynamo" if dynamo else "torchscript", len(graph.graph.node), error, report)

