"""Hessian trace and top eigenvalue: marginboost against PyHessian, same model, batch and probes.

    pip install pyhessian            # bench-only, not a dependency of the framework
    python bench/bench_hessian.py                                   # mlp on digits, batch 512
    python bench/bench_hessian.py --backbone resnet20 --width 8 --image 16 --batch 128 --probes 16
    python bench/bench_hessian.py --device cuda --backbone resnet18 --image 32 --batch 512

Both sides measure the Hessian of the plain cross-entropy of one batch with BN in eval mode
(PyHessian's setting), at the same parameters. PyHessian runs ``trace(maxIter=probes, tol=-inf)``
(every probe, no early stop) and ``eigenvalues(maxIter=iters, tol=-1)``; marginboost runs
``hessian_trace`` with the same number of Rademacher probes and ``hessian_top_eigenvalues`` with
the same number of products. Timings are medians over ``--repeats`` interleaved rounds in one
process; the ratio is marginboost / PyHessian (below 1: faster). The trace estimates are printed
with their standard errors (different probes on the two sides: they agree within a few standard
errors); PyHessian's power-iteration eigenvalue is printed beside our Lanczos value.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import timed_interleaved  # noqa: E402

from callbacks import hessian_top_eigenvalues, hessian_trace  # noqa: E402
from models import MarginClassifier  # noqa: E402


def _problem(args, device):
    torch.manual_seed(0)
    if args.backbone == "mlp":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data[: args.batch], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(digits.target[: args.batch])
        shape, kwargs = (1, 8, 8), {"width": args.width or 256}
    else:
        shape = (3, args.image, args.image)
        x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
        kwargs = {"width": args.width} if args.width else {}
    model = MarginClassifier(num_classes=10, input_shape=shape, backbone=args.backbone, backbone_kwargs=kwargs,
                             head_seed=0).to(device).eval()
    # a few SGD steps so the point is not the initialisation
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
    model.eval()
    return model, x.to(device), y.to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="mlp")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--iters", type=int, default=20, help="products for the top eigenvalue")
    p.add_argument("--chunk", type=int, default=8, help="probes per product call (marginboost)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        sys.exit("bench_hessian: PyHessian is not installed (pip install pyhessian); it is a bench-only dependency")
    device = torch.device(args.device)
    model, x, y = _problem(args, device)
    batches = [{"x": x, "y": y}]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device={device} torch={torch.__version__} python={platform.python_version()} threads={args.threads}")
    print(f"model={args.backbone} params={params} batch={args.batch} probes={args.probes} iters={args.iters}")

    results = {}

    def ours_trace():
        results["ours_trace"] = hessian_trace(model, "ce", batches, probes=args.probes, seed=0, per_layer=False,
                                              chunk_size=args.chunk)

    def theirs_trace():
        h = PyHessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda")
        # tol=-inf, not -1: its stopping test divides by the signed running mean, so with a
        # negative mean a tolerance of -1 can end the loop after a few probes
        results["theirs_trace"] = h.trace(maxIter=args.probes, tol=float("-inf"))

    def ours_eig():
        results["ours_eig"] = hessian_top_eigenvalues(model, "ce", batches, k=1, max_iter=args.iters, tol=0.0)

    def theirs_eig():
        h = PyHessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda")
        results["theirs_eig"] = h.eigenvalues(maxIter=args.iters, tol=-1.0, top_n=1)

    t = timed_interleaved({"ours_trace": ours_trace, "theirs_trace": theirs_trace, "ours_eig": ours_eig,
                "theirs_eig": theirs_eig}, device, args.repeats)
    ours, theirs = results["ours_trace"], results["theirs_trace"]
    if len(theirs) != args.probes:
        sys.exit(f"bench_hessian: PyHessian used {len(theirs)} probes, not {args.probes}; the times do not compare")
    theirs_mean = statistics.fmean(theirs)
    theirs_se = statistics.stdev(theirs) / math.sqrt(len(theirs)) if len(theirs) > 1 else float("nan")
    print(f"trace  marginboost {ours.value:.6g} ± {ours.stderr:.2g}   PyHessian {theirs_mean:.6g} ± {theirs_se:.2g}"
          f"   |Δ| / SE = {abs(ours.value - theirs_mean) / math.hypot(ours.stderr, theirs_se):.2f}")
    print(f"trace  time marginboost {t['ours_trace']:.3f} s   PyHessian {t['theirs_trace']:.3f} s   "
          f"ratio {t['ours_trace'] / t['theirs_trace']:.3f}")
    (ev, info), (their_ev, _) = results["ours_eig"], results["theirs_eig"]
    print(f"eig1   marginboost {float(ev[0]):.6g} (Lanczos, {int(info['iterations'])} products, residual "
          f"{info['max_residual']:.2g})   PyHessian {their_ev[0]:.6g} (power iteration, {args.iters} products)")
    print(f"eig1   time marginboost {t['ours_eig']:.3f} s   PyHessian {t['theirs_eig']:.3f} s   "
          f"ratio {t['ours_eig'] / t['theirs_eig']:.3f}")


if __name__ == "__main__":
    main()
