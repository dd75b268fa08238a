r"""The decision boundary of a 2-D classifier with its margin level sets, with and without gaps.

For a model ``f: R² → R^K`` and class ``y`` the margin field is
:math:`m_y(x) = f_y(x) - \max_{j \ne y} f_j(x)`; the decision boundary is where the predicted
class changes (:math:`m_y = 0` for the two classes that meet there), and the level set
:math:`m_y = c` is where an object of class ``y`` has margin ``c``.

The discounted loss subtracts an object's gap :math:`g_i` from its true logit, so it treats
object ``i`` as classified only once :math:`m_{y_i}(x_i) > g_i`: each class sees its own
boundary pushed into its region, :math:`m_y(x) = g_y(x)`. Gaps belong to training objects, not to
points of the plane; :math:`g_y(x)` is the mean gap of the ``k`` training objects of class ``y``
nearest to ``x`` (a piecewise-smooth field that equals the objects' own gaps where they sit).

:func:`decision_boundary_figure` draws both pictures side by side on the same axes:

* **without gaps**: predicted regions, the boundary, the level sets :math:`m_y = c` for ``levels``;
* **with gaps**: predicted regions, the boundary, each class's discounted boundary
  :math:`m_y(x) = g_y(x)`, the training objects coloured by their gap, and the share of objects
  beyond their own level set (:math:`m_i \ge g_i`, Theorem 1's condition).

Object-oriented matplotlib only (``matplotlib.figure.Figure`` and the Agg canvas): no ``pyplot``
state, no backend switch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models import margins

# Panel geometry in figure coordinates: both panels have the same size, so their pixels compare.
PANELS = ((0.06, 0.12, 0.38, 0.76), (0.52, 0.12, 0.38, 0.76))
COLORBAR = (0.915, 0.12, 0.015, 0.76)
CLASS_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")


def class_margin_fields(logits: Tensor) -> Tensor:
    r"""``[K, ...]`` margin of every class at every point: :math:`m_y = f_y - \max_{j\ne y} f_j`.

    Args:
        logits: ``[N, K]`` scores of ``N`` points.

    Example:
        >>> class_margin_fields(torch.tensor([[2.0, 0.5, 1.0]]))
        tensor([[ 1.0000],
                [-1.5000],
                [-1.0000]])
    """
    n, k = logits.shape
    return torch.stack([margins(logits, torch.full((n,), y, dtype=torch.long)) for y in range(k)])


def gap_fields(points: Tensor, x: Tensor, y: Tensor, gaps: Tensor, num_classes: int, k: int = 8) -> Tensor:
    """``[K, P]``: for each class, the mean gap of its ``k`` training objects nearest to each point.

    Args:
        points: ``[P, 2]`` where to evaluate; ``x``: ``[N, 2]`` training inputs; ``y``: ``[N]``
        labels; ``gaps``: ``[N]`` their gaps; ``k``: neighbours (fewer if a class has fewer).
        A class without training objects gets gap 0.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0]]); y = torch.tensor([0, 1])
        >>> gap_fields(torch.tensor([[0.1, 0.0]]), x, y, torch.tensor([0.5, 2.0]), 2, k=1)
        tensor([[0.5000],
                [2.0000]])
    """
    out = torch.zeros(num_classes, len(points), dtype=torch.float32)
    for c in range(num_classes):
        mine = y == c
        if not mine.any():
            continue
        dist = torch.cdist(points.float(), x[mine].float())
        nearest = dist.topk(min(k, int(mine.sum())), dim=1, largest=False).indices
        out[c] = gaps[mine].float()[nearest].mean(1)
    return out


def plane_grid(x: Tensor, resolution: int = 150, pad: float = 0.5) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """A ``resolution × resolution`` grid over the training inputs' bounding box widened by
    ``pad``: the axes stay fixed across epochs and rounds. Returns ``(xs, ys, points [R², 2])``."""
    lo = x.min(0).values.float() - pad
    hi = x.max(0).values.float() + pad
    xs = torch.linspace(float(lo[0]), float(hi[0]), resolution)
    ys = torch.linspace(float(lo[1]), float(hi[1]), resolution)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return xs.numpy(), ys.numpy(), torch.stack([gx.flatten(), gy.flatten()], 1)


@torch.no_grad()
def model_logits(model: nn.Module, points: Tensor, batch_size: int = 8192) -> Tensor:
    """``[P, K]`` float32 logits of ``model`` as it is (mode untouched), in batches, on its device."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.cat([model(points[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(points), batch_size)])


