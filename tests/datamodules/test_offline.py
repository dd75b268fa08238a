"""Toy2D: the kinds and the argument errors."""
import pytest

from datamodules import (
    Toy2DDataModule,
)


def test_toy_kinds_and_errors():
    for kind in ("moons", "circles", "spirals"):
        dm = Toy2DDataModule(kind=kind, num_train=50, num_val=10)
        assert dm.num_train == 50 and set(dm.train_targets.unique().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="data.kind"):
        Toy2DDataModule(kind="blobs")
