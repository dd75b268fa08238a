"""What the ``lightning`` command prints: a quiet console, a run-wide progress line, the round table.

By default (:func:`quiet_console`) the console drops a fixed list of known Lightning and PyTorch
messages that repeat every boosting round and say nothing about the run (cloud-service tips,
GPU/TPU availability, a pytree deprecation); each is matched by its logger and message, nothing
else is silenced. ``--verbose`` keeps them and Lightning's full model summary in every round.

* :class:`MarginBoostProgressBar`: Lightning's Rich bar with integer version numbers and, in a
  boosting run, a second line ``round t/T ━━━━ elapsed • remaining`` over the whole run.
* :class:`CompactModelSummary`: the model summary once per process, without metric objects
  (they hold no parameters) and without FLOPs when none were counted.
* :class:`RoundDisplay`: a rule per round (with the run's ETA) and, after each round, the table of
  every metric of ``summary.json``'s history, laid out to fit 80 columns (:func:`round_table`).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

# -- the quiet console ------------------------------------------------------------------------

VERBOSE_FLAG = "--verbose"

# (logger, message pattern) of Lightning's per-Trainer info lines that a quiet run drops.
NOISE_LOG_LINES: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud"),  # litlogger / litmodels ads
    ("lightning.pytorch.utilities.rank_zero", r"(GPU|TPU|HPU) available: "),
    ("lightning.pytorch.accelerators.cuda", r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"),
    # once per member's Trainer; the packaged GPU configs train in bf16-mixed, where it does not apply
    ("lightning.fabric.utilities.rank_zero", r"You are using a CUDA device .* that has Tensor Cores"),
)
# (message pattern, module pattern) of warnings a quiet run drops: raised inside Lightning, not
# actionable for a user of this project.
NOISE_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # the summary sizes parameters in fp32 under a mixed precision (seen on a GPU, every round)
    (r"Precision .* is not supported by the model summary", r"lightning\.pytorch\.utilities\.model_summary"),
)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches one of ``patterns`` (``re.match``)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def quiet_console(verbose: bool = False) -> None:
    """Drop the known noise of :data:`NOISE_LOG_LINES` and :data:`NOISE_WARNINGS` (idempotent).

    ``verbose=True`` removes the filters again: everything Lightning prints is printed.
    """
    while _installed:
        logger, filt = _installed.pop()
        logger.removeFilter(filt)
    warnings.filters[:] = [f for f in warnings.filters if getattr(f[1], "pattern", "") not in _warning_patterns()]
    if verbose:
        return
    by_logger: dict[str, list[str]] = {}
    for name, pattern in NOISE_LOG_LINES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger, filt = logging.getLogger(name), _DropMessages(patterns)
        logger.addFilter(filt)
        _installed.append((logger, filt))
    for message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


def _warning_patterns() -> set[str]:
    return {message for message, _ in NOISE_WARNINGS}


# -- progress over the whole run ------------------------------------------------------------------

class RunClock:
    """Elapsed time and ETA of a boosting run, from the work this process has done so far.

    Work is counted in rounds: a finished round is 1, the round in training its fraction of
    training batches (a round resumed mid-way counts from where it resumed). With ``S`` seconds
    spent on ``W`` rounds' worth of work and ``R`` rounds' worth left, the ETA is ``S / W · R``;
    scoring and logging between rounds are inside ``S``, so they are part of the estimate.

    Example:
        >>> now = iter([0.0, 30.0]).__next__
        >>> clock = RunClock(rounds=4, now=now)
        >>> clock.begin_round(1)              # t = 0 s
        >>> clock.progress(0.5)
        >>> clock.eta()                       # 30 s for half a round, 3.5 rounds left
        210.0
    """

    def __init__(self, rounds: int, now: Callable[[], float] = time.monotonic) -> None:
        self.rounds, self._now = rounds, now
        self.t = 0
        self._start: float | None = None
        self._done = 0.0  # rounds' worth of work finished in this process
        self._from = self._fraction = 0.0

    def begin_round(self, t: int, fraction: float = 0.0) -> None:
        if self._start is None:
            self._start = self._now()
        self.t, self._from, self._fraction = t, fraction, fraction

    def resumed_at(self, fraction: float) -> None:
        """The round in training starts at ``fraction`` (a mid-round resume): that part is not ours."""
        self._from = self._fraction = fraction

    def progress(self, fraction: float) -> None:
        self._fraction = min(max(fraction, self._from), 1.0)

    def end_round(self) -> None:
        self._done += 1.0 - self._from
        self._from = self._fraction = 1.0

    @property
    def completed(self) -> float:
        """Rounds done, the current one's fraction included (``t − 1 + fraction``)."""
        return max(self.t - 1, 0) + self._fraction

    def elapsed(self) -> float:
        return 0.0 if self._start is None else self._now() - self._start

    def eta(self) -> float | None:
        """Seconds left for the run, or ``None`` before any work was measured."""
        work = self._done + self._fraction - self._from
        if work <= 0:
            return None
        left = (self.rounds - self.t) + (1.0 - self._fraction)
        return self.elapsed() / work * left


