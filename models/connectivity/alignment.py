"""Align network B to network A by re-ordering (or transporting) B's hidden units.

Hidden units of a layer can be permuted without changing the function: permute the rows of the
layer's weight and bias, its BatchNorm's parameters and running statistics, and the matching input
columns of the next layer. Two independently trained networks are compared after choosing, for
every hidden layer, the permutation that makes B's units most like A's:

* :func:`align_weights` — weight matching ("Weight Adjustment", Ainsworth et al. 2023): for one
  layer ℓ with the others fixed, the permutation maximising
  ``Σ_i ⟨w^A_i, w^B_{π(i)}⟩`` over incoming rows, per-unit vectors (bias, BN affine) and outgoing
  columns is a linear assignment (``scipy.optimize.linear_sum_assignment``); layers are visited in
  random order until no layer changes (coordinate descent).
* :func:`align_activations` — activation matching: the permutation maximising the correlation of
  A's and B's unit activations over a data loader (each layer on its own).
* :func:`align_ot` — optimal transport between hidden units (Singh & Jaggi 2020, OT fusion, "wts"
  mode): layer by layer, the cost is ``‖w^A_i − w^B_j‖²`` of incoming weights (with B's inputs
  already aligned), uniform marginals; exact EMD (``ot.emd``) gives a permutation for equal
  widths; Sinkhorn (``ot.sinkhorn``) gives a soft map, applied as in OT fusion (rows of B averaged
  with the transport weights, next layer's columns mapped by the same matrix) — this also maps B
  onto A's widths when they differ. A soft map is an approximation; a permutation is exact.

Every permutation-based result is **functionally identical to B** (same logits). Supported
networks are chains that ``torch.fx`` can trace: ``Linear``/``Conv`` layers with optional
``BatchNorm`` (parameters and buffers permuted with the channels) and element-wise activations,
dropout, pooling and flatten between them — MLPs, VGG-style nets and ``MarginClassifier`` with the
``mlp`` or ``small_cnn`` backbones. Residual blocks (a tensor used twice, an addition) are refused
with a :class:`~marginboost.errors.ConfigError`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> b = permute_hidden_units(a, [torch.randperm(8)])
    >>> aligned, perms = align_weights(a, b)
    >>> torch.allclose(aligned[0].weight, a[0].weight)
    True
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from marginboost.errors import ConfigError, check_choice, check_int, check_number

ALIGN_METHODS = ("none", "weights", "activations", "ot")
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_ELEMENTWISE_FUNCTIONS = (torch.relu, F.relu, F.gelu, F.leaky_relu, torch.tanh, torch.sigmoid, F.dropout,
                          torch.flatten, F.adaptive_avg_pool2d, F.max_pool2d, F.avg_pool2d)
_ELEMENTWISE_METHODS = ("relu", "flatten", "contiguous", "sigmoid", "tanh")
_SUPPORTED = ("chains of Linear/Conv layers with optional BatchNorm and element-wise activations, "
              "dropout, pooling or flatten between them (no residual blocks)")


@dataclass
class HiddenLayer:
    """One permutable hidden layer: the units produced by ``producer`` and read by ``consumer``.

    ``norms`` are the BatchNorm layers on these channels; ``consumer`` reads ``size·repeat`` inputs
    (``repeat`` > 1 when a conv map is flattened into a linear layer: channel-major blocks).
    """

    producer: str
    size: int
    norms: list[str] = field(default_factory=list)
    consumer: str = ""
    repeat: int = 1


def _refuse(what: str) -> ConfigError:
    return ConfigError("alignment.model", what, _SUPPORTED, describe=True)


def hidden_layers(model: nn.Module) -> list[HiddenLayer]:
    """The permutable hidden layers of a chain network, in forward order (see module docstring)."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # tracing fails on data-dependent control flow
        raise _refuse(f"{type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {err})") from err
    modules = dict(model.named_modules())
    layers: list[HiddenLayer] = []
    current: HiddenLayer | None = None
    seen: set[str] = set()
    for node in graph.nodes:
        if node.op != "output" and len(node.users) > 1:
            raise _refuse(f"the output of {node.target if node.op == 'call_module' else node.name} is used "
                          f"{len(node.users)} times (a residual connection or a branch)")
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            raise _refuse(f"a parameter used outside its layer ({node.target})")
        if node.op == "call_function":
            if node.target not in _ELEMENTWISE_FUNCTIONS:
                name = getattr(node.target, "__name__", str(node.target))
                kind = "an addition (a residual block)" if node.target in (operator.add, torch.add) else name
                raise _refuse(f"the operation {kind}")
            continue
        if node.op == "call_method":
            if node.target not in _ELEMENTWISE_METHODS:
                raise _refuse(f"the tensor method .{node.target}()")
            continue
        name, module = node.target, modules[node.target]
        if name in seen:
            raise _refuse(f"the layer {name} called twice")
        seen.add(name)
        if isinstance(module, _PRODUCERS):
            if getattr(module, "groups", 1) != 1:
                raise _refuse(f"the grouped convolution {name}")
            width_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if current is not None:
                if width_in % current.size:
                    raise _refuse(f"{name} reads {width_in} inputs from {current.size} channels")
                current.consumer, current.repeat = name, width_in // current.size
                layers.append(current)
            size = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            current = HiddenLayer(producer=name, size=size)
        elif isinstance(module, _BatchNorm):
            if current is None or module.num_features != current.size:
                raise _refuse(f"the BatchNorm {name} is not on the channels of the layer before it")
            current.norms.append(name)
        elif not isinstance(module, _ELEMENTWISE_MODULES):
            if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
                raise _refuse(f"the layer {name} ({type(module).__name__})")
            raise _refuse(f"the module {name} ({type(module).__name__})")
    # Every parameter must live in a traced layer (otherwise it could not be permuted consistently).
    for pname, _ in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if owner not in seen:
            raise _refuse(f"the parameter {pname} outside the traced chain")
    return layers  # the last producer's outputs (the logits) are never permuted


