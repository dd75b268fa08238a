"""`lightning fit` then `test`/`predict` on the same boosting config, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _lightning(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_app", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fit_then_test_predict_and_refit(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", "digits_boost.yaml", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
              "--trainer.limit_train_batches=4", "--boosting.rounds=2", f"--boosting.run_dir={run_dir}"]
    fit = _lightning(tmp_path, "fit", *common)
    assert fit.returncode == 0, fit.stderr[-3000:]
    last = json.loads((run_dir / "summary.json").read_text())["history"][-1]

    test = _lightning(tmp_path, "test", *common, "--trainer.logger=false")
    assert test.returncode == 0, test.stderr[-3000:]
    printed = {}
    for line in test.stdout.splitlines():  # Lightning's table: "│ test/boosted_acc │ 0.96... │"
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) == 2 and cells[0].startswith("test/"):
            printed[cells[0][5:]] = float(cells[1])
    for key in ("boosted_acc", "boosted_nll", "boosted_ece", "boosted_brier", "deep_acc", "deep_nll", "deep_ece",
                "deep_brier", "disagreement", "member_acc_1", "member_acc_2"):
        assert printed[key] == pytest.approx(last[key], rel=1e-6, abs=1e-7), key

    predict = _lightning(tmp_path, "predict", *common, "--trainer.logger=false")
    assert predict.returncode == 0, predict.stderr[-3000:]
    saved = torch.load(run_dir / "predictions" / "predictions.pt")
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert torch.equal(saved["member_logits"], torch.stack(state["val_logits"], 1))  # digits: test = val split

    again = _lightning(tmp_path, "fit", *common)
    assert again.returncode == 0 and "run complete (2/2 rounds)" in " ".join(again.stdout.split())
    assert "boosting round" not in again.stdout
    changed = _lightning(tmp_path, "fit", *common[:2], "--trainer.max_epochs=3", *common[3:])
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1].startswith(f"error: resume of {run_dir}: trainer.max_epochs: 1 -> 3")
