"""Step time of each sharpness-aware method relative to plain SGD, in one process.

Every method trains the same model on the same in-memory batches through a Lightning ``Trainer``
(so loop overheads are included on both sides); the time of a step is measured from
``on_train_batch_start`` to ``on_train_batch_end`` (wall clock with a device synchronisation on GPU;
on CPU by default the process's CPU time with one thread, so that other jobs on a shared machine do
not count), the first
``--warmup`` steps are dropped, methods are interleaved over ``--repeats`` rounds, and the median step
time of each method is divided by that of plain SGD (``MarginClassifier`` with automatic optimization).

    python bench/bench_sam.py                      # CPU, small CNN on 8x8 inputs
    python bench/bench_sam.py --device cuda --backbone resnet18 --input-shape 3 32 32 --batch-size 128
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from models import CurvaturePenaltyClassifier, MarginClassifier, SAMClassifier

METHODS = {
    "sgd": (MarginClassifier, {}),
    "sam": (SAMClassifier, {"rho": 0.05}),
    "asam": (SAMClassifier, {"rho": 0.5, "adaptive": True}),
    "rsam": (SAMClassifier, {"rho": 0.05, "riemannian": True}),
    "gradnorm_fd": (CurvaturePenaltyClassifier, {"grad_norm_weight": 0.01, "grad_norm_form": "finite_difference"}),
    "gradnorm_exact": (CurvaturePenaltyClassifier, {"grad_norm_weight": 0.01, "grad_norm_form": "exact"}),
    "trace": (CurvaturePenaltyClassifier, {"trace_weight": 1e-4, "trace_probes": 1}),
}


class StepTimer(Callback):
    """Per-step time: wall clock, or this process's CPU time (robust to other processes' load)."""

    def __init__(self, device: torch.device, clock: str) -> None:
        self.device, self.times, self._t0 = device, [], 0.0
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._t0 = self.now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times.append(self.now() - self._t0)


def run(method: str, args, batches, device: torch.device) -> list[float]:
    cls, opts = METHODS[method]
    torch.manual_seed(0)
    model = cls(num_classes=args.num_classes, input_shape=tuple(args.input_shape), backbone=args.backbone,
                backbone_kwargs={"width": args.width}, head_seed=0,
                optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4), **opts)
    timer = StepTimer(device, args.clock)
    trainer = L.Trainer(max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator=device.type, devices=1, callbacks=[timer], precision=args.precision)
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return timer.times[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--input-shape", type=int, nargs="+", default=[1, 8, 8])
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="auto: CPU time of this process on CPU (a shared machine's load does not count), "
                             "wall clock on GPU")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" else "wall"
    methods = ["sgd"] + [m for m in args.methods if m != "sgd"]
    g = torch.Generator().manual_seed(0)
    n_batches = args.warmup + args.steps
    batches = [{"x": torch.randn(args.batch_size, *args.input_shape, generator=g).to(device),
                "y": torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device),
                "idx": torch.arange(args.batch_size, device=device),
                "gap": torch.rand(args.batch_size, generator=g).to(device)} for _ in range(n_batches)]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}); torch {torch.__version__}, lightning {L.__version__}, "
          f"threads {torch.get_num_threads()}, precision {args.precision}, clock {args.clock}")
    print(f"model: {args.backbone} width {args.width}, input {tuple(args.input_shape)}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} interleaved repeats")
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            times[m] += run(m, args, batches, device)
    base = statistics.median(times["sgd"])
    print(f"{'method':<16}{'median ms/step':>16}{'ratio to sgd':>14}")
    for m in methods:
        med = statistics.median(times[m])
        print(f"{m:<16}{1e3 * med:>16.2f}{med / base:>14.2f}")


if __name__ == "__main__":
    main()
