"""The figures of a boosting run, drawn the same way for TensorBoard (every round) and for the report.

Four figures, each a pure function of the run's data returning a ``matplotlib.figure.Figure``
(object-oriented API only: no ``pyplot`` state, no ``matplotlib.use``, so a notebook's backend is
left alone):

* :func:`margin_cdf_figure` — the cumulative distribution of the normalised ensemble training
  margins ``margin(Σ_s f_s) / t``, one curve per round so far (Schapire et al.'s margin plots);
* :func:`gap_cdf_figure` — the cumulative distribution of the gaps fed to the next member, per round;
* :func:`reliability_figure` — accuracy against confidence on the validation split, boosted
  (softmax of summed logits) vs deep ensemble (mean softmax);
* :func:`rounds_figure` — boosted, deep and member accuracy and NLL against rounds.

**Fixed axes.** Scrubbing through rounds in TensorBoard only compares something if every round's
image has the same axes. :class:`FigureLimits` is computed once, from round 1, and stored with the
run (``ensemble/figure_limits.json``):

* normalised margins: round 1's range (its 0.1% and 99.9% quantiles, and 0) padded by a tenth of
  its span. The normalised ensemble margin of round t is a margin of the *mean* member logit, so
  later rounds stay on round 1's scale;
* gaps: the gap rule's ``[g_min, g_max]`` where both are set, else round 1's padded range;
* accuracy: from ``1 − 3·(1 − worst round-1 accuracy)`` to 1; NLL: from 0 to 3× the worst
  round-1 NLL; rounds: ``1..T`` with T the configured rounds.

Values a later round puts outside the view are not hidden silently: the margin and gap figures
state the share of objects outside.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

FIGURE_NAMES = ("margin_cdf", "gap_cdf", "reliability", "accuracy_nll")


def nice_range(lo: float, hi: float, pad: float = 0.25) -> tuple[float, float]:
    """``[lo, hi]`` widened by ``pad`` of its span on each side and rounded outward to a 1-2-5 step.

    >>> nice_range(-0.3, 1.7)
    (-1.0, 2.5)
    """
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        span = max(abs(lo), abs(hi), 1.0)
    lo, hi = lo - pad * span, hi + pad * span
    raw = (hi - lo) / 8  # about eight ticks
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return float(round(math.floor(lo / step) * step, 10)), float(round(math.ceil(hi / step) * step, 10))


@dataclass(frozen=True)
class FigureLimits:
    """Axis limits shared by every round's figures (see the module docstring for the choice)."""

    margin: tuple[float, float] | None  # None: the run scores no training margins
    gap: tuple[float, float]
    accuracy: tuple[float, float]
    nll: tuple[float, float]
    rounds: int

    @classmethod
    def from_round_one(cls, normalised_margins: Tensor | None, gaps: Tensor, record: Mapping[str, Any], rounds: int,
                       gap_bounds: tuple[float | None, float | None] = (None, None)) -> FigureLimits:
        """Limits from round 1's data: its normalised ensemble margins, gaps and summary record."""
        margin = None
        if normalised_margins is not None:
            # the 0.1% and 99.9% quantiles, not min and max: one badly fit object would squash the view
            q = torch.tensor([0.001, 0.999], dtype=torch.float64)
            lo, hi = torch.quantile(normalised_margins.double(), q).tolist()
            margin = nice_range(min(lo, 0.0), max(hi, 0.0), pad=0.1)
        g_min, g_max = gap_bounds
        if g_min is not None and g_max is not None and g_max > g_min:
            # a little room beyond the bounds, so the jumps of clipped gaps stay visible
            gap = (float(g_min - 0.05 * (g_max - g_min)), float(g_max + 0.05 * (g_max - g_min)))
        else:
            gap = nice_range(gaps.double().min().item(), gaps.double().max().item())
        worst_acc = min(record["boosted_acc"], record["deep_acc"], record["member_acc_1"])
        acc_lo = max(0.0, math.floor((1 - 3 * (1 - worst_acc)) * 20) / 20)
        worst_nll = max(record["boosted_nll"], record["deep_nll"], record["member_nll_1"])
        nll_hi = nice_range(0.0, 3 * worst_nll, pad=0.0)[1]
        return cls(margin=margin, gap=gap, accuracy=(acc_lo, 1.0), nll=(0.0, nll_hi), rounds=int(rounds))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FigureLimits:
        return cls(margin=None if data["margin"] is None else tuple(data["margin"]), gap=tuple(data["gap"]), accuracy=tuple(data["accuracy"]),
                   nll=tuple(data["nll"]), rounds=int(data["rounds"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> FigureLimits:
        return cls.from_json(json.loads(Path(path).read_text()))


def _round_color(t: int, rounds: int):
    from matplotlib import colormaps

    return colormaps["viridis"](0.9 * (t - 1) / max(rounds - 1, 1))


def _ecdf(values: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the share of objects ``<=`` each: the empirical CDF as a step curve."""
    x = np.sort(values.detach().double().cpu().numpy())
    return x, np.arange(1, len(x) + 1) / len(x)


def _outside(values: Tensor, lim: tuple[float, float]) -> float:
    v = values.detach().double()
    return ((v < lim[0]) | (v > lim[1])).double().mean().item()


def _cdf_figure(curves: Sequence[tuple[int, Tensor]], xlim: tuple[float, float], rounds: int, xlabel: str,
                title: str, zero_line: bool) -> Figure:
    fig = Figure(figsize=(6.4, 4.0))
    # A fixed layout (not "constrained"): the plot area stays put from round to round, and the
    # layout solver would cost a third of the drawing time, every round.
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.85)
    ax = fig.add_subplot()
    rounds = max(rounds, max((t for t, _ in curves), default=1))
    for t, values in curves:
        x, y = _ecdf(values)
        # from the left edge at 0 to the right edge at 1: a clipped curve still reads as a CDF
        x = np.concatenate([[min(xlim[0], x[0])], x, [max(xlim[1], x[-1])]])
        y = np.concatenate([[0.0], y, [1.0]])
        ax.step(x, y, where="post", color=_round_color(t, rounds), lw=1.6 if t == curves[-1][0] else 1.0,
                label=f"t = {t}")
    if zero_line:
        ax.axvline(0.0, color="0.5", lw=0.8)
    ax.set_xlim(*xlim)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cumulative share of training objects")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", title="rounds")
    note = ""
    if curves:
        share = _outside(curves[-1][1], xlim)
        if share > 0:
            note = f"\n{100 * share:.1f}% of round {curves[-1][0]}'s values lie outside the fixed axis"
    ax.set_title(title + note, fontsize="medium")
    return fig


def margin_cdf_figure(curves: Sequence[tuple[int, Tensor]], limits: FigureLimits) -> Figure:
    """Cumulative distribution of the normalised ensemble training margins, one curve per round.

    Args:
        curves: ``(t, margin(Σ_{s≤t} f_s) / t)`` per round, each ``[N]`` over the training set.
        limits: the run's fixed axes.
    """
    return _cdf_figure(curves, limits.margin, limits.rounds, "ensemble training margin / rounds",
                       "boosted ensemble: normalised training margins", zero_line=True)


def gap_cdf_figure(curves: Sequence[tuple[int, Tensor]], limits: FigureLimits) -> Figure:
    """Cumulative distribution of the gaps the rule gives after each round (fed to member t + 1).

    Args:
        curves: ``(t, gaps after round t)`` per round, each ``[N]``.
        limits: the run's fixed axes.
    """
    return _cdf_figure(curves, limits.gap, limits.rounds, "gap g_i after round t (fed to member t+1)",
                       "gap distribution per round", zero_line=False)


def reliability_bins(probs: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    r"""Confidence bins of a classifier: the data of a reliability diagram.

    Objects are binned by confidence :math:`c_i = \max_k p_{ik}` into ``n_bins`` equal-width bins
    ``[b/B, (b+1)/B)`` plus one bin for :math:`c_i = 1` exactly (torchmetrics' ECE bins). Per bin:
    the number of objects, the mean confidence and the accuracy; so that
    :math:`\mathrm{ECE} = \sum_b \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Args:
        probs: ``[N, K]`` predicted probabilities.
        y: ``[N]`` labels.

    Returns:
        ``count``, ``confidence``, ``accuracy``: ``[n_bins + 1]`` each (NaN in empty bins), ``ece``: scalar.

    Example:
        >>> out = reliability_bins(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]), n_bins=2)
        >>> out["count"].tolist(), round(out["ece"].item(), 3)
        ([0.0, 2.0, 0.0], 0.25)
    """
    probs = probs.detach().double()
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, boundaries, right=True) - 1
    count = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, index, correct)
    confidence, accuracy = conf_sum / count, acc_sum / count  # NaN where a bin is empty
    ece = (count / count.sum() * (accuracy - confidence).abs()).nansum()
    return {"count": count, "confidence": confidence, "accuracy": accuracy, "ece": ece}


def ensemble_probabilities(member_logits: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(boosted, deep)`` probabilities ``[N, K]``: softmax of the summed logits, mean of the softmaxes."""
    stacked = torch.stack([m.double() for m in member_logits])
    return stacked.sum(0).softmax(-1), stacked.softmax(-1).mean(0)


def reliability_figure(member_logits: Sequence[Tensor], y: Tensor, n_bins: int = 15) -> Figure:
    """Reliability diagram of the boosted and the deep ensemble of ``member_logits`` (validation).

    Args:
        member_logits: ``t`` tensors ``[N, K]``, the members' validation logits.
        y: ``[N]`` validation labels.
    """
    boosted, deep = ensemble_probabilities(member_logits)
    fig = Figure(figsize=(5.2, 4.8))
    fig.subplots_adjust(left=0.13, right=0.96, bottom=0.11, top=0.92)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--", label="perfect calibration")
    for name, probs, color in (("boosted", boosted, "C0"), ("deep", deep, "C1")):
        bins = reliability_bins(probs, y, n_bins)
        keep = bins["count"] > 0
        sizes = 10 + 190 * bins["count"][keep] / bins["count"].sum()
        ax.plot(bins["confidence"][keep], bins["accuracy"][keep], color=color, lw=1.2)
        ax.scatter(bins["confidence"][keep], bins["accuracy"][keep], s=sizes, color=color, alpha=0.8,
                   label=f"{name} (ECE {bins['ece'].item():.3f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (max probability), validation split")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"reliability after {len(member_logits)} round(s); marker area ∝ objects", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def rounds_figure(history: Sequence[Mapping[str, Any]], limits: FigureLimits) -> Figure:
    """Boosted, deep and member accuracy (left) and NLL (right) on the validation split against rounds.

    Args:
        history: the run's round records (``summary.json``'s ``history``), rounds ``1..t``.
        limits: the run's fixed axes.
    """
    fig = Figure(figsize=(8.0, 3.6))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.25)
    rounds = [rec["round"] for rec in history]
    last = max(limits.rounds, max(rounds, default=1))
    for i, (metric, label, ylim) in enumerate((("acc", "accuracy", limits.accuracy), ("nll", "NLL", limits.nll))):
        ax = fig.add_subplot(1, 2, i + 1)
        series = (("boosted", [rec[f"boosted_{metric}"] for rec in history], "C0", "o-"),
                  ("deep", [rec[f"deep_{metric}"] for rec in history], "C1", "s-"),
                  ("member t", [rec[f"member_{metric}_{rec['round']}"] for rec in history], "C2", "^:"))
        for name, values, color, style in series:
            ax.plot(rounds, values, style, color=color, label=name, ms=4)
        ax.set_xlim(0.5, last + 0.5)
        ax.set_ylim(*ylim)
        ax.set_xticks(range(1, last + 1))
        ax.set_xlabel("round t")
        ax.set_ylabel(f"validation {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right" if metric == "acc" else "upper left")
    fig.suptitle("ensembles of the first t members vs member t alone", fontsize="medium")
    return fig


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The figure rendered by Agg as ``[H, W, 3]`` uint8 RGB (for TensorBoard images), without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG (Agg, without pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return Path(path)


@dataclass
class RunFigureData:
    """What the figures of rounds ``1..t`` read: per-round margins and gaps, history, validation logits."""

    normalised_margins: dict[int, Tensor]
    gaps: dict[int, Tensor]
    history: list[dict[str, Any]]
    val_logits: list[Tensor]
    val_y: Tensor | None


def round_figures(data: RunFigureData, t: int, limits: FigureLimits) -> dict[str, Figure]:
    """The four figures as they stand after round ``t`` (``{name: Figure}``, names in ``FIGURE_NAMES``).

    The reliability diagram needs the validation labels; a run saved before they were kept has
    none and gets the other three figures. A run that scores no training margins (a deep ensemble,
    ``boosting.training_margins``) has no margin figure.
    """
    upto = [s for s in range(1, t + 1)]
    figures = {}
    if limits.margin is not None and any(s in data.normalised_margins for s in upto):
        figures["margin_cdf"] = margin_cdf_figure([(s, data.normalised_margins[s]) for s in upto
                                                   if s in data.normalised_margins], limits)
    figures["gap_cdf"] = gap_cdf_figure([(s, data.gaps[s]) for s in upto if s in data.gaps], limits)
    if data.val_y is not None:
        figures["reliability"] = reliability_figure(data.val_logits[:t], data.val_y)
    figures["accuracy_nll"] = rounds_figure(data.history[:t], limits)
    return figures