def format_seconds(seconds: float | None) -> str:
    """``H:MM:SS`` (``-:--:--`` for an unknown time), as in Lightning's Rich bar."""
    return "-:--:--" if seconds is None else str(timedelta(seconds=int(seconds)))


def fit_fraction(trainer: L.Trainer, batch_idx: int | None = None) -> float:
    """Fraction of the member's training done: epochs and batches when ``max_epochs`` bounds the
    fit, else optimizer steps of ``max_steps``."""
    batches = trainer.num_training_batches
    if trainer.max_epochs not in (None, -1) and batches not in (0, float("inf")):
        done = trainer.current_epoch * batches + (0 if batch_idx is None else batch_idx + 1)
        return min(done / (trainer.max_epochs * batches), 1.0)
    if trainer.max_steps and trainer.max_steps > 0:
        return min(trainer.global_step / trainer.max_steps, 1.0)
    return 0.0


REFRESH_PER_SECOND = 10


class MarginBoostProgressBar(RichProgressBar):
    """Lightning's Rich bar, with integer version numbers and the run's progress.

    ``v_num`` is shown as the logger's version (``v_num: 3``, not ``3.000``). When a
    :class:`RoundDisplay` attaches a :class:`RunClock` (a boosting run), a second line
    ``round t/T  ━━━━  elapsed • remaining`` shows the whole run under the member's own bar
    (the remaining time from :meth:`RunClock.eta`).

    ``refresh_rate`` (redraws per second) defaults to 10 rather than Lightning's 100: the bar is
    redrawn by a thread that holds the GIL while it renders, 1.3 ms a redraw on a terminal
    (``docs/performance.md``), so at 100 a second the training thread waited for about an eighth
    of the time; 10 redraws a second look the same.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not args:
            kwargs.setdefault("refresh_rate", REFRESH_PER_SECOND)
        super().__init__(*args, **kwargs)
        self.run_clock: RunClock | None = None
        self._run_task: Any = None
        self._run_progress: Any = None  # the Progress the task lives in (leave=True makes a new one per epoch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items and not isinstance(items["v_num"], str):
            items["v_num"] = str(items["v_num"])  # the bar formats every number with .3f
        return items

    def configure_columns(self, trainer: L.Trainer) -> list:
        return [_RunAwareColumn(column, self) for column in super().configure_columns(trainer)]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._run_task = None
        if self.run_clock is not None:
            self.run_clock.resumed_at(fit_fraction(trainer))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Added after the member's own task, so the run's line sits under it.
        if self.run_clock is not None and self.progress is not None and self.is_enabled and (
                self._run_task is None or self._run_progress is not self.progress):
            clock = self.run_clock
            self._run_progress = self.progress
            self._run_task = self.progress.add_task(f"round {clock.t}/{clock.rounds}", total=float(clock.rounds),
                                                    completed=clock.completed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._run_task is not None and self._run_progress is self.progress:
            self.run_clock.progress(fit_fraction(trainer, batch_idx))
            self.progress.update(self._run_task, completed=self.run_clock.completed)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def is_run_task(self, task) -> bool:
        return self._run_task is not None and self._run_progress is self.progress and task.id == self._run_task


class _RunAwareColumn:
    """One of the bar's columns; for the run task it shows rounds and the run's ETA instead."""

    def __init__(self, column, bar: MarginBoostProgressBar) -> None:
        self.column, self.bar = column, bar

    def __getattr__(self, name: str):  # Rich reads max_refresh, _renderable_cache, ...
        return getattr(self.column, name)

    def __call__(self, task):
        if not self.bar.is_run_task(task):
            return self.column(task)
        from rich.text import Text

        clock, kind = self.bar.run_clock, type(self.column).__name__
        if kind == "CustomTimeColumn":  # elapsed • remaining, as in the member's line
            return Text(f"{format_seconds(clock.elapsed())} • {format_seconds(clock.eta())}",
                        style=self.column.style)
        if kind in ("BatchesProcessedColumn", "ProcessingSpeedColumn"):  # the rounds are in the description
            return Text("")
        return self.column(task)


# -- model summary ------------------------------------------------------------------------------

@dataclass
class SummaryOnce:
    """Shared by the trainers of one process: the model summary is printed by the first fit only."""

    shown: bool = False


class CompactModelSummary(ModelSummary):
    """The model summary without metric objects (no parameters) and without a FLOPs column when no
    FLOPs were counted (no ``example_input_array``); printed once per :class:`SummaryOnce`.

    Example output::

        Name      Type        Params  Mode
        backbone  Sequential  23.4 K  train
        head      MarginHead     640  train
        trainable 23.4 K · non-trainable 640 · total 24.0 K (0.096 MB)
    """

    def __init__(self, max_depth: int = 1, once: SummaryOnce | None = None) -> None:
        super().__init__(max_depth=max_depth)
        self.once = once

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._max_depth or (self.once is not None and self.once.shown):
            return
        if self.once is not None:
            self.once.shown = True
        if trainer.is_global_zero:
            from rich import get_console

            get_console().print(summary_table(self._summary(trainer, pl_module)))


def summary_table(summary) -> Any:
    """A Rich renderable of a Lightning ``ModelSummary`` minus metric objects and empty FLOPs."""
    from lightning.pytorch.utilities.model_summary.model_summary import (
        get_formatted_model_size,
        get_human_readable_count,
    )
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    from torchmetrics import Metric

    def count(n) -> str:
        return get_human_readable_count(int(n)).strip()

    flops = getattr(summary, "total_flops", 0)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (("Name", "left"), ("Type", "left"), ("Params", "right"), ("Mode", "left")):
        table.add_column(name, justify=justify)
    if flops:
        table.add_column("FLOPs", justify="right")
    counts = summary.flop_counts if flops else {}
    for name, layer in summary._layer_summary.items():
        if _only_metrics(layer._module, Metric):
            continue
        row = [name, layer.layer_type, count(layer.num_parameters),
               "train" if layer.training else "eval"]
        if flops:
            row.append(count(sum(counts.get(name, {}).values())))
        table.add_row(*row)
    total, trainable = summary.total_parameters, summary.trainable_parameters
    line = (f"trainable {count(trainable)} · non-trainable {count(total - trainable)} · total {count(total)} "
            f"({get_formatted_model_size(summary.model_size)} MB)")
    if flops:
        line += f" · {count(flops)} FLOPs"
    return Group(table, Text(line))


def _only_metrics(module, metric_type) -> bool:
    """A torchmetrics object, or a container (``ModuleList``, ``ModuleDict``) of nothing else."""
    if isinstance(module, metric_type):
        return True
    children = list(module.children())
    return bool(children) and not any(True for _ in module.parameters(recurse=False)) and all(
        _only_metrics(child, metric_type) for child in children)


# -- the trainer's console callbacks --------------------------------------------------------------

@dataclass
class ConsoleSettings:
    """What one ``lightning`` process prints: ``verbose`` restores Lightning's own output."""

    verbose: bool = False
    summary: SummaryOnce | None = None

    def __post_init__(self) -> None:
        self.summary = self.summary or SummaryOnce()

    def trainer_callbacks(self, config: dict[str, Any], callbacks: Sequence[Any]) -> list[Any]:
        """``callbacks`` plus the console's defaults for a Trainer built from ``config``: our Rich
        bar unless bars are off or one is configured, and the compact summary unless verbose, the
        summary is off, or a summary callback is configured (then ``config``'s
        ``enable_model_summary`` is set to ``False``: Lightning adds no second summary)."""
        from lightning.pytorch.callbacks import ProgressBar

        configured = list(config.get("callbacks") or []) + list(callbacks)
        out = list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(c, ProgressBar) for c in configured):
            out.append(MarginBoostProgressBar())
        if not self.verbose and config.get("enable_model_summary", True) is not False and not any(
                isinstance(c, ModelSummary) for c in configured):
            out.append(CompactModelSummary(once=self.summary))
            config["enable_model_summary"] = False
        return out


