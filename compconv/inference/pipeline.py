"""Inference form of a CompConv model: exact folds proven on the traced dataflow, always checked.

:func:`deploy` works on a copy: inner norms, biases and BatchNorms folded, each 1x1 layer in its fastest exact
form, shuffles moved into the next conv. The copy replaces the model only when its outputs equal the model's;
otherwise :class:`DeployError` names the first layer that differs. docs/deploy.md describes each step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..checks import DeployError, relative_error, tolerance_for
from ..efficient import EfficientCompConv2d
from ..layers import CompConv2d
from ..lowrank import FORMS, build_form, form_macs, rule_choice
from ..nested import map_tensors, tensors
from ..pointwise import is_pointwise
from .forms import absorb_norm, fold_shuffle, permute_input
from .graph import Site, analyse, plain_conv_norms, trace
from .timing import RUNTIMES, ChoiceCache, measured_choice

__all__ = ["DeployReport", "LayerChoice", "ROUNDING_SHARE", "check_outputs", "default_input", "deploy",
           "rounding_error"]

# deploy refuses an fp32 model whose own outputs move by more than this share of the tolerance under rounding alone
# (against a float64 copy): an exact fold then differs from the model by the model's rounding amplified, input by input
ROUNDING_SHARE = 0.25


@dataclass(frozen=True)
class LayerChoice:
    """The form chosen for one 1x1 CompConv layer, the norm it absorbed (if any) and its MACs per output position."""

    name: str
    form: str
    macs_per_position: int
    plain_macs_per_position: int
    times_ms: dict = field(default_factory=dict)
    norm: Optional[str] = None  # the BatchNorm after it (absorbed unless the form is chain)

    def row(self) -> str:
        timed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.times_ms.items())
        return (f"| {self.name} | {self.form} | {self.macs_per_position} | {self.plain_macs_per_position} | "
                f"{self.macs_per_position / self.plain_macs_per_position:.3f} | {timed or 'rule'} |")


@dataclass
class DeployReport:
    """What :func:`deploy` did: folds, each 1x1 layer's form, the folds left out and why, and the check."""

    norms_folded: int = 0
    biases_folded: int = 0
    shuffles_folded: int = 0
    layers: list[LayerChoice] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # layer name -> why a neighbour fold was not applied
    shuffle_folds: list[tuple[str, ...]] = field(default_factory=list)  # (conv, norm, *per-channel ops, consumer)
    norms_absorbed: list[tuple[str, str]] = field(default_factory=list)  # (chain-form conv, the norm it applies)
    norm_of: dict[str, Optional[str]] = field(default_factory=dict)  # each CompConv layer -> the BatchNorm after it
    plain_norms_folded: list[tuple[str, str]] = field(default_factory=list)  # (plain nn.Conv2d, its BatchNorm2d)
    traced: bool = True
    trace_error: Optional[str] = None
    traced_parts: list[str] = field(default_factory=list)  # the subtrees traced when the whole model is not
    max_error: Optional[float] = None  # of the check, relative to max |output|
    checked_parts: list[str] = field(default_factory=list)  # checked part by part (empty: the whole model's output)
    tolerance: Optional[float] = None
    rounding_error: Optional[float] = None  # the model's own fp32 outputs against float64 (None: not measured)

    def forms(self) -> dict[str, int]:
        return {form: sum(c.form == form for c in self.layers) for form in FORMS}

    def table(self) -> str:
        """Markdown table: each 1x1 CompConv layer, the form chosen, its MACs per output position."""
        lines = ["| layer | form | MACs/pos | plain MACs/pos | ratio | measured |", "|---|---|---:|---:|---:|---|"]
        return "\n".join(lines + [choice.row() for choice in self.layers])

    def left_table(self) -> str:
        """Markdown table of the layers whose norm or shuffle fold was not proven, with the reason."""
        return "\n".join(["| layer | left as it is because |", "|---|---|"] +
                         [f"| {name} | {reason} |" for name, reason in self.left.items()])

    def __str__(self) -> str:
        traced = "" if self.traced else (
            f", not traceable ({self.trace_error}): traced in parts {self.traced_parts}" if self.traced_parts else
            f", not traceable ({self.trace_error}): per-module forms only")
        return (f"DeployReport({self.norms_folded} inner norms folded, {self.biases_folded} biases folded, "
                f"{self.shuffles_folded} shuffles folded, {len(self.plain_norms_folded)} norms folded into plain "
                f"convs, {len(self.norms_absorbed)} norms applied in chain layers' "
                f"assembly, forms {self.forms()}, "
                f"{len(self.left)} folds left out"
                f"{traced}, max rel. error {self.max_error:.2g} <= {self.tolerance:.2g}"
                f"{f' at {self.checked_parts}' if self.checked_parts else ''})"
                if self.max_error is not None else f"DeployReport(unchecked, forms {self.forms()})")