# --------------------------------------------------------------------------------------------------
# Applying maps. A map of a hidden layer is a permutation (LongTensor π: aligned unit i = B's unit
# π[i]) or a soft matrix S [n_B, n_A] whose columns sum to 1 (aligned unit i = Σ_j S[j, i]·unit j).


def _map_rows(x: Tensor, m: Tensor) -> Tensor:
    if m.dtype == torch.long:
        return x[m]
    return (m.to(x).T @ x.reshape(x.shape[0], -1)).reshape(m.shape[1], *x.shape[1:])


def _map_cols(w: Tensor, m: Tensor, repeat: int) -> Tensor:
    out, rest = w.shape[0], w.shape[2:]
    n_in = m.shape[0] if m.dtype != torch.long else len(m)
    blocks = w.reshape(out, n_in, repeat, *rest)
    if m.dtype == torch.long:
        mapped = blocks[:, m]
    else:
        mapped = torch.einsum("oj...,ji->oi...", blocks, m.to(w))
    n_out = mapped.shape[1]
    return mapped.reshape(out, n_out * repeat, *rest)


def _check_maps(layers: Sequence[HiddenLayer], maps: Sequence[Tensor]) -> None:
    if len(maps) != len(layers):
        raise ConfigError("alignment.maps", f"{len(maps)} maps", f"one per hidden layer ({len(layers)})",
                          describe=True)
    for layer, m in zip(layers, maps):
        n_b = len(m) if m.dtype == torch.long else m.shape[0]
        if n_b != layer.size:
            raise ConfigError("alignment.maps", f"a map of {n_b} units for {layer.producer}",
                              f"{layer.size} units", describe=True)
        if m.dtype == torch.long and not torch.equal(torch.sort(m).values, torch.arange(layer.size)):
            raise ConfigError("alignment.maps", f"the map of {layer.producer}", "a permutation", describe=True)


def map_state(state: Mapping[str, Tensor], layers: Sequence[HiddenLayer], maps: Sequence[Tensor]) -> dict[str, Tensor]:
    """A state dict with every hidden layer's units mapped (rows, BN entries, next layer's columns)."""
    _check_maps(layers, maps)
    out = {k: v.detach().clone() for k, v in state.items()}
    for layer, m in zip(layers, maps):
        for key in (f"{layer.producer}.weight", f"{layer.producer}.bias"):
            if key in out and out[key] is not None:
                out[key] = _map_rows(out[key], m)
        for bn in layer.norms:
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                key = f"{bn}.{leaf}"
                if key in out:
                    out[key] = _map_rows(out[key], m)
        key = f"{layer.consumer}.weight"
        out[key] = _map_cols(out[key], m, layer.repeat)
    return out


