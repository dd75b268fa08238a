import lightning as L
import pytest
import torch

from datamodules import Toy2DDataModule
from lightning_app import BoostingOrchestrator, NoGapRule, warm_start
from models import MarginClassifier


class _StartWeights(L.Callback):
    def __init__(self):
        self.start = None

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _make_model(r, seed):
    return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8},
                            lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2))


def _run(run_dir, rounds, recorders):
    def make_trainer(r, round_dir):
        return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(round_dir), callbacks=[recorders[r - 1]])

    dm = Toy2DDataModule(num_train=32, num_val=8, batch_size=16)
    orch = BoostingOrchestrator(rounds, NoGapRule(), run_dir, seed=0)
    orch.run(warm_start(_make_model, run_dir), make_trainer, dm)
    return orch


def _member_state(run_dir, t):
    return torch.load(run_dir / f"round_{t}" / "member.ckpt", weights_only=False)["state_dict"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_each_member_starts_from_the_previous_one_and_resume_is_identical(tmp_path):
    recorders = [_StartWeights() for _ in range(3)]
    _run(tmp_path / "a", 3, recorders)
    for t in (2, 3):
        previous = _member_state(tmp_path / "a", t - 1)
        assert recorders[t - 1].start.keys() == previous.keys()
        for k, v in previous.items():  # parameters and BN buffers (incl. num_batches_tracked)
            assert torch.equal(recorders[t - 1].start[k], v), k
        # and training moved on from there
        assert not torch.equal(_member_state(tmp_path / "a", t)["backbone.1.weight"], previous["backbone.1.weight"])
    # killed after round 2 and resumed: member 3 starts from member 2's checkpoint on disk, the same
    _run(tmp_path / "b", 2, [_StartWeights() for _ in range(2)])
    resumed = [None, None, _StartWeights()]
    _run(tmp_path / "b", 3, resumed)
    for k, v in recorders[2].start.items():
        assert torch.equal(resumed[2].start[k], v), k
    for k, v in _member_state(tmp_path / "a", 3).items():
        assert torch.equal(_member_state(tmp_path / "b", 3)[k], v), k


def test_warm_start_needs_the_previous_member(tmp_path):
    with pytest.raises(FileNotFoundError, match="round_1/member.ckpt"):
        warm_start(_make_model, tmp_path)(2, 0)
    assert isinstance(warm_start(_make_model, tmp_path)(1, 0), MarginClassifier)  # member 1: fresh
