"""Inference form of a CompConv model: exact folds, and per layer the fastest of equivalent forms.

``deploy(model, example_input=None)`` (the model is put in eval mode and changed in place):

1. ``CompConv2d.reparameterize()`` folds each inner BatchNorm (``inner_norm``) into its conv (timm's
   per-module convention, so ``timm.utils.reparameterize_model`` does this step too);
2. a CompConv's output bias moves into the BatchNorm that follows it;
3. every 1x1 CompConv followed by a BatchNorm is an affine map of its input of rank at most
   ``C_prim + identity channels``. With the BatchNorm and the shuffle absorbed it becomes, whichever is
   fastest: ``dense`` (one plain conv with bias: exact, the plain conv's MACs), ``lowrank`` (the first
   conv, the identity slices, then one conv with bias: :class:`LowRankConv2d`) or ``chain`` (the CompConv
   and its BatchNorm as trained). With ``example_input`` each candidate is timed on the layer's real
   input in the runtime the model will run in (PyTorch, or ONNX Runtime with ``runtime="ort"``; the
   choice is cached per geometry, input shape and thread count); without it a rule measured on CPUs
   decides (:func:`rule_choice`);
4. the channel shuffle of a CompConv whose output passes a BatchNorm and elementwise ops into the next
   conv of the same block (``conv1 -> bn1 -> conv2``, ``conv2 -> bn2 -> conv3``) moves into the
   BatchNorm's parameters and the consumer's input channels (identity slices become gathers).

Eval outputs are unchanged up to float rounding (the tests check). :class:`DeployReport` lists each
replaced layer with the form chosen and its MACs: a dense form costs the plain conv's MACs.
"""


import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .layers import CompConv2d, shuffle_source

__all__ = ["DeployReport", "LayerChoice", "LowRankConv2d", "deploy", "rule_choice"]

FORMS = ("chain", "lowrank", "dense")
_CHAINS = (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"))
# Modules that may sit between a bn and the next conv without breaking the fold: they act on each channel alone.
_TRANSPARENT = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d)
_CHOICE_CACHE: dict[tuple, str] = {}


class LowRankConv2d(nn.Module):
    """``y = V · [U x ; x[identity channels]] + bias``: a 1x1 CompConv (+ BatchNorm) in two convs.

    Args:
        first: The CompConv's first conv ``U`` (C_in -> C_prim, carrying the stride).
        identity_index: Input channels copied beside ``U x`` (the identity slices), or None.
        second: ``V`` (C_prim + identity channels -> C_out) with the bias.
    """

    identity_index: Optional[torch.Tensor]

    def __init__(self, first: nn.Conv2d, identity_index: Optional[torch.Tensor], second: nn.Conv2d) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.stride = first.stride
        self.register_buffer("identity_index", identity_index)
        self.in_channels, self.out_channels = first.in_channels, second.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.first(x)
        index = self.identity_index
        if index is not None:
            a = x.index_select(1, index)[:, :, ::self.stride[0], ::self.stride[1]]
            b = torch.cat([b, a], dim=1)
        return self.second(b)

    def permute_input(self, source: torch.Tensor) -> None:
        """The input arrives permuted: original channel ``o`` is now channel ``source[o]``."""
        position = torch.argsort(source).to(self.first.weight.device)
        self.first.weight.data = self.first.weight.data[:, position].contiguous()
        if self.identity_index is not None:
            self.identity_index = source.to(self.identity_index.device)[self.identity_index]


@dataclass(frozen=True)
class LayerChoice:
    """The form chosen for one CompConv layer and its MACs per output position."""

    name: str
    form: str
    macs_per_position: int
    plain_macs_per_position: int
    times_ms: dict = field(default_factory=dict)

    def row(self) -> str:
        timed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.times_ms.items())
        return (f"| {self.name} | {self.form} | {self.macs_per_position} | {self.plain_macs_per_position} | "
                f"{self.macs_per_position / self.plain_macs_per_position:.3f} | {timed or 'rule'} |")


@dataclass
class DeployReport:
    norms_folded: int = 0
    biases_folded: int = 0
    shuffles_folded: int = 0
    layers: list[LayerChoice] = field(default_factory=list)

    def forms(self) -> dict[str, int]:
        return {form: sum(c.form == form for c in self.layers) for form in FORMS}

    def table(self) -> str:
        """Markdown table: each 1x1 CompConv layer, the form chosen, its MACs per output position."""
        lines = ["| layer | form | MACs/pos | plain MACs/pos | ratio | measured |", "|---|---|---:|---:|---:|---|"]
        return "\n".join(lines + [choice.row() for choice in self.layers])

    def __str__(self) -> str:
        return (f"DeployReport({self.norms_folded} inner norms folded, {self.biases_folded} biases folded, "
                f"{self.shuffles_folded} shuffles folded, forms {self.forms()})")


