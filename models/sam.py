r"""The perturbation math of sharpness-aware minimisation, as pure functions.

SAM (Foret et al., 2021) takes the gradient step at the point of (approximately) highest loss in a
ball of radius :math:`\rho` around the weights:

.. math::
    \varepsilon = \rho\, \frac{g}{\lVert g \rVert_2}, \qquad
    w \leftarrow w - \eta_{\mathrm{lr}}\, \nabla L(w + \varepsilon)

ASAM (Kwon et al., 2021) measures the ball in the coordinates :math:`T_w^{-1} w` with the
element-wise operator :math:`T_w = |w| + \eta` (:math:`\eta` keeps zero weights perturbable):

.. math::
    \varepsilon = \rho\, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2}

Riemannian SAM takes the step on the sphere :math:`\{v : \lVert v \rVert = \lVert w \rVert\}` of
every scale-invariant tensor ``w`` (a weight feeding a batch-statistic BatchNorm, for which
:math:`L(c\,w) = L(w)`): the gradient is projected to the tangent space, the step of length
:math:`\rho` (shared, as in SAM, with the other perturbed tensors) is taken along it and the result
is retracted to the sphere:

.. math::
    g_\perp = g - \frac{\langle g, w\rangle}{\lVert w\rVert^2} w, \qquad
    v = \rho\, \frac{g_\perp}{N}, \qquad
    w + \varepsilon = \lVert w\rVert \frac{w + v}{\lVert w + v\rVert}

with :math:`N = \sqrt{\sum_{\text{s.-inv.}} \lVert g_\perp\rVert^2 + \sum_{\text{others}}
\lVert g\rVert^2}`; tensors that are not scale-invariant get the SAM step :math:`\rho g / N`. The
radial component of ``g`` (along which the loss does not change) is discarded, so the whole budget
:math:`\rho` goes into directions that change the function.

All norms are global over the perturbed tensors (one ball, not one per tensor). The functions work on
lists of tensors (one per parameter) and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# Added to the gradient norm so that a zero gradient (or rho=0) gives a zero perturbation, not NaN.
NORM_EPS = 1e-12


def _with_weight_decay(params: Sequence[Tensor], grads: Sequence[Tensor],
                       weight_decay: float | Sequence[float]) -> list[Tensor]:
    if isinstance(weight_decay, (int, float)):
        weight_decay = [float(weight_decay)] * len(params)
    if len(weight_decay) != len(params):
        raise ValueError(f"weight_decay: got {len(weight_decay)} values for {len(params)} parameters")
    return [g + wd * p if wd else g for p, g, wd in zip(params, grads, weight_decay)]


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    if not tensors:
        raise ValueError("no tensors to perturb")
    # Accumulate in float32 at least: bf16/fp16 squares overflow or lose the small entries.
    norms = torch._foreach_norm([t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                                 for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms))


def sam_epsilon(params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, *, adaptive: bool = False,
                eta: float = 0.01, weight_decay: float | Sequence[float] = 0.0) -> list[Tensor]:
    r"""The SAM / ASAM perturbation :math:`\varepsilon` for each tensor.

    * SAM: :math:`\varepsilon = \rho\, g / \lVert g \rVert`.
    * ASAM (``adaptive=True``): :math:`\varepsilon = \rho\, T_w^2 g / \lVert T_w g \rVert` with
      :math:`T_w = |w| + \eta` element-wise.

    ``g`` is ``grads`` plus ``weight_decay · w`` (per tensor when a sequence is given), i.e. the
    gradient of the L2-regularised loss when the regulariser is to enter the ascent step. The norm
    is global over all tensors, computed in at least float32; a zero gradient gives ``ε = 0``.

    Args:
        params: the weights ``w`` (any shapes).
        grads: ``∇L`` with the same shapes.
        rho: radius of the ball, ``>= 0``.
        adaptive: ASAM instead of SAM.
        eta: the ASAM offset ``η >= 0``.
        weight_decay: a float or one float per tensor.

    Returns:
        One tensor per parameter, of its shape and dtype.

    Example:
        >>> eps = sam_epsilon([torch.zeros(2)], [torch.tensor([3.0, 4.0])], rho=0.5)
        >>> eps[0]
        tensor([0.3000, 0.4000])
    """
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients")
    g = _with_weight_decay(params, grads, weight_decay)
    if adaptive:
        t = [p.abs() + eta for p in params]
        tg = [ti * gi for ti, gi in zip(t, g)]
        scale = rho / (_global_norm(tg) + NORM_EPS)
        return [(ti * tgi * scale).to(p.dtype) for ti, tgi, p in zip(t, tg, params)]
    scale = rho / (_global_norm(g) + NORM_EPS)
    return [(gi * scale).to(p.dtype) for gi, p in zip(g, params)]


def tangent_projection(w: Tensor, g: Tensor) -> Tensor:
    r"""The component of ``g`` orthogonal to ``w``: :math:`g - \frac{\langle g,w\rangle}{\lVert w\rVert^2} w`.

    Example:
        >>> tangent_projection(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 3.0]))
        tensor([0., 3.])
    """
    w2 = (w * w).sum()
    return g - (g * w).sum() / (w2 + NORM_EPS) * w


def retract_to_sphere(w: Tensor, v: Tensor) -> Tensor:
    r"""The point :math:`\lVert w\rVert (w + v) / \lVert w + v\rVert` on the sphere of radius ``‖w‖``.

    Example:
        >>> retract_to_sphere(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        tensor([0.7071, 0.7071])
    """
    moved = w + v
    return moved * (torch.linalg.vector_norm(w) / (torch.linalg.vector_norm(moved) + NORM_EPS))


def riemannian_epsilon(params: Sequence[Tensor], grads: Sequence[Tensor], rho: float,
                       scale_invariant: Sequence[bool], *,
                       weight_decay: float | Sequence[float] = 0.0) -> list[Tensor]:
    r"""The Riemannian SAM perturbation (see the module docstring for the formula).

    For a scale-invariant tensor ``w`` the returned ``ε`` satisfies ``‖w + ε‖ = ‖w‖``; its
    tangent step before retraction is ``v = ρ g_⊥ / N``. Other tensors get ``ε = ρ g / N``.
    Weight decay, if given, is added to ``g`` first; it is radial, so it only changes the
    non-scale-invariant tensors and the shared norm through them.

    Args:
        params, grads: weights and gradients, one tensor each per parameter.
        rho: step length ``>= 0``.
        scale_invariant: one flag per parameter.

    Example:
        >>> w, g = torch.tensor([1.0, 0.0]), torch.tensor([5.0, 1.0])
        >>> eps = riemannian_epsilon([w], [g], rho=1.0, scale_invariant=[True])[0]
        >>> w + eps  # rotated by 45 degrees, still of norm 1
        tensor([0.7071, 0.7071])
    """
    if not (len(params) == len(grads) == len(scale_invariant)):
        raise ValueError("params, grads and scale_invariant must have the same length")
    g = _with_weight_decay(params, grads, weight_decay)
    directions = [tangent_projection(p, gi) if si else gi for p, gi, si in zip(params, g, scale_invariant)]
    scale = rho / (_global_norm(directions) + NORM_EPS)
    out = []
    for p, d, si in zip(params, directions, scale_invariant):
        v = d * scale
        out.append((retract_to_sphere(p, v) - p).to(p.dtype) if si else v.to(p.dtype))
    return out


def find_scale_invariant(model: nn.Module, example_input: Tensor) -> list[str]:
    """Names of the weights of ``Conv``/``Linear`` modules whose output goes straight into a BatchNorm.

    Detected structurally with one dry forward pass (no grad, eval mode, restored afterwards): a
    forward hook remembers every conv/linear output tensor and a pre-hook on each BatchNorm checks
    whether its input is one of them. Such a weight ``w`` (with or without bias: a bias before BN is
    cancelled by the mean subtraction) satisfies ``L(c·w) = L(w)`` for ``c > 0`` while BN uses batch
    statistics. A residual add or activation in between breaks the identity and the weight is not
    reported.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        >>> find_scale_invariant(net, torch.zeros(2, 3))
        ['0.weight']
    """
    producers: dict[int, tuple[str, Tensor]] = {}
    found: list[str] = []
    handles = []
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def remember(name: str):
        def hook(_module, _inputs, output):
            producers[id(output)] = (name, output)  # keep the tensor alive so its id stays unique
        return hook

    def check(_module, inputs):
        hit = producers.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0] and hit[0] not in found:
            found.append(hit[0])

    for name, module in model.named_modules():
        if isinstance(module, layer_types) and getattr(module, "weight", None) is not None:
            handles.append(module.register_forward_hook(remember(f"{name}.weight" if name else "weight")))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(check))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def batchnorm_buffers(model: nn.Module) -> list[Tensor]:
    """The running-statistics buffers (mean, var, count) of every BatchNorm in ``model``."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return out


@contextmanager
def preserved_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Run the body, then put every BatchNorm's running statistics back as they were.

    Used for the second (perturbed) pass of SAM: in train mode BN normalises with batch
    statistics either way, so the output is unchanged, but the running averages must be those of
    the unperturbed weights. Saving and copying back (instead of ``momentum=0``) keeps
    ``num_batches_tracked`` right, survives NaN batch statistics and keeps the same BN kernel
    (e.g. cuDNN) in both passes.
    """
    buffers = batchnorm_buffers(model)
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def get_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator state and, on CUDA, the state of ``device``'s generator."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Restore a state from :func:`get_rng_state` (so dropout draws the same masks again)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