def _input_dtype(x: Any) -> torch.dtype:
    """The dtype of the first floating-point tensor of an input (a tensor, or a list of images...)."""
    return next((t.dtype for t in tensors(x) if t.is_floating_point()), torch.float32)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"an input of shape {tuple(x.shape)}"
    return f"an input of {len(tensors(x))} tensors ({type(x).__name__})"


def _one_sample(x: Any) -> Any:
    """The first sample of a batch: ``x[:1]`` of a tensor, the first item of a list or tuple of images."""
    if isinstance(x, torch.Tensor):
        return x[:1]
    if isinstance(x, (list, tuple)) and x:
        return type(x)(x[:1])
    return x


def default_input(model: nn.Module) -> torch.Tensor:
    """A random batch of one at the model's default input size (timm's ``pretrained_cfg``), on its device;
    without one, 64x64 with the channels of the first conv."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", ())) if isinstance(cfg, dict) else ()
    if len(size) != 3:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, CompConv2d))), None)
        if first is None:
            raise DeployError("the model has no convolution to infer an input size from: pass example_input")
        size = (first.in_channels, 64, 64)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *size, generator=generator).to(device, dtype)


@torch.no_grad()
def rounding_error(model: nn.Module, x: torch.Tensor) -> Optional[float]:
    """How far ``model``'s float32 outputs on ``x[:1]`` are from a float64 copy's (relative to max |output|): the
    rounding sensitivity any exact rewrite inherits. None where not measured (not float32, no float64 run).
    """
    if _input_dtype(x) != torch.float32:
        return None
    sample = _one_sample(x)
    try:
        got = model(sample)
        exact = copy.deepcopy(model).double()(map_tensors(lambda t: t.double() if t.is_floating_point() else t,
                                                          sample))
    except Exception:  # e.g. an operator without a float64 kernel: nothing to compare with
        return None
    return relative_error(got, exact)


@torch.no_grad()
def check_outputs(original: nn.Module, deployed: nn.Module, x: Any, tolerance: float,
                  report: Optional[DeployReport] = None) -> float:
    """The relative error of ``deployed`` against ``original`` on ``x``; raises :class:`DeployError` above
    ``tolerance``, naming the first layer (in ``original``'s execution order) whose output differs."""
    try:
        want = original(x)
    except Exception as error:
        raise DeployError(f"cannot check the deployed model: the model does not run on {_describe(x)} "
                          f"({type(error).__name__}: {error}); pass example_input") from error
    error = relative_error(deployed(x), want)
    if error <= tolerance:
        return error
    where = _first_difference(original, deployed, x, tolerance, report)
    raise DeployError(f"the deployed model's output differs from the model's by {error:.3g} (relative; tolerance "
                      f"{tolerance:.2g}){where}. The model was not changed; please report this model")


def _first_difference(original: nn.Module, deployed: nn.Module, x: Any, tolerance: float,
                      report: Optional[DeployReport]) -> str:
    """``, first at layer NAME (error E)`` for the first module whose output should be equal and is not."""
    permuted = set()  # modules whose outputs deploy permutes or replaces by design
    if report is not None:
        permuted = {c.name for c in report.layers if c.form != "chain"} | {c.norm for c in report.layers
                                                                            if c.norm and c.form != "chain"}
        permuted |= {name for fold in report.shuffle_folds for name in fold[:-1]}
        permuted |= {name for pair in report.norms_absorbed for name in pair}
        permuted |= {conv for conv, _ in report.plain_norms_folded}  # output: the norm's
    permuted_outputs: set[int] = set()
    alive = []  # tracked outputs stay referenced, so their ids are not reused by later tensors

    def record(model: nn.Module, outputs: dict, order: list, track: bool):
        def hook(module, args, output, name):
            if track and (name in permuted or id(output) in permuted_outputs):
                permuted.add(name)
                permuted_outputs.add(id(output))
                alive.append(output)
            if name not in outputs:  # cloned: a later in-place op (ReLU(inplace=True), +=) must not change it
                outputs[name] = map_tensors(torch.clone, output)
                order.append(name)
        return [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in model.named_modules()
                if n]

    got, want, order = {}, {}, []
    hooks = record(original, want, order, False) + record(deployed, got, [], True)
    try:
        original(x)
        deployed(x)
    finally:
        for hook in hooks:
            hook.remove()
    for name in order:
        if name in permuted or name not in got:  # permuted by design, or replaced (its internals are gone)
            continue
        error = relative_error(got[name], want[name])
        if error > tolerance and math.isfinite(error):
            return f", first at layer {name} (error {error:.3g})"
        if error == math.inf:
            continue  # shapes differ (a replaced or permuted module); its consumers are compared
    return ""


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def deploy(model: nn.Module, example_input: Any = None, runtime: str = "torch", *,
           cache: Optional[ChoiceCache] = None, tolerance: Optional[float] = None) -> DeployReport:
    """Turns every CompConv of ``model`` into its fastest exact inference form, checked, in place.

    Args:
        model: Any model with :class:`CompConv2d` layers (timm/torchvision models, your own).
        example_input: The model's input as it will see it (a batch, or the single argument the model takes, e.g.
            a detector's list of images): 1x1 forms are timed on it and the check runs on it. None:
            :func:`rule_choice` decides and the check runs on :func:`default_input`.
        runtime: ``"torch"`` (PyTorch) or ``"ort"`` (ONNX Runtime on the CPU): where forms are timed and run.
        cache: A :class:`ChoiceCache` to reuse timings across calls (default: a fresh one).
        tolerance: Largest accepted max |deployed - original| / max |original|; default :func:`tolerance_for`
            the input's dtype (1e-4 in fp32, 2e-2 in fp16/bf16).

    Returns:
        A :class:`DeployReport`: ``table()`` lists each 1x1 layer's form and MACs, ``left_table()`` the folds
        the dataflow did not prove.

    Raises:
        DeployError: the copy's outputs differ from ``model``'s, or a float32 model's own outputs move by more
            than ``ROUNDING_SHARE`` of the tolerance under rounding; ``model`` is unchanged. A model traceable only
            in parts whose own outputs rounding moves (a detector, through NMS) is checked part by part instead: each
            rewritten part on the input the model feeds it (``report.checked_parts``).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if isinstance(model, CompConv2d):
        raise TypeError("deploy() rewrites the layers inside a model; for one layer use layer.fuse(), which returns "
                        "its inference form")
    modes = _modes(model)
    model.eval()
    try:
        x = example_input if example_input is not None else default_input(model)
        tolerance = tolerance if tolerance is not None else tolerance_for(_input_dtype(x))
        candidate = copy.deepcopy(model)
        report = _deploy_copy(candidate, example_input, runtime, cache or ChoiceCache())
        report.tolerance = tolerance
        report.rounding_error = rounding_error(model, x)
        if _unstable(report.rounding_error, tolerance) and not report.traced and report.traced_parts:
            report.max_error = _check_parts(model, candidate, x, tolerance, report)
        else:
            _refuse_if_unstable(report.rounding_error, tolerance, "the model's own float32 outputs")
            report.max_error = check_outputs(model, candidate, x, tolerance, report)
    except BaseException:
        for module, training in modes.items():
            module.train(training)
        raise
    _adopt(model, candidate)
    return report


def _unstable(rounding: Optional[float], tolerance: float) -> bool:
    return rounding is not None and rounding > ROUNDING_SHARE * tolerance


def _refuse_if_unstable(rounding: Optional[float], tolerance: float, what: str) -> None:
    if _unstable(rounding, tolerance):
        raise DeployError(
            f"{what} are {rounding:.2g} (relative) from a float64 copy's on this input, more than {ROUNDING_SHARE:g} of "
            f"the tolerance {tolerance:.2g}: rounding alone moves them, so no exact rewrite can promise equality within "
            f"the tolerance on other inputs. The model was not changed; deploy it in float64, or pass tolerance >= "
            f"{rounding / ROUNDING_SHARE:.2g} to accept differences of that order")


def _rewritten_parts(model: nn.Module, report: DeployReport) -> list[str]:
    """The traced subtrees, and every CompConv layer outside them: together they hold everything deploy rewrote."""
    inside = tuple(part + "." for part in report.traced_parts)
    layers = [name for name, m in model.named_modules() if isinstance(m, CompConv2d) and not name.startswith(inside)]
    return report.traced_parts + layers


@torch.no_grad()
def _check_parts(model: nn.Module, candidate: nn.Module, x: Any, tolerance: float, report: DeployReport) -> float:
    """Checks each rewritten part of a model that is traceable only in parts and whose own outputs rounding moves (a
    detector: NMS and top-k turn a last-bit change of a score into another set of boxes) on the input the model
    feeds it; the modules around the parts are the same modules with the same weights. Returns the largest error."""
    parts = _rewritten_parts(model, report)
    inputs: dict[str, tuple] = {}

    def record(name: str, args: tuple, kwargs: dict) -> None:
        if name not in inputs:  # the first call's input, cloned: later in-place ops must not change it
            inputs[name] = (map_tensors(torch.clone, args), kwargs)

    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, kwargs, name=name: record(name, args, kwargs), with_kwargs=True) for name in parts]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    errors = []
    for name in parts:
        if name not in inputs:
            raise DeployError(f"cannot check the deployed model: its part {name} did not run on {_describe(x)}; "
                              "pass an example_input that reaches every CompConv layer")
        args, kwargs = inputs[name]
        if len(args) != 1 or kwargs:
            raise DeployError(f"cannot check the deployed model part by part: its part {name} takes "
                              f"{len(args)} positional and {len(kwargs)} keyword inputs, and only one-input parts are "
                              "checked on their own. The model was not changed")
        original, deployed = model.get_submodule(name), candidate.get_submodule(name)
        _refuse_if_unstable(rounding_error(original, args[0]), tolerance, f"the outputs of {name}")
        errors.append(check_outputs(original, deployed, args[0], tolerance))
    report.checked_parts = parts
    return max(errors)


def _adopt(model: nn.Module, candidate: nn.Module) -> None:
    """Puts the checked copy's children, and any parameter or buffer it holds itself, in ``model`` (deploy rewrites
    nothing else of the root)."""
    for name, child in candidate.named_children():
        setattr(model, name, child)
    for name, tensor in [*candidate.named_parameters(recurse=False), *candidate.named_buffers(recurse=False)]:
        setattr(model, name, tensor)


def _as_batch_norm(frozen: nn.Module) -> nn.BatchNorm2d:
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones) as the eval ``nn.BatchNorm2d`` it computes, so
    the dataflow shows a norm the folds can absorb."""
    norm = nn.BatchNorm2d(frozen.weight.numel(), eps=frozen.eps, device=frozen.weight.device,
                          dtype=frozen.weight.dtype)
    for name in ("weight", "bias"):
        getattr(norm, name).data.copy_(getattr(frozen, name))
    norm.running_mean.copy_(frozen.running_mean)
    norm.running_var.copy_(frozen.running_var)
    return norm.eval()