def _model_with_state(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    shaped = {k: v for k, v in model.state_dict().items()}
    if all(shaped[k].shape == v.shape for k, v in state.items() if k in shaped):
        model.load_state_dict(state)
        return model
    raise ConfigError("alignment.maps", "maps giving other shapes than the template", "maps onto A's widths",
                      describe=True)


def permute_hidden_units(model: nn.Module, perms: Sequence[Tensor]) -> nn.Module:
    """A copy of ``model`` with hidden layer ℓ's units re-ordered by ``perms[ℓ]`` (same function)."""
    layers = hidden_layers(model)
    perms = [torch.as_tensor(p, dtype=torch.long) for p in perms]
    return _model_with_state(model, map_state(model.state_dict(), layers, perms))


def _pair(model_a: nn.Module, model_b: nn.Module) -> list[HiddenLayer]:
    layers_a, layers_b = hidden_layers(model_a), hidden_layers(model_b)
    if [(x.producer, x.consumer, x.norms) for x in layers_a] != [(x.producer, x.consumer, x.norms) for x in layers_b]:
        raise ConfigError("alignment.model_b", "another layer structure than model_a", "two networks of one architecture",
                          describe=True)
    return layers_b


def _assign(similarity: Tensor) -> Tensor:
    """The permutation π maximising ``Σ_i similarity[i, π(i)]``."""
    _, cols = linear_sum_assignment(similarity.detach().cpu().double().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Weight matching


def _unit_rows(state: Mapping[str, Tensor], layer: HiddenLayer) -> list[Tensor]:
    """Per-unit rows of a layer that are parameters: producer weight and bias, BN affine."""
    rows = [state[f"{layer.producer}.weight"].reshape(layer.size, -1)]
    keys = [f"{layer.producer}.bias"] + [f"{bn}.{leaf}" for bn in layer.norms for leaf in ("weight", "bias")]
    rows += [state[k].reshape(layer.size, 1) for k in keys if k in state and state[k] is not None]
    return rows


def align_weights(model_a: nn.Module, model_b: nn.Module, max_iter: int = 100, seed: int = 0,
                  return_objective: bool = False):
    """Weight matching of B to A by coordinate descent over layers (see module docstring).

    Args:
        model_a, model_b: two networks of one chain architecture.
        max_iter: passes over the layers at most; stops earlier when a pass changes nothing.
        seed: seed of the random layer order.
        return_objective: also return ``Σ_params ⟨θ_A, π(θ_B)⟩`` after each pass.

    Returns:
        ``(aligned B, permutations)`` (and the objective history with ``return_objective``).
    """
    max_iter = check_int("align_weights.max_iter", max_iter, low=1)
    layers = _pair(model_a, model_b)
    sa = {k: v.detach().double() for k, v in model_a.state_dict().items()}
    sb = {k: v.detach().double() for k, v in model_b.state_dict().items()}
    perms = [torch.arange(layer.size) for layer in layers]
    gen = torch.Generator().manual_seed(seed)
    history = []

    def objective() -> float:
        mapped = map_state(sb, layers, perms)
        return float(sum((sa[k] * mapped[k]).sum() for k, _ in model_a.named_parameters()))

    for _ in range(max_iter):
        changed = False
        for li in torch.randperm(len(layers), generator=gen).tolist():
            layer = layers[li]
            # B with every other layer's permutation applied, this layer's units in B's order.
            others = [p if j != li else torch.arange(layer.size) for j, p in enumerate(perms)]
            mb = map_state(sb, layers, others)
            sim = sum(ra @ rb.T for ra, rb in zip(_unit_rows(sa, layer), _unit_rows(mb, layer)))
            key = f"{layer.consumer}.weight"
            ca = sa[key].reshape(sa[key].shape[0], layer.size, -1).transpose(0, 1).reshape(layer.size, -1)
            cb = mb[key].reshape(mb[key].shape[0], layer.size, -1).transpose(0, 1).reshape(layer.size, -1)
            sim = sim + ca @ cb.T
            new = _assign(sim)
            old_score = sim[torch.arange(layer.size), perms[li]].sum()
            new_score = sim[torch.arange(layer.size), new].sum()
            if new_score > old_score + 1e-12 * max(1.0, float(old_score.abs())):
                perms[li], changed = new, True
        if return_objective:
            history.append(objective())
        if not changed:
            break
    aligned = permute_hidden_units(model_b, perms)
    return (aligned, perms, history) if return_objective else (aligned, perms)


# --------------------------------------------------------------------------------------------------
# Activation matching


def _unit_activations(model: nn.Module, layers: Sequence[HiddenLayer], x: Tensor) -> list[Tensor]:
    """Each hidden layer's input to its consumer, as ``[units, samples·positions]``."""
    modules = dict(model.named_modules())
    found: dict[str, Tensor] = {}
    hooks = []
    for layer in layers:
        def hook(mod, args, layer=layer):
            a = args[0].detach()
            n = a.shape[0]
            a = a.reshape(n, layer.size, -1)  # flattened conv maps: channel-major blocks
            found[layer.consumer] = a.transpose(0, 1).reshape(layer.size, -1)
        hooks.append(modules[layer.consumer].register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [found[layer.consumer] for layer in layers]


@torch.no_grad()
def align_activations(model_a: nn.Module, model_b: nn.Module, loader: Iterable,
                      max_batches: int | None = None):
    """Activation matching: per layer, the permutation maximising the correlation of units.

    Activations are the inputs of each hidden layer's consumer (after activation, BN, pooling),
    both models in eval mode on the same batches; conv channels pool all positions.

    Returns:
        ``(aligned B, permutations)``.
    """
    layers = _pair(model_a, model_b)
    modes = {m: m.training for m in list(model_a.modules()) + list(model_b.modules())}
    stats = None
    device = next(model_b.parameters()).device
    try:
        model_a.eval()
        model_b.eval()
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x = batch["x"] if isinstance(batch, Mapping) else (batch[0] if isinstance(batch, (list, tuple)) else batch)
            x = x.to(device)
            acts = zip(_unit_activations(model_a, layers, x), _unit_activations(model_b, layers, x))
            new = [(a.double().sum(1), b_.double().sum(1), (a.double() ** 2).sum(1), (b_.double() ** 2).sum(1),
                    a.double() @ b_.double().T, a.shape[1]) for a, b_ in acts]
            stats = new if stats is None else [tuple(s + t for s, t in zip(old, cur)) for old, cur in zip(stats, new)]
    finally:
        for m, mode in modes.items():
            m.training = mode
    if stats is None:
        raise ConfigError("align_activations.loader", "no batches", "a loader with at least one batch",
                          describe=True)
    perms = []
    for sa, sb, saa, sbb, sab, n in stats:
        ma, mb = sa / n, sb / n
        cov = sab / n - ma[:, None] * mb[None, :]
        sd_a = (saa / n - ma**2).clamp_min(0).sqrt()
        sd_b = (sbb / n - mb**2).clamp_min(0).sqrt()
        corr = cov / (sd_a[:, None] * sd_b[None, :] + 1e-12)
        perms.append(_assign(corr))
    return permute_hidden_units(model_b, perms), perms


# --------------------------------------------------------------------------------------------------
# Optimal transport


def _import_ot():
    try:
        import ot  # POT, the Python Optimal Transport library
    except ImportError as err:
        raise ImportError("align_ot needs the POT library: pip install 'marginboost[studies]' "
                          "(or pip install pot)") from err
    return ot


def align_ot(model_a: nn.Module, model_b: nn.Module, method: str = "emd", reg: float = 0.05):
    """Optimal transport between hidden units, layer by layer (OT fusion, weight-based).

    For layer ℓ, B's incoming weights are first mapped by layer ℓ−1's transport; the cost is
    ``C[i, j] = ‖w^A_i − w^B_j‖²`` over incoming weights and bias, the marginals are uniform
    (``1/n_A``, ``1/n_B``). ``method="emd"`` solves the exact problem (``ot.emd``); with equal
    widths its solution is a permutation and the result is functionally identical to B.
    ``method="sinkhorn"`` adds the entropy term ``reg·max(C)·Σ T log T`` (``ot.sinkhorn``) and
    returns B with soft maps ``S = Tᵀ·n_A`` (columns sum to 1): an approximation of B with A's
    widths, which is how OT fusion connects networks of unequal widths.

    Returns:
        ``(aligned B, maps)``: a permutation (LongTensor) or a soft matrix ``[n_B, n_A]`` per layer.
    """
    check_choice("align_ot.method", method, ("emd", "sinkhorn"))
    reg = check_number("align_ot.reg", reg, low=0.0, low_open=True)
    ot = _import_ot()
    layers_a, layers_b = hidden_layers(model_a), hidden_layers(model_b)
    if [(x.producer, x.consumer) for x in layers_a] != [(x.producer, x.consumer) for x in layers_b]:
        raise ConfigError("align_ot.model_b", "another layer structure than model_a",
                          "two networks of one layer structure", describe=True)
    sa = {k: v.detach().double() for k, v in model_a.state_dict().items()}
    sb = {k: v.detach().double() for k, v in model_b.state_dict().items()}
    maps: list[Tensor] = []
    prev: Tensor | None = None
    for la, lb in zip(layers_a, layers_b):
        wb = sb[f"{lb.producer}.weight"]
        if prev is not None:  # inputs of this layer are the previous layer's (already mapped) units
            wb = _map_cols(wb, prev, wb.shape[1] // (len(prev) if prev.dtype == torch.long else prev.shape[0]))
        fa = [sa[f"{la.producer}.weight"].reshape(la.size, -1)]
        fb = [wb.reshape(lb.size, -1)]
        if f"{la.producer}.bias" in sa:
            fa.append(sa[f"{la.producer}.bias"].reshape(la.size, 1))
            fb.append(sb[f"{lb.producer}.bias"].reshape(lb.size, 1))
        fa_, fb_ = torch.cat(fa, 1), torch.cat(fb, 1)
        cost = torch.cdist(fa_, fb_).pow(2)  # [n_A, n_B]
        a = np.full(la.size, 1.0 / la.size)
        b = np.full(lb.size, 1.0 / lb.size)
        c = cost.cpu().numpy()
        if method == "emd":
            plan = torch.as_tensor(ot.emd(a, b, c), dtype=torch.float64)
        else:
            plan = torch.as_tensor(ot.sinkhorn(a, b, c / max(c.max(), 1e-12), reg), dtype=torch.float64)
        soft = plan.T * la.size  # [n_B, n_A], columns sum to 1
        if method == "emd" and la.size == lb.size:
            perm = soft.argmax(0)
            if torch.equal(torch.sort(perm).values, torch.arange(la.size)) and torch.allclose(
                    soft[perm, torch.arange(la.size)], torch.ones(la.size, dtype=torch.float64)):
                maps.append(perm)
                prev = perm
                continue
        maps.append(soft)
        prev = soft
    if all(m.dtype == torch.long for m in maps):
        return permute_hidden_units(model_b, maps), maps
    template = model_a if any(la.size != lb.size for la, lb in zip(layers_a, layers_b)) else model_b
    state = map_state(model_b.state_dict(), layers_b, maps)
    ref = template.state_dict()
    state = {k: v.to(ref[k].dtype) for k, v in state.items()}
    return _model_with_state(template, state), maps


def align(model_a: nn.Module, model_b: nn.Module, method: str = "weights", loader: Iterable | None = None,
          **kwargs) -> nn.Module:
    """Dispatch: ``none`` (a copy of B), ``weights``, ``activations`` (needs ``loader``), ``ot``."""
    check_choice("alignment.method", method, ALIGN_METHODS)
    if method == "none":
        return copy.deepcopy(model_b)
    if method == "weights":
        return align_weights(model_a, model_b, **kwargs)[0]
    if method == "activations":
        if loader is None:
            raise ConfigError("alignment.loader", None, "a data loader for activation matching")
        return align_activations(model_a, model_b, loader, **kwargs)[0]
    return align_ot(model_a, model_b, **kwargs)[0]
