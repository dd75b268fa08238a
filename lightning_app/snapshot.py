"""Snapshot ensembles through the boosting orchestrator: each member warm-started from the last.

A snapshot ensemble (Huang et al., 2017, "Snapshot Ensembles: Train 1, get M for free") trains
one network with a cyclic learning rate and keeps a snapshot at the end of every cycle. With
the orchestrator that is: ``NoGapRule`` (no gaps), a learning-rate schedule that restarts with
every member (e.g. ``CosineAnnealingLR(T_max=max_epochs)``: one cosine cycle per member), and
members 2..T starting from the weights of the member before them::

    orch = BoostingOrchestrator(rounds=5, gap_rule=NoGapRule(), run_dir="runs/snapshot")
    orch.run(warm_start(make_model, "runs/snapshot"), make_trainer, datamodule)

The optimizer state (momentum) starts afresh with each cycle; the weights, BN statistics and the
frozen head carry over. Resume and DDP behave as for any run: the previous member is read from its
checkpoint ``run_dir/round_<t−1>/member.ckpt``, which every rank reads and which a resumed run
finds on disk. A round cut off in the middle resumes from its own last checkpoint, as any round.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from .run_dir import MEMBER_FILE, round_dir


def previous_member_checkpoint(run_dir: str | Path, t: int) -> Path:
    """The checkpoint of member ``t − 1`` (rounds ``1..T``): ``run_dir/round_<t−1>/member.ckpt``."""
    return round_dir(run_dir, t - 1) / MEMBER_FILE


def warm_start(model_factory: Callable[[int, int], L.LightningModule],
               run_dir: str | Path) -> Callable[[int, int], L.LightningModule]:
    """Wrap an orchestrator model factory so that member ``t > 1`` starts from member ``t − 1``.

    The wrapped factory builds the fresh member as before (its seed still sets the data order and
    augmentation), then loads the previous member's ``state_dict`` (parameters and buffers).

    Args:
        model_factory: ``(t, seed) -> LightningModule`` (``t`` in ``1..T``), as
            :meth:`BoostingOrchestrator.run` takes.
        run_dir: the orchestrator's ``run_dir``.
    """

    def factory(t: int, seed: int) -> L.LightningModule:
        model = model_factory(t, seed)
        if t > 1:
            path = previous_member_checkpoint(run_dir, t)
            if not path.is_file():
                raise FileNotFoundError(f"warm start: {path} is missing; the previous member of the "
                                        "snapshot ensemble must be in the same run_dir")
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(checkpoint["state_dict"])
        return model

    return factory
