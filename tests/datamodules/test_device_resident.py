"""The device-resident training loader and the fast-path model options, on CPU."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

import datamodules.base as base_mod
import datamodules.device_resident as dr_mod
from datamodules import (
    DeviceResidentLoader,
    DigitsDataModule,
    IndexedDataset,
    ShardedPermutation,
    Split,
)
from datamodules.augment import crop_flip, normalize
from models import MarginClassifier, discounted_cross_entropy


def _images(n: int, c: int = 3, h: int = 6, w: int = 5, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return Split(x, torch.randint(0, 10, (n,), generator=g))


MEAN, STD = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])


# -- augmentation ------------------------------------------------------------------------------
def test_batched_augmentation_equals_per_sample_cpu_path(monkeypatch):
    """Same crop/flip draws: the device path's batch is pixel-identical to IndexedDataset's samples."""
    split, pad, n = _images(9), 2, 9
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    assert flips.any() and not flips.all() and offsets.max() == 2 * pad and offsets.min() == 0

    # The CPU dataset draws one sample's parameters per call: hand it row i for object i.
    draws = iter(range(n))

    def per_sample(count, pad_, flip, generator=None, device="cpu"):
        i = next(draws)
        return offsets[i: i + 1], flips[i: i + 1]

    monkeypatch.setattr(base_mod, "sample_crop_flip", per_sample)
    ds = IndexedDataset(split, torch.zeros(n), MEAN, STD, pad=pad, flip=True, augment=True)
    cpu = torch.stack([ds[i]["x"] for i in range(n)])

    monkeypatch.setattr(dr_mod, "sample_crop_flip", lambda count, pad_, flip, device=None: (offsets, flips))
    loader = DeviceResidentLoader(split, torch.zeros(n), n, mean=MEAN, std=STD, pad=pad, flip=True,
                                  augment=True, seed=0)
    batch = loader.make_batch(torch.arange(n))
    assert batch["x"].dtype == torch.float32 and torch.equal(batch["x"], cpu)


def test_crop_flip_matches_torchvision_semantics():
    """RandomCrop(size, padding) + RandomHorizontalFlip: pad with zeros, crop at (top, left), mirror."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    # Literal case: a 1×2×3 image, pad 1, crop at top=0, left=2, then flipped.
    img = torch.tensor([[[1, 2, 3], [4, 5, 6]]], dtype=torch.uint8)
    # padded rows 0..1 (of 4) at cols 2..4 (of 5): [[0,0,0],[2,3,0]]; mirrored: [[0,0,0],[0,3,2]]
    out = crop_flip(img[None], torch.tensor([[0, 2]]), torch.tensor([True]), 1)[0]
    assert torch.equal(out, torch.tensor([[[0, 0, 0], [0, 3, 2]]], dtype=torch.uint8))

    split, pad = _images(1, c=3, h=4, w=7), 3
    x = split.x[0]
    for top, left, flip in [(0, 0, False), (6, 6, True), (2, 5, True), (4, 1, False), (3, 3, True)]:
        ref = tvf.crop(tvf.pad(x, [pad]), top, left, 4, 7)
        if flip:
            ref = tvf.horizontal_flip(ref)
        ours = crop_flip(x[None], torch.tensor([[top, left]]), torch.tensor([flip]), pad)[0]
        assert torch.equal(ours, ref), (top, left, flip)


