import numpy as np
import pytest

from lightning_app import member_seed
from marginboost.errors import ConfigError


def test_runs_with_seeds_0_and_1_share_no_member_seed():
    rounds = 50
    run0 = [member_seed(0, t) for t in range(1, rounds + 1)]
    run1 = [member_seed(1, t) for t in range(1, rounds + 1)]
    assert not set(run0) & set(run1)  # the old scheme seed + t − 1 shared 49 of 50
    assert len(set(run0)) == rounds
    assert len({member_seed(s, t) for s in range(10) for t in range(1, 6)}) == 50


def test_member_seed_is_the_seed_sequence_hash_and_a_valid_lightning_seed():
    expected = int(np.random.SeedSequence([7, 2]).generate_state(1)[0])
    assert member_seed(7, 3) == expected and member_seed(7, 3) == member_seed(7, 3)
    assert all(0 <= member_seed(s, t) <= 2**32 - 1 for s in (0, 1, 10**9) for t in (1, 2, 3))
    with pytest.raises(ConfigError, match="^boosting.seed: -1"):
        member_seed(-1, 1)