# -- the round display ----------------------------------------------------------------------------

# (key in metric_values, row label, format); keys not listed are shown after these, raw key as label.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("boosted_acc", "boosted acc", ".4f"), ("boosted_nll", "boosted nll", ".4f"),
    ("boosted_ece", "boosted ece", ".4f"), ("boosted_brier", "boosted brier", ".4f"),
    ("deep_acc", "deep acc", ".4f"), ("deep_nll", "deep nll", ".4f"),
    ("deep_ece", "deep ece", ".4f"), ("deep_brier", "deep brier", ".4f"),
    ("member_acc", "member acc", ".4f"), ("member_nll", "member nll", ".4f"),
    ("member_ece", "member ece", ".4f"), ("member_brier", "member brier", ".4f"),
    ("disagreement", "disagreement", ".4f"),
    ("gap.mean", "mean gap", ".3f"),
    ("member_train_margin.mean", "member margin", ".3f"),
    ("ensemble_train_margin.mean", "ens. margin", ".3f"),
    ("fit_seconds", "fit s", ".1f"), ("score_seconds", "score s", ".1f"), ("round_seconds", "round s", ".1f"),
    ("overhead", "overhead", ".3f"),  # (round − fit) / fit
)
# Identifiers, not metrics.
NOT_METRICS = ("round", "seed")
# Distribution summaries of which the table shows the mean (the quantiles are in summary.json).
SUMMARIES = ("gap", "member_train_margin", "ensemble_train_margin")
LEGEND = ("boosted: Σ member logits · deep: mean softmax · member: round t's member alone; "
          "acc/nll/ece/brier on the validation split; margins (mean) on the training set")

