"""A 2-process CPU DDP run gives the same margins, width, trace and eigenvalues as 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_metrics.py")


def _run(devices: int, out) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, "--devices", str(devices), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"devices={devices} rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = _run(1, tmp_path / "one"), _run(2, tmp_path / "two")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # per-sample margins: every object exactly once, same values (fit end and a boosting round)
    assert one["margin_files"] == two["margin_files"] == ["margins_fit_end.pt", "margins_round0.pt"]
    for name in one["margin_files"]:
        m1 = torch.load(tmp_path / "one" / "margins" / name)
        m2 = torch.load(tmp_path / "two" / "margins" / name)
        assert m1.shape == (1347,)
        torch.testing.assert_close(m2, m1, rtol=0, atol=1e-6)
    # the DataModule's DistributedSampler shards (padded to 1348) gathered by index
    s1 = torch.load(tmp_path / "one" / "sampler_margins.pt")
    s2 = torch.load(tmp_path / "two" / "sampler_margins.pt")
    torch.testing.assert_close(s2, s1, rtol=0, atol=1e-5)
    torch.testing.assert_close(s1, torch.load(tmp_path / "one" / "margins" / "margins_round0.pt"), rtol=0, atol=1e-5)
    # a single batch in all: rank 1 has nothing to measure and still joins every collective
    torch.testing.assert_close(torch.load(tmp_path / "two" / "lone_margins.pt"), s1, rtol=0, atol=1e-5)
    assert two["lone_trace"] == pytest.approx(one["lone_trace"], rel=1e-6)
    # scalars: width (mean over 13 minibatches), trace (+ per layer), top-2 eigenvalues
    assert set(one["fit_end"]) == set(two["fit_end"]) and "hessian/trace" in one["fit_end"]
    for key, value in one["fit_end"].items():
        assert two["fit_end"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert two["width_round0"] == pytest.approx(one["width_round0"], rel=1e-6)
    assert one["width_round0"] == pytest.approx(one["fit_end"]["width/width"], rel=1e-12)
    assert two["records"][0]["world_size"] == 2 and two["records"][0]["num_samples"] == 300
