"""DecisionBoundary: the margin fields and gap fields against hand computations, where the lines
are drawn, the model left as found, the image in the events of a toy_boost.yaml run."""
import io
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import DecisionBoundary
from callbacks.functional.decision_boundary import (
    PANELS,
    class_margin_fields,
    decision_boundary_figure,
    figure_to_rgb,
    gap_fields,
    panel_pixels,
    plane_grid,
)
from datamodules import DigitsDataModule, Toy2DDataModule
from marginboost.errors import ConfigError
from models import MarginClassifier

REPO = Path(__file__).resolve().parents[2]
RED, BLUE, BLACK = "red", "blue", "black"  # class 1 and class 0 lines (#d62728, #1f77b4), the boundary


def test_class_margin_fields_match_the_definition():
    logits = torch.randn(50, 4, dtype=torch.float64)
    fields = class_margin_fields(logits)
    for y in range(4):
        others = torch.cat([logits[:, :y], logits[:, y + 1:]], 1).max(1).values
        torch.testing.assert_close(fields[y], logits[:, y] - others)
    two = torch.randn(9, 2)
    torch.testing.assert_close(class_margin_fields(two)[1], two[:, 1] - two[:, 0])  # K = 2: ±(f₁ − f₀)
    torch.testing.assert_close(class_margin_fields(two)[0], -(two[:, 1] - two[:, 0]))


def test_gap_fields_are_means_of_the_nearest_objects_of_each_class():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 2, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    gaps, points = torch.rand(40, generator=gen), torch.randn(15, 2, generator=gen)
    got = gap_fields(points, x, y, gaps, num_classes=4, k=3)
    for c in range(3):
        xc, gc = x[y == c].numpy(), gaps[y == c].numpy()
        for p, point in enumerate(points.numpy()):
            nearest = np.argsort(((xc - point) ** 2).sum(1))[:3]
            assert got[c, p].item() == pytest.approx(gc[nearest].mean(), abs=1e-6)
    assert torch.equal(got[3], torch.zeros(15))  # no objects of class 3: no gap


def _near(image, color):
    """Pixels of a line of ``color``, antialiased lines included; the tinted backgrounds are not."""
    r, g, b = (image[..., i].astype(int) for i in range(3))
    if color == RED:
        return (r - g > 100) & (r - b > 100)
    if color == BLUE:
        return (b - r > 80) & (g - r > 40)
    return (r + g + b) < 200


def _column_share(panel, extent, x1, color):
    """Share of the panel's rows with a pixel of ``color`` within 2 pixels of data abscissa ``x1``."""
    col = int(round((x1 - extent[0]) / (extent[1] - extent[0]) * (panel.shape[1] - 1)))
    return _near(panel[:, col - 2:col + 3], color).any(1).mean()


def test_lines_are_where_the_margins_and_gaps_put_them():
    # logits (0, x₁): m₁ = x₁, m₀ = −x₁. Boundary x₁ = 0; class-1 level set m₁ = 0.5 at x₁ = 0.5;
    # with gap 1 for every object the discounted boundaries are m₁ = 1 (x₁ = 1) and m₀ = 1 (x₁ = −1).
    x2 = torch.linspace(-2, 2, 9)
    x = torch.cat([torch.stack([torch.full_like(x2, -2.0), x2], 1), torch.stack([torch.full_like(x2, 2.0), x2], 1)])
    y = torch.tensor([0] * 9 + [1] * 9)

    def logits_fn(p):
        return torch.stack([torch.zeros(len(p)), p[:, 0]], 1)

    def draw(gaps):
        fig = decision_boundary_figure(logits_fn, x, y, gaps, 2, levels=(0.5,), resolution=200)
        image = figure_to_rgb(fig)
        return panel_pixels(image, 0), panel_pixels(image, 1)

    extent = (-2.5, 2.5)
    left0, right0 = draw(torch.zeros(18))
    left1, right1 = draw(torch.ones(18))
    assert np.array_equal(left0, left1)  # the picture without gaps does not depend on them
    assert not np.array_equal(right0, right1)  # the picture with gaps does
    assert _column_share(left1, extent, 0.5, RED) > 0.5  # dashed level set m₁ = 0.5
    assert _column_share(left1, extent, 1.0, RED) < 0.05
    assert _column_share(right1, extent, 1.0, RED) > 0.9  # discounted boundary of class 1
    assert _column_share(right1, extent, -1.0, BLUE) > 0.9  # and of class 0
    assert _column_share(right1, extent, 0.5, RED) < 0.05
    for panel in (left1, right1):
        assert _column_share(panel, extent, 0.0, BLACK) > 0.9  # the boundary x₁ = 0