_MEMBER_KEY = re.compile(r"member_(acc|nll|ece|brier)_(\d+)$")


def metric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ``summary.json`` history record that the round table shows, by key.

    Every numeric top-level field except ``round`` and ``seed``; ``member_<metric>_<t>`` of the
    record's own round as ``member_<metric>`` (earlier members' values are in their own rounds'
    records); the mean of each distribution summary (``gap.mean``, ...); every ``sharpness`` value
    (``sharpness.<name>``). A numeric field added to the record later is included as it is.
    """
    out: dict[str, float] = {}
    t = record.get("round")
    for key, value in record.items():
        if key in NOT_METRICS:
            continue
        match = _MEMBER_KEY.match(key)
        if match:
            if int(match.group(2)) == t:
                out[f"member_{match.group(1)}"] = float(value)
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, Mapping) and key in SUMMARIES and "mean" in value:
            out[f"{key}.mean"] = float(value["mean"])
        elif isinstance(value, Mapping) and key == "sharpness":
            out.update({f"sharpness.{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
    return out


def _rows_for(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    known = {key for key, _, _ in ROWS}
    present: dict[str, None] = {}
    for record in history:
        present.update(dict.fromkeys(metric_values(record)))
    extra = [(key, key.removeprefix("sharpness."), ".4g") for key in present if key not in known]
    return [row for row in ROWS if row[0] in present] + extra


def round_table(history: Sequence[Mapping[str, Any]], rounds: int, width: int = 80):
    """The table of every metric of the history so far: a row per metric, a column per round.

    The rounds that fit in ``width`` columns are shown, the latest ones (the title says which);
    the legend under the table explains the row names.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = _rows_for(history)
    label_width = max(len(label) for _, label, _ in rows)
    fit = max(1, (width - label_width - 2) // 9)
    shown = list(history)[-fit:]
    first, last = shown[0]["round"], shown[-1]["round"]
    title = f"ensemble after {last}/{rounds} rounds"
    if len(shown) < len(history):
        title += f" (rounds {first}-{last}; all in summary.json)"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                  min_width=min(width, len(title) + 2))
    table.add_column("round", justify="left", no_wrap=True)
    for record in shown:
        table.add_column(str(record["round"]), justify="right", no_wrap=True)
    values = [metric_values(record) for record in shown]
    for key, label, fmt in rows:
        table.add_row(label, *(format(v[key], fmt) if key in v else "" for v in values))
    return Group(table, Text(LEGEND, style="dim"))


class RoundDisplay:
    """Rank zero's console in a boosting run: a rule per round with the run's ETA, the round table
    after each round, and the run's progress task in a :class:`MarginBoostProgressBar`."""

    def __init__(self, rounds: int, console=None, clock: RunClock | None = None) -> None:
        self.rounds = rounds
        self.clock = clock or RunClock(rounds)
        self._console = console

    @property
    def console(self):
        from rich import get_console

        return self._console or get_console()

    @rank_zero_only
    def start(self, t: int, seed: int) -> None:
        eta = self.clock.eta() if self.clock.t else None
        self.clock.begin_round(t)
        text = f"[bold]boosting round {t}/{self.rounds}[/bold] · seed {seed}"
        if eta is not None:
            text += f" · run ETA {format_seconds(eta)}"
        self.console.rule(text)

    @rank_zero_only
    def attach(self, trainer: L.Trainer) -> None:
        """Show the run's progress in the member's bar (when it is a :class:`MarginBoostProgressBar`)."""
        bar = getattr(trainer, "progress_bar_callback", None)
        if isinstance(bar, MarginBoostProgressBar):
            bar.run_clock = self.clock

    @rank_zero_only
    def complete(self, done: int, run_dir: Path) -> None:
        self.console.print(f"boosting: run complete ({done}/{self.rounds} rounds) in {run_dir}; nothing to "
                           "train. Raise boosting.rounds to add members; evaluate with `lightning test` on "
                           "the same config.")

    @rank_zero_only
    def end(self, history: Sequence[Mapping[str, Any]]) -> None:
        self.clock.end_round()
        console = self.console
        console.print(round_table(history, self.rounds, width=console.width))
