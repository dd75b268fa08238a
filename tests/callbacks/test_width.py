"""GradientNormWidth: restored running statistics, the recorded batch size, override errors."""
import copy

import lightning as L
import pytest
import torch

from callbacks import (
    GradientNormWidth,
    gradient_norm_width,
)
from datamodules import DigitsDataModule
from models import MarginClassifier


def test_width_callback_restores_running_stats_and_records_batch_size(tmp_path):
    dm = DigitsDataModule(batch_size=128, eval_batch_size=512)
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 2}, head_seed=0)
    before = copy.deepcopy(model.state_dict())
    cb = GradientNormWidth(num_batches=3)
    out = cb.measure_now(None, model, datamodule=dm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    rec = cb.history[0]
    assert rec["metric"] == "width/width" and rec["batch_size"] == 128 and rec["num_samples"] == 384
    assert rec["bn_mode"] == "train" and rec["normalize"] and rec["scale_invariant"] == 3
    assert out["width"].stderr > 0 and out["scale_invariant_tensors"].value == 3.0
    # the same subset as the plain function on hand-built batches
    dm.setup()
    ds = dm.train_eval_dataloader(distributed=False).dataset
    order = torch.randperm(dm.num_train, generator=torch.Generator().manual_seed(0))[:384].split(128)
    batches = [torch.utils.data.default_collate([ds[i] for i in idx.tolist()]) for idx in order]
    assert gradient_norm_width(model, None, batches).value == pytest.approx(out["width"].value, rel=1e-6)


def test_width_override_errors_before_training(tmp_path):
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 2}, head_seed=0)
    cb = GradientNormWidth(scale_invariant=["backbone.0.weight", "head.linear.weight"])
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"GradientNormWidth.scale_invariant: 'head.linear.weight'; allowed: regular expressions matching trainable"):
        trainer.fit(model, DigitsDataModule())
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match=r"GradientNormWidth.scale_invariant: 'backbone.0.weight'; allowed: a list of regular expressions"):
        GradientNormWidth(scale_invariant="backbone.0.weight")
    # an explicit list is used as given
    ok = GradientNormWidth(scale_invariant=["backbone.0.weight"], num_batches=1)
    ok.measure_now(None, model, datamodule=DigitsDataModule())
    assert ok.history[0]["scale_invariant"] == 1
