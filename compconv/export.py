"""ONNX export as timm users export: deploy, export, run the file in ONNX Runtime, compare its outputs with the
model the user gave. Needs the ``export`` extra (``pip install 'compconv[export]'``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checks import relative_error
from .inference import DeployReport, deploy
from .nested import leaves
from .onnxrt import ort_session, require

__all__ = ["ExportError", "ExportReport", "export_onnx", "ort_session"]


class ExportError(RuntimeError):
    """The model cannot be exported as given, or ONNX Runtime's outputs differ from the model's (nothing written)."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and checked."""

    path: Path
    exporter: str
    nodes: int
    max_error: float  # max |ONNX Runtime - model| relative to max |model output| (at least 1)
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
        example_input: Passed to :func:`compconv.deploy` (forms timed in ONNX Runtime); default its rule.
        opset: ONNX opset.
        atol: Largest accepted difference from ``model`` (eval), relative to the largest output (at least 1).

    Outputs may be any nest of tensors (dicts, tuples); the file's outputs are its leaves in order, each compared.

    Raises:
        DeployError: the deployed copy differs from ``model`` (nothing is written).
        ExportError: the model does not take one batch tensor or return tensors (a detector: export its
            backbone), or ONNX Runtime's outputs differ from ``model``'s (the file is removed).
    """
    onnx = require("onnx")
    require("onnxscript") if dynamo else None
    if _is_detector(model):
        raise ExportError(f"{type(model).__name__} is a detector (a list of images in, a list of dicts of boxes, "
                          "scores and labels out), which export_onnx does not take as one graph: export its backbone "
                          "(export_onnx(model.backbone, ...)), and deploy the detector itself with compconv.deploy")
    model = copy.deepcopy(model).eval().float().cpu()
    x = torch.randn(batch_size, *input_size)
    expected = _leaves(model, x)  # the user's model, before deploy touches the copy
    names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    report = deploy(model, example_input, runtime="ort") if deploy_model else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _export(model, x, tmp, dynamo, opset, names)
        graph = onnx.load(str(tmp))
        if len(graph.graph.input) != 1:
            raise ExportError(f"the exported graph has {len(graph.graph.input)} inputs, expected 1")
        got = ort_session(tmp).run(None, {graph.graph.input[0].name: x.numpy()})
        if len(got) != len(expected):
            raise ExportError(f"the ONNX file has {len(got)} outputs where the model returns {len(expected)} tensors")
        got = [torch.from_numpy(value) for value in got]
        for value, want in zip(got, expected):
            if value.shape != want.shape:
                raise ExportError(f"an ONNX output has shape {tuple(value.shape)} where the model's has "
                                  f"{tuple(want.shape)}; the exporter wrote a wrong model")
        error = relative_error(got, expected, floor=1.0)
        if not error <= atol:
            raise ExportError(f"ONNX Runtime's output differs from the model's by {error:.3g} (relative to max |y|, "
                              f"at least 1); the {'dynamo' if dynamo else 'TorchScript'} exporter wrote a wrong model")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(path, "dynamo" if dynamo else "torchscript", len(graph.graph.node), error, report)


def _leaves(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs on the batch ``x`` as a flat list of tensors, or an :class:`ExportError` saying what
    to pass instead."""
    try:
        output = model(x)
    except Exception as error:
        raise ExportError(
            f"the model does not run on one batch tensor of shape {tuple(x.shape)} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160]}); export_onnx exports models that take one image batch: for a "
            "detector that takes a list of images, export its backbone (e.g. model.backbone), or pass the right "
            "input_size") from error
    found = leaves(output)
    if not found or not all(isinstance(leaf, torch.Tensor) for leaf in found):
        raise ExportError(f"the model returns {type(output).__name__} holding more than tensors; export_onnx needs "
                          "outputs that are tensors or dicts, lists and tuples of tensors")
    return found


def _is_detector(model: nn.Module) -> bool:
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(model, GeneralizedRCNN)


def _export(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool, opset: int, names: list[str]) -> None:
    """Writes the ONNX file, or raises :class:`ExportError` with the exporter's first line."""
    try:
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, dynamic_shapes=({0: batch},),
                                        input_names=["input"], output_names=names, verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=names, dynamic_axes={n: {0: "batch"} for n in ["input", *names]})
    except Exception as error:
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        raise ExportError(f"the {'dynamo' if dynamo else 'TorchScript'} exporter cannot export this model "
                          f"({type(error).__name__}: {first[:200]}); try dynamo={not dynamo}, or export the part "
                          "that takes one image batch") from error