def test_panels_have_the_same_size():
    assert PANELS[0][2:] == PANELS[1][2:]
    xs, ys, points = plane_grid(torch.tensor([[0.0, 0.0], [1.0, 2.0]]), resolution=5, pad=0.5)
    assert (xs[0], xs[-1], ys[0], ys[-1]) == (-0.5, 1.5, -0.5, 2.5) and points.shape == (25, 2)


def _trainer(tmp_path, cb, max_epochs=1):
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb],
                     logger=TensorBoardLogger(str(tmp_path), name="tb"), default_root_dir=str(tmp_path))


def test_callback_leaves_the_model_as_found_and_logs_the_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dm = Toy2DDataModule(num_train=64, num_val=16, batch_size=16)
    model = MarginClassifier(num_classes=2, input_shape=(2,), backbone="mlp",
                             backbone_kwargs={"width": 8, "dropout": 0.3})
    cb = DecisionBoundary(every_n_epochs=1, at_fit_end=False, resolution=40)
    trainer = _trainer(tmp_path, cb)
    trainer.fit(model, datamodule=dm)
    dm.set_gaps(torch.rand(64) * 2)
    # A model mid-training: train mode, gradients, a module in eval mode, an RNG position.
    model.train()
    model.head.eval()
    batch = next(iter(dm.train_dataloader()))
    model.loss_and_logits(batch)[0].backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    cb.log_figure(trainer, model)
    assert torch.equal(torch.rand(3), expected_draw)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN statistics and num_batches_tracked included
    for name, p in model.named_parameters():
        assert (p.grad is None) == (grads[name] is None) and (p.grad is None or torch.equal(p.grad, grads[name]))
    assert {n: m.training for n, m in model.named_modules()} == modes
    trainer.loggers[0].experiment.flush()
    events = EventAccumulator(trainer.loggers[0].log_dir, size_guidance={"images": 0}).Reload()
    steps = [event.step for event in events.Images("boundary/margins")]
    assert steps == [trainer.global_step, trainer.global_step]  # epoch end, then ours


def test_callback_refuses_data_that_is_not_2d(tmp_path):
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp", backbone_kwargs={"width": 8})
    with pytest.raises(ConfigError, match="DecisionBoundary: data with input_shape \\(1, 8, 8\\)"):
        _trainer(tmp_path, DecisionBoundary()).fit(model, datamodule=DigitsDataModule())
    with pytest.raises(ConfigError, match="every_n_epochs"):
        DecisionBoundary(every_n_epochs=0)


@pytest.mark.parametrize("overrides, message", [
    (["--model.init_args.backbone_kwargs={}"],
     "error: model.backbone: 'resnet18'; allowed: a backbone for inputs of shape (2,): mlp or relu_mlp "
     "(this one needs images [C, H, W])"),
    ([], "error: model.backbone_kwargs: {'width': 64, 'depth': 2}; allowed: arguments of backbone 'resnet18': "
         "['width'] (not ['depth'])"),
])
def test_toy_config_with_an_image_backbone_fails_in_one_line(tmp_path, capsys, overrides, message):
    from lightning_app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "toy_boost.yaml", "--model.init_args.backbone=resnet18", *overrides,
              f"--boosting.run_dir={tmp_path}/run"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


@pytest.mark.slow
def test_toy_boost_config_logs_the_boundary_with_and_without_gaps(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_app", "fit", "--config", "toy_boost.yaml", "--boosting.rounds=2",
           "--trainer.max_epochs=10", f"--boosting.run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pictures = {}
    for t in (1, 2):
        events = EventAccumulator(str(tmp_path / "run" / f"round_{t}" / "version_0"),
                                  size_guidance={"images": 0}).Reload()
        images = events.Images("boundary/margins")
        assert [i.step for i in images] == [images[-1].step]  # every 10 epochs = the fit's end: once
        pictures[t] = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    without, with_gaps = panel_pixels(pictures[2], 0), panel_pixels(pictures[2], 1)
    assert without.shape == with_gaps.shape
    # Round 2 trains with gaps: the discounted boundaries sit away from the boundary.
    assert (np.abs(without.astype(int) - with_gaps.astype(int)).sum(-1) > 60).mean() > 0.01
