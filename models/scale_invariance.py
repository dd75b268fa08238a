r"""Scale-invariant weights: the one definition, used by the width, the Hessian and Riemannian SAM.

A weight ``w`` of a ``Linear``/``Conv`` layer is **scale-invariant** when the loss does not change
if ``w`` alone is multiplied by ``c > 0``: ``L(c·w) = L(w)``, hence ``∇L(c·w) = ∇L(w)/c`` and
``⟨∇L(w), w⟩ = 0``. With batch-statistic BatchNorm this holds when every path from the layer's
output reaches a BN through maps ``h`` with ``h(c·z) = c·h(z)``:

* affine-commuting maps (flatten, view/reshape, identity, adaptive average pooling, indexing)
  keep a bias invariant too (``BN`` removes the per-channel constant), so the layer may have one;
* homogeneous but non-linear maps (ReLU, LeakyReLU, max pooling, average pooling with padding,
  dropout) do not commute with adding the bias, so the layer must have **no bias** for ``w`` to be
  invariant on its own;
* anything else on the way (a residual add, a concat, the model's output) breaks invariance.

Detection (:func:`scale_invariant_structure`) reads the structure from a ``torch.fx`` trace, or
from forward hooks when the model cannot be traced. :func:`scale_invariant_parameters` confirms
each candidate with the gradient test ``|cos(∇L, w)| ≤ tol`` on a batch (BN in train mode), the
same on every rank under DDP. Users override the detection with regular expressions over
parameter names (:func:`select_scale_invariant`, the convention of
:func:`~models.parameters.match_parameters`).

:func:`unit_norm_copy` puts the invariant weights at unit norm in a copy of the parameters and
buffers: the canonical representative at which widths and Hessians are comparable.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from marginboost.batches import Batch, as_batch, batch_to
from marginboost.distributed import comm_device, is_distributed
from marginboost.errors import ConfigError

from .losses import Criterion, resolve_criterion
from .parameters import match_parameters
from .state import batchnorm_mode, buffer_copies, is_batchnorm, trainable_tensors

_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
# h(c·z) = c·h(z) and h(z + b) = h(z) + b' for a per-channel constant b: a bias may stay.
_AFFINE_MODULES = (nn.Identity, nn.Flatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_AFFINE_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                     operator.getitem}
_AFFINE_METHODS = {"flatten", "view", "reshape", "contiguous"}
# h(c·z) = c·h(z) only: the layer must have no bias.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_HOMOGENEOUS_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                          F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_HOMOGENEOUS_METHODS = {"relu"}

_AFFINE, _HOMOGENEOUS = 1, 2


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def _fx_kind(user: torch.fx.Node, node: torch.fx.Node, modules: dict[str, nn.Module]) -> int:
    """How ``user`` maps its input ``node``: affine-commuting, homogeneous only, or neither (0)."""
    if user.op == "call_module":
        mod = modules[user.target]
        return _AFFINE if isinstance(mod, _AFFINE_MODULES) else _HOMOGENEOUS if isinstance(
            mod, _HOMOGENEOUS_MODULES) else 0
    first = bool(user.args) and user.args[0] is node
    if user.op == "call_function" and first:
        return _AFFINE if user.target in _AFFINE_FUNCTIONS else _HOMOGENEOUS if user.target in \
            _HOMOGENEOUS_FUNCTIONS else 0
    if user.op == "call_method" and first:
        return _AFFINE if user.target in _AFFINE_METHODS else _HOMOGENEOUS if user.target in \
            _HOMOGENEOUS_METHODS else 0
    return 0


def _fx_structure(model: nn.Module) -> dict[str, list[str]]:
    """``{weight name: [BN module names]}`` from a ``torch.fx`` trace of ``model``."""
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())

    def reaches_bn(node: torch.fx.Node, found: list[str], bias: bool) -> bool:
        if not node.users:
            return False
        for user in node.users:
            if user.op == "call_module" and is_batchnorm(modules[user.target]):
                found.append(str(user.target))
                continue
            kind = _fx_kind(user, node, modules)
            if kind == 0 or (kind == _HOMOGENEOUS and bias) or not reaches_bn(user, found, bias):
                return False
        return True

    verdict: dict[str, bool] = {}
    bns: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _WEIGHTED):
            found: list[str] = []
            ok = reaches_bn(node, found, _has_bias(modules[node.target]))
            # a module called twice must be invariant at every call
            verdict[node.target] = verdict.get(node.target, True) and ok
            bns.setdefault(node.target, []).extend(found)
    return {f"{m}.weight": sorted(set(bns[m])) for m, ok in verdict.items() if ok}


def _hook_structure(model: nn.Module, x: Tensor) -> dict[str, list[str]]:
    """Fallback for models ``torch.fx`` cannot trace: follow tensors between leaf modules with
    forward hooks. Only module-to-module links are seen, so a weight whose output also feeds a
    functional op may be listed; the gradient test of :func:`scale_invariant_parameters` catches
    those."""
    # id -> (tensor kept alive so ids stay unique, source layers, a non-affine map was passed)
    origin: dict[int, tuple[Tensor, frozenset[str], bool]] = {}
    bad: set[str] = set()
    hits: dict[str, set[str]] = {}
    names = {m: n for n, m in model.named_modules()}
    has_bias: dict[str, bool] = {}

    def src_of(t) -> tuple[frozenset[str], bool]:
        entry = origin.get(id(t)) if torch.is_tensor(t) else None
        return (entry[1], entry[2]) if entry is not None and entry[0] is t else (frozenset(), False)

    def hook(module: nn.Module, inputs, output) -> None:
        name = names[module]
        src, bent = src_of(inputs[0]) if inputs else (frozenset(), False)
        if is_batchnorm(module):
            for s in src:
                if bent and has_bias[s]:
                    bad.add(s)
                else:
                    hits.setdefault(s, set()).add(name)
        elif isinstance(module, (_AFFINE_MODULES, _HOMOGENEOUS_MODULES)) and torch.is_tensor(output):
            if src:
                origin[id(output)] = (output, src, bent or isinstance(module, _HOMOGENEOUS_MODULES))
        else:
            bad.update(src)
        if isinstance(module, _WEIGHTED) and torch.is_tensor(output):
            origin[id(output)] = (output, frozenset([name]), False)
            has_bias[name] = _has_bias(module)
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
    """Weights that are scale-invariant by structure: ``{param name: [names of the BNs they reach]}``.

    Uses ``torch.fx``; a model it cannot trace falls back to forward hooks on ``example_input``.
    Only trainable weights are listed (a frozen head ``W`` is not a parameter of the measure).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(4),
        ...                     nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
        >>> scale_invariant_structure(net)  # the second conv has a bias before the ReLU
        {'0.weight': ['2']}
    """
    try:
        found = _fx_structure(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) on dynamic code
        if example_input is None:
            raise ValueError(f"scale_invariant_structure: torch.fx cannot trace {type(model).__name__} ({err}); "
                             "pass example_input to use the hook-based detection") from err
        found = _hook_structure(model, example_input)
    trainable = trainable_tensors(model)
    return {n: b for n, b in found.items() if n in trainable}


def gradient_cosines(model: nn.Module, loss_fn: Criterion | str | None, batch: Batch,
                     names: Sequence[str]) -> dict[str, float]:
    r""":math:`\langle\nabla_w L, w\rangle / (\|\nabla_w L\|\,\|w\|)` for each named weight, BN in
    train mode on ``batch`` (0 for a scale-invariant weight; 0 also when the gradient vanishes)."""
    loss_fn, _ = resolve_criterion(loss_fn, "loss_fn")
    params = {n: p.detach().clone().requires_grad_(True) for n, p in trainable_tensors(model).items()}
    first = params[next(iter(params))]
    batch = batch_to(as_batch(batch), first.device, first.dtype)
    with batchnorm_mode(model, "train"), torch.enable_grad():
        loss = loss_fn(functional_call(model, (params, buffer_copies(model)), (batch["x"],)), batch)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    out = {}
    for n, g in zip(names, grads):
        w = params[n].detach()
        denom = (g.norm() * w.norm()).item() if g is not None else 0.0
        out[n] = (g * w).sum().item() / denom if denom > 0 else 0.0
    return out


def scale_invariant_parameters(model: nn.Module, loss_fn: Criterion | str | None = None,
                               batch: Batch | None = None, tol: float = 1e-3,
                               distributed: bool | None = None) -> dict[str, list[str]]:
    """Detected scale-invariant weights ``{name: [BN module names]}``.

    Structure first (:func:`scale_invariant_structure`); with a ``batch`` each candidate is
    confirmed by ``|cos(∇L, w)| <= tol`` with batch-statistic BN and dropped otherwise. Under DDP
    (``distributed``; ``None`` detects a process group) every rank passes its own batch (or none)
    and the largest ``|cos|`` over ranks decides, so all ranks agree. Call it on every rank then.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        >>> list(scale_invariant_parameters(net))
        ['0.weight']
    """
    distributed = is_distributed() if distributed is None else distributed
    # every rank needs an input for the hook fallback, also one without a batch: never let one
    # rank raise before the collective below
    x = as_batch(batch)["x"] if batch is not None else example_input(model)
    found = scale_invariant_structure(model, x)
    names = sorted(found)
    if not names or (batch is None and not distributed):
        return found
    cos = gradient_cosines(model, loss_fn, batch, names) if batch is not None else dict.fromkeys(names, 0.0)
    worst = torch.tensor([abs(cos[n]) for n in names], dtype=torch.float64)
    if distributed:
        buf = worst.to(comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        worst = buf.cpu()
    keep = {n for n, c in zip(names, worst.tolist()) if c <= tol}
    return {n: b for n, b in found.items() if n in keep}


def select_scale_invariant(model: nn.Module, patterns: str | Sequence[str], field: str,
                           example_input: Tensor | None = None) -> dict[str, list[str]]:
    """The weights named by ``patterns`` (regexes, :func:`~models.parameters.match_parameters`),
    with the BNs each one reaches (empty where the structure shows none): a user's override of
    the detection."""
    chosen = [n for n, _ in match_parameters(model, patterns, field)]
    try:
        structure = scale_invariant_structure(model, example_input)
    except ValueError:
        structure = {}
    return {n: structure.get(n, []) for n in chosen}


# -- the unit-norm representative -----------------------------------------------------------

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
    (per tensor, or per output channel = dim 0). The model itself is not touched.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.BatchNorm1d(3))
        >>> copy = unit_norm_copy(net, {"0.weight": ["1"]})
        >>> round(float(copy.params["0.weight"].norm()), 6)
        1.0
    """
    params = {n: p.clone() for n, p in trainable_tensors(model).items()}
    buffers = buffer_copies(model)
    bn_of = invariant if isinstance(invariant, Mapping) else {n: [] for n in invariant}
    scales = {}
    for name, bns in bn_of.items():
        if name not in params:
            raise ConfigError("scale_invariant", name, f"a trainable parameter such as {sorted(params)[:8]}"
                              f"{' ...' if len(params) > 8 else ''}")
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
