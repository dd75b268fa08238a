"""Plain-function forms of the measurements, usable without Lightning."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.losses import discounted_cross_entropy
from models.losses import margins as margins_from_logits

from .distributed import gather_by_index


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def per_sample_outputs(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], num_total: int,
                       outputs: Callable[[Tensor, Mapping[str, Tensor]], tuple[Tensor, ...]],
                       device: torch.device | str | None = None) -> tuple[Tensor, ...]:
    """One eval-mode, fp32 (autocast off) pass; ``outputs(logits, batch)`` per batch, placed by ``idx``.

    Restores the model's train/eval mode. Under DDP each rank passes its shard and every rank
    receives the same full ``[num_total, ...]`` tensors (see :func:`gather_by_index`).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts, indices = [], []
    try:
        with torch.autocast(device.type, enabled=False):
            for batch in loader:
                batch = _to(batch, device)
                parts.append(outputs(model(batch["x"]).float(), batch))
                indices.append(batch["idx"])
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("the measurement loader yielded no batches")
    idx = torch.cat(indices)
    return tuple(gather_by_index(torch.cat(column), idx, num_total) for column in zip(*parts))


def collect_margins(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], num_total: int,
                    device: torch.device | str | None = None) -> Tensor:
    r"""Margins :math:`f_y - \max_{j\ne y} f_j` ``[num_total]`` of every object, by the batches' ``idx``."""
    return per_sample_outputs(model, loader, num_total,
                              lambda logits, b: (margins_from_logits(logits, b["y"]),), device)[0]


def collect_logits(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], num_total: int,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """fp32 logits ``[num_total, K]`` and labels ``[num_total]`` of every object, by ``idx``."""
    return per_sample_outputs(model, loader, num_total, lambda logits, b: (logits, b["y"]), device)


# -- shared plumbing for the measurements ------------------------------------------------------

Batch = Mapping[str, Tensor]
LossFn = Callable[[Tensor, Batch], Tensor]
BN_MODES = ("eval", "train")


def discounted_ce_criterion(logits: Tensor, batch: Batch) -> Tensor:
    """The training criterion of ``MarginClassifier``: discounted CE with the batch's gaps."""
    return discounted_cross_entropy(logits, batch["y"], batch.get("gap", 0.0))


def ce_criterion(logits: Tensor, batch: Batch) -> Tensor:
    """Plain cross-entropy (gaps ignored)."""
    return F.cross_entropy(logits, batch["y"])


CRITERIA: dict[str, LossFn] = {"discounted_ce": discounted_ce_criterion, "ce": ce_criterion}


def resolve_criterion(criterion: str | LossFn | None, field: str = "criterion") -> tuple[LossFn, str]:
    """``(loss_fn, name)`` from a name in :data:`CRITERIA`, a callable ``(logits, batch) -> loss``
    or ``None`` (the discounted CE)."""
    if criterion is None:
        return discounted_ce_criterion, "discounted_ce"
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise ValueError(f"{field}: unknown criterion {criterion!r}; allowed: {sorted(CRITERIA)} "
                             "or a callable (logits, batch) -> scalar loss")
        return CRITERIA[criterion], criterion
    if not callable(criterion):
        raise TypeError(f"{field} must be a name in {sorted(CRITERIA)} or a callable, got {type(criterion).__name__}")
    return criterion, getattr(criterion, "__qualname__", type(criterion).__name__)


def as_batch(batch: Batch | Sequence[Tensor]) -> dict[str, Tensor]:
    """A batch as a dict with ``x``, ``y`` (and ``idx``/``gap`` when present); ``(x, y)`` tuples too."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return {"x": batch[0], "y": batch[1]}
    raise TypeError(f"a batch must be a mapping with keys x, y (idx, gap) or an (x, y) pair, got {type(batch).__name__}")


def batch_to(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Move a batch to ``device``; floating tensors are cast to ``dtype`` when given."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, dtype if (dtype is not None and v.is_floating_point()) else None, non_blocking=True)
        out[k] = v
    return out


def batch_len(batch: Batch) -> int:
    return int(batch["y"].shape[0] if "y" in batch else batch["x"].shape[0])


def reiterable(batches: Iterable) -> Iterable:
    """Batches that can be iterated more than once (a one-shot iterator is listed)."""
    return list(batches) if iter(batches) is batches else batches


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@contextmanager
def batchnorm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Everything in eval mode except BatchNorm, which is in ``mode`` (``eval``: running
    statistics, ``train``: batch statistics); every module's own flag is restored on exit."""
    if mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    if mode == "train":
        for m in model.modules():
            if is_bn(m):
                m.train()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """``{name: detached tensor}`` of the parameters with ``requires_grad``."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def buffer_copies(model: nn.Module) -> dict[str, Tensor]:
    """Clones of every buffer: a forward pass in train mode updates the clones, not the model."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def margin_summary(m: Tensor) -> dict[str, float]:
    r"""Quartiles and Tukey fences of a margin vector ``m [N]``.

    ``q1, median, q3`` (linear interpolation), ``iqr = q3 - q1``, ``lower_fence = q1 - 1.5 iqr``,
    ``upper_fence = q3 + 1.5 iqr``, ``min``, ``max``, ``mean``, ``std``, ``frac_negative``
    (share with :math:`m_i < 0`) and ``frac_below_fence`` (share below the lower fence).

    Example:
        >>> margin_summary(torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0]))["median"]
        1.0
    """
    if m.ndim != 1 or m.numel() == 0:
        raise ValueError(f"margin_summary needs a non-empty 1-D tensor, got shape {tuple(m.shape)}")
    m = m.detach().double()
    q1, med, q3 = torch.quantile(m, torch.tensor([0.25, 0.5, 0.75], dtype=m.dtype, device=m.device)).tolist()
    iqr = q3 - q1
    lower = q1 - 1.5 * iqr
    return {"q1": q1, "median": med, "q3": q3, "iqr": iqr, "lower_fence": lower, "upper_fence": q3 + 1.5 * iqr,
            "min": m.min().item(), "max": m.max().item(), "mean": m.mean().item(),
            "std": m.std().item() if m.numel() > 1 else 0.0,
            "frac_negative": (m < 0).double().mean().item(), "frac_below_fence": (m < lower).double().mean().item()}
