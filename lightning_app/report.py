"""``lightning report RUN_DIR`` (or ``python -m lightning_app.report RUN_DIR``): a boosting run on paper.

Writes into ``RUN_DIR/report/`` the figures the run's TensorBoard shows after its last round, as
PNG (``margin_cdf.png``, ``gap_cdf.png``, ``reliability.png``, ``accuracy_nll.png``, the same
functions and the same fixed axes), and ``report.md``: a table of every round's validation
metrics from ``summary.json`` and the figures, for papers and for readers without TensorBoard.
Needs only the run directory (``state.pt``, ``summary.json``, ``round_<t>/margins.pt``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from marginboost.errors import ConfigError

from .ensemble_logging import figure_limits, load_figure_data
from .figures import round_figures, save_png
from .run_dir import STATE_FILE, SUMMARY_FILE, load_state

REPORT_DIR = "report"
REPORT_FILE = "report.md"
# (column header, summary.json key or a function of the record, format)
COLUMNS: tuple[tuple[str, Any, str], ...] = (
    ("round", "round", "d"),
    ("member acc", lambda rec: rec[f"member_acc_{rec['round']}"], ".4f"),
    ("boosted acc", "boosted_acc", ".4f"),
    ("deep acc", "deep_acc", ".4f"),
    ("member NLL", lambda rec: rec[f"member_nll_{rec['round']}"], ".4f"),
    ("boosted NLL", "boosted_nll", ".4f"),
    ("deep NLL", "deep_nll", ".4f"),
    ("boosted ECE", "boosted_ece", ".4f"),
    ("deep ECE", "deep_ece", ".4f"),
    ("boosted Brier", "boosted_brier", ".4f"),
    ("deep Brier", "deep_brier", ".4f"),
    ("disagreement", "disagreement", ".4f"),
    ("mean gap", lambda rec: rec["gap"]["mean"], ".4f"),
    ("fit s", "fit_seconds", ".1f"),
    # the rest of the round (build, save, score, log) over fit; absent in a round cut off before it
    ("non-fit / fit", lambda rec: rec.get("overhead", float("nan")), ".3f"),
)


def summary_table(history: Sequence[Mapping[str, Any]]) -> str:
    """The rounds of ``summary.json`` as a markdown table (one row per round).

    >>> rec = {"round": 1, "member_acc_1": 0.9, "boosted_acc": 0.9, "deep_acc": 0.9, "member_nll_1": 0.3,
    ...        "boosted_nll": 0.3, "deep_nll": 0.3, "boosted_ece": 0.01, "deep_ece": 0.01, "boosted_brier": 0.1,
    ...        "deep_brier": 0.1, "disagreement": 0.0, "gap": {"mean": 1.5}, "fit_seconds": 2.25}
    >>> print(summary_table([rec]).splitlines()[2])
    | 1 | 0.9000 | 0.9000 | 0.9000 | 0.3000 | 0.3000 | 0.3000 | 0.0100 | 0.0100 | 0.1000 | 0.1000 | 0.0000 | 1.5000 | 2.2 | nan |
    """
    lines = ["| " + " | ".join(name for name, _, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    for rec in history:
        cells = [format(key(rec) if callable(key) else rec[key], fmt) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


FIGURE_TEXT = {
    "margin_cdf": "Cumulative distribution of the boosted ensemble's training margins divided by the "
                  "number of rounds, one curve per round: a curve moving right means larger margins.",
    "gap_cdf": "Cumulative distribution of the gaps the rule fed to the next member, per round.",
    "reliability": "Validation accuracy against confidence, boosted (summed logits) vs deep ensemble "
                   "(mean softmax), after the last round; the diagonal is perfect calibration.",
    "accuracy_nll": "Validation accuracy and NLL of the boosted and deep ensembles of the first t "
                    "members and of member t alone.",
}


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/`` (PNGs and ``report.md``); returns the markdown file's path.

    Raises:
        ConfigError: ``run_dir`` holds no boosting run (no ``state.pt``), or none of its rounds is done.
    """
    run_dir = Path(run_dir)
    if not (run_dir / STATE_FILE).is_file():
        raise ConfigError("report RUN_DIR", str(run_dir),
                          f"a boosting run directory holding {STATE_FILE} (the boosting.run_dir of a "
                          "`lightning fit` run)")
    state = load_state(run_dir)
    t = state["rounds_done"]
    if t == 0:
        raise ConfigError("report RUN_DIR", f"{run_dir} (no completed round)", "a run with at least one round")
    summary_path = run_dir / SUMMARY_FILE
    history = json.loads(summary_path.read_text())["history"] if summary_path.is_file() else state["history"]
    rounds = json.loads(summary_path.read_text()).get("rounds", t) if summary_path.is_file() else t
    data = load_figure_data(run_dir, state)
    limits = figure_limits(run_dir, data, rounds, save=False)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    lines = [f"# Boosting run `{run_dir}`", "",
             f"{t} of {rounds} rounds; gap rule `{state['gap_rule']}`; run seed {state['seed']}. "
             "Validation metrics per round (from `summary.json`): `boosted` predicts with the sum of the "
             "members' logits, `deep` with the mean of their softmaxes, `member` is member t alone.", "",
             summary_table(history), ""]
    for name, fig in round_figures(data, t, limits).items():
        save_png(fig, out / f"{name}.png")
        lines += [f"![{name}]({name}.png)", "", FIGURE_TEXT[name], ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path


def main(args: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m lightning_app.report",
        description="Write a boosting run's figures (PNG) and a markdown table of its rounds into RUN_DIR/report/.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the boosting.run_dir of a `lightning fit` run")
    ns = parser.parse_args(sys.argv[1:] if args is None else args)
    try:
        path = write_report(ns.run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report written to {path} (figures next to it)")


if __name__ == "__main__":
    main()
