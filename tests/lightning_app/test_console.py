"""The console: known noise dropped (and back with --verbose), the run's ETA, the 80-column round
table, the compact model summary, --help and the program name."""
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import summarize
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from rich.console import Console
from torch import nn
from torchmetrics import MeanMetric

from datamodules import Toy2DDataModule
from lightning_app import packaged_configs
from lightning_app.cli import build_cli
from lightning_app.cli_help import CONFIG_DIR, config_purpose, program_name
from lightning_app.console import (
    ROWS,
    RoundDisplay,
    RunClock,
    quiet_console,
    round_table,
    summary_table,
)
from models import MarginClassifier
from tests.helpers import tiny_boosting_run

REPO = Path(__file__).resolve().parents[2]
NOISE = [r"Tip: For seamless", r"litlogger", r"litmodels", r"GPU available", r"TPU available",
         r"args parameter is intended", r"LeafSpec", r"weights_only", r"v_num: \d+\.\d", r"Total FLOPs",
         r"MeanMetric", r"MulticlassAccuracy", r"boost…", r"disag…"]


# -- a real history ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """``summary.json``'s history of a real 3-round run (tiny MLP on Toy2D, 1 epoch a member)."""
    run_dir = tmp_path_factory.mktemp("console_run")
    tiny_boosting_run(run_dir, rounds=3, seed=0)
    return json.loads((run_dir / "summary.json").read_text())["history"]


def _expected_cells(record):
    """Every numeric metric of a record, found without the console's code: ``{label: text}``."""
    labels = {key: (label, fmt) for key, label, fmt in ROWS}
    out = {}
    for key, value in record.items():
        member = re.fullmatch(r"member_(acc|nll|ece|brier)_(\d+)", key)
        if key in ("round", "seed") or (member and int(member.group(2)) != record["round"]):
            continue
        if member:
            key = f"member_{member.group(1)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            label, fmt = labels.get(key, (key, ".4g"))
            out[label] = format(value, fmt)
        elif isinstance(value, dict) and key == "sharpness":
            out.update({k: format(v, ".4g") for k, v in value.items()})
        elif isinstance(value, dict):
            label, fmt = labels[f"{key}.mean"]
            out[label] = format(value["mean"], fmt)
    return out


def _render(renderable, width=80):
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_round_table_fits_80_columns_with_every_metric(history):
    record = dict(history[-1])
    record["overhead"] = 0.3125  # a numeric field added to the record later gets its row
    text = _render(round_table([*history[:-1], record], rounds=3))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "…" not in text
    rows = {line.split("  ")[0].strip(): line.split() for line in lines if "  " in line}
    expected = _expected_cells(record)
    assert len(expected) >= 19  # 12 acc/nll/ece/brier, disagreement, 3 means, 2 timings, overhead
    for label, cell in expected.items():
        assert label in rows, f"{label!r} has no row:\n{text}"
        assert rows[label][-1] == cell, (label, rows[label], cell)
    # one column per round, round 1's member accuracy in its own column
    assert rows["member acc"][-3] == format(history[0]["member_acc_1"], ".4f")


def test_round_table_keeps_latest_rounds_when_they_do_not_fit(history):
    long = [dict(history[0], round=t, **{f"member_acc_{t}": history[0]["member_acc_1"]}) for t in range(1, 21)]
    text = _render(round_table(long, rounds=20))
    assert max(len(line) for line in text.splitlines()) <= 80
    shown = next(line for line in text.splitlines() if line.startswith("round")).split()[1:]
    assert shown == [str(t) for t in range(21 - len(shown), 21)] and 5 <= len(shown) < 20
    assert "all in summary.json" in text


