"""``DecisionBoundary``: the 2-D decision boundary with its margin level sets, with and without gaps,
logged as an image (see :mod:`callbacks.functional.decision_boundary` for what is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from marginboost.errors import ConfigError, check_int, check_number
from models.state import preserved_state

from .functional.decision_boundary import decision_boundary_figure, figure_to_rgb, model_logits


class DecisionBoundary(Callback):
    """Logs ``boundary/margins``: the decision boundary and margin level sets (left) next to the
    discounted loss's picture with the training objects' gaps (right), for 2-D inputs.

    At the end of every ``every_n_epochs``-th training epoch and at the end of the fit, on rank 0,
    the model is evaluated in eval mode on a grid over the training set (plus its training objects)
    and the figure goes to every logger: an image for TensorBoard (``add_image``), ``log_image``
    for loggers that have it (W&B), else a PNG under the logger's ``log_dir/boundary/``. The step is
    the global step. The model is left exactly as found: parameters, buffers, gradients,
    train/eval modes and RNG states.

    Args:
        every_n_epochs: epochs between figures; ``None`` for the fit's end only.
        at_fit_end: also draw at the end of the fit (once, if the last epoch already drew).
        levels: margins ``c`` of the level sets ``m_y = c`` in the left panel.
        resolution: grid points per axis.
        tag: the image's name.

    Example (config)::

        trainer:
          callbacks:
            - class_path: callbacks.DecisionBoundary
              init_args: {every_n_epochs: 10}
    """

    def __init__(self, every_n_epochs: int | None = None, at_fit_end: bool = True,
                 levels: Sequence[float] = (0.5, 1.0, 2.0), resolution: int = 150,
                 tag: str = "boundary/margins") -> None:
        if every_n_epochs is not None:
            check_int("DecisionBoundary.every_n_epochs", every_n_epochs, low=1)
        if not levels:
            raise ConfigError("DecisionBoundary.levels", list(levels), "one or more margins >= 0")
        self.levels = [check_number("DecisionBoundary.levels", v, low=0.0) for v in levels]
        self.every_n_epochs, self.at_fit_end = every_n_epochs, at_fit_end
        self.resolution = check_int("DecisionBoundary.resolution", resolution, low=10, high=1000)
        self.tag = tag
        self.logged_steps: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        shape = tuple(getattr(trainer.datamodule, "input_shape", ()) or ())
        if shape != (2,):
            raise ConfigError("DecisionBoundary", f"data with input_shape {shape}",
                              "a data module with 2-D inputs (datamodules.Toy2DDataModule)", describe=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_figure(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step not in self.logged_steps:
            self.log_figure(trainer, pl_module)

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> np.ndarray:
        """``[H, W, 3]`` pixels of the figure for the model as it is now (left exactly as found)."""
        dm = trainer.datamodule
        with preserved_state(pl_module):  # also the RNG: iterating a DataLoader draws a seed from it
            batches = list(dm.train_eval_dataloader(distributed=False))
            x = torch.cat([b["x"] for b in batches]).float()
            y = torch.cat([b["y"] for b in batches])
            gaps = torch.cat([b["gap"] for b in batches]).float()
            pl_module.eval()
            fig = decision_boundary_figure(lambda p: model_logits(pl_module, p), x, y, gaps,
                                           int(dm.num_classes), self.levels, self.resolution,
                                           title=self._title(trainer))
        return figure_to_rgb(fig)

    def log_figure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        image, step = self.render(trainer, pl_module), trainer.global_step
        for logger in trainer.loggers:
            log_image(logger, self.tag, image, step)
        self.logged_steps.append(step)

    @staticmethod
    def _title(trainer: L.Trainer) -> str:
        root = Path(str(trainer.default_root_dir)).name  # a boosting member trains in round_<t>/
        where = f"round {root.removeprefix('round_')} · " if root.startswith("round_") else ""
        return f"{where}epoch {trainer.current_epoch + 1} · step {trainer.global_step}"


def log_image(logger, tag: str, image: np.ndarray, step: int) -> None:
    """One ``[H, W, 3]`` uint8 image to a Lightning logger: TensorBoard's ``add_image``, a logger's
    ``log_image`` (W&B), else a PNG under the logger's ``log_dir`` (CSV and others)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
    elif hasattr(logger, "log_image"):
        logger.log_image(key=tag, images=[image], step=step)
    elif getattr(logger, "log_dir", None):
        from PIL import Image

        path = Path(logger.log_dir) / tag.replace("/", "_") / f"step_{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
