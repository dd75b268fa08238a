"""SharpnessCallback: exact restoration, schedule, reduction, logging, history, errors, the example."""
import csv
import importlib.util
import inspect
import os
import random
import sys

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.func import functional_call, grad

from callbacks import (
    GradientNormWidth,
    HessianEigenvalues,
    HessianTrace,
    Measurement,
    PerSampleMargins,
    SharpnessCallback,
)
from datamodules import DigitsDataModule
from models import MarginClassifier, discounted_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_example():
    spec = importlib.util.spec_from_file_location("fisher_trace", os.path.join(ROOT, "examples", "fisher_trace.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["fisher_trace"] = module  # inspect.getsource finds the class through it
    spec.loader.exec_module(module)
    return module


def _model():
    return MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                            backbone_kwargs={"width": 2}, head_seed=0)


def _trainer(tmp_path, callbacks, **kw):
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                log_every_n_steps=1, callbacks=callbacks)
    args.update(kw)
    return L.Trainer(**args)


class _MeanLoss(SharpnessCallback):
    name = "meanloss"

    def measure(self, pl_module, batches):
        total = sum(self.loss(pl_module, b) * b["y"].shape[0] for b in batches)
        return {"value": total / batches.num_samples}


class _Vandal(SharpnessCallback):
    """Changes everything a measurement could change; the base must undo all of it."""

    name = "vandal"

    def measure(self, pl_module, batches):
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(1.0)
                if p.grad is not None:
                    p.grad.mul_(3.0)
                else:
                    p.grad = torch.ones_like(p)
            for b in pl_module.buffers():
                b.add_(1)
        pl_module.train()
        for b in batches:
            pl_module(b["x"])  # BN in train mode: running stats and num_batches_tracked move
        pl_module.head.linear.weight.requires_grad_(True)
        torch.rand(3), np.random.rand(3), random.random()
        return {"value": 1.0}


def _snapshot(model):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "ids": {n: id(p) for n, p in model.named_parameters()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "modes": {n: m.training for n, m in model.named_modules()},
            "torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state(), "py_rng": random.getstate()}


def _assert_same(a, b):
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
        assert a["ids"][n] == b["ids"][n] and a["grad_ids"][n] == b["grad_ids"][n], n
        assert (a["grads"][n] is None) == (b["grads"][n] is None), n
        if a["grads"][n] is not None:
            assert torch.equal(a["grads"][n], b["grads"][n]), n
    assert a["requires_grad"] == b["requires_grad"]
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n], b["buffers"][n]), n
    assert a["modes"] == b["modes"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert all(np.array_equal(x, y) for x, y in zip(a["np_rng"], b["np_rng"]))
    assert a["py_rng"] == b["py_rng"]


class _ListLoaderDigits(DigitsDataModule):
    """train_eval_dataloader() returns a plain list of batches (no indexable dataset)."""

    def train_eval_dataloader(self, distributed=None):
        return list(super().train_eval_dataloader(distributed=False))


def test_every_callback_leaves_model_and_rng_bitwise_unchanged(tmp_path):
    dm = DigitsDataModule(batch_size=64, eval_batch_size=256)
    model = _model()
    _trainer(tmp_path, []).fit(model, dm)  # non-trivial BN statistics and num_batches_tracked
    for i, p in enumerate(model.parameters()):
        if p.requires_grad and i % 2 == 0:
            p.grad = torch.randn_like(p)  # some grads set, some None
    model.train()
    model.backbone[1].eval()  # mixed modes survive too
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    fisher = _load_example().FisherTrace(num_batches=1)
    callbacks = [PerSampleMargins(save=False), GradientNormWidth(num_batches=2),
                 HessianTrace(probes=4, num_batches=1), HessianEigenvalues(k=1, max_iter=4, num_batches=1),
                 fisher, _Vandal(num_batches=1)]
    for cb in callbacks:
        before = _snapshot(model)
        cb.measure_now(None, model, datamodule=dm)
        _assert_same(before, _snapshot(model))


def test_schedule_logging_history_and_reduction(tmp_path):
    dm = DigitsDataModule(batch_size=64, eval_batch_size=200)
    model = _model()
    cb = _MeanLoss(every_n_epochs=2, num_batches=2, seed=3)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [cb], max_epochs=3, logger=logger)
    trainer.fit(model, dm)
    assert [h["tag"] for h in cb.history] == ["epoch0001", "fit_end"]
    assert [h["global_step"] for h in cb.history] == [4, 6]
    # the mean loss over the seeded subset, by hand, in eval mode
    ds = dm.train_eval_dataloader(distributed=False).dataset
    idx = torch.randperm(dm.num_train, generator=torch.Generator().manual_seed(3))[:400].tolist()
    batch = torch.utils.data.default_collate([ds[i] for i in idx])
    model.eval()
    with torch.no_grad():
        expected = discounted_cross_entropy(model(batch["x"]), batch["y"], batch["gap"]).item()
    model.train()
    assert cb.history[-1]["value"] == pytest.approx(expected, rel=1e-5)
    rec = cb.history[-1]
    for key in ("criterion", "data", "augmentation", "bn_mode", "batch_size", "num_samples", "seed", "dtype",
                "stderr", "world_size"):
        assert key in rec, key
    assert rec["batch_size"] == 200 and rec["num_samples"] == 400 and rec["seed"] == 3 and rec["world_size"] == 1
    assert "seeded subset of 400" in rec["data"]
    assert trainer.callback_metrics["meanloss/value"].item() == pytest.approx(expected, rel=1e-5)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("meanloss/value")]
    assert [int(r["step"]) for r in rows] == [4, 6]
    # the same seeded subset every time: a second call gives the same number
    assert cb.measure_now(None, model, datamodule=dm)["value"].value == pytest.approx(expected, rel=1e-5)


