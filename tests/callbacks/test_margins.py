"""PerSampleMargins against margins computed by hand; quantiles, files, TensorBoard histogram."""
import os

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import PerSampleMargins
from datamodules import DigitsDataModule
from models import MarginClassifier


def _model():
    return MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                            backbone_kwargs={"width": 2}, head_seed=0)


def _hand_margins(model, dm):
    dm.setup()
    ds = dm.train_eval_dataloader(distributed=False).dataset
    x = torch.stack([ds[i]["x"] for i in range(len(ds))])
    y = torch.stack([ds[i]["y"] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    top2 = logits.topk(2, dim=1)
    runner_up = torch.where(top2.indices[:, 0] == y, top2.values[:, 1], top2.values[:, 0])
    return logits[torch.arange(len(y)), y] - runner_up


def test_margins_match_hand_computation_and_are_saved(tmp_path):
    dm = DigitsDataModule(eval_batch_size=300)
    model = _model()
    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = PerSampleMargins(every_n_epochs=1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    expected = _hand_margins(model, dm)
    assert cb.margins.shape == (dm.num_train,)
    torch.testing.assert_close(cb.margins, expected, rtol=0, atol=1e-5)
    # one measurement after the epoch; at fit end nothing new happened, so no duplicate
    assert {h["tag"] for h in cb.history} == {"epoch0000"}
    path = os.path.join(logger.log_dir, "margins", "margins_epoch0000.pt")
    assert cb.latest_path == path and torch.equal(torch.load(path), cb.margins)
    rec = {h["metric"]: h for h in cb.history}
    q1, med, q3 = np.percentile(expected.double().numpy(), [25, 50, 75])
    assert rec["margins/median"]["value"] == pytest.approx(med, abs=1e-5)
    assert rec["margins/q1"]["value"] == pytest.approx(q1, abs=1e-5)
    assert rec["margins/q3"]["value"] == pytest.approx(q3, abs=1e-5)
    assert rec["margins/frac_negative"]["value"] == pytest.approx(float((expected < 0).double().mean()))
    assert rec["margins/min"]["value"] == pytest.approx(float(expected.min()), abs=1e-5)
    assert rec["margins/median"]["bn_mode"] == "eval" and rec["margins/median"]["augmentation"].startswith("none")
    assert rec["margins/distribution"]["value"] == f"tensor[{dm.num_train}]"
    # TensorBoard got the scalars and the histogram
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert "margins/distribution" in acc.Tags()["histograms"]
    assert "margins/median" in acc.Tags()["scalars"]
    assert trainer.callback_metrics["margins/median"].item() == pytest.approx(med, abs=1e-5)
    # the boosting orchestrator's call: a round tag names the file
    cb.measure_now(trainer, model, tag="round1")
    assert os.path.exists(os.path.join(logger.log_dir, "margins", "margins_round1.pt"))
