"""Snapshot and restore of what training or a measurement can disturb in a model.

One home for: the full model state (:class:`ModelState`, :func:`preserved_state`), BatchNorm
running statistics (:func:`batchnorm_buffers`, :func:`preserved_batchnorm_stats`), the BN mode
used by measurements (:func:`batchnorm_mode`), copies of buffers and trainable parameters, and the
RNG state that makes a second forward pass draw the same dropout masks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from marginboost.errors import check_choice

BN_MODES = ("eval", "train")


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm of any dimension (SyncBatchNorm included)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


# -- the whole model ------------------------------------------------------------------------

@dataclass
class ModelState:
    """A snapshot of everything a measurement could disturb: parameter and buffer values (by
    reference and by copy, so tensor identity survives), ``.grad`` (tensor and value, or
    ``None``), ``requires_grad``, every module's train/eval flag, and the RNG states (torch CPU,
    CUDA when initialised, numpy, python ``random``)."""

    tensors: list[tuple[dict, str, Tensor, Tensor]]
    grads: list[tuple[nn.Parameter, Tensor | None, Tensor | None, bool]]
    modes: list[tuple[nn.Module, bool]]
    rng: dict[str, Any]

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        # (owning dict, name, the tensor object, its value): a block may re-bind an attribute or
        # change a tensor's dtype/device (``model.double()``); both are undone.
        tensors = [(slots, name, t, t.detach().clone()) for m in model.modules()
                   for slots in (m._parameters, m._buffers) for name, t in slots.items() if t is not None]
        grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone(), p.requires_grad)
                 for p in model.parameters()]
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return cls(tensors, grads, [(m, m.training) for m in model.modules()], rng)

    def restore(self) -> None:
        with torch.no_grad():
            for slots, name, t, saved in self.tensors:
                slots[name] = t
                _put_back(t, saved)
        for p, grad, value, requires_grad in self.grads:
            p.requires_grad_(requires_grad)
            if grad is not None:
                with torch.no_grad():
                    _put_back(grad, value)
            p.grad = grad
        for m, flag in self.modes:
            m.training = flag
        torch.set_rng_state(self.rng["torch"])
        np.random.set_state(self.rng["numpy"])
        random.setstate(self.rng["python"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def _put_back(t: Tensor, saved: Tensor) -> None:
    """Give ``t`` the value of ``saved`` in place (same object), dtype, device and shape included."""
    if t.dtype != saved.dtype or t.device != saved.device or t.shape != saved.shape:
        t.data = saved.clone()
    else:
        t.copy_(saved)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[ModelState]:
    """Run a block and put the model and the RNGs back as they were, whatever the block did.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> before = [t.clone() for t in net.state_dict().values()]
        >>> with preserved_state(net):
        ...     _ = net(torch.randn(4, 2)).sum().backward()  # updates BN stats, writes .grad
        >>> all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))
        True
        >>> net[0].weight.grad is None
        True
    """
    state = ModelState.capture(model)
    try:
        yield state
    finally:
        state.restore()


# -- BatchNorm ------------------------------------------------------------------------------

def batchnorm_buffers(model: nn.Module) -> list[Tensor]:
    """The running-statistics buffers (mean, var, count) of every BatchNorm in ``model``."""
    out = []
    for m in model.modules():
        if is_batchnorm(m) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return out


def save_batchnorm_stats(model: nn.Module) -> list[Tensor]:
    """Copies of :func:`batchnorm_buffers`, for :func:`restore_batchnorm_stats`."""
    return [b.clone() for b in batchnorm_buffers(model)]


def restore_batchnorm_stats(model: nn.Module, saved: list[Tensor]) -> None:
    """Copy values saved by :func:`save_batchnorm_stats` back into the model's BN buffers."""
    with torch.no_grad():
        for b, s in zip(batchnorm_buffers(model), saved):
            b.copy_(s)


@contextmanager
def preserved_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Run the body, then put every BatchNorm's running statistics back as they were.

    Used for the second (perturbed) pass of SAM: in train mode BN normalises with batch
    statistics either way, so the output is unchanged, but the running averages must be those of
    the unperturbed weights. Saving and copying back (instead of ``momentum=0``) keeps
    ``num_batches_tracked`` right, survives NaN batch statistics and keeps the same BN kernel
    (e.g. cuDNN) in both passes.
    """
    saved = save_batchnorm_stats(model)
    try:
        yield
    finally:
        restore_batchnorm_stats(model, saved)


@contextmanager
def batchnorm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Everything in eval mode except BatchNorm, which is in ``mode`` (``eval``: running
    statistics, ``train``: batch statistics); every module's own flag is restored on exit."""
    check_choice("bn_mode", mode, BN_MODES)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    if mode == "train":
        for m in model.modules():
            if is_batchnorm(m):
                m.train()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# -- copies for functional calls ------------------------------------------------------------

def buffer_copies(model: nn.Module) -> dict[str, Tensor]:
    """Clones of every buffer: a forward pass in train mode updates the clones, not the model."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def trainable_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``{name: detached tensor}`` of the parameters with ``requires_grad`` (shares storage)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# -- RNG ------------------------------------------------------------------------------------

def get_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator state and, on CUDA, the state of ``device``'s generator."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Restore a state from :func:`get_rng_state` (so dropout draws the same masks again)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
