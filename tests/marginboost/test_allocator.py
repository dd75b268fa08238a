"""glibc malloc tuning: freed blocks are reused (no new page faults), the switches, the CLI's error."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from marginboost import ConfigError
from marginboost.allocator import ENV_VAR, malloc_tuning_skip_reason

ROOT = Path(__file__).resolve().parents[2]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Minor page faults of each of five evaluation passes of a small conv net over 1,000 images
# (activations of 25 MiB). By default glibc hands such blocks back to the system when they are
# freed, so every pass faults its pages in again.
FAULTS = """
import json, resource, torch
from marginboost import tune_malloc
tuned = tune_malloc()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                          torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
x = torch.randn(1000, 1, 28, 28)
faults = []
with torch.inference_mode():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _faults(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", FAULTS], env=environ, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_tuned_process_reuses_freed_blocks_and_default_does_not():
    pages = (25 << 20) // 4096  # one activation
    default = _faults(**{ENV_VAR: "0"})
    assert default["tuned"] is False
    assert all(f >= pages for f in default["faults"][1:]), default  # every pass faults pages in again
    tuned = _faults(**{ENV_VAR: "1"})
    assert tuned["tuned"] is True
    assert sum(tuned["faults"][1:]) < 0.05 * pages, tuned  # later passes reuse the heap's pages


def test_skip_reasons():
    if GLIBC:
        assert malloc_tuning_skip_reason({}) is None
        assert malloc_tuning_skip_reason({ENV_VAR: "1"}) is None
    assert malloc_tuning_skip_reason({ENV_VAR: "0"}) == f"{ENV_VAR}=0"
    if GLIBC:
        assert "another allocator" in malloc_tuning_skip_reason({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
        assert malloc_tuning_skip_reason({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"


def test_bad_switch_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match=rf"^{ENV_VAR}: 'yes'; allowed: 0 .* or 1"):
        malloc_tuning_skip_reason({ENV_VAR: "yes"})


def test_cli_reports_a_bad_switch_in_one_line(monkeypatch, capsys):
    from lightning_app import main

    monkeypatch.setenv(ENV_VAR, "on")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "digits_boost.yaml"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {ENV_VAR}: 'on'; allowed: 0")