# ---------------------------------------------------------------------------------------------- 1x1 algebra
def _matrix(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if conv.groups == 1:
        return weight[:, :, 0, 0], bias
    return torch.diag(weight[:, 0, 0, 0]), bias  # depthwise 1x1: a per-channel scale


def pointwise(module: CompConv2d) -> bool:
    """True when the whole CompConv is a per-pixel affine map (1x1 kernels, no padding, no inner norms left)."""
    tail = module.plan.tail
    return (module.kernel_size == (1, 1) and module.padding == (0, 0)
            and (tail is None or tail.kernel_size == (1, 1))
            and not any(isinstance(n, nn.BatchNorm2d) for n in module.modules() if n is not module))


def _low_rank_map(module: CompConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, f)``: the concatenated parts (pre-shuffle) as ``M z + f`` of ``z = [B(d-1); identity slices]``."""
    c = module.plan.c_prim
    widths = [p.channels for p in module.plan.identities]
    rank = c + sum(widths)
    eye = torch.eye(rank, dtype=torch.float64)
    b_mat, b_bias = eye[:c], torch.zeros(c, dtype=torch.float64)
    first_w, first_b = _matrix(module.convs[0])
    b_bias = b_bias + first_b  # the first conv's bias rides on B(d-1), not on U x
    rows, biases, offset = [b_mat], [b_bias], c
    for conv, width in zip(list(module.convs)[1:], widths):
        a_mat = eye[offset:offset + width]
        offset += width
        rows.append(a_mat)
        biases.append(torch.zeros(width, dtype=torch.float64))
        weight, bias = _matrix(conv)
        b_mat = weight @ torch.cat([b_mat, a_mat])
        b_bias = weight @ torch.cat([b_bias, torch.zeros(width, dtype=torch.float64)]) + bias
        rows.append(b_mat)
        biases.append(b_bias)
    if module.tail is not None:
        weight, bias = _matrix(module.tail)
        rows.append(weight @ b_mat[:module.tail_in])
        biases.append(weight @ b_bias[:module.tail_in] + bias)
    return torch.cat(rows), torch.cat(biases)


def _output_affine(module: CompConv2d, norm: Optional[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source order of the shuffle, and the BatchNorm after it as ``scale * y + shift`` (identity without one)."""
    channels = module.out_channels
    source = shuffle_source(channels, module.shuffle_groups)
    if norm is None:
        return source, torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    return source, scale, norm.bias.double() - norm.running_mean.double() * scale


def _identity_index(module: CompConv2d) -> Optional[torch.Tensor]:
    if not module.identity_starts:
        return None
    if module.input_index is not None:
        return module.input_index.clone()
    return torch.cat([torch.arange(a, b) for a, b in zip(module.identity_starts, module.identity_stops)])


def _conv(weight: torch.Tensor, bias: torch.Tensor, stride, like: nn.Conv2d) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, stride=stride, bias=True,
                     device=like.weight.device, dtype=like.weight.dtype)
    conv.weight.data.copy_(weight[:, :, None, None])
    conv.bias.data.copy_(bias)
    return conv


def build_form(module: CompConv2d, norm: Optional[nn.BatchNorm2d], form: str) -> nn.Module:
    """The ``lowrank`` or ``dense`` equivalent of a pointwise CompConv followed by ``norm`` (None: no norm)."""
    matrix, offset = _low_rank_map(module)
    source, scale, shift = _output_affine(module, norm)
    bias = module.bias.detach().double() if module.bias is not None else 0.0
    matrix = scale[:, None] * matrix[source]
    offset = scale * (offset[source] + bias) + shift
    first = module.convs[0]
    if form == "lowrank":
        u = nn.Conv2d(first.in_channels, first.out_channels, 1, stride=first.stride, bias=False,
                      device=first.weight.device, dtype=first.weight.dtype)
        u.weight.data.copy_(first.weight.data)
        index = _identity_index(module)
        return LowRankConv2d(u, index.to(first.weight.device) if index is not None else None,
                             _conv(matrix, offset, 1, first))
    # dense: z = [U x ; S x] is itself a linear map of x
    u_mat = _matrix(first)[0]
    selection = torch.zeros(matrix.shape[1] - u_mat.shape[0], module.in_channels, dtype=torch.float64)
    index = _identity_index(module)
    if index is not None:
        selection[torch.arange(len(index)), index.cpu()] = 1.0
    return _conv(matrix @ torch.cat([u_mat, selection]), offset, first.stride, first)