# -- epoch contract ----------------------------------------------------------------------------
def test_epoch_visits_every_index_once_with_its_sample():
    split = _images(37)
    gaps = torch.randn(37)
    loader = DeviceResidentLoader(split, gaps, 8, mean=MEAN, std=STD, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    idx = torch.cat([b["idx"] for b in batches])
    assert torch.equal(idx.sort().values, torch.arange(37))
    for b in batches:
        assert b["idx"].dtype == b["y"].dtype == torch.int64 and b["gap"].dtype == torch.float32
        # Ground truth from the split itself, not from the loader's code path.
        assert torch.equal(b["x"], (split.x[b["idx"]].float() / 255 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))
        assert torch.equal(b["y"], split.y[b["idx"]]) and torch.equal(b["gap"], gaps[b["idx"]])


def test_augmentation_keeps_pixels_of_the_right_object():
    """With augmentation, each output is a crop/flip of *its* object's image (checked by brute force)."""
    split = _images(6, c=1, h=4, w=4)
    loader = DeviceResidentLoader(split, torch.zeros(6), 6, pad=1, flip=True, augment=True, seed=0)
    batch = next(iter(loader))
    for x, i in zip(batch["x"], batch["idx"]):
        candidates = [crop_flip(split.x[i][None], torch.tensor([[a, b]]), torch.tensor([f]), 1)[0]
                      for a in range(3) for b in range(3) for f in (False, True)]
        assert any(torch.equal(x, normalize(c[None], None, None)[0]) for c in candidates)


def test_gaps_after_set_gaps_reach_the_next_pass():
    dm = DigitsDataModule(batch_size=256)
    dm.device_resident = True  # the attribute: DigitsDataModule's signature does not forward it yet
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceResidentLoader)
    for round_ in range(3):
        gaps = torch.randn(dm.num_train) + round_
        dm.set_gaps(gaps)
        seen = torch.zeros(dm.num_train, dtype=torch.bool)
        for b in loader:
            assert torch.equal(b["gap"], gaps[b["idx"]])
            seen[b["idx"]] = True
        assert seen.all()


def test_shuffle_fresh_each_epoch_and_reproducible(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    split = _images(50)

    def orders(seed):
        loader = DeviceResidentLoader(split, torch.zeros(50), 50, seed=seed)
        return [next(iter(loader))["idx"] for _ in range(3)]

    a, b = orders(7), orders(7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert not torch.equal(orders(8)[0], a[0])
    # set_epoch selects an epoch's order, as Lightning does before each epoch.
    loader = DeviceResidentLoader(split, torch.zeros(50), 50, seed=7)
    loader.set_epoch(2)
    assert torch.equal(next(iter(loader))["idx"], a[2])
    # No explicit seed and no seed_everything: drawn from torch's global generator.
    torch.manual_seed(5)
    c = DeviceResidentLoader(split, torch.zeros(50), 50)
    torch.manual_seed(5)
    d = DeviceResidentLoader(split, torch.zeros(50), 50)
    assert torch.equal(next(iter(c))["idx"], next(iter(d))["idx"])


# -- DDP sharding ------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(10, 3), (11, 4), (12, 4), (2, 5)])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_matches_distributed_sampler(n, world, shuffle, drop_last):
    if drop_last and n < world:
        with pytest.raises(ValueError, match="drop_last"):
            ShardedPermutation(n, 0, world, shuffle, 4, drop_last)
        return
    shards = []
    for rank in range(world):
        ours = ShardedPermutation(n, rank, world, shuffle, seed=4, drop_last=drop_last)
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=4, drop_last=drop_last)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert ours.indices().tolist() == list(ref) and len(ours) == len(ref)
        shards.append(ours.indices())
    union = torch.cat(shards)
    assert len(union) == len(shards[0]) * world
    if not drop_last:
        assert set(union.tolist()) == set(range(n))


def test_loader_shards_by_rank():
    split, world = _images(23), 3
    shards = []
    for rank in range(world):
        loader = DeviceResidentLoader(split, torch.arange(23.0), 4, seed=9, rank=rank, world_size=world)
        ref = DistributedSampler(range(23), num_replicas=world, rank=rank, shuffle=True, seed=9)
        loader.set_epoch(1)
        ref.set_epoch(1)
        idx = torch.cat([b["idx"] for b in loader])
        assert idx.tolist() == list(ref) and len(loader) == 2  # 8 per rank: batches of 4, 4
        shards.append(idx)
    union = torch.cat(shards)
    assert set(union.tolist()) == set(range(23)) and len(union) == 24  # one padded repeat


# -- in a Trainer ------------------------------------------------------------------------------
class _GapProbe(L.Callback):
    """Sets epoch-dependent gaps at each epoch start and checks every batch carries them."""

    def __init__(self) -> None:
        self.first_idx, self.first_batch_ok, self.checked = [], [], 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.expected = torch.linspace(0, 1, trainer.datamodule.num_train) * (trainer.current_epoch + 1)
        trainer.datamodule.set_gaps(self.expected)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ok = torch.equal(batch["gap"].cpu(), self.expected[batch["idx"].cpu()])
        assert ok, f"epoch {trainer.current_epoch} batch {batch_idx}: stale gaps"
        self.checked += 1
        if batch_idx == 0:
            self.first_idx.append(batch["idx"].cpu().clone())
            self.first_batch_ok.append(ok)


def _train_loss(model: MarginClassifier, dm: DigitsDataModule) -> float:
    """Loss on the whole un-augmented training set in one batch, BN on batch statistics.

    (Eval-mode BN would judge running statistics that a few dozen steps have not settled.)
    """
    probe = copy.deepcopy(model).train()
    x, y = zip(*[(b["x"], b["y"]) for b in dm.train_eval_dataloader()])
    with torch.no_grad():
        return discounted_cross_entropy(probe(torch.cat(x)), torch.cat(y)).item()


@pytest.mark.parametrize("device_resident", [True, False])
def test_fit_on_digits(device_resident, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    dm.device_resident = device_resident
    dm.setup("fit")
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 8}, head_scale=4.0)
    before = _train_loss(model, dm)
    probe = _GapProbe()
    trainer = L.Trainer(max_epochs=3, limit_train_batches=8, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, callbacks=[probe])
    trainer.fit(model, datamodule=dm)
    assert probe.checked == 24 and all(probe.first_batch_ok)
    assert _train_loss(model, dm) < 0.5 * before
    if device_resident:
        # Lightning's set_epoch reaches the loader: epoch e's order is the seeded permutation e.
        assert isinstance(trainer.train_dataloader, DeviceResidentLoader)
        for epoch, first in enumerate(probe.first_idx):
            perm = ShardedPermutation(dm.num_train, seed=0)
            perm.set_epoch(epoch)
            assert torch.equal(first, perm.indices()[:64])
        assert not torch.equal(probe.first_idx[0], probe.first_idx[1])


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="data.device_resident"):
        DigitsDataModule().device_resident = "yes"
    with pytest.raises(ValueError, match="model.channels_last"):
        MarginClassifier(backbone="small_cnn", channels_last=1)
    with pytest.raises(ValueError, match="model.compile_backbone"):
        MarginClassifier(backbone="small_cnn", compile_backbone="true")


