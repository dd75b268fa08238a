"""``BoostedEnsemble``: the members of a boosting run as one LightningModule.

The boosted ensemble predicts with the **sum of member logits**, ``F(x) = Σ_t f_t(x)``; the deep
ensemble of the same members with the **mean softmax**, ``p(x) = 1/T · Σ_t softmax(f_t(x))``::

    from lightning_app import BoostedEnsemble
    ensemble = BoostedEnsemble.from_run_dir("runs/digits_boost")   # logits [N, K] = Σ_t f_t(x)
    logits, per_member = ensemble(x, return_members=True)          # [N, K], [T, N, K]

``trainer.validate/test`` log the boosting summary's metrics (``<stage>/boosted_acc``, ...) over
the whole split; ``trainer.predict`` returns per batch the member logits, both ensembles'
probabilities and the objects' indices (``EnsemblePredictionWriter`` saves them).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn

from marginboost.errors import check_choice

from .ensemble import ensemble_metrics
from .run_dir import load_state, member_paths

MODES = ("boosted", "deep")


def _member_class(class_path: str | None) -> type[L.LightningModule]:
    if not class_path:
        from models import MarginClassifier

        return MarginClassifier
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:  # e.g. a class defined in the training script (__main__)
        raise ImportError(f"member class {class_path!r} cannot be imported here; make its module importable, "
                          "or load the members yourself and pass them to BoostedEnsemble(members)") from err


class BoostedEnsemble(L.LightningModule):
    """The members ``f_1..f_T`` of a run; ``forward`` gives the boosted logits or the deep probabilities.

    Args:
        members: ``T`` modules mapping ``x [N, ...]`` to logits ``[N, K]``.
        mode: ``boosted`` (``forward`` = ``Σ_t f_t(x)``, logits) or ``deep``
            (``forward`` = ``1/T Σ_t softmax f_t(x)``, probabilities).

    Members always run in eval mode, in fp32 with autocast off: the numbers the boosting run
    recorded for its validation set.
    """

    def __init__(self, members: Sequence[nn.Module], mode: str = "boosted") -> None:
        super().__init__()
        if not members:
            raise ValueError("BoostedEnsemble needs at least one member")
        self.mode = check_choice("ensemble.mode", mode, MODES)
        self.members = nn.ModuleList(members)
        self._outputs: list[dict[str, Tensor]] = []

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, mode: str = "boosted", rounds: int | None = None,
                     map_location: str | torch.device = "cpu") -> BoostedEnsemble:
        """The first ``rounds`` (default: all completed) members of the run in ``run_dir``.

        Raises ``ConfigError`` naming the file when ``state.pt`` is missing or unreadable or a
        member checkpoint is missing.
        """
        state = load_state(run_dir)
        paths = member_paths(run_dir, state)
        if not paths:
            raise ValueError(f"{run_dir}: the run has no completed round yet")
        chosen = list(zip(state["members"], paths))[: rounds or None]
        # weights_only=True, said explicitly: member checkpoints hold tensors, numbers and strings only.
        members = [_member_class(m.get("class_path")).load_from_checkpoint(p, map_location=map_location,
                                                                           weights_only=True)
                   for m, p in chosen]
        return cls(members, mode=mode)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def member_logits(self, x: Tensor) -> Tensor:
        """``[T, N, K]`` fp32 logits of every member (eval mode, autocast off)."""
        with torch.autocast(x.device.type, enabled=False):
            out = []
            for member in self.members:
                was_training = member.training
                member.eval()
                out.append(member(x).float())
                member.train(was_training)
        return torch.stack(out)

    def forward(self, x: Tensor, return_members: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Boosted: ``Σ_t f_t(x)`` ``[N, K]``; deep: ``mean_t softmax f_t(x)`` ``[N, K]``.

        With ``return_members`` also the per-member outputs ``[T, N, K]`` (logits for boosted,
        probabilities for deep).
        """
        logits = self.member_logits(x)
        per_member = logits if self.mode == "boosted" else logits.softmax(-1)
        out = per_member.sum(0) if self.mode == "boosted" else per_member.mean(0)
        return (out, per_member) if return_members else out

    # -- evaluation: the boosting summary's metrics over the whole split ---------------------
    def _collect(self, batch: Mapping[str, Tensor]) -> None:
        self._outputs.append({"logits": self.member_logits(batch["x"]).transpose(0, 1),  # [N, T, K]
                              "y": batch["y"], "idx": batch["idx"]})

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def gathered_outputs(self) -> dict[str, Tensor]:
        """The collected ``logits [N, T, K]``, ``y``, ``idx`` of all ranks, one row per object, by idx."""
        cat = {k: torch.cat([o[k] for o in self._outputs]) for k in ("logits", "y", "idx")}
        if self.trainer is not None and self.trainer.world_size > 1:
            # DistributedSampler pads every rank to the same length, so the shapes agree.
            cat = {k: v.flatten(0, 1) for k, v in self.all_gather(cat).items()}
        order = torch.sort(cat["idx"], stable=True).indices
        sorted_idx = cat["idx"][order]
        first = torch.ones_like(sorted_idx, dtype=torch.bool)
        first[1:] = sorted_idx[1:] != sorted_idx[:-1]  # drop the sampler's padding duplicates
        keep = order[first]
        return {k: v[keep] for k, v in cat.items()}

    def _log_metrics(self, stage: str) -> None:
        if not self._outputs:
            return
        out = self.gathered_outputs()
        metrics = ensemble_metrics(list(out["logits"].cpu().unbind(1)), out["y"].cpu())
        for key, value in metrics.items():
            self.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=False)
        self._outputs = []

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self.member_logits(batch["x"])  # [T, N, K]
        out = {"member_logits": logits.transpose(0, 1), "boosted_probs": logits.sum(0).softmax(-1),
               "deep_probs": logits.softmax(-1).mean(0)}
        for key in ("idx", "y"):
            if key in batch:
                out[key] = batch[key]
        return out


class EnsemblePredictionWriter(BasePredictionWriter):
    """Saves ``BoostedEnsemble`` predictions to ``output_dir/predictions.pt`` at the end of predict.

    The file holds ``idx [N]``, ``y [N]`` (when the data has labels), ``member_logits [N, T, K]``,
    ``boosted_probs [N, K]`` (softmax of the summed logits) and ``deep_probs [N, K]`` (mean
    softmax), one row per object, sorted by ``idx``. Under DDP each rank writes
    ``predictions_rank<r>.pt`` with its share.
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        out = {k: torch.cat([b[k].cpu() for b in batches]) for k in batches[0]}
        if "idx" in out:
            order = torch.sort(out["idx"], stable=True).indices
            out = {k: v[order] for k, v in out.items()}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.pt" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.pt"
        torch.save(out, self.output_dir / name)
        self.path = self.output_dir / name