def form_macs(module: CompConv2d, form: str) -> int:
    plan = module.plan
    if form == "dense":
        return plan.plain_macs_per_position
    if form == "lowrank":
        rank = plan.c_prim + plan.identity_channels
        return plan.in_channels * plan.c_prim + rank * plan.out_channels
    return plan.macs_per_position


def rule_choice(module: CompConv2d, runtime: str = "torch") -> str:
    """The form used without ``example_input``, from measurements on a 2-core AVX-512 CPU (README, Performance).

    PyTorch: depth-1 1x1 layers save at most half the MACs but add a memory-bound pass over the output, so
    dense wins; deeper ones save 5-10x MACs and the chain as trained was fastest (batch 32, channels_last).
    ONNX Runtime: every concatenation and slice costs layout reorders around its blocked convs, so the
    low-rank pair wins where it saves MACs (at most 0.6x the plain conv's) and dense elsewhere; this beat
    per-layer timing (1.49x vs 1.41x ResNet-50 at batch 8), which cannot see the reorders between layers.
    """
    if runtime == "ort":
        return "lowrank" if form_macs(module, "lowrank") <= 0.6 * module.plan.plain_macs_per_position else "dense"
    if module.plan.depth == 1 or module.plan.macs_ratio > 0.5:
        return "dense"
    return "chain"


RUNTIMES = ("torch", "ort")


