"""Collectives shared by the measurements and the boosting loop.

Per-sample values gathered by index, sums across ranks. They work without Lightning (plain
``torch.distributed``), are no-ops in a single process, and must be called on every rank.
"""

from __future__ import annotations

import atexit

import torch
import torch.distributed as dist
from torch import Tensor


def destroy_process_group_at_exit() -> None:
    """Tear the default process group down while the interpreter is still whole.

    Lightning does this at exit for NCCL only. A gloo group left to interpreter finalization can
    abort the process (``terminate called without an active exception``, exit status -6) after
    all its work is done, because gloo's worker threads still hold tensors that need the GIL.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Registered at import, before any group exists: atexit runs handlers last-in first-out, so a
# handler Lightning registers at init runs first and this one is then a no-op.
atexit.register(destroy_process_group_at_exit)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where collectives' tensors must live: this rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over ranks (a new tensor on ``t``'s device); ``t`` itself in one process."""
    if not is_distributed():
        return t
    buf = t.to(comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def _all_gather_varlen(t: Tensor) -> Tensor:
    """Concatenate ``t`` (``[n_rank, ...]``, ``n_rank`` may differ) from every rank, rank order."""
    device = comm_device()
    t = t.to(device)
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)])


def gather_by_index(values: Tensor, idx: Tensor, num_total: int) -> Tensor:
    """Scatter per-sample ``values [n, ...]`` of objects ``idx [n]`` into a full ``[num_total, ...]``.

    Under DDP, values and indices are all-gathered first, so the result is identical on every
    rank. Repeats of an index (the padding ``DistributedSampler`` adds) collapse onto one entry;
    an index that no rank covered, or one outside ``[0, num_total)``, raises ``RuntimeError``.
    """
    if values.shape[0] != idx.shape[0]:
        raise ValueError(f"gather_by_index: values and idx disagree in length: {values.shape[0]} vs {idx.shape[0]}")
    out_device = values.device
    if is_distributed():
        values, idx = _all_gather_varlen(values), _all_gather_varlen(idx)
    idx = idx.long().to(values.device)
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_total):
        raise RuntimeError(f"gather_by_index: indices outside [0, {num_total})")
    counts = torch.bincount(idx, minlength=num_total)
    if not bool((counts > 0).all()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise RuntimeError(f"gather_by_index: {int((counts == 0).sum())} of {num_total} indices not covered "
                           f"(first {missing}); measure over the whole training set")
    # Keep the first occurrence (lowest rank, earliest batch) of a repeated index: the padding
    # copies may differ in the last bits, and an indexed write of duplicates has no defined winner.
    order = torch.sort(idx, stable=True).indices
    sorted_idx = idx[order]
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    out = values.new_zeros((num_total, *values.shape[1:]))
    out[sorted_idx[first]] = values[order[first]]
    return out.to(out_device)