def test_round_display_prints_rule_with_eta_and_table(history):
    ticks = iter([0.0, 10.0, 10.0, 10.0, 10.0, 10.0])
    console = Console(width=80, file=io.StringIO(), color_system=None)
    display = RoundDisplay(3, console=console, clock=RunClock(3, now=lambda: next(ticks)))
    display.start(1, seed=11)
    display.end(history[:1])  # round 1 took 10 s: 2 rounds left
    display.start(2, seed=12)
    text = console.file.getvalue()
    assert "boosting round 1/3 · seed 11" in text and "run ETA" not in text.splitlines()[0]
    assert "boosting round 2/3 · seed 12 · run ETA 0:00:20" in text
    assert "ensemble after 1/3 rounds" in text


# -- the run's clock ---------------------------------------------------------------------------

def test_run_clock_eta_is_time_per_round_times_rounds_left():
    now = [0.0]
    clock = RunClock(rounds=5, now=lambda: now[0])
    assert clock.eta() is None  # nothing measured yet
    clock.begin_round(3)  # rounds 1-2 were done by an earlier process: not timed here
    clock.resumed_at(0.5)  # and round 3 resumes half-way
    now[0] = 20.0
    clock.progress(0.75)  # a quarter of a round in 20 s: 80 s a round
    assert clock.eta() == pytest.approx(80.0 * (0.25 + 2))
    clock.progress(1.0)
    clock.end_round()
    clock.begin_round(4)
    now[0] = 60.0  # 60 s for 0.5 round (scoring included)
    assert clock.eta() == pytest.approx(120.0 * 2)


# -- noise filters ------------------------------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_quiet_console_drops_only_the_known_noise_and_verbose_restores_it():
    handler = _Collect()
    root = logging.getLogger("lightning.pytorch")
    root.addHandler(handler)
    messages = ["GPU available: False, used: False", "TPU available: False, using: 0 TPU cores",
                "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
                "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
                "`Trainer.fit` stopped: `max_epochs=1` reached.", "GPU available but not used."]
    try:
        quiet_console(verbose=False)
        for m in messages:
            rank_zero_info(m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet_console(verbose=False)  # installs its warning filter inside this context
            warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                                   "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
            warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning,
                                   "mine.py", 1, module="my_package")  # same text, someone else's: kept
            warnings.warn_explicit("Precision bf16-mixed is not supported by the model summary.  Estimated ...",
                                   UserWarning, "model_summary.py", 242,
                                   module="lightning.pytorch.utilities.model_summary.model_summary")
        logging.getLogger("lightning.pytorch.accelerators.cuda").info("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]")
        fabric = logging.getLogger("lightning.fabric")
        fabric.addHandler(handler)
        try:  # seen on an H100, once per member's Trainer
            logging.getLogger("lightning.fabric.utilities.rank_zero").warning(
                "You are using a CUDA device ('NVIDIA H100 80GB HBM3') that has Tensor Cores. To properly ...")
        finally:
            fabric.removeHandler(handler)
        assert handler.lines == messages[4:]
        assert [str(w.message) for w in caught] == ["`isinstance(treespec, LeafSpec)` is deprecated"]
        handler.lines.clear()
        quiet_console(verbose=True)
        for m in messages:
            rank_zero_info(m)
        assert handler.lines == messages
    finally:
        root.removeHandler(handler)
        quiet_console(verbose=False)


def test_compact_summary_lists_layers_not_metrics():
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 4})
    model.val_by_lambda = nn.ModuleList([MeanMetric(), MeanMetric()])  # as HyperNetClassifier keeps them
    text = _render(summary_table(summarize(model, max_depth=1)))
    assert "backbone" in text and "head" in text and "Sequential" in text
    for noise in ("Metric", "Accuracy", "FLOPs", "train_loss", "val_by_lambda"):
        assert noise not in text, text
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0  # the margin head's W
    count = lambda n: get_human_readable_count(n).strip()  # noqa: E731
    assert f"trainable {count(trainable)} · non-trainable {count(frozen)}" in text, text


# -- --help and the program name ----------------------------------------------------------------

