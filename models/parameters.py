"""Parameters by name, and the one global norm over a list of tensors.

:func:`match_parameters` is the one way a config names parameters (``perturb_params``,
``penalty_params``, ``scale_invariant_params`` of the models and ``scale_invariant`` of the metric
callbacks): a list of regular expressions, each matched with ``re.search`` against names such as
``backbone.0.weight``. Anchor a pattern (``^backbone\\.0\\.weight$``) to name one tensor exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marginboost.errors import ConfigError


def match_parameters(module: nn.Module, patterns: str | Sequence[str] | None, field: str,
                     trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs whose name matches any regex in ``patterns`` (``re.search``).

    ``None`` selects every (trainable) parameter. A pattern that does not compile or matches
    nothing raises a :class:`~marginboost.errors.ConfigError` naming the config ``field``.
    The result is in ``named_parameters`` order, without duplicates.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> [n for n, _ in match_parameters(net, r"^0\\.", "model.perturb_params")]
        ['0.weight', '0.bias']
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if patterns is None:
        return named
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(field, patterns, "a list of regular expressions over parameter names, or null for "
                          "all trainable parameters")
    sample = [n for n, _ in named[:8]]
    names_hint = f"regular expressions matching trainable parameter names such as {sample}" + (
        " ..." if len(named) > 8 else "")
    selected: dict[str, nn.Parameter] = {}
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as err:
            raise ConfigError(field, pat, f"a valid regular expression ({err})") from err
        hits = [(n, p) for n, p in named if rx.search(n)]
        if not hits:
            raise ConfigError(field, pat, names_hint)
        selected.update(hits)
    return [(n, p) for n, p in named if n in selected]


def global_norm(tensors: Sequence[Tensor], squared: bool = False) -> Tensor:
    r""":math:`\lVert (t_1, \dots, t_n) \rVert_2`, the L2 norm over all entries of all tensors.

    One fused kernel for the per-tensor norms, then the norm of those. Half-precision tensors are
    accumulated in float32 (their squares overflow or lose the small entries). Differentiable when
    the tensors are (the exact gradient-norm penalty differentiates it).

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])], squared=True)
        tensor(25.)
    """
    if not tensors:
        raise ValueError("global_norm: no tensors")
    norms = torch._foreach_norm([t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors])
    norm = torch.linalg.vector_norm(torch.stack(norms))
    return norm.square() if squared else norm
