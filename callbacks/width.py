"""Scale-invariant weights and the gradient-norm minimum width, without Lightning.

A weight ``w`` whose output reaches a BatchNorm only through positively homogeneous maps
(ReLU, pooling, flatten, dropout) is scale-invariant under batch statistics:
``L(c·w) = L(w)`` for ``c > 0``, hence ``∇L(c·w) = ∇L(w)/c`` and ``⟨∇L(w), w⟩ = 0``.
A residual add (or any other op) before the BN breaks this.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .distributed import comm_device, is_distributed
from .functional import (
    Batch,
    LossFn,
    as_batch,
    batch_len,
    batch_to,
    batchnorm_mode,
    buffer_copies,
    is_bn,
    reiterable,
    resolve_criterion,
    trainable_parameters,
)

_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
# Positively homogeneous and channel-preserving (or channel-free) maps: h(c·z) = c·h(z), c > 0.
_PASS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_PASS_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, torch.flatten, F.dropout, F.max_pool1d, F.max_pool2d,
                   F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, operator.getitem}
_PASS_METHODS = {"relu", "flatten", "view", "reshape", "contiguous"}


def _fx_structure(model: nn.Module) -> dict[str, list[str]]:
    """``{weight name: [BN module names]}`` from a ``torch.fx`` trace of ``model``."""
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())

    def reaches_bn(node: torch.fx.Node, found: list[str]) -> bool:
        if not node.users:
            return False
        for user in node.users:
            if user.op == "call_module" and is_bn(modules[user.target]):
                found.append(str(user.target))
            elif ((user.op == "call_module" and isinstance(modules[user.target], _PASS_MODULES))
                  or (user.op == "call_function" and user.target in _PASS_FUNCTIONS
                      and user.args and user.args[0] is node)
                  or (user.op == "call_method" and user.target in _PASS_METHODS and user.args[0] is node)):
                if not reaches_bn(user, found):
                    return False
            else:
                return False  # an add, a concat, the output, anything not homogeneous
        return True

    verdict: dict[str, bool] = {}
    bns: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _WEIGHTED):
            found: list[str] = []
            ok = reaches_bn(node, found)
            # a module called twice must be invariant at every call
            verdict[node.target] = verdict.get(node.target, True) and ok
            bns.setdefault(node.target, []).extend(found)
    return {f"{m}.weight": sorted(set(bns[m])) for m, ok in verdict.items() if ok}


def _hook_structure(model: nn.Module, x: Tensor) -> dict[str, list[str]]:
    """Fallback for models ``torch.fx`` cannot trace: follow tensors between leaf modules with
    forward hooks. Only module-to-module links are seen, so a weight whose output also feeds a
    functional op may be listed; the gradient check (``⟨∇L, w⟩ ≈ 0``) catches those."""
    origin: dict[int, tuple[Tensor, frozenset[str]]] = {}  # keep tensors alive: ids stay unique
    bad: set[str] = set()
    hits: dict[str, set[str]] = {}
    names = {m: n for n, m in model.named_modules()}

    def src_of(t) -> frozenset[str]:
        entry = origin.get(id(t)) if torch.is_tensor(t) else None
        return entry[1] if entry is not None and entry[0] is t else frozenset()

    def hook(module: nn.Module, inputs, output) -> None:
        name = names[module]
        src = src_of(inputs[0]) if inputs else frozenset()
        if is_bn(module):
            for s in src:
                hits.setdefault(s, set()).add(name)
        elif isinstance(module, _PASS_MODULES) and torch.is_tensor(output):
            if src:
                origin[id(output)] = (output, src)
        else:
            bad.update(src)
        if isinstance(module, _WEIGHTED) and torch.is_tensor(output):
            origin[id(output)] = (output, frozenset([name]))
            hits.setdefault(name, set())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), batchnorm_mode(model, "eval"):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {f"{m}.weight": sorted(b) for m, b in hits.items() if b and m not in bad}


def example_input(model: nn.Module) -> Tensor | None:
    """Two zero inputs of ``model.hparams.input_shape`` (``MarginClassifier``), else ``None``."""
    shape = getattr(model, "hparams", {}).get("input_shape") if hasattr(model, "hparams") else None
    if shape is None:
        return None
    param = next(model.parameters(), None)
    return torch.zeros(2, *shape, device=param.device if param is not None else "cpu")


def scale_invariant_structure(model: nn.Module, example_input: Tensor | None = None) -> dict[str, list[str]]:
    """Weights followed by BN with only homogeneous maps in between: ``{param name: [BN names]}``.

    Uses ``torch.fx``; a model it cannot trace falls back to forward hooks on ``example_input``.
    Only trainable weights are listed (a frozen head ``W`` is not a parameter of the measure).
    """
    try:
        found = _fx_structure(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) on dynamic code
        if example_input is None:
            raise ValueError(f"scale_invariant_structure: torch.fx cannot trace {type(model).__name__} ({err}); "
                             "pass example_input to use the hook-based detection") from err
        found = _hook_structure(model, example_input)
    trainable = trainable_parameters(model)
    return {n: b for n, b in found.items() if n in trainable}


def gradient_cosines(model: nn.Module, loss_fn: LossFn | str | None, batch: Batch,
                     names: Sequence[str]) -> dict[str, float]:
    r""":math:`\langle\nabla_w L, w\rangle / (\|\nabla_w L\|\,\|w\|)` for each named weight, BN in
    train mode on ``batch`` (0 for a scale-invariant weight; 0 also when the gradient vanishes)."""
    loss_fn, _ = resolve_criterion(loss_fn, "loss_fn")
    params = {n: p.detach().clone().requires_grad_(True) for n, p in trainable_parameters(model).items()}
    batch = batch_to(as_batch(batch), params[next(iter(params))].device, params[next(iter(params))].dtype)
    with batchnorm_mode(model, "train"), torch.enable_grad():
        loss = loss_fn(functional_call(model, (params, buffer_copies(model)), (batch["x"],)), batch)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    out = {}
    for n, g in zip(names, grads):
        w = params[n].detach()
        denom = (g.norm() * w.norm()).item() if g is not None else 0.0
        out[n] = (g * w).sum().item() / denom if denom > 0 else 0.0
    return out


def scale_invariant_parameters(model: nn.Module, loss_fn: LossFn | str | None = None, batch: Batch | None = None,
                               tol: float = 1e-3) -> dict[str, list[str]]:
    """Detected scale-invariant weights ``{name: [BN module names]}``.

    Structure first (:func:`scale_invariant_structure`); with a ``batch`` each candidate is
    confirmed by ``|cos(∇L, w)| <= tol`` with batch-statistic BN and dropped otherwise.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        >>> list(scale_invariant_parameters(net))
        ['0.weight']
    """
    # every rank needs an input for the hook fallback, also one without a batch: never let one
    # rank raise before the collective below
    x = as_batch(batch)["x"] if batch is not None else example_input(model)
    found = scale_invariant_structure(model, x)
    if batch is None or not found:
        return found
    cos = gradient_cosines(model, loss_fn, batch, list(found))
    return {n: b for n, b in found.items() if abs(cos[n]) <= tol}


@dataclass
class UnitNormCopy:
    """Parameters and buffers with scale-invariant weights rescaled to unit norm.

    ``scales[name]`` is the norm divided out (a scalar, or ``[C]`` per output channel); the BN
    running statistics that follow are divided by the same scale (variance by its square) so
    the copy computes the same function in eval mode too.
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    scales: dict[str, Tensor] = field(default_factory=dict)


