"""A small boosting run for the end-to-end tests (DDP vs one process, kill and resume).

The model is chosen so that DDP is mathematically the same computation as one process: no batch
statistics anywhere (a BN-free backbone and the head's BN replaced by the identity: CPU has no
SyncBatchNorm), unshuffled data, and per-rank batches that together form the one-process batch.
"""

import argparse
import os

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from datamodules import Toy2DDataModule
from lightning_app import BoostingOrchestrator, ClippedGapRule
from models import MarginClassifier


class TinyNet(nn.Module):
    def __init__(self, input_shape, width=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_shape[0], width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.out_features = width

    def forward(self, x):
        return self.net(x)


class NoBatchStatsClassifier(MarginClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head.bn = nn.Identity()


class SequentialToy(Toy2DDataModule):
    """Unshuffled; under DDP rank r takes objects r, r+W, ... (Lightning's own sampler would shuffle)."""

    def train_dataloader(self):
        dataset = super().train_dataloader().dataset
        sampler = DistributedSampler(dataset, shuffle=False) if dist.is_initialized() else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler)


class KillAt(L.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os._exit(3)  # a hard crash: no cleanup, no state written


class EpochLog(L.Callback):
    """Appends ``<round> <epoch>`` to ``path`` at each epoch start: shows what a resumed run re-trains."""

    def __init__(self, path, t):
        self.path, self.t = path, t

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{self.t} {trainer.current_epoch}\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--kill-round", type=int, default=-1, help="round t (1..T) to kill")
    p.add_argument("--kill-epoch", type=int, default=1, help="epoch (0-based) at whose start it dies")
    p.add_argument("--data-seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    dm = SequentialToy(num_train=64, num_val=37, batch_size=a.batch_size, eval_batch_size=10, seed=a.data_seed)

    def make_model(r, seed):
        return NoBatchStatsClassifier(num_classes=2, input_shape=(2,), backbone="boost_run.TinyNet",
                                 optimizer=lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9))

    def make_trainer(r, round_dir):
        callbacks = [EpochLog(os.path.join(a.run_dir, "epochs.txt"), r)]
        callbacks += [KillAt(a.kill_epoch)] if r == a.kill_round else []
        kwargs = {"strategy": "ddp"} if a.devices > 1 else {}
        return L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=a.devices, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(round_dir), callbacks=callbacks,
                         use_distributed_sampler=False, **kwargs)

    BoostingOrchestrator(a.rounds, ClippedGapRule(-2.0, 3.0), a.run_dir, seed=7).run(make_model, make_trainer, dm)


if __name__ == "__main__":
    main()
