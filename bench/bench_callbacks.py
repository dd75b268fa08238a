"""Cost of each metric callback relative to training, same model, data and process.

    python bench/bench_callbacks.py                       # CPU, digits, small_cnn width 16
    python bench/bench_callbacks.py --device cuda --width 32 --probes 64

Baselines, timed here: one training epoch (loading, forward, discounted CE, backward, SGD step
over the augmented training loader), hence the mean training step; one inference pass over the ordered
training set (eval mode, no grad). Then each callback's ``measure_now`` (after a warm-up call).
Reported ratios:

* margins / inference pass           (target <= 1.2)
* trace per probe per batch / training step at the same batch size   (target <= 3), against
  the step with its data loading and against the step on pre-loaded batches (the stricter one)
* every callback / training epoch
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning  # noqa: E402
import torch  # noqa: E402
from timing import timed_interleaved  # noqa: E402

from callbacks import GradientNormWidth, HessianEigenvalues, HessianTrace, PerSampleMargins  # noqa: E402
from datamodules import DigitsDataModule  # noqa: E402
from models import MarginClassifier  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--hessian-batches", type=int, default=4, help="seeded batches (of --batch-size) for the Hessian")
    p.add_argument("--eig-iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=a.batch_size, eval_batch_size=a.eval_batch_size)
    dm.setup()
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone=a.backbone,
                             backbone_kwargs={"width": a.width}, head_seed=0).to(device)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01, momentum=0.9)
    train_loader, eval_loader = dm.train_dataloader(), dm.train_eval_dataloader()
    num_steps = len(train_loader)

    def epoch() -> None:
        model.train()
        for raw in train_loader:  # loading included, as the callbacks load their data too
            b = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
            loss, _ = model.loss_and_logits(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    loaded = [{k: v.to(device) for k, v in raw.items()} for raw in train_loader]

    def epoch_compute() -> None:  # the same steps on pre-loaded batches: the stricter baseline
        model.train()
        for b in loaded:
            loss, _ = model.loss_and_logits(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def inference() -> None:
        model.eval()
        with torch.no_grad():
            for b in eval_loader:
                model(b["x"].to(device))
        model.train()

    hb = dict(num_batches=a.hessian_batches, batch_size=a.batch_size, every_n_epochs=None)
    cbs = {
        "margins": PerSampleMargins(save=False),
        "width": GradientNormWidth(),
        "trace": HessianTrace(probes=a.probes, chunk_size=a.chunk_size, **hb),
        "eigenvalues": HessianEigenvalues(k=1, max_iter=a.eig_iters, lanczos_tol=1e-12, **hb),
    }
    fns = {"epoch": epoch, "epoch_compute": epoch_compute, "inference": inference}
    fns.update({name: (lambda cb=cb: cb.measure_now(None, model, datamodule=dm)) for name, cb in cbs.items()})
    times = timed_interleaved(fns, device, a.repeats)
    t_epoch, t_infer = times.pop("epoch"), times.pop("inference")
    t_step, t_step_compute = t_epoch / num_steps, times.pop("epoch_compute") / num_steps
    n_params = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()})"
          f", torch threads {torch.get_num_threads()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}")
    print(f"settings: digits N={dm.num_train}, {a.backbone} width {a.width} ({n_params} trainable params), "
          f"batch {a.batch_size}, eval batch {a.eval_batch_size}, probes {a.probes} (chunk {a.chunk_size}), "
          f"Hessian on {a.hessian_batches} batches of {a.batch_size}, Lanczos {a.eig_iters} iters, "
          f"median of {a.repeats}")
    print(f"baseline: training epoch {t_epoch * 1e3:.1f} ms ({num_steps} steps, "
          f"{t_step * 1e3:.2f} ms/step, {t_step_compute * 1e3:.2f} ms/step without loading); "
          f"inference pass {t_infer * 1e3:.1f} ms")
    print(f"{'callback':<12} {'time ms':>9} {'/ epoch':>8}  notes")
    for name, t in times.items():
        note = ""
        if name == "margins":
            note = f"/ inference pass = {t / t_infer:.2f} (target <= 1.2)"
        elif name == "trace":
            per = t / (a.probes * a.hessian_batches)
            note = (f"per probe per batch = {per * 1e3:.2f} ms = {per / t_step:.2f} training steps, "
                    f"{per / t_step_compute:.2f} without loading (target <= 3)")
        elif name == "eigenvalues":
            per = t / (cbs[name].history[-1].get("iterations", a.eig_iters) * a.hessian_batches)
            note = f"per HVP per batch = {per / t_step:.2f} training steps, {per / t_step_compute:.2f} without loading"
        elif name == "width":
            rec = next(h for h in reversed(cbs[name].history) if h["metric"] == "width/width")
            note = f"{rec['num_batches']} batches of {rec['batch_size']}"
        print(f"{name:<12} {t * 1e3:>9.1f} {t / t_epoch:>8.2f}  {note}")


if __name__ == "__main__":
    main()