def unit_norm_copy(model: nn.Module, invariant: Mapping[str, Sequence[str]] | Sequence[str],
                   per_channel: bool = False) -> UnitNormCopy:
    """A copy of the trainable parameters and buffers with ``invariant`` weights at unit norm
    (per tensor, or per output channel = dim 0). The model itself is not touched."""
    params = {n: p.clone() for n, p in trainable_parameters(model).items()}
    buffers = buffer_copies(model)
    bn_of = invariant if isinstance(invariant, Mapping) else {n: [] for n in invariant}
    scales = {}
    for name, bns in bn_of.items():
        if name not in params:
            raise ValueError(f"unit_norm_copy: {name!r} is not a trainable parameter; "
                             f"trainable: {sorted(params)[:8]}{' ...' if len(params) > 8 else ''}")
        w = params[name]
        if per_channel:
            s = w.reshape(w.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
            params[name] = w / s.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            s = w.norm().clamp_min(torch.finfo(w.dtype).tiny)
            params[name] = w / s
        scales[name] = s
        for bn in bns:
            mean, var = buffers.get(f"{bn}.running_mean"), buffers.get(f"{bn}.running_var")
            if mean is None or var is None:
                continue
            if per_channel and mean.shape != s.shape:
                continue  # channels mixed on the way (flatten): eval-mode statistics cannot follow
            buffers[f"{bn}.running_mean"] = mean / s
            buffers[f"{bn}.running_var"] = var / s.pow(2)
    return UnitNormCopy(params, buffers, scales)


@dataclass
class WidthEstimate:
    """``value``: mean over minibatches of ``‖∇L_b‖``; ``stderr`` over batches; the batch count and
    sizes; the weights rescaled to unit norm (empty when ``normalize=False``)."""

    value: float
    stderr: float
    num_batches: int
    batch_size: int
    scale_invariant: list[str]


def gradient_norm_width(model: nn.Module, loss_fn: LossFn | str | None, batches: Iterable[Batch],
                        scale_invariant: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
                        normalize: bool = True, per_channel: bool = False, bn_mode: str = "train",
                        tol: float = 1e-3, distributed: bool | None = None) -> WidthEstimate:
    r"""Gradient-norm minimum width: :math:`\frac1B\sum_b \|\nabla_\theta L_b(\tilde\theta)\|_2`.

    :math:`\tilde\theta` is a copy of the trainable parameters with every scale-invariant weight
    rescaled to unit norm (``normalize``; per output channel with ``per_channel``), so the figure
    does not depend on the arbitrary scale of those weights. ``scale_invariant=None`` detects them
    (structure + gradient check on the first batch). BN uses batch statistics (``bn_mode="train"``)
    on buffer copies, so the running statistics are not touched. Under DDP each rank passes whole
    minibatches and the mean is over all of them.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> batches = [{"x": torch.randn(16, 4), "y": torch.randint(0, 3, (16,))} for _ in range(2)]
        >>> est = gradient_norm_width(net, "ce", batches)
        >>> est.scale_invariant, est.num_batches
        (['0.weight'], 2)
    """
    loss_fn, _ = resolve_criterion(loss_fn, "loss_fn")
    batches = reiterable(batches)
    distributed = is_distributed() if distributed is None else distributed
    if not normalize:
        invariant: Mapping[str, Sequence[str]] | Sequence[str] = {}
    elif scale_invariant is None:
        first = next(iter(batches), None)
        invariant = detect_scale_invariant(model, loss_fn, first, tol, distributed)
    else:
        invariant = scale_invariant
    copy = unit_norm_copy(model, invariant, per_channel)
    device = next(iter(copy.params.values())).device
    dtype = next(iter(copy.params.values())).dtype
    norms, size = [], 0
    with batchnorm_mode(model, bn_mode), torch.enable_grad():
        for raw in batches:
            batch = batch_to(as_batch(raw), device, dtype)
            size = max(size, batch_len(batch))
            params = {n: p.detach().requires_grad_(True) for n, p in copy.params.items()}
            buffers = {n: b.clone() for n, b in copy.buffers.items()}
            loss = loss_fn(functional_call(model, (params, buffers), (batch["x"],)), batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            sq = sum((g.double().pow(2).sum() for g in grads if g is not None), torch.zeros((), dtype=torch.float64,
                                                                                               device=device))
            norms.append(sq.sqrt())
    local = torch.stack(norms).cpu() if norms else torch.zeros(0, dtype=torch.float64)
    stats = torch.tensor([float(local.sum()), float(local.pow(2).sum()), float(local.numel()), float(size)],
                         dtype=torch.float64)
    if distributed:
        buf = stats[:3].to(comm_device())
        dist.all_reduce(buf)
        top = stats[3:].to(comm_device())
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        stats = torch.cat([buf.cpu(), top.cpu()])
    total, total_sq, count, size = stats.tolist()
    if count == 0:
        raise ValueError("gradient_norm_width: no batches to measure")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1)
    return WidthEstimate(mean, math.sqrt(var / count) if count > 1 else float("nan"), int(count), int(size),
                         sorted(invariant))


def detect_scale_invariant(model: nn.Module, loss_fn: LossFn | str | None, batch: Batch | None, tol: float = 1e-3,
                           distributed: bool | None = None) -> dict[str, list[str]]:
    """:func:`scale_invariant_parameters` made identical on every rank: each rank checks its own
    first batch (or none) and the largest ``|cos(∇L, w)|`` over ranks decides."""
    distributed = is_distributed() if distributed is None else distributed
    # every rank needs an input for the hook fallback, also one without a batch: never let one
    # rank raise before the collective below
    x = as_batch(batch)["x"] if batch is not None else example_input(model)
    found = scale_invariant_structure(model, x)
    names = sorted(found)
    if not names:
        return {}
    cos = gradient_cosines(model, loss_fn, batch, names) if batch is not None else dict.fromkeys(names, 0.0)
    worst = torch.tensor([abs(cos[n]) for n in names], dtype=torch.float64)
    if distributed:
        buf = worst.to(comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        worst = buf.cpu()
    return {n: found[n] for n, c in zip(names, worst.tolist()) if c <= tol}