def test_help_names_the_project_and_every_packaged_config(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--help"], prog="lightning")
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning ") and "marginboost" in out
    assert "Lightning Trainer command line tool" not in out
    flat = " ".join(out.split())
    for name in packaged_configs():
        purpose = config_purpose(CONFIG_DIR / name)
        assert purpose, f"{name} has no '# purpose' first line"
        assert f"{name} {' '.join(purpose.split())}" in flat, name
    assert "--verbose" in out


def test_program_name_of_every_entry_point():
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^(\w+) = "([\w.:]+)"', section, re.M))
    assert scripts == {"lightning": "lightning_app.cli:main", "marginboost": "lightning_app.cli:main"}
    for script in scripts:
        assert program_name(f"/venv/bin/{script}", main_module="") == script
    assert program_name("/x/lightning_app/__main__.py", "lightning_app.__main__") == "python -m lightning_app"
    assert program_name("/x/lightning_app/cli.py", "lightning_app.cli") == "python -m lightning_app.cli"


def test_python_m_lightning_app_help_names_itself(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lightning_app", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m lightning_app "), proc.stdout[:200]
    assert "__main__.py" not in proc.stdout + proc.stderr


# -- the console of a real run ------------------------------------------------------------------

def _fit(tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_app", "fit", "--config", "digits_boost.yaml", "--boosting.rounds=2",
           "--trainer.max_epochs=1", f"--boosting.run_dir={tmp_path / 'run'}", *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_boosting_console_is_quiet_and_fits_80_columns(tmp_path):
    out = _fit(tmp_path)
    for pattern in NOISE:
        assert not re.search(pattern, out), f"{pattern!r} in:\n{out}"
    too_wide = [line for line in out.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    assert out.count("Sequential") == 1  # the model summary, first round only
    assert re.search(r"v_num: 0\b", out)
    assert re.search(r"round 2/2 .* \d:\d\d:\d\d • \d:\d\d:\d\d", out)  # the run's progress line
    assert "ensemble after 2/2 rounds" in out and "boosted ece" in out
    (tmp_path / "verbose").mkdir()
    verbose = _fit(tmp_path / "verbose", "--verbose")
    assert verbose.count("Total params") == 2 and "GPU available" in verbose  # every round, in full


@pytest.mark.parametrize("leave", [False, True])
def test_progress_bar_advances_the_run_clock(tmp_path, leave):
    from lightning_app.console import MarginBoostProgressBar

    bar, clock = MarginBoostProgressBar(leave=leave), RunClock(rounds=4)
    display = RoundDisplay(4, console=Console(file=io.StringIO()), clock=clock)
    display.start(2, seed=0)  # round 2 of 4: the bar's run line starts at 1 round done
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[bar],
                        default_root_dir=str(tmp_path))
    display.attach(trainer)
    seen = []
    trainer.callbacks.append(L.Callback())
    trainer.callbacks[-1].on_train_batch_end = lambda *a: seen.append(clock.completed)
    trainer.fit(MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 4}),
                datamodule=Toy2DDataModule(num_train=32, num_val=8, batch_size=8))
    assert seen == pytest.approx([1 + k / 8 for k in range(1, 9)])  # 2 epochs × 4 batches
    run_line = [task for task in bar.progress.tasks if task.description == "round 2/4"]
    assert len(run_line) == 1 and run_line[0].completed == pytest.approx(2.0)  # 2 of 4 rounds


def test_progress_bar_redraws_ten_times_a_second_unless_configured(tmp_path):
    from lightning_app.console import MarginBoostProgressBar

    assert MarginBoostProgressBar(refresh_rate=3).refresh_rate == 3
    bar = MarginBoostProgressBar()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[bar],
                        default_root_dir=str(tmp_path))
    trainer.fit(MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp", backbone_kwargs={"width": 4}),
                datamodule=Toy2DDataModule(num_train=16, num_val=8, batch_size=8))
    # Lightning's default redraws 100 times a second from a thread that holds the GIL
    assert bar.refresh_rate == 10 and bar.progress.live.refresh_per_second == 10
