"""Curvature of a model's loss: Hessian-vector products and the estimators built on them.

One home for the Hessian machinery that the metric callbacks (trace, eigenvalues) and the
curvature penalties share:

* :class:`HessianOperator`: ``H v`` of the per-sample mean criterion over a fixed set of batches,
  ``L = Σ_b n_b L_b / N``, with respect to the trainable parameters flattened in
  ``named_parameters`` order; forward-over-reverse (``torch.func``) or double backward. Under DDP
  each rank passes its share of the batches and every product is summed across ranks.
* :func:`hessian_vector_products`: ``H v`` from an existing gradient graph
  (``create_graph=True``), differentiable again for a penalty.
* :func:`rademacher`, :func:`rademacher_like`: the probes.
* :func:`hutchinson`, :func:`hutchpp` (trace estimates with standard errors),
  :func:`hutchinson_forms` (the per-probe forms ``vᵀHv`` on a gradient graph, for a penalty), and
  :func:`lanczos_top_eigenvalues` (restarted Lanczos in a basis of bounded size).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from marginboost.batches import Batch, as_batch, batch_len, batch_to, reiterable
from marginboost.distributed import all_reduce_sum, is_distributed
from marginboost.errors import check_choice, check_int

from .losses import Criterion, resolve_criterion
from .state import batchnorm_mode, buffer_copies, trainable_tensors

BACKENDS = ("auto", "func", "double_backward")
Matvec = Callable[[Tensor], Tensor]


class HessianOperator:
    r"""Hessian-vector products :math:`H v` of :math:`L(\theta)=\frac1N\sum_i \ell_i` over ``batches``.

    ``backend="func"``: forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``),
    ``vmap``-ed over a block of vectors in chunks of ``chunk_size``. ``"double_backward"``: the
    gradient graph of a batch is built once (``create_graph=True``) and differentiated again for
    each vector of the block. ``"auto"`` (default): double backward whenever the
    graphs are reused, for a single vector, when BN is in train mode, or when a model does not go
    through ``torch.func`` (with a warning); ``func`` for blocks otherwise.

    ``reuse_graph`` keeps each batch's gradient graph between products, so a forward and
    backward pass is paid once per batch for all the products of an estimate (PyHessian's
    single-batch strategy): the fastest for Hutchinson and Lanczos, at the memory cost of every
    batch's activations and gradient graph. ``None`` (default) reuses them when the batches are a
    single batch.

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
        reuse_graph: keep the gradient graphs between products (see above).

    Shapes: ``matvec(V)`` takes ``[P]`` or ``[k, P]`` and returns the same shape, ``P = dim``.
    """

    def __init__(self, model: nn.Module, loss_fn: Criterion | str | None, batches: Iterable[Batch],
                 params: Mapping[str, Tensor] | None = None, buffers: Mapping[str, Tensor] | None = None,
                 bn_mode: str = "eval", backend: str = "auto", chunk_size: int | None = 8,
                 distributed: bool | None = None, reuse_graph: bool | None = None) -> None:
        check_choice("backend", backend, BACKENDS)
        self.model = model
        self.loss_fn, self.criterion_name = resolve_criterion(loss_fn, "loss_fn")
        self.batches = reiterable(batches)
        self.params = dict(params) if params is not None else trainable_tensors(model)
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
        if reuse_graph is None:
            reuse_graph = hasattr(self.batches, "__len__") and len(self.batches) == 1
        self.reuse_graph = reuse_graph
        # (batch size, parameter leaves, gradients with their graph) per batch, when reused
        self._graphs: list[tuple[int, list[Tensor], tuple[Tensor | None, ...]]] | None = None

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

    def _gradient_graph(self, batch: Batch) -> tuple[list[Tensor], tuple[Tensor | None, ...]]:
        """Parameter leaves and the gradient of the batch loss, with its graph kept."""
        p = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
        leaves = list(p.values())
        return leaves, torch.autograd.grad(self._loss(p, batch), leaves, create_graph=True, allow_unused=True)

    def _hvp_from_graph(self, leaves: list[Tensor], grads: tuple[Tensor | None, ...], block: Tensor,
                        retain: bool) -> Tensor:
        """``[k, P]`` products of the rows of ``block`` on a gradient graph, written in place into
        one flat result (no per-parameter staging copies)."""
        k = block.shape[0]
        out = torch.empty_like(block)
        if not any(g is not None and g.requires_grad for g in grads):  # the loss is at most linear
            return out.zero_()
        tangents = self.unflatten(block)  # views
        # One vector at a time: on the CPU a vmap-batched double backward (``is_grads_batched``)
        # measured 1.1-1.2x slower than this loop (bench/bench_hessian.py, chunks of 4 to 16).
        vectors = [[tangents[n][i] for n in self.names] for i in range(k)]
        for i, hv in enumerate(hessian_vector_products(grads, leaves, vectors, retain_graph=retain)):
            torch.cat([(h if h is not None else torch.zeros_like(leaf)).reshape(-1) for h, leaf in zip(hv, leaves)],
                      out=out[i])
        return out

    def _batch_hvp(self, batch: Batch, block: Tensor) -> Tensor:
        """``[k, P]`` products on one batch, from a fresh forward and backward."""
        single = block.shape[0] == 1
        # "auto": a lone vector (Lanczos) by double backward, measured about 2x faster than a
        # forward-over-reverse product of one tangent on CPU; probe blocks by vmap-ed jvp-of-grad.
        if self.backend == "func" or (self.backend == "auto" and not single):
            try:
                return self.flatten(self._hvp_func(batch, self.unflatten(block)), block.shape[0])
            except (RuntimeError, NotImplementedError) as err:
                if self.backend == "func":
                    raise
                warnings.warn(f"HessianOperator: torch.func forward-over-reverse failed ({err}); "
                              "falling back to double backward", stacklevel=3)
                self.backend = "double_backward"
        leaves, grads = self._gradient_graph(batch)
        return self._hvp_from_graph(leaves, grads, block, retain=False)

    def _products(self, block: Tensor) -> Iterator[tuple[int, Tensor]]:
        """``(batch size, H_b V [k, P])`` per batch, from the kept graphs or batch by batch; each
        product is a new tensor the caller may overwrite."""
        if self.reuse_graph and self.backend != "func":
            if self._graphs is None:
                graphs = []
                for raw in self.batches:
                    batch = batch_to(as_batch(raw), self.device, self.dtype)
                    graphs.append((batch_len(batch), *self._gradient_graph(batch)))
                self._graphs = graphs
            for nb, leaves, grads in self._graphs:
                yield nb, self._hvp_from_graph(leaves, grads, block, retain=True)
            return
        for raw in self.batches:
            batch = batch_to(as_batch(raw), self.device, self.dtype)
            yield batch_len(batch), self._batch_hvp(batch, block)

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`H v` for ``v [P]`` or a block ``[k, P]``."""
        single = v.ndim == 1
        block = (v[None] if single else v).to(self.device, self.dtype)
        acc, n = None, 0
        # Products on kept graphs run no forward: BN's mode was fixed when the graphs were built,
        # and switching every module's mode per product cost about 5 % of a small model's product.
        modes = nullcontext() if self._graphs is not None else batchnorm_mode(self.model, self.bn_mode)
        with modes, torch.enable_grad():
            for nb, product in self._products(block):
                acc = product.mul_(nb) if acc is None else acc.add_(product, alpha=nb)
                n += nb
        if acc is None:  # no batch on this rank: it still joins the sums (and the count) below
            acc = torch.zeros_like(block)
        total = self.num_samples(n)
        if self.distributed:
            acc = all_reduce_sum(acc)
        self.num_matvecs += block.shape[0]
        out = acc.div_(total)
        return out[0] if single else out

    __call__ = matvec

    def num_samples(self, local: int | None = None) -> int:
        """N, the number of samples over all ranks (counted on the first product)."""
        if self._num_samples is None:
            if local is None:
                local = sum(batch_len(as_batch(b)) for b in self.batches)
            count = torch.tensor([float(local)], dtype=torch.float64)
            if self.distributed:
                count = all_reduce_sum(count)
            self._num_samples = int(count.item())
            if self._num_samples == 0:
                raise ValueError("HessianOperator: the batches hold no samples")
        return self._num_samples


