"""The CUDA paths, checked against the CPU or exact answers; skipped where no GPU is visible.

CI has no GPU: these run on a GPU machine (`python -m pytest -q tests/test_cuda_paths.py`).
"""
import copy

import lightning as L
import pytest
import torch

from datamodules import DigitsDataModule, Toy2DDataModule
from marginboost import collect_logits
from models import HessianOperator, MarginClassifier, margins
from models.curvature import _probe_block
from tests.helpers import hessian_problem
from tests.models.test_classifier import _by_hand, _Recording

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_hessian_vector_products_on_cuda_match_the_exact_hessian():
    net, batches, H, _, _ = hessian_problem()
    net = copy.deepcopy(net).to(CUDA)
    on_gpu = [{k: v.to(CUDA) for k, v in b.items()} for b in batches]
    for backend, reuse in (("double_backward", True), ("double_backward", False), ("func", False)):
        op = HessianOperator(net, None, on_gpu, backend=backend, chunk_size=2, reuse_graph=reuse)
        V = torch.randn(3, op.dim, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(V.to(CUDA)).cpu(), V @ H, atol=1e-10, rtol=1e-8)


def test_rademacher_probes_do_not_depend_on_the_device():
    for dim in (1, 63, 64, 65, 1000):
        cpu = _probe_block(5, dim, torch.Generator().manual_seed(3), torch.float32, "cpu")
        gpu = _probe_block(5, dim, torch.Generator().manual_seed(3), torch.float32, CUDA)
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_training_metrics_under_bf16_on_cuda_equal_the_batches_by_hand():
    model = _Recording(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn", backbone_kwargs={"width": 8})
    model.epoch_values = []
    L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=2, limit_train_batches=5,
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=32))
    assert len(model.epoch_values) == 2
    for epoch, logged in enumerate(model.epoch_values):
        expected = _by_hand([(loss.float().cpu(), logits.float().cpu(), y.cpu()) for loss, logits, y in model.seen[epoch]])
        for key, value in expected.items():
            assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (epoch, key)


def test_margin_pass_on_cuda_equals_the_cpu_pass():
    dm = DigitsDataModule(batch_size=64)
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 8}).eval()
    cpu_logits, y = collect_logits(model, dm.train_eval_dataloader(), dm.num_train, "cpu")
    gpu_logits, _ = collect_logits(copy.deepcopy(model).to(CUDA), dm.train_eval_dataloader(), dm.num_train, CUDA)
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(margins(gpu_logits, y.to(CUDA)).cpu(), margins(cpu_logits, y), atol=2e-4, rtol=1e-4)


def test_boosting_on_cuda_scores_the_members_it_saved(tmp_path):
    from lightning_app import BoostedEnsemble, BoostingOrchestrator, MeanGapRule

    def make_model(t, seed):
        return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})

    def make_trainer(t, round_dir):
        return L.Trainer(max_epochs=2, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(round_dir))

    dm = Toy2DDataModule(num_train=96, num_val=40, batch_size=32, device_resident=True)
    orch = BoostingOrchestrator(2, MeanGapRule(), tmp_path / "run", seed=1)
    orch.run(make_model, make_trainer, dm)
    ensemble = BoostedEnsemble.from_run_dir(tmp_path / "run")
    total = torch.zeros(96)
    for member in ensemble.members:
        logits, y = collect_logits(member.cpu(), dm.train_eval_dataloader(), dm.num_train, "cpu")
        total += margins(logits, y)
    torch.testing.assert_close(orch.state["M"], total, atol=1e-4, rtol=1e-4)
