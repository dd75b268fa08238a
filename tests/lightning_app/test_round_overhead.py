"""What a boosting round runs besides ``fit``: the margin pass only when needed, shared with an
attached ``PerSampleMargins``, and the time it costs reported in the summary."""
import json

import pytest
import torch

import marginboost.per_sample as per_sample
from callbacks import PerSampleMargins
from lightning_app import BoostingOrchestrator, MeanGapRule, NoGapRule
from marginboost.errors import ConfigError
from tests.helpers import tiny_boosting_run


def _run(tmp_path, name, rule, callbacks=(), **orchestrator_kwargs):
    summary, orch = tiny_boosting_run(tmp_path / name, rounds=2, gap_rule=rule, num_train=96, num_val=40, seed=1,
                                      callbacks=callbacks, **orchestrator_kwargs)
    return summary, orch.state


@pytest.fixture
def training_passes(monkeypatch):
    """Counts the per-sample passes over the whole training set (96 objects)."""
    calls = []
    original = per_sample.per_sample_outputs

    def counting(model, loader, num_total, outputs, device=None):
        if num_total == 96:
            calls.append(num_total)
        return original(model, loader, num_total, outputs, device)

    monkeypatch.setattr(per_sample, "per_sample_outputs", counting)
    import callbacks.functional.margins as functional_margins

    monkeypatch.setattr(functional_margins, "per_sample_outputs", counting)
    import callbacks.theory as theory

    monkeypatch.setattr(theory, "per_sample_outputs", counting)
    return calls


def test_deep_ensemble_scores_no_training_margins_unless_asked(tmp_path, training_passes):
    summary, state = _run(tmp_path, "deep", NoGapRule())
    assert training_passes == []
    assert all(r["member_train_margin"] is None and r["ensemble_train_margin"] is None for r in summary["history"])
    assert state["train_logit_sum"] is None and torch.equal(state["M"], torch.zeros(96))
    assert torch.equal(state["gaps"], torch.zeros(96))
    # Its dashboard has the gap figure and the validation scalars, and no margin figure or scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "deep" / "ensemble")).Reload()
    images, scalars = events.Tags()["images"], events.Tags()["scalars"]
    assert "figures/gap_cdf" in images and "figures/margin_cdf" not in images
    assert [e.step for e in events.Scalars("ensemble/boosted_acc")] == [1, 2]
    assert not any("train_margin" in tag for tag in scalars)

    asked, asked_state = _run(tmp_path, "deep_scored", NoGapRule(), training_margins=True)
    assert training_passes == [96, 96]  # one pass per round
    assert all(r["member_train_margin"] is not None for r in asked["history"])
    # The other numbers do not depend on whether the training set was scored.
    for a, b in zip(summary["history"], asked["history"]):
        assert a["boosted_acc"] == b["boosted_acc"] and a["deep_nll"] == b["deep_nll"]
    assert asked_state["M"].abs().sum() > 0


def test_training_margins_false_with_a_rule_that_needs_them_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^boosting.training_margins: False; allowed: true or null"):
        BoostingOrchestrator(2, MeanGapRule(), tmp_path / "x", training_margins=False)
    with pytest.raises(ConfigError, match=r"^boosting.training_margins"):
        BoostingOrchestrator(2, NoGapRule(), tmp_path / "x", training_margins="yes")


def test_attached_per_sample_margins_shares_the_rounds_margin_pass(tmp_path, training_passes):
    alone, alone_state = _run(tmp_path, "alone", MeanGapRule())
    assert training_passes == [96, 96]
    training_passes.clear()
    made = []

    def margins_callback():
        made.append(PerSampleMargins(every_n_epochs=None, at_fit_end=True, save=False))
        return made[-1]

    shared, shared_state = _run(tmp_path, "shared", MeanGapRule(), callbacks=[margins_callback])
    assert training_passes == [96, 96]  # the callback's fit-end pass, reused by the round
    assert len(made) == 2 and all(c.logits is not None for c in made)
    torch.testing.assert_close(shared_state["M"], alone_state["M"])
    torch.testing.assert_close(shared_state["gaps"], alone_state["gaps"])
    # The callback's margins are the round's member margins.
    member = torch.load(tmp_path / "shared" / "round_2" / "margins.pt", weights_only=True)["member_margins"]
    torch.testing.assert_close(made[1].margins, member)


def test_per_epoch_per_sample_margins_also_shares_its_last_pass(tmp_path, training_passes):
    """The default PerSampleMargins measures every epoch; its last-epoch pass is on the final
    weights (the fit-end pass is skipped at the same step), and the round reuses it."""
    made = []

    def margins_callback():
        made.append(PerSampleMargins(every_n_epochs=1, save=False))
        return made[-1]

    _, state = _run(tmp_path, "per_epoch", MeanGapRule(), callbacks=[margins_callback])
    assert training_passes == [96, 96]
    assert [c.history[-1]["tag"] for c in made] == ["epoch0000", "epoch0000"]
    member = torch.load(tmp_path / "per_epoch" / "round_2" / "margins.pt", weights_only=True)["member_margins"]
    torch.testing.assert_close(made[1].margins, member)


def test_summary_reports_the_non_fit_share_of_each_round(tmp_path):
    summary, _ = _run(tmp_path, "timed", MeanGapRule())
    on_disk = json.loads((tmp_path / "timed" / "summary.json").read_text())
    assert on_disk["overhead"] == pytest.approx(summary["overhead"])
    rounds = summary["history"]
    for r in rounds:
        assert r["round_seconds"] > r["fit_seconds"] > 0
        assert r["overhead"] == pytest.approx((r["round_seconds"] - r["fit_seconds"]) / r["fit_seconds"])
    total = sum(r["round_seconds"] - r["fit_seconds"] for r in rounds) / sum(r["fit_seconds"] for r in rounds)
    assert summary["overhead"] == pytest.approx(total)
    state = torch.load(tmp_path / "timed" / "state.pt", weights_only=False)
    assert state["history"][-1]["round_seconds"] == rounds[-1]["round_seconds"]


def test_margin_theory_check_also_hands_its_last_pass_to_the_round(tmp_path, training_passes):
    """The Fashion-MNIST configs attach MarginTheoryCheck, which passes over the training set
    every epoch: its last pass (final weights) is the round's, and M is what a pass of its own gives."""
    from callbacks import MarginTheoryCheck

    _, alone = _run(tmp_path, "alone", MeanGapRule())
    training_passes.clear()
    made = []

    def theory_callback():
        made.append(MarginTheoryCheck(max_margin_steps=0))
        return made[-1]

    _, shared = _run(tmp_path, "theory", MeanGapRule(), callbacks=[theory_callback])
    assert training_passes == [96, 96]  # its per-epoch passes only (1 epoch a member)
    assert all(c.keep_logits and c.logits is not None for c in made)
    torch.testing.assert_close(shared["M"], alone["M"])


def test_no_shared_pass_when_the_member_trains_on_several_processes(tmp_path):
    """Under DDP each rank measures with its own BN statistics, the round with rank 0's. Lightning
    starts the process group inside fit, so the choice is made from the trainer's world size."""
    import lightning as L

    orch = BoostingOrchestrator(2, MeanGapRule(), tmp_path / "x")
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                    callbacks=[PerSampleMargins(save=False)])
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    callbacks=[PerSampleMargins(save=False)])
    assert orch._shareable_margin_callback(ddp) is None
    assert isinstance(orch._shareable_margin_callback(one), PerSampleMargins)
