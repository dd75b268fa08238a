"""Learning-rate schedules whose horizon is the run's length, whatever ``trainer.max_epochs`` says."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR

from marginboost.errors import ConfigError


class CosineAnnealingRunLR(CosineAnnealingLR):
    r"""Cosine annealing over the whole run: ``T_max`` defaults to the run's length.

    :math:`\eta_e = \eta_{min} + \tfrac12(\eta_0 - \eta_{min})(1 + \cos(\pi e / T_{max}))`, as in
    ``torch.optim.lr_scheduler.CosineAnnealingLR``. With ``T_max: null`` (the default) the model
    calls :meth:`set_horizon` in ``configure_optimizers`` with ``trainer.max_epochs`` (interval
    ``epoch``) or the trainer's estimated optimizer steps (interval ``step``), so overriding
    ``--trainer.max_epochs`` keeps the schedule whole. ``fraction`` sets ``T_max`` to that part of
    the run (``0.5``: ``eta_min`` is reached half-way; torch's cosine rises again after ``T_max``).

    Example::

        lr_scheduler:
          class_path: models.CosineAnnealingRunLR   # T_max follows trainer.max_epochs
    """

    def __init__(self, optimizer: Optimizer, T_max: int | None = None, eta_min: float = 0.0,  # noqa: N803
                 fraction: float = 1.0, last_epoch: int = -1) -> None:
        if T_max is not None and (not isinstance(T_max, int) or isinstance(T_max, bool) or T_max < 1):
            raise ConfigError("model.lr_scheduler.T_max", T_max, "null (the run's length) or an integer >= 1")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError("model.lr_scheduler.fraction", fraction, "a number in (0, 1]")
        self.fraction = float(fraction)
        self.follows_run = T_max is None
        super().__init__(optimizer, T_max=T_max if T_max is not None else 0, eta_min=eta_min, last_epoch=last_epoch)

    def set_horizon(self, steps: int) -> None:
        """Set ``T_max = max(1, round(fraction · steps))`` when it was left null."""
        if self.follows_run:
            if steps is None or steps < 1:
                raise ConfigError("trainer.max_epochs", steps, "an integer >= 1 when model.lr_scheduler.T_max "
                                  "is null (the schedule follows the run's length)")
            self.T_max = max(1, round(self.fraction * steps))

    def get_lr(self):
        if self.follows_run and self.T_max == 0 and self.last_epoch > 0:
            raise RuntimeError("CosineAnnealingRunLR: T_max is null and set_horizon was never called; "
                               "give T_max or use a model that sets the horizon (MarginClassifier)")
        return super().get_lr()