# -- model fast-path options -------------------------------------------------------------------
def _pair(**kwargs) -> tuple[MarginClassifier, MarginClassifier]:
    args = dict(num_classes=10, input_shape=(3, 16, 16), backbone="small_cnn", backbone_kwargs={"width": 8})
    ref = MarginClassifier(**args)
    fast = MarginClassifier(**args, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_channels_last_gives_the_same_outputs():
    ref, fast = _pair(channels_last=True)
    conv = fast.backbone[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(6, 3, 16, 16)
    for train in (False, True):
        ref.train(train)
        fast.train(train)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    loss_ref = discounted_cross_entropy(ref(x), torch.arange(6))
    loss_fast = discounted_cross_entropy(fast(x), torch.arange(6))
    loss_ref.backward()
    loss_fast.backward()
    torch.testing.assert_close(fast.backbone[0].weight.grad, ref.backbone[0].weight.grad, rtol=1e-4, atol=1e-5)


def test_compile_backbone_is_lazy_training_only_and_copyable(monkeypatch):
    compiled = []
    real_compile = torch.compile

    def eager_compile(module, **kwargs):
        # The eager backend runs Dynamo's capture without Inductor's slow C++ build on CPU.
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    ref, fast = _pair(compile_backbone=True)
    x = torch.randn(4, 3, 16, 16)
    fast.eval()
    fast(x)
    assert compiled == []  # eval-mode forwards stay eager
    fast.train()
    ref.train()
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    assert compiled == [fast.backbone]
    assert set(fast.state_dict()) == set(ref.state_dict())
    twin = copy.deepcopy(fast)
    assert twin.__dict__["_compiled_backbone"] is None
    torch.testing.assert_close(twin(x), ref(x), rtol=1e-5, atol=1e-5)
