"""MarginClassifier: the frozen head, gaps in the loss, arguments, channels_last."""
import lightning as L
import pytest
import torch

from datamodules import DigitsDataModule
from models import MarginClassifier


def test_head_frozen_without_bn_affine_and_unchanged_by_training():
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16},
                             head_seed=0)
    assert model.head.bn.weight is None and model.head.bn.bias is None and not model.head.bn.affine
    assert not model.head.weight.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("head")] == []
    w0 = model.head.weight.detach().clone()
    b0 = [p.detach().clone() for p in model.backbone.parameters()]
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert torch.equal(model.head.weight, w0)
    assert model.head.weight.grad is None
    assert any(not torch.equal(a, b) for a, b in zip(b0, model.backbone.parameters()))


def test_unfrozen_head_trains_and_bound():
    model = MarginClassifier(num_classes=3, input_shape=(4,), backbone="mlp", freeze_head=False, head_init="kaiming")
    assert model.head.weight.requires_grad
    torch.testing.assert_close(model.seed_mean_margin_value(), 2 / 3 * model.head.weight.detach().abs().sum())


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        MarginClassifier(num_classes=1)
    with pytest.raises(ValueError, match="scheduler_interval"):
        MarginClassifier(num_classes=3, input_shape=(2,), backbone="mlp", scheduler_interval="batch")


def test_loss_uses_batch_gap():
    model = MarginClassifier(num_classes=3, input_shape=(4,), backbone="mlp").eval()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    gap = torch.linspace(0, 2, 5)
    loss, logits = model.loss_and_logits({"x": x, "y": y, "gap": gap})
    from models import discounted_cross_entropy

    torch.testing.assert_close(loss, discounted_cross_entropy(logits, y, gap))
    assert loss > model.loss_and_logits({"x": x, "y": y})[0]


def test_channels_last_needs_images_and_stays_traceable():
    from callbacks import scale_invariant_structure

    with pytest.raises(ValueError, match="model.channels_last"):
        MarginClassifier(num_classes=3, input_shape=(4,), backbone="mlp", channels_last=True)
    model = MarginClassifier(num_classes=3, input_shape=(1, 8, 8), backbone="small_cnn", channels_last=True)
    found = scale_invariant_structure(model)  # torch.fx trace, no example input needed
    assert found["backbone.0.weight"] == ["backbone.1"]


class _Recording(MarginClassifier):
    """Keeps every training batch's loss, logits and labels, per epoch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: dict[int, list] = {}

    def log_train_metrics(self, loss, logits, y) -> None:
        self.seen.setdefault(len(self.epoch_values), []).append((loss.detach(), logits.detach(), y))
        super().log_train_metrics(loss, logits, y)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        keys = ("train/loss", "train/acc", "train/margin_mean")
        self.epoch_values.append({k: float(self.trainer.callback_metrics[k]) for k in keys})


def _margins_by_hand(logits, y):
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(1).values


def _by_hand(batches) -> dict[str, float]:
    n = sum(len(y) for _, _, y in batches)
    return {"train/loss": float(sum(loss * len(y) for loss, _, y in batches) / n),
            "train/acc": float(sum((lg.argmax(1) == y).sum() for _, lg, y in batches) / n),
            "train/margin_mean": float(torch.cat([_margins_by_hand(lg, y) for _, lg, y in batches]).mean())}


@pytest.fixture(params=[32, 3, 1], ids=["block32", "block3", "block1"])
def metric_block(request, monkeypatch):
    """Steps kept before the accuracy and margins are summed: the default, and blocks that a
    4-batch epoch fills once with a remainder, or at every step."""
    import models.classifier

    monkeypatch.setattr(models.classifier, "TRAIN_METRIC_BLOCK", request.param)
    return request.param


def test_epoch_metrics_equal_the_batches_by_hand_every_epoch_and_fit(metric_block):
    """The metric objects are registered with ``self.log`` once per epoch; the logged values must
    still be each epoch's own (reset between epochs and between fits), not a running total."""
    model = _Recording(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16})
    model.epoch_values = []
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0, limit_train_batches=4)
    L.Trainer(max_epochs=2, **kwargs).fit(model, DigitsDataModule(batch_size=32))
    L.Trainer(max_epochs=1, **kwargs).fit(model, DigitsDataModule(batch_size=16))  # a second fit, same model
    assert len(model.epoch_values) == 3
    for epoch, logged in enumerate(model.epoch_values):
        assert len(model.seen[epoch]) == 4
        expected = _by_hand(model.seen[epoch])
        for key, value in expected.items():
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (epoch, key)


def test_epoch_cut_short_by_max_steps_still_logs_its_own_batches(metric_block):
    model = _Recording(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16})
    model.epoch_values = []
    L.Trainer(max_steps=6, limit_train_batches=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
              limit_val_batches=0).fit(model, DigitsDataModule(batch_size=32))
    assert [len(model.seen[e]) for e in sorted(model.seen)] == [4, 2]
    assert len(model.epoch_values) == 2
    for epoch, logged in enumerate(model.epoch_values):
        for key, value in _by_hand(model.seen[epoch]).items():
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (epoch, key)


def test_training_metrics_are_visible_to_callbacks_at_the_epochs_end():
    """Callbacks' ``on_train_epoch_end`` runs before the module's: the epoch's values are logged
    at its last batch, so a callback reads this epoch's numbers, not the previous one's."""
    seen = []

    class Reader(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["train/acc"]))

    model = _Recording(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16})
    model.epoch_values = []
    L.Trainer(max_epochs=2, limit_train_batches=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[Reader()]).fit(model, DigitsDataModule(batch_size=32))
    assert seen == [pytest.approx(_by_hand(model.seen[e])["train/acc"]) for e in range(2)]


def test_a_training_step_outside_a_trainer_returns_the_loss():
    """A custom loop or a unit test may call training_step without a Trainer: the loss comes
    back, the metrics are simply not accumulated."""
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16})
    batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.tensor([0, 1, 2, 3]), "gap": torch.zeros(4)}
    loss = model.training_step(batch, 0)
    torch.testing.assert_close(loss, model.loss_and_logits(batch)[0])


def test_bf16_loss_is_summed_in_the_sums_precision():
    """``bf16-true`` hands a bf16 loss to the metrics: scaled by n in bf16 it would round."""
    model = _Recording(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 16})
    model.epoch_values = []
    L.Trainer(max_epochs=1, limit_train_batches=3, precision="bf16-true", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
              limit_val_batches=0).fit(model, DigitsDataModule(batch_size=600))
    batches = [(loss.double(), logits.double(), y) for loss, logits, y in model.seen[0]]
    assert model.epoch_values[0]["train/loss"] == pytest.approx(_by_hand(batches)["train/loss"], rel=1e-6)
