"""`lightning report RUN_DIR`: the figures as PNG and a markdown table equal to summary.json."""

import json

import pytest

from lightning_app.cli import main as cli_main
from lightning_app.figures import FIGURE_NAMES
from lightning_app.report import COLUMNS, write_report
from marginboost.errors import ConfigError
from tests.helpers import tiny_boosting_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    tiny_boosting_run(path, rounds=2, epochs=2, num_train=40, num_val=20, batch_size=64, seed=1)
    return path


def _table(markdown):
    """The rows of the report's table as {header: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_report_writes_pngs_and_a_table_equal_to_summary_json(run_dir, capsys):
    from matplotlib.image import imread

    cli_main(["report", str(run_dir)])  # `lightning report RUN_DIR`
    assert "report written to" in capsys.readouterr().out
    out = run_dir / "report"
    for name in FIGURE_NAMES:
        image = imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0, name
    markdown = (out / "report.md").read_text()
    assert all(f"({name}.png)" in markdown for name in FIGURE_NAMES)
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    rows = _table(markdown)
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert len(rows[0]) == len(COLUMNS)
    for row, rec in zip(rows, history, strict=True):
        t = rec["round"]
        expected = {"member acc": rec[f"member_acc_{t}"], "boosted acc": rec["boosted_acc"],
                    "deep acc": rec["deep_acc"], "boosted NLL": rec["boosted_nll"], "deep NLL": rec["deep_nll"],
                    "boosted ECE": rec["boosted_ece"], "deep ECE": rec["deep_ece"],
                    "disagreement": rec["disagreement"], "mean gap": rec["gap"]["mean"]}
        for header, value in expected.items():
            assert float(row[header]) == pytest.approx(value, abs=5e-5), header


def test_report_uses_the_runs_fixed_axes(run_dir):
    """The report's axes are those TensorBoard used (ensemble/figure_limits.json, from round 1)."""
    from lightning_app.ensemble_logging import figure_limits, load_figure_data
    from lightning_app.figures import FigureLimits, round_figures
    from lightning_app.run_dir import load_state

    stored = FigureLimits.load(run_dir / "ensemble" / "figure_limits.json")
    assert stored.gap == pytest.approx((-0.1, 2.1))  # the rule's [0, 2], 5% room
    state = load_state(run_dir)
    data = load_figure_data(run_dir, state)
    assert figure_limits(run_dir, data, 2, save=False) == stored
    fig = round_figures(data, 2, stored)["margin_cdf"]
    assert tuple(fig.axes[0].get_xlim()) == stored.margin


def test_report_of_a_directory_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="report RUN_DIR: .*; allowed: a boosting run directory holding state.pt"):
        write_report(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: report RUN_DIR:") and len(err.splitlines()) == 1


def test_report_of_a_run_saved_before_ensemble_margins_were_kept(run_dir, tmp_path):
    """Older runs: round 1's curve from member 1's margins (its own ensemble), later rounds' left out."""
    import shutil

    import torch

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "ensemble" / "figure_limits.json").unlink()
    for t in (1, 2):
        path = old / f"round_{t}" / "margins.pt"
        saved = torch.load(path, weights_only=True)
        del saved["ensemble_margins"]
        torch.save(saved, path)
    write_report(old)
    from lightning_app.ensemble_logging import load_figure_data
    from lightning_app.run_dir import load_state

    data = load_figure_data(old, load_state(old))
    assert sorted(data.normalised_margins) == [1]
    fresh = load_figure_data(run_dir, load_state(run_dir))
    assert torch.equal(data.normalised_margins[1], fresh.normalised_margins[1])
