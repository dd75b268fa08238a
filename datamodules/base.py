"""The indexed, gap-carrying dataset and the DataModule base every data set builds on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from marginboost.errors import ConfigError, check_bool, check_int

from .augment import crop_flip, normalize, sample_crop_flip
from .device_resident import DeviceResidentLoader
from .split import Split


class IndexedDataset(Dataset):
    """Yields ``{"x", "y", "idx", "gap"}`` for object ``idx``.

    ``gaps`` lives in shared memory and is read at access time, so gaps set between fits or
    epochs reach DataLoader workers, persistent ones included, without re-creating them.
    """

    def __init__(self, split: Split, gaps: Tensor | None = None, mean: Tensor | None = None,
                 std: Tensor | None = None, pad: int = 0, flip: bool = False, augment: bool = False) -> None:
        self.split, self.gaps, self.mean, self.std = split, gaps, mean, std
        self.pad, self.flip, self.augment = pad, flip, augment and (pad > 0 or flip)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx: int) -> dict[str, Tensor]:
        x = self.split.x[idx]
        if self.augment:
            offsets, flips = sample_crop_flip(1, self.pad, self.flip)
            x = crop_flip(x[None], offsets, flips, self.pad)[0]
        x = normalize(x[None], self.mean, self.std)[0]
        gap = self.gaps[idx] if self.gaps is not None else torch.zeros(())
        return {"x": x, "y": self.split.y[idx], "idx": torch.tensor(idx), "gap": gap}

    def __getitems__(self, indices: list[int]) -> Sequence[dict[str, Tensor]]:
        """A whole batch in one indexing and one normalisation (the DataLoader's batched fetch).

        Without augmentation only (an augmented batch keeps the per-object path, so the random
        draws stay those of the per-object path). The result reads as the list of the batch's
        objects, so any collate function takes it; :func:`collate_batches` (GapDataModule's
        loaders) takes the whole batch as it is, bit for bit the per-object batch, while the
        per-object path spends most of an evaluation pass in Python.
        """
        if self.augment:
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = normalize(self.split.x[idx], self.mean, self.std)
        gap = self.gaps[idx] if self.gaps is not None else torch.zeros(len(indices))
        return WholeBatch({"x": x, "y": self.split.y[idx], "idx": idx, "gap": gap})


class WholeBatch(Sequence):
    """A batch made in one piece that reads as the list of its objects (``batch[i]`` is object
    ``i``'s dict), for a collate function that expects one."""

    def __init__(self, batch: dict[str, Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["idx"])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"WholeBatch index {i} out of range for {len(self)} objects")
        return {key: value[i] for key, value in self.batch.items()}


def collate_batches(batch: WholeBatch | list) -> Any:
    """``default_collate``, taking a :class:`WholeBatch` as it is (no per-object stacking)."""
    return batch.batch if isinstance(batch, WholeBatch) else default_collate(batch)


def validate_gaps(gaps, num_train: int) -> Tensor:
    """Check a gap vector for ``set_gaps``: 1-D, ``num_train`` long, real-valued, finite."""
    if not torch.is_tensor(gaps):
        try:
            gaps = torch.as_tensor(gaps)
        except (TypeError, ValueError) as err:
            raise TypeError(f"set_gaps: gaps must be a tensor of shape [{num_train}], got {type(gaps).__name__}") from err
    if gaps.dtype == torch.bool or gaps.is_complex():
        raise TypeError(f"set_gaps: gaps must be real numbers (float or int), got dtype {gaps.dtype}")
    if gaps.shape != (num_train,):
        raise ValueError(f"set_gaps: gaps must have shape [num_train]=[{num_train}], got {list(gaps.shape)}")
    gaps = gaps.detach().to("cpu", torch.float32)
    bad = ~torch.isfinite(gaps)
    if bad.any():
        first = bad.nonzero()[:5].flatten().tolist()
        raise ValueError(f"set_gaps: gaps must be finite; {int(bad.sum())} are NaN/inf (first indices {first})")
    return gaps


class GapDataModule(L.LightningDataModule):
    """Base DataModule: every training sample carries its index and its gap.

    Subclasses implement :meth:`load` returning ``(train, val, test)`` :class:`Split` s and set
    ``num_classes``, ``input_shape``, ``mean``/``std`` (or ``None``), ``pad`` and ``flip``.

    Args:
        batch_size: training batch size (per process under DDP).
        eval_batch_size: batch size of validation, test and measurement loaders.
        num_workers: DataLoader workers.
        persistent_workers: keep workers alive between epochs (gaps still reach them).
        pin_memory: pin host memory for faster host-to-device copies.
        augment: use the data set's training augmentation (crop/flip) for training batches.
        device_resident: keep the training set on the trainer's device and make training batches
            there (gather, crop/flip, normalise; no workers); see
            :class:`~datamodules.device_resident.DeviceResidentLoader`. Validation, test and
            measurement loaders are unchanged.
    """

    num_classes: int
    input_shape: tuple[int, ...]
    mean: Tensor | None = None
    std: Tensor | None = None
    pad: int = 0
    flip: bool = False

    def __init__(self, batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0,
                 persistent_workers: bool = False, pin_memory: bool = False, augment: bool = True,
                 device_resident: bool = False) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            check_int(f"data.{name}", value, low=low)
        for name, value in (("persistent_workers", persistent_workers), ("pin_memory", pin_memory),
                            ("augment", augment)):
            check_bool(f"data.{name}", value)
        if persistent_workers and num_workers == 0:
            raise ConfigError("data.persistent_workers", True, "false when data.num_workers is 0")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.persistent_workers = num_workers, persistent_workers
        self.pin_memory, self.augment = pin_memory, augment
        self._splits: tuple[Split, Split, Split] | None = None
        self._gaps: Tensor | None = None
        self._resident_loader: DeviceResidentLoader | None = None
        self._resident_cache: dict = {}  # device -> training split on it, reused across fits
        self.device_resident = device_resident

    @property
    def device_resident(self) -> bool:
        """Whether training batches are made on the accelerator (settable before a fit)."""
        return self._device_resident

    @device_resident.setter
    def device_resident(self, value: bool) -> None:
        self._device_resident = check_bool("data.device_resident", value)

    # -- data -------------------------------------------------------------------------------
    def load(self) -> tuple[Split, Split, Split]:
        raise NotImplementedError(f"{type(self).__name__} must implement load() -> (train, val, test)")

    def _ensure_loaded(self) -> tuple[Split, Split, Split]:
        if self._splits is None:
            self._splits = self.load()
            self._gaps = torch.zeros(len(self._splits[0])).share_memory_()
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        self._ensure_loaded()

    @property
    def num_train(self) -> int:
        return len(self._ensure_loaded()[0])

    @property
    def train_targets(self) -> Tensor:
        return self._ensure_loaded()[0].y

    # -- gaps -------------------------------------------------------------------------------
    def set_gaps(self, gaps) -> None:
        """Set the per-object gaps ``[num_train]`` used by the next training batches."""
        checked = validate_gaps(gaps, self.num_train)
        self._gaps.copy_(checked)  # in place: shared with DataLoader workers
        if self._resident_loader is not None:
            self._resident_loader.refresh_gaps()

    @property
    def gaps(self) -> Tensor:
        self._ensure_loaded()
        return self._gaps.clone()

    # -- loaders ----------------------------------------------------------------------------
    def _dataset(self, split: Split, train: bool) -> IndexedDataset:
        return IndexedDataset(split, self._gaps if train else None, self.mean, self.std,
                              self.pad, self.flip, augment=train and self.augment)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, sampler=None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers, collate_fn=collate_batches)

    def train_dataloader(self) -> DataLoader | DeviceResidentLoader:
        train, _, _ = self._ensure_loaded()
        if self.device_resident:
            return self.device_resident_loader()
        return self._loader(self._dataset(train, train=True), self.batch_size, shuffle=True)

    def device_resident_loader(self, device: torch.device | str | None = None) -> DeviceResidentLoader:
        """The training loader of ``device_resident=True``, usable without it too.

        ``device`` defaults to the attached trainer's root device (CPU without a trainer); under a
        multi-process trainer the loader shards like ``DistributedSampler`` by the trainer's global
        rank and world size.
        """
        train, _, _ = self._ensure_loaded()
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if device is None:
            device = trainer.strategy.root_device if trainer is not None else "cpu"
        self._resident_loader = DeviceResidentLoader(
            train, self._gaps, self.batch_size, mean=self.mean, std=self.std, pad=self.pad, flip=self.flip,
            augment=self.augment, shuffle=True, device=device, rank=rank, world_size=world_size,
            cache=self._resident_cache)
        return self._resident_loader

    def val_dataloader(self) -> DataLoader:
        _, val, _ = self._ensure_loaded()
        return self._loader(self._dataset(val, train=False), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        _, _, test = self._ensure_loaded()
        return self._loader(self._dataset(test, train=False), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def train_eval_dataloader(self, distributed: bool | None = None) -> DataLoader:
        """Ordered, un-augmented loader over the whole training set, for measurements.

        Batches carry ``idx`` and the current ``gap``. Under an initialised process group with
        more than one rank (``distributed=None`` detects it) each rank gets a shard from a
        non-shuffling ``DistributedSampler``; it pads with repeated objects, so gather results by
        ``idx`` (see ``callbacks.gather_by_index``).
        """
        train, _, _ = self._ensure_loaded()
        dataset = IndexedDataset(train, self._gaps, self.mean, self.std, augment=False)
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        sampler = DistributedSampler(dataset, shuffle=False, drop_last=False) if distributed else None
        return self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)