# -- estimators on any symmetric operator --------------------------------------------------

def hessian_vector_products(grads: Sequence[Tensor | None], params: Sequence[Tensor],
                            vectors: Iterable[Sequence[Tensor]], create_graph: bool = False,
                            retain_graph: bool = True) -> Iterable[list[Tensor | None]]:
    r"""``H v = ∂⟨g, v⟩/∂θ`` for each ``v`` (one tensor per parameter), by double backward.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)``; gradients
    that are ``None`` or constant (the loss is at most linear in that tensor) contribute nothing,
    and a parameter the products do not reach gets ``None``. With ``create_graph`` the products
    are differentiable again (a penalty's gradient); ``retain_graph=False`` frees the graph after
    the last vector. Yields one list per vector, lazily.
    """
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    vectors = list(vectors)
    for j, v in enumerate(vectors):
        if not live:
            yield [None] * len(params)
            continue
        yield list(torch.autograd.grad([grads[i] for i in live], list(params), grad_outputs=[v[i] for i in live],
                                       create_graph=create_graph, retain_graph=retain_graph or j < len(vectors) - 1,
                                       allow_unused=True))


# -- estimators on any symmetric operator --------------------------------------------------

def rademacher(shape: Sequence[int], generator: torch.Generator | None = None, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Independent ±1 entries of ``shape``, drawn on ``device`` from ``generator`` (the global RNG
    when ``None``).

    >>> rademacher((2, 3), torch.Generator().manual_seed(0)).abs().sum().item()
    6.0
    """
    return torch.randint(0, 2, tuple(shape), generator=generator, device=device).to(dtype).mul_(2).sub_(1)


def rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """One Rademacher tensor shaped (and typed, and placed) like each of ``tensors``."""
    return [rademacher(t.shape, generator, dtype=t.dtype, device=t.device) for t in tensors]


def _probe_block(k: int, dim: int, generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device | str) -> Tensor:
    """``[k, dim]`` Rademacher probes: random bits from the CPU ``generator``, 64 to a draw,
    unpacked on ``device``.

    The bits come from the CPU, so the probes do not depend on the device the operator runs on;
    drawing them 64 at a time (instead of one value per coordinate, then copying ``k·dim``
    floats) matters on a GPU, where the draws took longer than the Hessian products themselves.
    """
    words = -(-dim // 64)
    draws = torch.randint(-(2**63), 2**63 - 1, (k, words), generator=generator, dtype=torch.int64)
    octets = draws.view(torch.uint8).to(device)  # [k, 8·words]
    bits = (octets[..., None] >> torch.arange(8, dtype=torch.uint8, device=octets.device)) & 1
    return bits.reshape(k, -1)[:, :dim].to(dtype).mul_(2).sub_(1)


def hutchinson_forms(grads: Sequence[Tensor], params: Sequence[Tensor],
                     probes: int | Sequence[Sequence[Tensor]] = 1, create_graph: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
    r"""Per-probe Hutchinson forms :math:`v_j^\top H v_j` (``[k]``) on a gradient graph; their
    mean estimates ``tr H``.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)``. With
    ``create_graph=True`` the result is differentiable in ``params`` (the trace penalty).
    ``probes`` is a count (Rademacher probes) or the probes themselves, one list of tensors per
    probe. For a measurement with standard errors use :func:`hutchinson` on a
    :class:`HessianOperator`.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = torch.autograd.grad((w ** 2).sum() * 1.5, [w], create_graph=True)  # H = 3 I
        >>> hutchinson_forms([g], [w], probes=4).tolist()  # exact for a diagonal H
        [6.0, 6.0, 6.0, 6.0]
    """
    if isinstance(probes, int):
        check_int("probes", probes, low=1)
        probes = [rademacher_like(params, generator) for _ in range(probes)]
    if not any(g is not None and g.requires_grad for g in grads):  # at most linear: zero curvature
        return torch.zeros(len(probes), device=params[0].device, dtype=params[0].dtype)
    values = [sum((vi * hvi).sum() for vi, hvi in zip(v, hv) if hvi is not None)
              for v, hv in zip(probes, hessian_vector_products(grads, params, probes, create_graph))]
    return torch.stack(values)


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
    check_int("probes", probes, low=1)
    values, layers = [], []
    keys = list(slices or {})
    for start in range(0, probes, chunk):
        v = _probe_block(min(chunk, probes - start), dim, generator, dtype, device)
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
    check_int("probes", probes, low=3)
    r = min(probes // 3, dim)
    g = probes - 2 * r
    s = _probe_block(r, dim, generator, dtype, device)
    q, _ = torch.linalg.qr(matvec(s).double().T)  # [P, r], orthonormal
    q = q.T.contiguous()
    hq = matvec(q.to(dtype)).double()
    low = q * hq  # [r, P]
    gv = _probe_block(g, dim, generator, torch.float64, device)
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
                            device: torch.device | str = "cpu",
                            basis_size: int = 20) -> tuple[Tensor, dict[str, float]]:
    r"""The ``k`` largest (algebraic) eigenvalues of a symmetric operator by restarted Lanczos.

    The Krylov basis holds at most ``basis_size`` vectors of ``dim`` entries, stored in ``dtype``
    on ``device``: memory ``basis_size · dim · bytes(dtype)`` whatever ``max_iter`` is (ResNet-18,
    11.2M parameters, float32, 20 vectors: 0.9 GB). Each new vector is orthogonalised twice
    against the whole basis and its column of the projected matrix :math:`T = V^\top H V` is
    computed explicitly (float64, tiny); when the basis is full, it is restarted on the
    :math:`\ell = (m + k) / 2` leading Ritz vectors (thick restart, Wu & Simon 2000), which keeps
    the relation :math:`H V = V T + w e^\top` exact. A Ritz value :math:`\theta` with Ritz vector
    :math:`V s` has residual :math:`\lVert w\rVert\,|s_{\text{last}}|`, a bound on
    :math:`|\lambda - \theta|`; the run stops when every wanted residual is
    :math:`\le tol\cdot|\theta|`, after ``max_iter`` products, or when the whole space is
    spanned (an invariant subspace found early is left for a fresh orthogonal vector).

    Returns ``(eigenvalues [k] descending, float64, {"iterations", "max_residual", "restarts",
    "basis_size"})``; ``iterations`` counts products.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5]))
        >>> lanczos_top_eigenvalues(lambda v: v @ A, 4, k=2)[0].round(decimals=4)
        tensor([5., 3.], dtype=torch.float64)
    """
    check_int("k", k, low=1, high=dim)
    check_int("basis_size", basis_size, low=2)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    budget = max(max_iter, k)
    m = min(dim, max(basis_size, k + 2))
    keep = max(k, min(m - 1, (m + k) // 2))
    basis = torch.zeros(m, dim, dtype=dtype, device=device)
    proj = torch.zeros(m, m, dtype=torch.float64)
    n = 0  # vectors in the basis

    def orthogonalise(w: Tensor) -> tuple[Tensor, Tensor]:
        coef = torch.zeros(n, dtype=torch.float64)
        for _ in range(2):  # classical Gram-Schmidt, twice: orthogonal to working precision
            if n:
                c = basis[:n] @ w
                w = w - basis[:n].T @ c
                coef += c.double().cpu()
        return w, coef

    def fresh() -> Tensor:
        q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device, dtype)
        q, _ = orthogonalise(q)
        return q / q.norm()

    q = fresh()
    theta = torch.empty(0, dtype=torch.float64)
    max_res, products, restarts = float("inf"), 0, 0
    while True:
        basis[n] = q
        n += 1
        w = matvec(q).to(dtype)
        products += 1
        w, h = orthogonalise(w)
        proj[:n, n - 1] = h
        proj[n - 1, :n] = h
        beta = float(w.double().norm())
        evals, evecs = torch.linalg.eigh(proj[:n, :n])
        scale = max(float(evals.abs().max()), 1e-30)
        if n >= k:
            theta = evals[-k:].flip(0)
            res = (beta * evecs[-1, -k:].abs()).flip(0)
            max_res = float(res.max())
            if bool((res <= tol * theta.abs().clamp_min(1e-12 * scale)).all()):
                break
        if products >= budget or (n == dim and beta <= 1e-10 * scale):
            break
        if n == m:  # thick restart on the leading Ritz vectors, rotated in place chunk by chunk
            rot = evecs[:, -keep:].T.to(device, dtype)
            for start in range(0, dim, 1 << 20):
                cols = slice(start, start + (1 << 20))
                basis[:keep, cols] = rot @ basis[:n, cols]
            proj.zero_()
            proj[:keep, :keep] = torch.diag(evals[-keep:])
            n = keep
            restarts += 1
        q = w / beta if beta > 1e-10 * scale else fresh()
    if theta.numel() < k:
        theta = evals.flip(0)[:k]
    return theta.cpu(), {"iterations": float(products), "max_residual": max_res, "restarts": float(restarts),
                         "basis_size": float(m)}