@torch.inference_mode()
def _time_ms(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    module(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def _time_ort_ms(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median ms of ``module`` exported (TorchScript exporter: fast, and exact for every form) and run in ONNX Runtime."""
    import tempfile

    from .export import ort_session

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/layer.onnx"
        torch.onnx.export(module.float().cpu(), (x.float().cpu().contiguous(),), path, dynamo=False,
                          input_names=["x"])
        session = ort_session(path, torch.get_num_threads())
    feed = {"x": x.float().cpu().contiguous().numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _measured_choice(module: CompConv2d, norm, x: torch.Tensor, runtime: str) -> tuple[str, dict]:
    key = (runtime, module.in_channels, module.out_channels, module.stride, module.plan.depth, module.plan.c_prim,
           tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), str(x.device),
           torch.get_num_threads())
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key], {}
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    # eval() on the wrapper too: an exporter restores the wrapper's mode, recursively, after exporting
    candidates = {"chain": nn.Sequential(module, norm).eval() if norm is not None else module}
    for form in ("lowrank", "dense"):
        candidates[form] = build_form(module, norm, form).to(memory_format=fmt).eval()
    timer = _time_ort_ms if runtime == "ort" else _time_ms
    times = {form: timer(candidate, x) for form, candidate in candidates.items()}
    choice = min(times, key=times.get)
    _CHOICE_CACHE[key] = choice
    return choice, times


# ---------------------------------------------------------------------------------------------- model walk
def _pairs(model: nn.Module):
    """(parent, conv attribute, norm attribute or None) for every CompConv: block ``convN/bnN`` and Sequential neighbours."""
    seen = set()
    for parent in model.modules():
        children = dict(parent.named_children())
        names = list(children)
        for index, name in enumerate(names):
            conv = children[name]
            if not isinstance(conv, CompConv2d) or id(conv) in seen:
                continue
            norm_name = None
            if name.startswith("conv") and isinstance(children.get("bn" + name[4:]), nn.BatchNorm2d):
                norm_name = "bn" + name[4:]
            elif isinstance(parent, nn.Sequential) and index + 1 < len(names) and isinstance(
                    children[names[index + 1]], nn.BatchNorm2d):
                norm_name = names[index + 1]
            seen.add(id(conv))
            yield parent, name, norm_name


def _transparent_between(block: nn.Module, first: str, second: str) -> bool:
    """True when everything the block runs between ``first`` (a bn) and ``second`` (a conv) is elementwise."""
    names = [name for name, _ in block.named_children()]
    if first not in names or second not in names:
        return False
    between = names[names.index(first) + 1:names.index(second)]
    return all(isinstance(getattr(block, n), _TRANSPARENT) or getattr(block, n) is None for n in between)


@torch.no_grad()
def _permute_consumer_input(consumer: nn.Module, source: torch.Tensor) -> None:
    if isinstance(consumer, (CompConv2d, LowRankConv2d)):
        consumer.permute_input(source)
    else:
        position = torch.argsort(source).to(consumer.weight.device)
        consumer.weight.data = consumer.weight.data[:, position].contiguous()


@torch.no_grad()
def _fold_shuffle(conv: CompConv2d, norm: nn.BatchNorm2d, consumer: nn.Module) -> None:
    source = shuffle_source(conv.out_channels, conv.shuffle_groups)
    position = torch.argsort(source)
    conv.shuffle_groups = 1
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(norm, name)
        if tensor is not None:
            tensor.data = tensor.data[position.to(tensor.device)]
    _permute_consumer_input(consumer, source)


def _consumer_ok(consumer: nn.Module) -> bool:
    if isinstance(consumer, (CompConv2d, LowRankConv2d)):
        return True
    return isinstance(consumer, nn.Conv2d) and consumer.groups == 1


@torch.no_grad()
def deploy(model: nn.Module, example_input: Optional[torch.Tensor] = None, runtime: str = "torch") -> DeployReport:
    """Turns every CompConv of ``model`` into its fastest exact inference form, in place.

    Args:
        model: A model with :class:`CompConv2d` layers (timm/torchvision ResNets, VGG, your own).
        example_input: A batch as the model will see it (device, dtype, memory format). Given, each 1x1
            layer's candidate forms are timed on its real input and the fastest is kept; None applies
            :func:`rule_choice`.
        runtime: Where the deployed model will run: ``"torch"`` (PyTorch; forms timed on ``example_input``'s
            device) or ``"ort"`` (ONNX Runtime on the CPU; forms timed there, each layer exported alone).
            Each runtime has its own rule when no ``example_input`` is given.

    Returns:
        A :class:`DeployReport`; ``report.table()`` lists the form and MACs of each 1x1 layer.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    model.eval()
    report = DeployReport()
    for module in model.modules():
        if isinstance(module, CompConv2d):
            report.norms_folded += module.reparameterize()

    inputs: dict[int, torch.Tensor] = {}
    if example_input is not None:
        hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0]))
                 for m in model.modules() if isinstance(m, CompConv2d)]
        try:
            model(example_input)
        finally:
            for hook in hooks:
                hook.remove()

    names = {id(m): n for n, m in model.named_modules()}
    for parent, conv_name, norm_name in list(_pairs(model)):
        conv = getattr(parent, conv_name)
        norm = getattr(parent, norm_name) if norm_name else None
        if conv.bias is not None and norm is not None:
            norm.running_mean.sub_(conv.bias)
            conv.bias = None
            report.biases_folded += 1
        if not pointwise(conv):
            continue
        times = {}
        if id(conv) in inputs:
            form, times = _measured_choice(conv, norm, inputs[id(conv)], runtime)
        else:
            form = rule_choice(conv, runtime)
        report.layers.append(LayerChoice(names[id(conv)], form, form_macs(conv, form),
                                         conv.plan.plain_macs_per_position, times))
        if form != "chain":
            setattr(parent, conv_name, build_form(conv, norm, form).eval())
            if norm_name:
                setattr(parent, norm_name, nn.Identity())

    for block in model.modules():
        for conv_name, norm_name, next_name in _chains(block):
            conv, norm, consumer = (getattr(block, n, None) for n in (conv_name, norm_name, next_name))
            if (isinstance(conv, CompConv2d) and conv.shuffle_groups > 1 and isinstance(norm, nn.BatchNorm2d)
                    and _consumer_ok(consumer) and _transparent_between(block, norm_name, next_name)):
                _fold_shuffle(conv, norm, consumer)
                report.shuffles_folded += 1
    model.eval()
    return report


def _chains(block: nn.Module) -> list[tuple[str, str, str]]:
    """(conv, norm, next conv) names inside one block: ResNet's ``conv1 -> bn1 -> conv2``, ``conv2 -> bn2 ->
    conv3``, and in a Sequential (VGG's features) each conv, the norm after it and the next conv."""
    if not isinstance(block, nn.Sequential):
        return list(_CHAINS)
    names = [name for name, _ in block.named_children()]
    chains = []
    for index, name in enumerate(names[:-1]):
        following = names[index + 2:]
        consumer = next((n for n in following if isinstance(getattr(block, n), nn.Conv2d | CompConv2d | LowRankConv2d)),
                        None)
        if consumer is not None:
            chains.append((name, names[index + 1], consumer))
    return chains