def test_rich_progress_task_is_added_and_removed(tmp_path, monkeypatch):
    seen = {"add": 0, "remove": 0}
    from lightning.pytorch.callbacks.progress.rich_progress import CustomProgress

    add, remove = CustomProgress.add_task, CustomProgress.remove_task

    def spy_add(self, description, *a, **k):
        seen["add"] += description.startswith("measuring")
        return add(self, description, *a, **k)

    def spy_remove(self, task_id):
        seen["remove"] += 1
        return remove(self, task_id)

    monkeypatch.setattr(CustomProgress, "add_task", spy_add)
    monkeypatch.setattr(CustomProgress, "remove_task", spy_remove)
    cb = HessianTrace(probes=4, chunk_size=2, num_batches=1, at_fit_end=False)
    _trainer(tmp_path, [cb, RichProgressBar()], enable_progress_bar=True).fit(_model(), DigitsDataModule())
    assert seen["add"] == 1 and seen["remove"] >= 1 and len(cb.history) > 0


def test_bad_configuration_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"_MeanLoss.every_n_epochs: -1; allowed: an integer >= 0"):
        _MeanLoss(every_n_epochs=-1)
    with pytest.raises(ValueError, match=r"_MeanLoss.num_batches: 0; allowed: an integer >= 1"):
        _MeanLoss(num_batches=0)
    with pytest.raises(ValueError, match=r"_MeanLoss.bn_mode: 'frozen'; allowed: 'eval', 'train'"):
        _MeanLoss(bn_mode="frozen")
    with pytest.raises(ValueError, match=r"_MeanLoss.criterion: 'mse'; allowed:"):
        _MeanLoss(criterion="mse")
    dm = DigitsDataModule()
    dm.setup()
    trainer = _trainer(tmp_path, [_MeanLoss()])
    with pytest.raises(ValueError, match=r"_MeanLoss.datamodule: none; allowed: a DataModule with train_eval_dataloader"):
        trainer.fit(_model(), train_dataloaders=dm.train_dataloader())
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match=r"GradientNormWidth.batch_size: 5000; allowed: at most the training-set size 1438"):
        GradientNormWidth(batch_size=5000).measure_now(None, _model(), datamodule=dm)


def test_fisher_example_matches_per_sample_gradients_by_hand():
    module = _load_example()
    source = inspect.getsource(module.FisherTrace)
    assert len(source.strip().splitlines()) < 30
    dm = DigitsDataModule(eval_batch_size=16)
    model = _model()
    out = module.FisherTrace(num_batches=1, seed=1).measure_now(None, model, datamodule=dm)
    ds = dm.train_eval_dataloader(distributed=False).dataset
    idx = torch.randperm(dm.num_train, generator=torch.Generator().manual_seed(1))[:16].tolist()
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    sq = []
    for i in idx:  # one sample at a time, plain torch.func.grad
        s = ds[i]

        def loss(p, s=s):
            return discounted_cross_entropy(functional_call(model, p, (s["x"][None],)), s["y"][None], s["gap"][None])

        sq.append(sum(g.pow(2).sum() for g in grad(loss)(params).values()))
    sq = torch.stack(sq)
    assert out["trace"].value == pytest.approx(sq.mean().item(), rel=1e-4)
    assert out["trace"].stderr == pytest.approx((sq.std() / 4).item(), rel=1e-3)
    assert isinstance(out["trace"], Measurement)


def test_loader_without_indexable_dataset_gives_same_numbers():
    model = _model()
    plain, listed = DigitsDataModule(eval_batch_size=400), _ListLoaderDigits(eval_batch_size=400)
    a, b = PerSampleMargins(save=False), PerSampleMargins(save=False)
    a.measure_now(None, model, datamodule=plain)
    b.measure_now(None, model, datamodule=listed)
    assert torch.equal(a.margins, b.margins)
    ta = HessianTrace(probes=4, per_layer=False).measure_now(None, model, datamodule=plain)["trace"].value
    tb = HessianTrace(probes=4, per_layer=False).measure_now(None, model, datamodule=listed)["trace"].value
    assert ta == pytest.approx(tb, rel=1e-6)
    sub = HessianTrace(probes=4, num_batches=1)
    sub.measure_now(None, model, datamodule=listed)
    assert sub.history[0]["num_samples"] == 400 and "first 1 batches" in sub.history[0]["data"]