def _traced_sites(model: nn.Module, report: DeployReport) -> tuple[dict[str, Site], list[tuple[str, str]]]:
    """Each CompConv's :class:`Site` and the plain conv-norm pairs, from the whole model's dataflow or, where it
    cannot be traced, from its largest traceable subtrees; other layers get per-module forms only.
    """
    sites: dict[str, Site] = {}
    pairs: list[tuple[str, str]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        try:
            graph = trace(module)
        except Exception as error:
            if not prefix:
                report.traced = False
                report.trace_error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            for name, child in module.named_children():
                if isinstance(child, CompConv2d):
                    sites[prefix + name] = Site(prefix + name, norm_reason="not traced", consumer_reason="not traced")
                elif any(isinstance(m, CompConv2d) for m in child.modules()):
                    visit(f"{prefix}{name}.", child)
            return
        if prefix:
            report.traced_parts.append(prefix[:-1])
        for name, site in analyse(module, graph).items():
            sites[prefix + name] = dataclasses.replace(
                site, name=prefix + name, norm=site.norm and prefix + site.norm,
                consumer=site.consumer and prefix + site.consumer, between=tuple(prefix + b for b in site.between))
        pairs.extend((prefix + conv, prefix + norm) for conv, norm in plain_conv_norms(module, graph))

    visit("", model)
    return sites, pairs


@torch.no_grad()
def _deploy_copy(model: nn.Module, example_input: Any, runtime: str,
                 cache: ChoiceCache) -> DeployReport:
    """Rewrites ``model`` (deploy's copy) into its inference form, step by step; returns what was done."""
    report = DeployReport()
    _plain_layers(model, report)
    sites, plain_pairs = _traced_sites(model, report)
    if runtime == "torch":  # ONNX Runtime folds these itself
        for conv, norm in plain_pairs:
            model.set_submodule(conv, fuse_conv_bn_eval(model.get_submodule(conv), model.get_submodule(norm)))
            model.set_submodule(norm, nn.Identity())
            report.plain_norms_folded.append((conv, norm))
    inputs = _layer_inputs(model, sites, example_input)
    for name, site in sites.items():
        _choose_form(model, name, site, inputs.get(name), runtime, cache, report)
    for name, site in sites.items():
        _fold_shuffle(model, name, site, report)
    if runtime == "torch":
        for name, site in sites.items():
            conv = model.get_submodule(name)
            if isinstance(conv, CompConv2d) and site.norm is not None and conv.bias is None:
                model.set_submodule(name, absorb_norm(conv, model.get_submodule(site.norm)).eval())
                model.set_submodule(site.norm, nn.Identity())
                report.norms_absorbed.append((name, site.norm))
    return report


def _plain_layers(model: nn.Module, report: DeployReport) -> None:
    """Frozen norms as BatchNorm2d, fast-path layers as plain ones (deploy chooses each form itself), inner norms
    folded."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, module in list(model.named_modules()):
        if type(module) is FrozenBatchNorm2d:
            model.set_submodule(name, _as_batch_norm(module))
        if type(module) is EfficientCompConv2d:
            module = CompConv2d.from_layer(module)
            model.set_submodule(name, module)
        if isinstance(module, CompConv2d):
            report.norms_folded += module.reparameterize()


def _layer_inputs(model: nn.Module, sites: dict[str, Site], example_input: Any) -> dict[str, torch.Tensor]:
    """Each CompConv layer's input on ``example_input`` (none without one)."""
    inputs: dict[str, torch.Tensor] = {}
    if example_input is None:
        return inputs
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: inputs.setdefault(n, args[0])) for n in sites]
    try:
        model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _choose_form(model: nn.Module, name: str, site: Site, x: Optional[torch.Tensor], runtime: str,
                 cache: ChoiceCache, report: DeployReport) -> None:
    """Moves the layer's bias into its norm and, for a pointwise layer, puts in its fastest exact form (timed on
    ``x``, or by :func:`compconv.lowrank.rule_choice`) with the norm absorbed."""
    conv = model.get_submodule(name)
    norm = model.get_submodule(site.norm) if site.norm else None
    report.norm_of[name] = site.norm
    if site.norm_reason:
        report.left[name] = site.norm_reason
    if conv.bias is not None and norm is not None:
        norm.running_mean.sub_(conv.bias)
        conv.bias = None
        report.biases_folded += 1
    if not is_pointwise(conv):
        return
    times = {}
    if x is not None:
        form, times = measured_choice(conv, norm, x, runtime, cache)
    else:
        form = rule_choice(conv, runtime)
    report.layers.append(LayerChoice(name, form, form_macs(conv, form), conv.plan.plain_macs_per_position, times,
                                     site.norm))
    if form != "chain":
        model.set_submodule(name, build_form(conv, norm, form).eval())
        if site.norm:
            model.set_submodule(site.norm, nn.Identity())


def _fold_shuffle(model: nn.Module, name: str, site: Site, report: DeployReport) -> None:
    """Drops a chain layer's shuffle into the norm after it and the next conv's input channels, where proven."""
    conv = model.get_submodule(name)
    if not isinstance(conv, CompConv2d) or conv.shuffle_groups == 1 or site.norm is None:
        return
    if site.consumer is None:
        report.left.setdefault(name, f"shuffle kept: {site.consumer_reason}")
        return
    source = fold_shuffle(conv, model.get_submodule(site.norm))
    model.set_submodule(site.consumer, permute_input(model.get_submodule(site.consumer), source).eval())
    report.shuffles_folded += 1
    report.shuffle_folds.append((name, site.norm, *site.between, site.consumer))
