import lightning as L
import pytest
import torch

from callbacks import MarginTheoryCheck, theorem1_summary
from datamodules import DigitsDataModule
from marginboost.errors import ConfigError
from models import MarginClassifier, max_bn_mean_margin


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _EpochMargins(L.Callback):
    """The classifier's own train/margin_mean (train mode, augmented batches) after every epoch."""

    def __init__(self):
        self.values = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics["train/margin_mean"]))


def test_logged_theory_values_match_margins_by_hand_and_the_maximum_holds():
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    gaps = torch.linspace(0.0, 3.0, dm.num_train)  # Theorem 1 with per-object gaps
    dm.set_gaps(gaps)
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp",
                             backbone_kwargs={"width": 64, "depth": 1}, head_seed=0)
    check, margins_seen = MarginTheoryCheck(every_n_epochs=1, max_margin_steps=300), _EpochMargins()
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[check, margins_seen])
    trainer.fit(model, datamodule=dm)
    # ground truth: margins of the trained model, computed here object by object in eval mode
    model.eval()
    train = dm._ensure_loaded()[0]
    with torch.no_grad():
        x = (train.x.float() / 255 - dm.mean) / dm.std
        logits = model(x)
    y = train.y
    own = logits[torch.arange(len(y)), y]
    rival = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    m = own - rival
    last = {r["metric"]: r["value"] for r in check.history if r["epoch"] == 3}
    assert last["train/min_margin"] == pytest.approx(m.min().item(), abs=1e-4)
    assert last["train/frac_below_gap"] == pytest.approx((m < gaps).double().mean().item(), abs=1e-9)
    assert last["train/eval_acc"] == pytest.approx((m > 0).double().mean().item(), abs=1e-9)
    # the maximum: for this head and these class frequencies, above every mean margin reached
    freq = torch.bincount(y, minlength=10).double()
    expected, _ = max_bn_mean_margin(model.head.weight, freq, steps=300)
    assert last["train/max_mean_margin"] == pytest.approx(expected)
    reached = margins_seen.values + [r["value"] for r in check.history if r["metric"] == "train/eval_margin_mean"]
    assert len(reached) == 8 and max(reached) > 1.0  # training did push the margins up
    assert all(v <= expected for v in reached)


def test_theorem1_summary_by_hand():
    s = theorem1_summary(torch.tensor([0.5, 2.0, -1.0, 3.0]), torch.tensor([1.0, 1.0, 0.0, 3.0]))
    assert s == {"min_margin": -1.0, "frac_below_gap": 0.5, "eval_acc": 0.75, "eval_margin_mean": 1.125}


def test_model_without_a_head_is_refused():
    with pytest.raises(ConfigError, match="^MarginTheoryCheck: Linear; allowed"):
        MarginTheoryCheck().check(None, torch.nn.Linear(2, 2))
