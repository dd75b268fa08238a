"""GapDataModule: index and gap in every batch, the ordered measurement loader, set_gaps."""
import lightning as L
import pytest
import torch

from datamodules import (
    DigitsDataModule,
    Toy2DDataModule,
)
from datamodules.split import Split
from models import MarginClassifier


class _RecordGaps(L.Callback):
    """Records (idx, gap) of every training batch; sets new gaps after the first epoch."""

    def __init__(self, dm, new_gaps):
        self.dm, self.new_gaps, self.seen = dm, new_gaps, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).append((batch["idx"].clone(), batch["gap"].clone()))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.dm.set_gaps(self.new_gaps)


def _fit(dm, callback, epochs):
    model = MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})
    L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
              callbacks=[callback]).fit(model, dm)


def test_digits_batches_carry_index_and_gap():
    dm = DigitsDataModule(batch_size=16)
    assert dm.num_train == 1438 and dm.num_classes == 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "y", "idx", "gap"}
    assert batch["x"].shape == (16, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert torch.equal(batch["gap"], torch.zeros(16))
    assert torch.equal(batch["y"], dm.train_targets[batch["idx"]])


def test_train_eval_loader_is_ordered_unaugmented_and_complete():
    dm = DigitsDataModule(eval_batch_size=100)
    dm.set_gaps(torch.arange(dm.num_train, dtype=torch.float32))
    batches = list(dm.train_eval_dataloader())
    idx = torch.cat([b["idx"] for b in batches])
    assert torch.equal(idx, torch.arange(dm.num_train))
    assert torch.equal(torch.cat([b["gap"] for b in batches]), torch.arange(dm.num_train, dtype=torch.float32))
    again = torch.cat([b["x"] for b in dm.train_eval_dataloader()])
    assert torch.equal(torch.cat([b["x"] for b in batches]), again)  # no random augmentation
    x0 = dm._ensure_loaded()[0].x[:3].float() / 255
    torch.testing.assert_close(again[:3], (x0 - dm.mean) / dm.std)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(10), r"shape \[num_train\]=\[1438\]"),
    (torch.full((1438,), float("nan")), "finite"),
    (torch.zeros(1438, dtype=torch.bool), "real numbers"),
    (torch.zeros(1438, 2), "shape"),
])
def test_set_gaps_validation(bad, match):
    dm = DigitsDataModule()
    with pytest.raises((ValueError, TypeError), match=match):
        dm.set_gaps(bad)
    assert torch.equal(dm.gaps, torch.zeros(1438))  # a rejected call changes nothing


def test_set_gaps_accepts_ints_and_returns_copies():
    dm = Toy2DDataModule(num_train=8, num_val=4)
    dm.set_gaps(list(range(8)))
    g = dm.gaps
    g += 100
    assert torch.equal(dm.gaps, torch.arange(8, dtype=torch.float32))


@pytest.mark.parametrize("workers", [0, 2])
def test_gaps_reach_batches_between_epochs_and_fits(workers):
    dm = Toy2DDataModule(num_train=96, num_val=8, batch_size=32, num_workers=workers,
                         persistent_workers=workers > 0)
    first = torch.linspace(-1, 1, 96)
    second = torch.arange(96, dtype=torch.float32) * 10
    dm.set_gaps(first)
    rec = _RecordGaps(dm, second)
    _fit(dm, rec, epochs=2)
    for epoch, expected in ((0, first), (1, second)):
        idx = torch.cat([i for i, _ in rec.seen[epoch]])
        gap = torch.cat([g for _, g in rec.seen[epoch]])
        assert sorted(idx.tolist()) == list(range(96))
        assert torch.equal(gap, expected[idx])
    third = -torch.arange(96, dtype=torch.float32)
    dm.set_gaps(third)  # between fits: the next fit sees it
    rec2 = _RecordGaps(dm, third)
    _fit(dm, rec2, epochs=1)
    idx = torch.cat([i for i, _ in rec2.seen[0]])
    assert torch.equal(torch.cat([g for _, g in rec2.seen[0]]), third[idx])


@pytest.mark.parametrize("kwargs,match", [({"batch_size": 0}, "data.batch_size"),
                                          ({"num_workers": 0, "persistent_workers": True}, "persistent_workers"),
                                          ({"val_fraction": 1.5}, "data.val_fraction")])
def test_bad_datamodule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def _per_object_batches(dataset, batch_size):
    """What the DataLoader gave before batched fetching: one ``dataset[i]`` per object, collated."""
    from torch.utils.data import default_collate

    order = list(range(len(dataset)))
    return [default_collate([dataset[i] for i in order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]


@pytest.mark.parametrize("augment", [False, True])
def test_batched_fetch_equals_the_per_object_batches(augment):
    """``IndexedDataset.__getitems__`` builds an evaluation batch in one go; it must be the same
    batch, bit for bit, as collating the objects one by one (augmented batches, and their random
    draws, stay per object)."""
    from torch.utils.data import DataLoader

    from datamodules import FashionMNISTDataModule
    from datamodules.base import IndexedDataset, collate_batches

    dm = DigitsDataModule()
    train = dm._ensure_loaded()[0]
    images = Split((torch.arange(40 * 64) % 256).to(torch.uint8).reshape(40, 1, 8, 8), train.y[:40])
    for split, mean, std in ((train, dm.mean, dm.std),
                             (images, FashionMNISTDataModule.mean, FashionMNISTDataModule.std)):
        gaps = torch.linspace(0, 2, len(split))
        dataset = IndexedDataset(split, gaps, mean, std, pad=1, augment=augment)
        torch.manual_seed(5)
        fast = list(DataLoader(dataset, batch_size=16, collate_fn=collate_batches))
        torch.manual_seed(5)
        plain = list(DataLoader(dataset, batch_size=16))  # a DataLoader made elsewhere: default collate
        torch.manual_seed(5)
        torch.empty((), dtype=torch.int64).random_()  # the base seed a DataLoader iterator draws first
        slow = _per_object_batches(dataset, 16)
        assert len(fast) == len(slow) == len(plain)
        for a, b in [*zip(fast, slow), *zip(plain, slow)]:
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
