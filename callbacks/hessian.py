"""Hessian-vector products, trace estimators (Hutchinson, Hutch++) and Lanczos, without Lightning.

The operator is the Hessian of the per-sample mean of the criterion over a fixed set of batches,
``L = Σ_b n_b L_b / N`` (``L_b`` the mean over batch ``b``), with respect to the trainable
parameters flattened in ``named_parameters`` order. Under DDP each rank passes its share of the
batches and every product is summed across ranks, so all ranks see the same operator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from .distributed import comm_device, is_distributed
from .functional import (
    Batch,
    LossFn,
    as_batch,
    batch_len,
    batch_to,
    batchnorm_mode,
    buffer_copies,
    reiterable,
    resolve_criterion,
    trainable_parameters,
)

BACKENDS = ("auto", "func", "double_backward")
TRACE_METHODS = ("hutchinson", "hutch++")
Matvec = Callable[[Tensor], Tensor]


def _all_reduce_sum(t: Tensor) -> Tensor:
    device = comm_device()
    buf = t.to(device)
    dist.all_reduce(buf)
    return buf.to(t.device)


class HessianOperator:
    r"""Hessian-vector products :math:`H v` of :math:`L(\theta)=\frac1N\sum_i \ell_i` over ``batches``.

    ``backend="func"``: forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``),
    ``vmap``-ed over a block of vectors in chunks of ``chunk_size``. ``"double_backward"``:
    ``autograd.grad`` of the gradient, one vector at a time. ``"auto"`` (default): ``func`` for
    blocks of vectors, double backward for a single vector (cheaper there) and whenever a model
    does not go through ``torch.func`` (with a warning) or BN is in train mode.

    Args:
        model: ``forward(x) -> logits``; it is not modified (parameters and buffers are copies).
        loss_fn: ``(logits, batch) -> scalar mean loss``, a name (``"discounted_ce"``, ``"ce"``)
            or ``None`` (discounted CE with the batch's gaps).
        batches: re-iterable of batches (mappings with ``x``, ``y``, optional ``gap``).
        params: ``{name: tensor}`` to differentiate at (default: the trainable parameters); pass
            a rescaled copy here. Parameters not named keep the model's values.
        buffers: ``{name: tensor}`` (default: clones of the model's buffers).
        bn_mode: ``"eval"`` (running statistics, the default) or ``"train"``.
        distributed: sum products across ranks; ``None`` detects an initialised process group.

    Shapes: ``matvec(V)`` takes ``[P]`` or ``[k, P]`` and returns the same shape, ``P = dim``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | str | None, batches: Iterable[Batch],
                 params: Mapping[str, Tensor] | None = None, buffers: Mapping[str, Tensor] | None = None,
                 bn_mode: str = "eval", backend: str = "auto", chunk_size: int | None = 8,
                 distributed: bool | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.loss_fn, self.criterion_name = resolve_criterion(loss_fn, "loss_fn")
        self.batches = reiterable(batches)
        self.params = dict(params) if params is not None else trainable_parameters(model)
        if not self.params:
            raise ValueError("HessianOperator: the model has no trainable parameters")
        self.buffers = dict(buffers) if buffers is not None else buffer_copies(model)
        self.bn_mode, self.chunk_size = bn_mode, chunk_size
        # BN in train mode writes its running statistics inside the forward, which torch.func
        # transforms refuse; double backward on buffer copies handles it.
        self.backend = "double_backward" if (backend == "auto" and bn_mode == "train") else backend
        self.distributed = is_distributed() if distributed is None else distributed
        self.names = list(self.params)
        self.shapes = [self.params[n].shape for n in self.names]
        self.sizes = [self.params[n].numel() for n in self.names]
        self.dim = sum(self.sizes)
        first = self.params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.num_matvecs = 0
        self._num_samples: int | None = None

    # -- layout ----------------------------------------------------------------------------
    def slices(self, group: str = "module") -> dict[str, slice]:
        """Coordinate ranges of each parameter tensor (``group="param"``) or of each module's
        parameters (``group="module"``, e.g. ``backbone.0`` for its weight and bias)."""
        out: dict[str, slice] = {}
        start = 0
        for name, size in zip(self.names, self.sizes):
            key = name if group == "param" else (name.rpartition(".")[0] or name)
            prev = out.get(key)
            # parameters of one module are adjacent in named_parameters order
            out[key] = slice(prev.start if prev is not None else start, start + size)
            start += size
        return out

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """``[k, P] -> {name: [k, *shape]}``."""
        parts = v.split(self.sizes, dim=1)
        return {n: p.reshape(v.shape[0], *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, d: Mapping[str, Tensor], k: int) -> Tensor:
        return torch.cat([d[n].reshape(k, -1) for n in self.names], dim=1)

    # -- products --------------------------------------------------------------------------
    def _loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        logits = functional_call(self.model, (dict(params), self.buffers), (batch["x"],))
        return self.loss_fn(logits, batch)

    def _hvp_func(self, batch: Batch, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        g = grad(lambda p: self._loss(p, batch))

        def one(t: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(g, (self.params,), (t,))[1]

        return vmap(one, chunk_size=self.chunk_size)(tangents)

    def _hvp_double_backward(self, batch: Batch, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        p = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
        leaves = list(p.values())
        g = torch.autograd.grad(self._loss(p, batch), leaves, create_graph=True, allow_unused=True)
        used = [(leaf, gi) for leaf, gi in zip(leaves, g) if gi is not None and gi.requires_grad]
        k = next(iter(tangents.values())).shape[0]
        out = {n: torch.zeros_like(tangents[n]) for n in self.names}
        if not used:
            return out
        pos = {id(leaf): n for n, leaf in p.items()}
        for i in range(k):
            hv = torch.autograd.grad([gi for _, gi in used], leaves,
                                     grad_outputs=[tangents[pos[id(leaf)]][i] for leaf, _ in used],
                                     retain_graph=i < k - 1, allow_unused=True)
            for n, h in zip(self.names, hv):
                if h is not None:
                    out[n][i] = h
        return out

    def _batch_hvp(self, batch: Batch, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        single = next(iter(tangents.values())).shape[0] == 1
        # "auto": a lone vector (Lanczos) by double backward, measured about 2x faster than a
        # forward-over-reverse product of one tangent on CPU; probe blocks by vmap-ed jvp-of-grad.
        if self.backend == "func" or (self.backend == "auto" and not single):
            try:
                return self._hvp_func(batch, tangents)
            except (RuntimeError, NotImplementedError) as err:
                if self.backend == "func":
                    raise
                warnings.warn(f"HessianOperator: torch.func forward-over-reverse failed ({err}); "
                              "falling back to double backward", stacklevel=3)
                self.backend = "double_backward"
        return self._hvp_double_backward(batch, tangents)

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`H v` for ``v [P]`` or a block ``[k, P]``."""
        single = v.ndim == 1
        block = (v[None] if single else v).to(self.device, self.dtype)
        tangents = self.unflatten(block)
        acc = torch.zeros_like(block)
        n = 0
        with batchnorm_mode(self.model, self.bn_mode), torch.enable_grad():
            for raw in self.batches:
                batch = batch_to(as_batch(raw), self.device, self.dtype)
                nb = batch_len(batch)
                acc += nb * self.flatten(self._batch_hvp(batch, tangents), block.shape[0])
                n += nb
        total = self.num_samples(n)
        if self.distributed:
            acc = _all_reduce_sum(acc)
        self.num_matvecs += block.shape[0]
        out = acc / total
        return out[0] if single else out

    __call__ = matvec

    def num_samples(self, local: int | None = None) -> int:
        """N, the number of samples over all ranks (counted on the first product)."""
        if self._num_samples is None:
            if local is None:
                local = sum(batch_len(as_batch(b)) for b in self.batches)
            count = torch.tensor([float(local)], dtype=torch.float64)
            if self.distributed:
                count = _all_reduce_sum(count)
            self._num_samples = int(count.item())
            if self._num_samples == 0:
                raise ValueError("HessianOperator: the batches hold no samples")
        return self._num_samples


def hvp(model: nn.Module, loss_fn: LossFn | str | None, batches: Iterable[Batch], v: Tensor,
        **kwargs) -> Tensor:
    """One Hessian-vector product ``H v`` (``v [P]`` or ``[k, P]``); see :class:`HessianOperator`."""
    return HessianOperator(model, loss_fn, batches, **kwargs).matvec(v)


# -- estimators on any symmetric operator --------------------------------------------------

def rademacher(k: int, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Tensor:
    """``[k, dim]`` of ±1, drawn on the CPU so the probes do not depend on the device."""
    return (torch.randint(0, 2, (k, dim), generator=generator) * 2 - 1).to(device, dtype)


@dataclass
class TraceEstimate:
    """A trace estimate: ``value ± stderr`` from ``probes`` products; ``per_layer`` maps a layer
    to ``(value, stderr)`` and sums to ``value``; ``samples`` are the per-probe values."""

    value: float
    stderr: float
    probes: int
    method: str
    samples: Tensor
    per_layer: dict[str, tuple[float, float]] = field(default_factory=dict)


def _stderr(x: Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def hutchinson(matvec: Matvec, dim: int, probes: int, generator: torch.Generator,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               chunk: int = 32, slices: Mapping[str, slice] | None = None) -> TraceEstimate:
    r"""Hutchinson: :math:`\mathrm{tr}(H) \approx \frac1K \sum_k v_k^\top H v_k`, :math:`v_k` Rademacher.

    Standard error :math:`s/\sqrt K` (``s`` the sample std of the ``K`` quadratic forms). Per-layer
    traces :math:`\frac1K\sum_k v_{k,l}^\top (H v_k)_l` are unbiased for :math:`\mathrm{tr}(H_{ll})`
    and sum to the total.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 5.0))
        >>> est = hutchinson(lambda V: V @ A, 4, 64, torch.Generator().manual_seed(0))
        >>> est.value  # a diagonal matrix: every Rademacher form is exact
        10.0
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    values, layers = [], []
    keys = list(slices or {})
    for start in range(0, probes, chunk):
        v = rademacher(min(chunk, probes - start), dim, generator, dtype, device)
        prod = (v * matvec(v)).double()
        values.append(prod.sum(1))
        if keys:
            layers.append(torch.stack([prod[:, slices[k]].sum(1) for k in keys], 1))
    samples = torch.cat(values).cpu()
    per_layer = {}
    if keys:
        lay = torch.cat(layers).cpu()
        per_layer = {k: (float(lay[:, i].mean()), _stderr(lay[:, i])) for i, k in enumerate(keys)}
    return TraceEstimate(float(samples.mean()), _stderr(samples), probes, "hutchinson", samples, per_layer)


def hutchpp(matvec: Matvec, dim: int, probes: int, generator: torch.Generator,
            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
            slices: Mapping[str, slice] | None = None) -> TraceEstimate:
    r"""Hutch++ (Meyer et al., 2021) with a budget of ``probes`` products.

    A third sketches the range: :math:`Q = \mathrm{orth}(H S)`; a third gives
    :math:`\mathrm{tr}(Q^\top H Q)` exactly; the rest estimate the deflated remainder
    :math:`\mathrm{tr}((I-QQ^\top) H (I-QQ^\top))` by Hutchinson (its standard error is the
    estimate's). Exact when :math:`\mathrm{rank}(H) \le` ``probes // 3``.
    """
    if probes < 3:
        raise ValueError(f"hutch++ needs probes >= 3, got {probes}")
    r = min(probes // 3, dim)
    g = probes - 2 * r
    s = rademacher(r, dim, generator, dtype, device)
    q, _ = torch.linalg.qr(matvec(s).double().T)  # [P, r], orthonormal
    q = q.T.contiguous()
    hq = matvec(q.to(dtype)).double()
    low = q * hq  # [r, P]
    gv = rademacher(g, dim, generator, torch.float64, device)
    gv = gv - (gv @ q.T) @ q
    resid = (gv * matvec(gv.to(dtype)).double())  # [g, P]
    samples = resid.sum(1).cpu()
    value = float(low.sum()) + float(samples.mean())
    per_layer = {}
    for k, sl in (slices or {}).items():
        lay = resid[:, sl].sum(1).cpu()
        per_layer[k] = (float(low[:, sl].sum()) + float(lay.mean()), _stderr(lay))
    return TraceEstimate(value, _stderr(samples), probes, "hutch++", samples, per_layer)


def lanczos_top_eigenvalues(matvec: Matvec, dim: int, k: int = 1, max_iter: int = 100, tol: float = 1e-5,
                            generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu") -> tuple[Tensor, dict[str, float]]:
    r"""The ``k`` largest (algebraic) eigenvalues of a symmetric operator by Lanczos.

    Full re-orthogonalisation (twice), in float64; stops when every wanted Ritz value
    :math:`\theta` has residual :math:`|\beta_m s_{m}| \le tol\cdot|\theta|` (a bound on
    :math:`|\lambda-\theta|`), after ``max_iter`` products, or when the Krylov space is exhausted
    (then it restarts from a fresh orthogonal vector until ``k`` values are found).

    Returns ``(eigenvalues [k] descending, {"iterations", "max_residual"})``.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5]))
        >>> lanczos_top_eigenvalues(lambda v: v @ A, 4, k=2)[0]
        tensor([5., 3.], dtype=torch.float64)
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}], got {k}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    m_max = min(dim, max(max_iter, k))
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j+1]

    def fresh() -> Tensor:
        q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
        for _ in range(2):
            if basis:
                b = torch.stack(basis)
                q = q - b.T @ (b @ q)
        return q / q.norm()

    q = fresh()
    theta = torch.empty(0, dtype=torch.float64)
    max_res = float("inf")
    for j in range(m_max):
        basis.append(q)
        w = matvec(q.to(dtype)).double()
        alphas.append(float(w @ q))
        b = torch.stack(basis)
        for _ in range(2):
            w = w - b.T @ (b @ w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        scale = max(float(evals.abs().max()), 1e-30)
        if len(alphas) >= k:
            theta = evals[-k:].flip(0)
            res = (beta * evecs[-1, -k:].abs()).flip(0)
            max_res = float(res.max())
            if bool((res <= tol * theta.abs().clamp_min(1e-12 * scale)).all()):
                break
        if j == m_max - 1:
            break
        if beta <= 1e-10 * scale:  # invariant subspace: restart orthogonally (zero coupling)
            betas.append(0.0)
            q = fresh()
        else:
            betas.append(beta)
            q = w / beta
    if theta.numel() < k:
        theta = evals.flip(0)[:k]
    return theta.cpu(), {"iterations": float(len(alphas)), "max_residual": max_res}


def hessian_trace(model: nn.Module, loss_fn: LossFn | str | None, batches: Iterable[Batch], probes: int = 32,
                  method: str = "hutchinson", seed: int = 0, per_layer: bool = True,
                  params: Mapping[str, Tensor] | None = None, buffers: Mapping[str, Tensor] | None = None,
                  bn_mode: str = "eval", backend: str = "auto", chunk_size: int = 8,
                  distributed: bool | None = None) -> TraceEstimate:
    r"""Trace of the Hessian of the mean criterion over ``batches``, by Hutchinson or Hutch++.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> batch = {"x": torch.randn(8, 3), "y": torch.randint(0, 2, (8,))}
        >>> est = hessian_trace(net, "ce", [batch], probes=16)
        >>> est.value > 0 and est.probes == 16
        True
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    op = HessianOperator(model, loss_fn, batches, params, buffers, bn_mode, backend, chunk_size, distributed)
    gen = torch.Generator().manual_seed(seed)
    slices = op.slices() if per_layer else None
    if method == "hutch++":
        return hutchpp(op.matvec, op.dim, probes, gen, op.dtype, op.device, slices)
    return hutchinson(op.matvec, op.dim, probes, gen, op.dtype, op.device, chunk_size, slices)


def hessian_top_eigenvalues(model: nn.Module, loss_fn: LossFn | str | None, batches: Iterable[Batch], k: int = 1,
                            max_iter: int = 100, tol: float = 1e-5, seed: int = 0,
                            params: Mapping[str, Tensor] | None = None,
                            buffers: Mapping[str, Tensor] | None = None, bn_mode: str = "eval",
                            backend: str = "auto", distributed: bool | None = None) -> tuple[Tensor, dict[str, float]]:
    """Top-``k`` Hessian eigenvalues by :func:`lanczos_top_eigenvalues` on :class:`HessianOperator`."""
    op = HessianOperator(model, loss_fn, batches, params, buffers, bn_mode, backend, 1, distributed)
    return lanczos_top_eigenvalues(op.matvec, op.dim, k, max_iter, tol, torch.Generator().manual_seed(seed),
                                   op.dtype, op.device)
