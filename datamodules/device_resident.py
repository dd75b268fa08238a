"""A training loader that keeps the whole training set on the accelerator.

The images stay on the device as ``uint8`` (CIFAR-10: 150 MB) and every batch is gathered,
cropped, flipped and normalised there with the same functions the per-sample CPU path uses
(:func:`~datamodules.augment.sample_crop_flip`, :func:`~datamodules.augment.crop_flip`,
:func:`~datamodules.augment.normalize`), so there are no DataLoader workers and no host-to-device
image copies. Batches follow the contract of :class:`~datamodules.base.IndexedDataset`: dicts with
``x`` (float32), ``y`` (int64), ``idx`` (int64) and ``gap`` (float32).

Lightning injects no ``DistributedSampler`` into an iterable that is not a ``DataLoader``, so the
loader shards itself with :class:`ShardedPermutation`, which reproduces ``DistributedSampler``'s
order, padding and slicing index for index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from marginboost.errors import check_int

from .augment import crop_flip, normalize, sample_crop_flip
from .split import Split


class ShardedPermutation:
    """The indices one rank visits in one epoch, exactly as ``DistributedSampler`` yields them.

    Epoch ``e`` shuffles with ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``;
    without ``drop_last`` the order is padded by repeating its head until it divides by
    ``world_size``, with ``drop_last`` its tail is cut; rank ``r`` takes ``order[r::world_size]``.

    Args:
        num_samples: size of the data set.
        rank / world_size: this process's shard (``0`` / ``1`` for a single process).
        shuffle: permute each epoch; otherwise ``0..n-1``.
        seed: base seed shared by all ranks (they must agree, or shards overlap).
        drop_last: drop the tail instead of padding (``DistributedSampler``'s meaning).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        if num_samples < 1:
            raise ValueError(f"ShardedPermutation: the data set is empty (num_samples={num_samples})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedPermutation: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and num_samples < world_size:
            raise ValueError(f"ShardedPermutation: drop_last with {num_samples} samples leaves nothing for "
                             f"{world_size} ranks")
        self.n, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        if drop_last and num_samples % world_size:
            self.num_per_rank = math.ceil((num_samples - world_size) / world_size)
        else:
            self.num_per_rank = math.ceil(num_samples / world_size)
        self.total_size = self.num_per_rank * world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (Lightning calls this before every training epoch)."""
        self.epoch = epoch

    def indices(self) -> Tensor:
        """This rank's indices for the current epoch, an int64 CPU tensor of ``len(self)``."""
        if self.shuffle:
            # A CPU generator, as DistributedSampler uses: the same order on every device type.
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > self.n:
            repeats = math.ceil((self.total_size - self.n) / self.n)
            order = torch.cat([order, order.repeat(repeats)[: self.total_size - self.n]])
        return order[self.rank: self.total_size: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_per_rank


def default_shuffle_seed(world_size: int) -> int:
    """The base seed when none is given: that of ``seed_everything`` (``PL_GLOBAL_SEED``), else
    a draw from torch's global generator on a single process (reproducible under
    ``torch.manual_seed``), else 0 (ranks must agree, as in Lightning's own ``DistributedSampler``)."""
    env = os.environ.get("PL_GLOBAL_SEED")
    if env is not None:
        return int(env)
    if world_size == 1:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return 0


class DeviceResidentLoader:
    """Batches of an indexed training set held on ``device``, augmented there.

    An iterable with ``__len__`` (what Lightning accepts as a train dataloader). The split and the
    gap vector move to ``device`` lazily, on the first iteration (or :meth:`to`). The shuffle order
    comes from :attr:`sampler` (a :class:`ShardedPermutation`; Lightning calls its ``set_epoch``
    before each epoch, and starting a pass also advances it, so iterating by hand gives a fresh
    order per pass). Crop/flip parameters are drawn per batch from the device's global generator,
    so runs are reproducible under ``seed_everything``.

    Gaps are read when a batch is made, from a device copy of ``gaps`` refreshed at the start of
    every pass and by :meth:`refresh_gaps` (``GapDataModule.set_gaps`` calls it), so gaps set
    between epochs or fits reach the next batches without any per-batch host-to-device copy.

    Args:
        split: the training :class:`~datamodules.split.Split` (uint8 images or float features).
        gaps: the CPU gap vector ``[N]`` (the DataModule's shared tensor).
        batch_size: batch size per process.
        mean / std: per-channel normalisation (``None``: only scale uint8 to [0, 1]).
        pad / flip / augment: crop padding, horizontal flips, and whether to augment at all.
        shuffle: a fresh permutation every epoch.
        seed: base shuffle seed; ``None``: :func:`default_shuffle_seed`.
        device: where the data lives; ``None``: CPU until :meth:`to` is called.
        rank / world_size: this process's shard under DDP.
        drop_last: drop the last incomplete batch of each epoch (not the sampler's padding).
        cache: optional dict shared between loaders to reuse a split already moved to a device.
    """

    def __init__(self, split: Split, gaps: Tensor, batch_size: int, *, mean: Tensor | None = None,
                 std: Tensor | None = None, pad: int = 0, flip: bool = False, augment: bool = False,
                 shuffle: bool = True, seed: int | None = None, device: torch.device | str | None = None,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 cache: dict | None = None) -> None:
        check_int("data.batch_size", batch_size, low=1)
        if gaps.shape != (len(split),):
            raise ValueError(f"DeviceResidentLoader: gaps must have shape [{len(split)}], got {list(gaps.shape)}")
        self.split, self.gaps, self.batch_size = split, gaps, batch_size
        self.mean, self.std = mean, std
        self.pad, self.flip = pad, flip
        self.augment = augment and (pad > 0 or flip)
        self.drop_last = drop_last
        seed = default_shuffle_seed(world_size) if seed is None else seed
        self.sampler = ShardedPermutation(len(split), rank, world_size, shuffle, seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cache = cache if cache is not None else {}
        self._resident: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None = None
        self._gaps_dev: Tensor | None = None

    # -- placement --------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> DeviceResidentLoader:
        """Move the data to ``device`` now (otherwise it moves on the first iteration)."""
        self.device = torch.device(device)
        self._resident = None
        self._materialize()
        return self

    def _materialize(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        if self._resident is None:
            key = str(self.device)
            entry = self._cache.get(key)
            # Reuse a copy another loader made of this very split (e.g. the previous boosting round).
            if entry is None or entry[0] is not self.split:
                x, y = self.split.x.to(self.device), self.split.y.to(self.device)
                entry = (self.split, x, y)
                self._cache[key] = entry
            _, x, y = entry
            # Statistics moved once: normalize() would otherwise copy them host-to-device per batch.
            mean = self.mean.to(self.device) if self.mean is not None else None
            std = self.std.to(self.device) if self.std is not None else None
            self._resident = (x, y, mean, std)
            self._gaps_dev = None
        return self._resident

    def refresh_gaps(self) -> None:
        """Copy the current gaps to the device (a no-op until the data is resident)."""
        if self._resident is None:
            return
        if self.gaps.device == self.device:
            self._gaps_dev = self.gaps  # the shared tensor itself: always current
        elif self._gaps_dev is None:
            self._gaps_dev = self.gaps.to(self.device)
        else:
            self._gaps_dev.copy_(self.gaps)  # once per pass or set_gaps, never per batch

    # -- iteration --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of ``epoch`` (same as ``self.sampler.set_epoch``)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        # A generator: nothing runs until the first batch is requested, which Lightning does only
        # after calling set_epoch for the epoch.
        x_all, y_all, mean, std = self._materialize()
        self.refresh_gaps()
        order = self.sampler.indices()
        self.sampler.set_epoch(self.sampler.epoch + 1)
        order = order.to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            yield self.make_batch(idx, x_all, y_all, mean, std)

    def make_batch(self, idx: Tensor, x_all: Tensor | None = None, y_all: Tensor | None = None,
                   mean: Tensor | None = None, std: Tensor | None = None) -> dict[str, Tensor]:
        """The batch of objects ``idx`` (a device tensor), augmented with fresh random parameters."""
        if x_all is None:
            x_all, y_all, mean, std = self._materialize()
            if self._gaps_dev is None:
                self.refresh_gaps()
        x = x_all[idx]
        if self.augment:
            offsets, flips = sample_crop_flip(idx.shape[0], self.pad, self.flip, device=self.device)
            x = crop_flip(x, offsets, flips, self.pad)
        return {"x": normalize(x, mean, std), "y": y_all[idx], "idx": idx, "gap": self._gaps_dev[idx]}
