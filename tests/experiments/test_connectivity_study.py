"""The connectivity study script end to end on a tiny grid (real Fashion-MNIST files)."""

import json
from pathlib import Path

import pytest

from models import path_metrics

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_study_writes_consistent_tables(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("connectivity_study", "experiments/connectivity.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    study.main(["--widths", "4", "--seeds", "2", "--epochs", "1", "--priors", "none", "--train-eval", "500",
                "--grid", "5", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "connectivity.json").read_text())
    rows = {r["method"]: r for r in res["records"]}
    assert set(rows) == set(study.DEFAULT_METHODS)
    for row in rows.values():  # every cell is the metric of its own stored curve
        curve = row["curve"]
        m = path_metrics([r["t"] for r in curve], [r["test_loss"] for r in curve], [r["test_acc"] for r in curve])
        assert row["test_max_acc_loss"] == pytest.approx(m["max_acc_loss"])
    # aligned B computes B's function: the t = 1 end of every method has B's accuracy and loss
    end = rows["Linear"]["curve"][-1]
    for method in study.DEFAULT_METHODS:
        assert rows[method]["curve"][-1]["test_acc"] == end["test_acc"]
        assert rows[method]["curve"][-1]["test_loss"] == pytest.approx(end["test_loss"], abs=1e-5)
        assert rows[method]["curve"][0] == rows["Linear"]["curve"][0]  # t = 0 is A for all
    md = (tmp_path / "connectivity.md").read_text()
    assert "| without prior | 4 |" in md and "| Arc + OT |" in md and "45.74" in md  # ours and the seed's
    assert (tmp_path / "connectivity.png").stat().st_size > 10_000
