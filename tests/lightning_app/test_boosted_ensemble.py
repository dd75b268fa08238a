import lightning as L
import pytest
import torch

from datamodules import Toy2DDataModule
from lightning_app import (
    BoostedEnsemble,
    BoostingOrchestrator,
    ClippedGapRule,
    EnsemblePredictionWriter,
    brier_score,
    ensemble_metrics,
    resolve_config,
)
from models import MarginClassifier


def _dm():
    return Toy2DDataModule(num_train=40, num_val=23, batch_size=16, eval_batch_size=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")

    def make_model(t, seed):
        return MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 8})

    def make_trainer(t, round_dir):
        return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)

    summary = BoostingOrchestrator(2, ClippedGapRule(-1.0, 2.0), run_dir, seed=1).run(make_model, make_trainer, _dm())
    return run_dir, summary, torch.load(run_dir / "state.pt", weights_only=True)


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_from_run_dir_reproduces_the_stored_validation_logits(run):
    run_dir, _, state = run
    ensemble = BoostedEnsemble.from_run_dir(run_dir)
    assert ensemble.num_members == 2
    dm = _dm()
    x = torch.cat([b["x"] for b in dm.val_dataloader()])
    per_member = ensemble.member_logits(x)
    for t in range(2):
        assert torch.equal(per_member[t], state["val_logits"][t])
    logits, members = ensemble(x, return_members=True)
    assert torch.equal(members, per_member) and torch.allclose(logits, per_member.sum(0))
    deep = BoostedEnsemble.from_run_dir(run_dir, mode="deep")
    probs, member_probs = deep(x, return_members=True)
    torch.testing.assert_close(probs, (state["val_logits"][0].softmax(-1) + state["val_logits"][1].softmax(-1)) / 2)
    assert torch.equal(member_probs, per_member.softmax(-1))
    assert BoostedEnsemble.from_run_dir(run_dir, rounds=1).num_members == 1


def test_test_and_validate_log_the_summary_metrics(run):
    run_dir, summary, _ = run
    last = summary["history"][-1]
    for stage in ("test", "validate"):
        out = getattr(_trainer(), stage)(BoostedEnsemble.from_run_dir(run_dir), datamodule=_dm())[0]
        prefix = "test" if stage == "test" else "val"
        keys = [k for k in last if k.startswith(("boosted_", "deep_", "member_", "disagreement"))
                and not k.endswith("train_margin")]
        assert len(keys) == 9 + 4 * 2
        for key in keys:  # logged as float32
            assert out[f"{prefix}/{key}"] == torch.tensor(last[key], dtype=torch.float32).item(), key


def test_predict_writes_member_logits_and_probabilities(run, tmp_path):
    run_dir, _, state = run
    writer = EnsemblePredictionWriter(tmp_path)
    _trainer(callbacks=[writer]).predict(BoostedEnsemble.from_run_dir(run_dir), datamodule=_dm(),
                                         return_predictions=False)
    saved = torch.load(tmp_path / "predictions.pt")
    assert torch.equal(saved["idx"], torch.arange(23))
    member_logits = torch.stack(state["val_logits"], 1)  # Toy2D's test split is its validation split
    assert torch.equal(saved["member_logits"], member_logits)
    torch.testing.assert_close(saved["boosted_probs"], member_logits.sum(1).softmax(-1))
    torch.testing.assert_close(saved["deep_probs"], member_logits.softmax(-1).mean(1))


def test_brier_and_member_metrics_by_hand():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 3.0], [3.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    m = ensemble_metrics([a, b], y)
    p = (a + b).double().softmax(1)
    by_hand = sum((p[i, k] - float(k == y[i])) ** 2 for i in range(3) for k in range(2)) / 3
    assert m["boosted_brier"] == pytest.approx(by_hand.item())
    assert brier_score(torch.tensor([[0.5, 0.5]]), torch.tensor([1])) == pytest.approx(0.5)
    assert m["member_nll_2"] == pytest.approx(torch.nn.functional.cross_entropy(b, y).item(), rel=1e-6)
    assert m["member_acc_1"] == pytest.approx(2 / 3) and "member_acc_0" not in m


def test_cli_test_with_ckpt_path_to_the_run_dir(run, tmp_path, monkeypatch):
    """``lightning test --config <boosting config> --ckpt_path RUN_DIR`` evaluates that run."""
    from lightning_app import build_cli

    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml in the working directory

    run_dir, summary, _ = run
    cli = build_cli(["test", "--config", resolve_config("digits_boost.yaml"), "--ckpt_path", str(run_dir),
                     "--data=datamodules.Toy2DDataModule", "--data.init_args.num_train=40",
                     "--data.init_args.num_val=23", "--data.init_args.eval_batch_size=10",
                     "--model.init_args.backbone=mlp", "--model.init_args.backbone_kwargs={width: 8}",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    logged = cli.trainer.callback_metrics
    last = summary["history"][-1]
    for key in ("boosted_acc", "boosted_nll", "deep_nll", "member_acc_2", "disagreement"):
        assert logged[f"test/{key}"].item() == torch.tensor(last[key], dtype=torch.float32).item(), key