def decision_boundary_figure(logits_fn, x: Tensor, y: Tensor, gaps: Tensor, num_classes: int,
                             levels: Sequence[float] = (0.5, 1.0, 2.0), resolution: int = 150,
                             title: str = "", gap_max: float | None = None):
    """The two panels (without gaps | with gaps) as a ``matplotlib.figure.Figure``.

    Args:
        logits_fn: ``points [P, 2] -> logits [P, K]`` (e.g. ``lambda p: model_logits(model, p)``).
        x: ``[N, 2]`` training inputs; y: ``[N]`` labels; gaps: ``[N]`` the gaps they train with.
        num_classes: ``K``.
        levels: the margins ``c > 0`` whose level sets :math:`m_y = c` the left panel draws.
        resolution: grid points per axis.
        title: the figure's title (e.g. the round and epoch).
        gap_max: top of the gap colour scale (default: the largest gap, at least 1).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    xs, ys, points = plane_grid(x, resolution)
    grid_logits = logits_fn(points)
    shape = (len(ys), len(xs))
    fields = class_margin_fields(grid_logits).reshape(num_classes, *shape).numpy()
    predicted = grid_logits.argmax(1).reshape(shape).numpy()
    discounted = fields - gap_fields(points, x, y, gaps, num_classes).reshape(num_classes, *shape).numpy()
    train_margins = margins(logits_fn(x), y)
    beyond = float((train_margins >= gaps.float()).float().mean())

    colors = CLASS_COLORS[:num_classes] if num_classes <= len(CLASS_COLORS) else None
    regions = ListedColormap(colors) if colors else "tab20"
    extent = (xs[0], xs[-1], ys[0], ys[-1])
    point_colors = [CLASS_COLORS[int(c) % len(CLASS_COLORS)] for c in y]
    fig = Figure(figsize=(10, 4.4), dpi=80)
    if title:
        fig.suptitle(title)
    panels = [fig.add_axes(rect) for rect in PANELS]
    for ax in panels:
        ax.imshow(predicted, origin="lower", extent=extent, cmap=regions, vmin=-0.5, vmax=num_classes - 0.5,
                  alpha=0.18, aspect="auto", interpolation="nearest")
        for c in range(num_classes):  # the boundary: each class's zero margin
            ax.contour(xs, ys, fields[c], levels=[0.0], colors="black", linewidths=1.6)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xlabel("x₁")
    left, right = panels
    left.set_ylabel("x₂")
    for c in range(num_classes):
        left.contour(xs, ys, fields[c], levels=sorted(levels), colors=CLASS_COLORS[c % len(CLASS_COLORS)],
                     linewidths=0.9, linestyles="dashed")
    left.scatter(x[:, 0], x[:, 1], c=point_colors, s=7, linewidths=0)
    left.set_title(f"without gaps: boundary and level sets m = {', '.join(f'{v:g}' for v in sorted(levels))}",
                   fontsize=10)
    for c in range(num_classes):
        if (discounted[c] > 0).any() and (discounted[c] < 0).any():
            right.contour(xs, ys, discounted[c], levels=[0.0], colors=CLASS_COLORS[c % len(CLASS_COLORS)],
                          linewidths=1.4)
    top = gap_max if gap_max is not None else max(float(gaps.max()) if len(gaps) else 0.0, 1.0)
    dots = right.scatter(x[:, 0], x[:, 1], c=gaps.numpy(), cmap="viridis", vmin=0.0, vmax=top, s=9,
                         linewidths=0)
    right.set_title(f"with gaps: m_y(x) = g_y(x); mean gap {float(gaps.mean()):.2f}, "
                    f"{100 * beyond:.0f}% with m ≥ g", fontsize=10)
    fig.colorbar(dots, cax=fig.add_axes(COLORBAR), label="gap")
    return fig


def figure_to_rgb(fig) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a figure, drawn by the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def panel_pixels(image: np.ndarray, panel: int) -> np.ndarray:
    """The pixels inside panel ``panel`` (0: without gaps, 1: with gaps) of a rendered figure."""
    h, w = image.shape[:2]
    x0, y0, pw, ph = PANELS[panel]
    rows = slice(int(round((1 - y0 - ph) * h)) + 1, int(round((1 - y0) * h)) - 1)
    cols = slice(int(round(x0 * w)) + 1, int(round((x0 + pw) * w)) - 1)
    return image[rows, cols]
